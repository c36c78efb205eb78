"""Launching: the environment reader (``env``) and the Ray Train driver (``ray_train``). No training logic."""

from __future__ import annotations

from uniemo.distributed.env import DistEnv, read_env

__all__ = ["DistEnv", "read_env"]
