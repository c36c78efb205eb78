"""The driver of ``uniemo train`` (one per job): :func:`prepare_run` checks and sets up the run on the driver, then
:func:`run_training` starts Ray Train's workers (:mod:`uniemo.distributed.ray_trainer`), each running
:func:`uniemo.training.worker.train_worker`, waits, and summarises.

:func:`prepare_run` checks what can be checked before any worker starts, each a one-line :class:`UserError`: batch
arithmetic, the weights folders (exist, fit the model, safetensors), fresh run vs ``--resume`` (a fresh run never
overwrites checkpoints), resume compatibility, the stage-1 weights of stage 2, checkpoint files that would run code
when unpickled, wandb credentials for ``online``, the data's shape (:mod:`uniemo.training.preflight`: empty splits,
a batch per rank), a writable run directory. It resolves the data source once (making the synthetic shards on first
use), prints what the data leaves out of the method (one line), and writes ``<run_dir>/config.yaml``.

Workers write their pid to ``<run_dir>/workers/rank-<r>.pid`` (a test kills one, for real), and every start of a
worker appends where it runs to ``<run_dir>/workers/placement.jsonl`` (:mod:`uniemo.distributed.placement`). When a
node dies mid-run (its raylet is gone), its workers die with it and Ray Train restarts the group from
``checkpoints/latest`` (``distributed.max_failures``); with ``strict_spread`` the new group waits for enough nodes,
so the run continues once the node (or another) is back. A node that is not back within ``distributed.node_timeout_s``
(and no new group started) ends the run with one line naming it, ``checkpoints/latest`` and ``--resume``
(:func:`_lost_node_watch`). Measured on one machine with two ``ray start`` nodes (``tests/test_two_node_ray.py``).

SIGTERM (preemption, ``scontrol requeue``, ``scancel``) asks the workers to checkpoint at the next step and stop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniemo.config import save_resolved
from uniemo.config.paths import absolute_paths
from uniemo.config.schema import Config
from uniemo.console import quiet_console
from uniemo.data.source import data_source
from uniemo.distributed.env import cpu_driver_env
from uniemo.distributed.placement import check_custom_resource
from uniemo.distributed.ray_session import keep_embedded_ray_on_loopback, ray_session
from uniemo.distributed.ray_trainer import LostNodeWatch, fit, torch_trainer
from uniemo.errors import DiskFullError, UserError
from uniemo.logging import check_wandb_credentials, read_metrics, say
from uniemo.models.weights import check_model_folders
from uniemo.run_layout import run_dir_of, stop_request_path
from uniemo.training.checkpoint import (
    CheckpointError,
    check_compatible,
    compat_keys,
    latest_checkpoint,
    read_trainer_state,
    remove_unpublished,
)
from uniemo.training.engine import check_batch_arithmetic
from uniemo.training.preflight import check_training_data
from uniemo.training.run_weights import recorded_init
from uniemo.training.safe_pickle import check_checkpoint_folder
from uniemo.training.stages import resolve_init_from
from uniemo.training.worker import train_worker


@dataclass
class RunPlan:
    """What the driver decided before starting workers."""

    config: Config
    """The run's config with absolute paths (what the workers get and ``config.yaml`` holds)."""
    run_dir: Path
    resume_from: Path | None
    """The checkpoint a ``--resume`` continues from (None: a fresh run)."""
    init_from: Path | None
    """Stage 2: the stage-1 checkpoint the understanding weights come from."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """One-line remarks printed before the workers start (e.g. what data without annotations leaves out)."""


def _check_writable(folder: Path, key: str) -> None:
    """One line naming ``key`` when ``folder`` cannot be created or written (permissions, a file in the path, a
    read-only or full file system), before any work starts."""
    import errno

    probe = folder / f".uniemo-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable folder"
        raise UserError(f"cannot write the run directory {folder} ({reason}); {hint} (set {key})") from None


def prepare_run(cfg: Config, resume: bool = False) -> RunPlan:
    """Driver-side checks and set-up (module docstring)."""

    cfg = absolute_paths(cfg)
    cpu_driver_env(cfg.distributed)
    world = cfg.distributed.num_workers
    check_batch_arithmetic(cfg, world)
    check_model_folders(cfg.model)
    run_dir = run_dir_of(cfg)
    resume = resume or cfg.training.resume == "latest"
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise UserError(f"cannot resume: {run_dir} has no checkpoint yet; run without --resume to start it")
    if not resume and latest is not None:
        raise UserError(
            f"{run_dir} already has checkpoints (latest: {latest.name}); pass --resume to continue that run, "
            "or choose another run.name"
        )
    init_from = None
    if latest is not None:
        state = read_trainer_state(latest)
        check_compatible(state.get("compat", {}), compat_keys(cfg, world), latest)
        check_checkpoint_folder(latest)
        init_from = recorded_init(latest)  # the frozen stage-1 weights of this run, not a newer run's
        if init_from is not None:
            if not init_from.is_dir():
                raise CheckpointError(
                    f"cannot resume {run_dir}: its stage-1 weights {init_from} are gone; restore that folder"
                )
    elif cfg.training.stage == 2:
        init_from = resolve_init_from(cfg, run_dir)
    if init_from is not None:
        check_checkpoint_folder(init_from)
    check_wandb_credentials(cfg)
    data_source(cfg.data, progress=True)
    notes = check_training_data(cfg, world)
    _check_writable(run_dir, "run.output_dir")
    save_resolved(cfg, run_dir)
    for note in notes:
        say(note)
    return RunPlan(config=cfg, run_dir=run_dir, resume_from=latest, init_from=init_from, notes=notes)


@contextmanager
def _stop_on_sigterm(stop_file: Path) -> Iterator[None]:
    """While training, SIGTERM (preemption, ``scontrol requeue``, ``scancel``) asks the workers to checkpoint at
    the next step and stop, instead of killing them mid-step; a second SIGTERM stops at once. Only in the main
    thread (signal handlers cannot be set elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if stop_file.exists():
            raise KeyboardInterrupt  # the second request: stop now
        stop_file.touch()
        say("SIGTERM: checkpointing at the next step, then stopping (resume with --resume)")

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)



