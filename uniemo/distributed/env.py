"""Where this process stands in a distributed job: the ONLY reader of the launcher's environment (STYLE 9).

Every other module asks :func:`read_env` for rank, world size and local rank, and never looks at ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``SLURM_*`` or the Ray Train context itself. Sources, first match wins:

1. the Ray Train context (inside a function started by ``TorchTrainer.fit``);
2. torchrun-style variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``);
3. SLURM task variables (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE``,
   ``SLURM_NODEID``);
4. a single process (rank 0 of 1).

:func:`worker_env_vars` is the other direction: the variables a training worker needs, which the Ray driver
sends through ``runtime_env`` (and a worker applies again in case it joined a cluster started by someone else).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from uniemo.config.schema import DistributedConfig

Launcher = Literal["ray", "torchrun", "slurm", "single"]


@dataclass(frozen=True)
class DistEnv:
    """Rank bookkeeping of one process."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    local_rank: int
    """Rank among the processes of this node (the GPU index on GPU nodes)."""
    local_world_size: int
    node_rank: int
    launcher: Launcher
    """Which launcher the values came from."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process with side effects (files shared by the run, logging, progress)."""
        return self.rank == 0


def _ray_train_env() -> DistEnv | None:
    """The Ray Train context when this code runs inside a training function, else None."""
    if "ray" not in sys.modules:  # never import Ray just to find out we are not in it
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
    except (RuntimeError, AttributeError, ValueError):
        return None  # Ray is up, but this is the driver or a non-training actor
    return DistEnv(
        rank=int(rank),
        world_size=int(ctx.get_world_size()),
        local_rank=int(ctx.get_local_rank()),
        local_world_size=int(ctx.get_local_world_size()),
        node_rank=int(ctx.get_node_rank()),
        launcher="ray",
    )


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value.split("(")[0]) if value else default  # SLURM writes e.g. "2(x3)" for tasks per node
    except ValueError:
        return default


