"""A rank's whole training job, for any launcher (:mod:`uniemo.distributed.env` says which rank this is): join the
process group, build the stage and the DeepSpeed engine, restore or seed, run the loop of
:mod:`uniemo.training.trainer`, finish. Ray Train workers run it through :func:`train_worker` (what the driver,
:mod:`uniemo.training.driver`, hands Ray Train), and so do tests and benchmarks in one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from uniemo.atomic import atomic_write
from uniemo.config.loader import from_dict
from uniemo.config.schema import Config
from uniemo.data.remote import worker_modules
from uniemo.data.workers import start_server
from uniemo.distributed.env import (
    apply_worker_env,
    backend_for,
    device_for,
    ensure_process_group,
    export_torch_env,
    ray_node_record,
    read_env,
)
from uniemo.distributed.placement import record_placement
from uniemo.logging import make_run_logger
from uniemo.run_layout import worker_pid_path
from uniemo.training.engine import build_engine
from uniemo.training.run_weights import save_initial_weights
from uniemo.training.stages import build_stage, describe_init
from uniemo.training.trainer import Trainer, total_steps_for


def run_worker(cfg: Config, run_dir: str | Path, init_from: str | None = None) -> dict[str, Any]:
    """A rank's whole training job: build the stage and the engine, restore or seed, train, finish.

    Resumes from ``<run_dir>/checkpoints/latest`` whenever it exists (the driver refuses to start a fresh run in
    a directory that has one, so a checkpoint found here is this run's: ``--resume``, or a restart after a
    failure).
    """
    apply_worker_env(cfg.distributed)
    if cfg.data.num_workers:  # the loader workers' fork server imports torch while this rank joins and builds
        start_server(worker_modules([str(cfg.data.shards), *(s.path for s in cfg.data.extra_sources)]))
    env = read_env()
    export_torch_env(env)
    device = device_for(env, cfg.distributed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(cfg.distributed)
    created = ensure_process_group(env, backend)
    reduce_device = device if backend == "nccl" else torch.device("cpu")
    run_dir = Path(run_dir)
    logger = None
    try:
        parts = build_stage(cfg, env, Path(init_from) if init_from else None)
        if env.is_main and parts.untrained:
            save_initial_weights(run_dir, parts.untrained)  # once per run; loading it replays no random draws
        total = total_steps_for(cfg, parts.train_loader.batches_per_epoch)
        engine = build_engine(parts.task, cfg, world_size=env.world_size, device=device, total_steps=total)
        trainer = Trainer(cfg, env, run_dir, engine, parts, total, reduce_device)
        start = trainer.restore()
        logger = make_run_logger(cfg, run_dir, env.is_main, resume_step=start)
        where = f"resumed at step {start}" if start else "from step 0"
        logger.info(
            f"stage {cfg.training.stage}: {env.world_size} rank(s), ZeRO-{cfg.distributed.zero_stage}, "
            f"{cfg.training.precision}, global batch {trainer.global_batch}, {total} steps, {where}; "
            f"{describe_init(Path(init_from) if init_from else None) if cfg.training.stage == 2 else ''}".rstrip("; ")
        )
        for note in parts.notes:
            logger.info(note)
        summary = trainer.train(logger)
        if trainer.last_checkpoint is not None:
            summary["checkpoint"] = str(trainer.last_checkpoint)
        logger.close()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # nobody leaves while another rank still writes
        return summary
    finally:
        if logger is not None:
            logger.close()  # idempotent; after a failure it still flushes metrics and wandb
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (picklable by reference: a module-level function)."""

    run_dir = Path(loop_config["run_dir"])
    env = read_env()
    pid_file = worker_pid_path(run_dir, env.rank)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(pid_file, f"{os.getpid()}\n")
    record_placement(run_dir, [ray_node_record(role="trainer", rank=env.rank)])
    cfg = from_dict(Config, loop_config["config"])
    run_worker(cfg, run_dir, init_from=loop_config.get("init_from"))