def _lost_node_watch(plan: RunPlan) -> LostNodeWatch | None:
    """The watch that ends the run when a node of its trainers stays lost for ``distributed.node_timeout_s``
    (:class:`uniemo.distributed.ray_trainer.LostNodeWatch`); None for 0 (Ray Train's own policy). The error's
    line ends with the checkpoint to resume from, read when it fires."""
    dist = plan.config.distributed
    if dist.node_timeout_s <= 0:
        return None

    def resume_hint() -> str:
        latest = latest_checkpoint(plan.run_dir)
        if latest is None:
            return f"{plan.run_dir} has no checkpoint yet: run the same command again (without --resume) to start over"
        return (f"resume from checkpoints/latest ({latest}) with the same command and --resume once the cluster has "
                f"the nodes for {dist.num_workers} workers (distributed.placement={dist.placement})")

    return LostNodeWatch(plan.run_dir, dist.num_workers, dist.node_timeout_s, resume_hint)


def run_training(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """``uniemo train``: plan, start Ray Train with ``distributed.num_workers`` workers, wait, summarise. Other
    packages' console output goes to ``<run_dir>/uniemo.log`` (:mod:`uniemo.console`)."""
    keep_embedded_ray_on_loopback(cfg.distributed)
    with quiet_console(run_dir_of(cfg)):
        return _run_training(cfg, resume)


def _run_training(cfg: Config, resume: bool) -> dict[str, Any]:
    plan = prepare_run(cfg, resume)
    cfg = plan.config
    dist = cfg.distributed
    trainer = torch_trainer(
        train_worker,
        {
            "config": dataclasses.asdict(cfg),
            "run_dir": str(plan.run_dir),
            "init_from": str(plan.init_from) if plan.init_from else None,
        },
        dist, name="ray-train", storage_path=plan.run_dir, max_failures=dist.max_failures,
    )
    stop_file = stop_request_path(plan.run_dir)
    stop_file.unlink(missing_ok=True)  # a request left by an earlier, killed driver is not for this run
    with ray_session(dist), _stop_on_sigterm(stop_file):
        check_custom_resource(dist.worker_resource, "distributed.worker_resource")
        try:
            fit(trainer, lost_node=_lost_node_watch(plan))
        except DiskFullError:
            remove_unpublished(plan.run_dir)  # a save's partial folder: the ranks have stopped, free its space
            raise
    stopped = stop_file.exists()
    stop_file.unlink(missing_ok=True)
    latest = latest_checkpoint(plan.run_dir)
    records = read_metrics(plan.run_dir)
    last = records[-1] if records else {}
    return {
        "run_dir": str(plan.run_dir),
        "step": int(last.get("step", 0)),
        "loss": last.get("loss"),
        "checkpoint": str(latest) if latest else None,
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
        "init_from": str(plan.init_from) if plan.init_from else None,
        "stopped": stopped,
        "notes": plan.notes,
    }
