"""Training: task modules (model + losses), parameter groups, and (later) the loop, engine and checkpoints."""

from __future__ import annotations

from uniemo.training.task import (
    Stage1Task,
    Stage2Task,
    build_param_groups,
    build_stage1_task,
    build_stage2_task,
)

__all__ = ["Stage1Task", "Stage2Task", "build_param_groups", "build_stage1_task", "build_stage2_task"]