def read_env() -> DistEnv:
    """Rank, world size and local rank of this process (see the module docstring for the sources)."""
    ray_env = _ray_train_env()
    if ray_env is not None:
        return ray_env
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = _int_env("WORLD_SIZE", 1)
        return DistEnv(
            rank=_int_env("RANK", 0),
            world_size=world,
            local_rank=_int_env("LOCAL_RANK", 0),
            local_world_size=_int_env("LOCAL_WORLD_SIZE", world),
            node_rank=_int_env("NODE_RANK", _int_env("GROUP_RANK", 0)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        world = _int_env("SLURM_NTASKS", 1)
        return DistEnv(
            rank=_int_env("SLURM_PROCID", 0),
            world_size=world,
            local_rank=_int_env("SLURM_LOCALID", 0),
            local_world_size=_int_env("SLURM_NTASKS_PER_NODE", world),
            node_rank=_int_env("SLURM_NODEID", 0),
            launcher="slurm",
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, launcher="single")


def worker_threads(dist_cfg: DistributedConfig) -> int:
    """torch/OpenMP threads of one worker: its reserved CPUs (at least 1), so ranks do not oversubscribe."""
    return max(1, int(dist_cfg.cpus_per_worker))


LAUNCH_DIR_ENV = "UNIEMO_LAUNCH_DIR"
"""The driver's working directory, in the workers' environment (:func:`worker_env_vars`)."""


def launch_dir() -> Path:
    """The working directory the job was launched from: the driver's in a Ray worker, else this process's."""
    return Path(os.environ.get(LAUNCH_DIR_ENV) or os.getcwd()).resolve()


def ray_node_record(**fields: Any) -> dict[str, Any]:
    """Where this process runs on the Ray cluster it is part of: ``fields`` plus the Ray node id, the node's address
    and custom resources (the labels ``ray start --resources`` gave it), host name, pid and time. What a run's
    placement record holds per trainer and feedback actor (:func:`uniemo.distributed.placement.record_placement`)."""
    import time

    import ray

    from uniemo.config.schema import RAY_BUILTIN_RESOURCES

    node_id = ray.get_runtime_context().get_node_id()
    node: dict[str, Any] = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    labels = sorted(
        name for name in node.get("Resources", {})
        if name not in RAY_BUILTIN_RESOURCES and not name.startswith(("node:", "accelerator_type:"))
    )
    return {
        **fields,
        "node_id": node_id,
        "node_ip": node.get("NodeManagerAddress", ""),
        "node_resources": labels,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
    }


def worker_env_vars(dist_cfg: DistributedConfig) -> dict[str, str]:
    """Environment a training worker needs, for Ray's ``runtime_env``.

    ``OMP_NUM_THREADS`` = the worker's CPUs (2 ranks on 2 cores must not run 2 x 2 threads);
    ``DS_ACCELERATOR=cpu`` on CPU workers (DeepSpeed would otherwise probe for a GPU and warn);
    ``TOKENIZERS_PARALLELISM=false`` (the tokenizer's thread pool would be forked into loader workers);
    ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` (plain ``print`` in Ray Train workers); ``UNIEMO_LAUNCH_DIR`` = the
    driver's working directory (a Ray worker runs elsewhere; files meant to be shipped record paths relative to it).
    """
    env = {
        LAUNCH_DIR_ENV: os.getcwd(),
        "OMP_NUM_THREADS": str(worker_threads(dist_cfg)),
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Train would route print() through its logger and also tee it to the stream: every line twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if dist_cfg.gpus_per_worker <= 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def cpu_driver_env(dist_cfg: DistributedConfig) -> None:
    """In a driver whose workers have no GPU: ``DS_ACCELERATOR=cpu``, as :func:`worker_env_vars` gives the workers
    (a driver that loads models imports DeepSpeed, which would probe for a GPU and warn on the console); a value
    already set wins."""
    if dist_cfg.gpus_per_worker <= 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def apply_worker_env(dist_cfg: DistributedConfig) -> None:
    """Apply :func:`worker_env_vars` in this process (values already set by the launcher win) and the thread
    count to torch. Call before DeepSpeed is imported."""
    for key, value in worker_env_vars(dist_cfg).items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(worker_threads(dist_cfg))


def export_torch_env(env: DistEnv) -> None:
    """Publish the rank as torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)
    for libraries that read them (DeepSpeed asserts ``LOCAL_RANK``); values already set are kept."""
    for key, value in (
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
        ("LOCAL_WORLD_SIZE", env.local_world_size),
    ):
        os.environ.setdefault(key, str(value))


def backend_for(dist_cfg: DistributedConfig) -> str:
    """torch.distributed backend: ``distributed.backend``, or NCCL when workers have GPUs and gloo otherwise."""
    if dist_cfg.backend != "auto":
        return dist_cfg.backend
    return "nccl" if dist_cfg.gpus_per_worker > 0 else "gloo"


def device_for(env: DistEnv, dist_cfg: DistributedConfig) -> torch.device:
    """This worker's device: ``cuda:<local GPU>`` when workers have GPUs, else the CPU."""
    import torch

    if dist_cfg.gpus_per_worker > 0:
        if env.launcher == "ray":
            # Ray sets CUDA_VISIBLE_DEVICES per worker; its own helper maps that to the right index.
            from ray.train.torch import get_device

            return get_device()
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def ensure_process_group(env: DistEnv, backend: str) -> bool:
    """Join the job's process group; Ray Train (and torchrun with an init) make it before us. Returns whether this
    function created it (then it also destroys it)."""
    import torch.distributed as dist  # torch only when a rank starts: this module is read by drivers too

    if dist.is_initialized():
        return False
    if env.world_size == 1 and env.launcher == "single":
        with socket.socket() as s:  # a free port for a one-process group (DeepSpeed needs a group)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    return True
