"""Distributed plumbing, no training logic: the environment reader (``env``), the Ray session (``ray_session``),
Ray Train's trainer (``ray_trainer``) and where workers and actors run (``placement``)."""

from __future__ import annotations

from uniemo.distributed.env import DistEnv, read_env

__all__ = ["DistEnv", "read_env"]
