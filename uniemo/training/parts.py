"""What a training stage hands the loop, and what the loop hands the stage's end hook.

:func:`uniemo.training.stages.build_stage` makes a :class:`StageParts`; the loop
(:class:`uniemo.training.trainer.Trainer`) runs it and, after the final checkpoint, calls its ``finish`` with
itself, which the hook sees as a :class:`FinishedTraining`. Apart from both so that neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.data.loader import ShardLoader
    from uniemo.distributed.env import DistEnv
    from uniemo.logging import NullRunLogger
    from uniemo.training.task import Task


@dataclass
class StageParts:
    """Everything stage-specific the loop needs."""

    task: Task
    train_loader: ShardLoader
    val_loader: ShardLoader | None
    """Full validation split, evaluation transforms, every sample once over all ranks; None: no validation."""
    init_from: str | None = None
    """Stage 2: the stage-1 checkpoint folder the understanding model came from."""
    continued_from: str | None = None
    """Stage 2 continuing a stage-2 run (feedback): that run's checkpoint, the source of every trained weight."""
    initial_understanding: dict[str, torch.Tensor] = field(default_factory=dict)
    """Stage 2: fp32 CPU copy of the understanding weights before training (the frozen ones never change)."""
    untrained: dict[str, torch.Tensor] = field(default_factory=dict)
    """The task's entries no checkpoint holds and no weights folder gives back (never trained), saved with the
    run at its start (:func:`uniemo.training.run_weights.save_initial_weights`)."""
    finish: Callable[[FinishedTraining], None] | None = None
    """Called on every rank after the final checkpoint."""
    notes: list[str] = field(default_factory=list)
    """One-line remarks about the run's set-up, logged once at the start (e.g. annotations the data lacks)."""


class FinishedTraining(Protocol):
    """The loop as a stage's end hook sees it (every rank, after the final checkpoint)."""

    cfg: Config
    env: DistEnv
    parts: StageParts
    run_dir: Path
    step: int
    global_batch: int
    samples_seen: int
    device: torch.device
    reduce_device: torch.device
    """Where collectives put their tensors (the device under NCCL, else the CPU)."""
    logger: NullRunLogger

    def final_checkpoint(self) -> Path:
        """The step folder of the final checkpoint."""
        ...
