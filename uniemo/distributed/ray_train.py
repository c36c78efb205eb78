"""The Ray driver of ``uniemo train``: Ray Train's ``TorchTrainer`` with N workers, each a DeepSpeed rank.

:func:`run_training` (the driver, one per job):

1. :func:`prepare_run` checks on the driver what can be checked before any worker starts, each a one-line
   :class:`UserError`: batch arithmetic, the weights folders (exist, fit the model, safetensors), fresh run vs
   ``--resume`` (a fresh run never overwrites checkpoints), resume compatibility, the stage-1 weights of stage 2,
   checkpoint files that would run code when unpickled, wandb credentials for ``online``, the data's shape
   (:mod:`uniemo.training.preflight`: empty splits, a batch per rank), a writable run directory. It makes the
   synthetic shards once, prints what the data leaves out of the method (one line), and writes
   ``<run_dir>/config.yaml``.
2. :func:`ray_session` joins Ray: the caller's when ``ray.init`` already ran in this process (tests share one
   cluster), the cluster at ``distributed.ray_address``, or an embedded local cluster started here with
   ``address="local"`` and an own temp folder (never a stale cluster a ``ray_current_cluster`` file points to),
   without dashboard unless asked (then bound to ``distributed.bind_host``, 127.0.0.1); stopped again at the end
   (only what this driver started). Ray 2.60 itself resolves a loopback node address to the machine's address,
   and its core gRPC servers listen on the node's interfaces; they are protected by Ray's token authentication,
   which is on by default.
3. ``TorchTrainer.fit``: Ray Train makes the process group (gloo on CPU, NCCL on GPU) and runs
   :func:`train_worker` on every worker; worker environment variables travel in ``worker_runtime_env``. With
   ``FailureConfig(max_failures=distributed.max_failures)`` a dead worker makes Ray Train restart the whole
   group, and :func:`uniemo.training.worker.run_worker` resumes from ``checkpoints/latest``. A
   :class:`UserError` raised in a worker (config, data, weights, a non-finite loss) is not retried
   (:class:`UserErrorsAreFinal`): retrying would fail the same way. It reaches the caller as itself, one line,
   without the worker's traceback in the log (:func:`quiet_ray_internals`), and an embedded cluster's logs are
   kept and named in that line.

Workers write their pid to ``<run_dir>/workers/rank-<r>.pid`` (a test kills one, for real), and every start of a
worker appends where it runs (Ray node id, address, the node's custom resources) to
``<run_dir>/workers/placement.jsonl`` (:func:`record_placement`; the feedback pool's actors too).

**Placement on a cluster of several nodes.** ``distributed.placement`` is Ray's placement-group strategy for the
workers (``pack``, ``spread``, ``strict_pack``, ``strict_spread``); ``distributed.worker_resource`` names a custom
resource each worker asks a tiny share of (:data:`RESOURCE_SHARE`), so workers run only on nodes started with it
(``ray start --resources '{"trainers": 1}'``). A resource no node has is a one-line error before training starts
(:func:`check_custom_resource`). When a node dies mid-run (its raylet is gone), its workers die with it and Ray
Train restarts the group from ``checkpoints/latest`` (``distributed.max_failures``); with ``strict_spread`` the new
group waits for enough nodes, so the run continues once the node (or another) is back. Measured on one machine
with two ``ray start`` nodes (``tests/test_two_node_ray.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.atomic import atomic_write
from uniemo.config import save_resolved
from uniemo.config.loader import from_dict
from uniemo.config.schema import Config
from uniemo.data.remote import is_url
from uniemo.data.shards import ensure_synthetic_shards
from uniemo.distributed.env import backend_for, ray_node_record, read_env, worker_env_vars
from uniemo.errors import UserError
from uniemo.logging import read_metrics, say
from uniemo.models.weights import check_model_folders
from uniemo.run_layout import PLACEMENT_FILE, WORKERS_DIR, stop_request_path
from uniemo.training.checkpoint import (
    CheckpointError,
    check_compatible,
    compat_keys,
    latest_checkpoint,
    read_trainer_state,
)
from uniemo.training.engine import check_batch_arithmetic
from uniemo.training.preflight import check_training_data
from uniemo.training.safe_pickle import check_checkpoint_folder
from uniemo.training.stages import resolve_init_from
from uniemo.training.worker import run_worker

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config, DistributedConfig



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


def _absolute(path: str) -> str:
    if not path or is_url(path):  # a URL source (data.shards, extra sources) is the same from every worker
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose file and folder paths are absolute (relative ones are read from this process's
    working directory). Workers run elsewhere: Ray Train changes their working directory, and on a cluster they
    run on other machines (which then need the same paths, e.g. a shared file system)."""
    cfg = copy.deepcopy(cfg)
    cfg.run.output_dir = _absolute(cfg.run.output_dir)
    cfg.data.shards = _absolute(cfg.data.shards)
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir)
    for source in cfg.data.extra_sources:
        source.path = _absolute(source.path)
    cfg.model.understanding.clip_path = _absolute(cfg.model.understanding.clip_path)
    cfg.model.conditioner.attribute_clip_path = _absolute(cfg.model.conditioner.attribute_clip_path)
    cfg.model.generator.path = _absolute(cfg.model.generator.path)
    cfg.training.init_from = _absolute(cfg.training.init_from)
    return cfg


def run_dir_of(cfg: Config) -> Path:
    """``<run.output_dir>/<run.name>``, absolute (workers may start in another folder)."""
    return (Path(cfg.run.output_dir).expanduser() / cfg.run.name).resolve()


def _check_wandb(cfg: Config) -> None:
    if cfg.logging.wandb.mode != "online":
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise UserError(
        "logging.wandb.mode=online needs wandb credentials (WANDB_API_KEY or `wandb login`); "
        "use logging.wandb.mode=offline (sync later with `wandb sync`) or disabled"
    )


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
    """Driver-side checks and set-up (module docstring, step 1)."""

    cfg = absolute_paths(cfg)
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
        if state.get("init_from"):
            init_from = Path(state["init_from"])  # the frozen stage-1 weights of this run, not a newer run's
            if not init_from.is_dir():
                raise CheckpointError(
                    f"cannot resume {run_dir}: its stage-1 weights {init_from} are gone; restore that folder"
                )
    elif cfg.training.stage == 2:
        init_from = resolve_init_from(cfg, run_dir)
    if init_from is not None:
        check_checkpoint_folder(init_from)
    _check_wandb(cfg)
    ensure_synthetic_shards(cfg.data, progress=True)
    notes = check_training_data(cfg, world)
    _check_writable(run_dir, "run.output_dir")
    save_resolved(cfg, run_dir)
    for note in notes:
        say(note)
    return RunPlan(config=cfg, run_dir=run_dir, resume_from=latest, init_from=init_from, notes=notes)


# -- Ray ------------------------------------------------------------------------------------------------------

# Ray Train's PlacementGroupCleaner polls Ray's state API, which a minimal Ray (ray[train], no dashboard) does
# not serve: it logs a warning every few seconds for the whole run, or its thread dies with a traceback when
# another Ray instance runs on the machine. It only acts when the controller dies ungracefully, and our
# embedded cluster is shut down as a whole anyway.
_QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
_QUIET_THREADS = ("PlacementGroupCleanerMonitor",)


# Ray Train logs the traceback of any exception a worker's function raises, before the driver sees it.
_WORKER_ERROR_LOGGERS = ("ray.train.v2._internal.util",)


def _not_a_user_error(record: object) -> bool:
    """Logging filter: drop a record logged while a :class:`UserError` is being handled (the driver prints it as
    its one line; its traceback is noise)."""
    return not isinstance(sys.exc_info()[1], UserError)


def quiet_ray_internals() -> None:
    """Ray ``worker_process_setup_hook``: silence Ray-internal noise (see ``_QUIET_LOGGERS``) and the tracebacks
    of user errors (``_WORKER_ERROR_LOGGERS``)."""
    import logging
    import threading

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in _WORKER_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_user_error not in logger.filters:
            logger.addFilter(_not_a_user_error)
    previous = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name in _QUIET_THREADS:
            return
        previous(args)

    threading.excepthook = excepthook


def job_runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init`` of a uniemo job (also for a caller that starts Ray itself)."""
    return {"worker_process_setup_hook": f"{__name__}.quiet_ray_internals"}



def _keep_embedded_ray_on_loopback(dist_cfg: DistributedConfig) -> None:
    """Ray resolves a loopback node address to the machine's own address (so other nodes could reach it) unless
    its "local-only cluster" switch is off; an embedded one-machine cluster stays on loopback. Ray reads the
    switch when it is first imported: call this before any ``import ray``."""
    if not dist_cfg.ray_address and _is_loopback(dist_cfg.bind_host):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def ray_session(dist_cfg: DistributedConfig, extra_cpus: float = 0.0, extra_gpus: float = 0.0) -> Iterator[str]:
    """Be connected to Ray inside the block (module docstring, step 2). Yields how: caller/address/embedded.

    The one way uniemo joins or starts Ray: training, the feedback rounds, evaluation, the pipeline, benchmarks
    and tests all use it. ``extra_cpus`` / ``extra_gpus``: what an embedded cluster needs beside the trainers
    (e.g. the feedback pool's actors); with any GPU asked for, the embedded cluster gets the visible GPUs.
    """
    _keep_embedded_ray_on_loopback(dist_cfg)
    import logging

    import ray

    if ray.is_initialized():
        yield "caller"  # the caller's cluster: theirs to stop
        return
    if dist_cfg.ray_address:
        ray.init(address=dist_cfg.ray_address, log_to_driver=True, runtime_env=job_runtime_env())
        try:
            yield "address"
        finally:
            ray.shutdown()  # disconnects; the cluster keeps running
        return
    own_temp = not dist_cfg.ray_temp_dir
    # Short path: Ray puts unix sockets in it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="uniemo-ray-") if own_temp else dist_cfg.ray_temp_dir
    needed = dist_cfg.num_workers * dist_cfg.cpus_per_worker + extra_cpus
    ok = named = False
    try:
        ray.init(
            address="local",
            _temp_dir=temp_dir,
            _node_ip_address=dist_cfg.bind_host,
            include_dashboard=dist_cfg.dashboard,
            dashboard_host=dist_cfg.bind_host,
            num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
            num_gpus=_visible_gpus() if dist_cfg.gpus_per_worker > 0 or extra_gpus > 0 else 0,
            log_to_driver=True,
            logging_level=logging.WARNING,
            runtime_env=job_runtime_env(),
        )
        try:
            yield "embedded"
        except UserError as exc:
            if own_temp:  # name the logs in the error's one line
                exc.args = (f"{exc}; Ray's logs of this run are kept in {temp_dir}",)
                named = True
            raise
        ok = True
    finally:
        if ray.is_initialized():
            ray.shutdown()  # stops the processes this ray.init started, nothing else
        if own_temp and ok:
            for _ in range(3):  # a log writer may still be exiting: retry briefly
                shutil.rmtree(temp_dir, ignore_errors=True)
                if not os.path.exists(temp_dir):
                    break
                time.sleep(0.5)
        elif own_temp and not named:
            say(f"Ray's logs of this run are kept in {temp_dir}")


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


RESOURCE_SHARE = 0.001
"""The share of a custom resource (``distributed.worker_resource``, ``feedback.actor_resource``) one worker or
actor asks for: the resource selects nodes and never limits how many run there."""

PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK",
                        "strict_spread": "STRICT_SPREAD"}
"""``distributed.placement`` -> Ray's placement-group strategy of the workers."""


def record_placement(run_dir: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append ``records`` (:func:`uniemo.distributed.env.ray_node_record`) to ``<run_dir>/workers/placement.jsonl``,
    one JSON line each, in one ``O_APPEND`` write (processes on several nodes append to the same file)."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    if not data:
        return
    path = Path(run_dir) / PLACEMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_placement(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/workers/placement.jsonl``, oldest first (none: an empty list)."""
    path = Path(run_dir) / PLACEMENT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_custom_resource(name: str, key: str) -> None:
    """One line when no node of the connected Ray cluster offers the custom resource ``name`` (set as ``key``):
    the workers or actors asking for it would wait forever."""
    if not name:
        return
    import ray

    if ray.cluster_resources().get(name, 0) <= 0:
        raise UserError(
            f"{key}={name}: no node of the Ray cluster has the custom resource {name!r}; start the nodes meant for "
            f"it with `ray start ... --resources '{{\"{name}\": 1}}'`, or set {key}= (empty) to use any node"
        )


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (picklable by reference: a module-level function)."""

    run_dir = Path(loop_config["run_dir"])
    env = read_env()
    pid_dir = run_dir / WORKERS_DIR
    pid_dir.mkdir(parents=True, exist_ok=True)
    pid_file = pid_dir / f"rank-{env.rank}.pid"
    atomic_write(pid_file, f"{os.getpid()}\n")
    record_placement(run_dir, [ray_node_record(role="trainer", rank=env.rank)])
    cfg = from_dict(Config, loop_config["config"])
    run_worker(cfg, run_dir, init_from=loop_config.get("init_from"))


def _user_error_of(exc: BaseException) -> UserError | None:
    """The UserError a worker raised, if that is what failed the run (it prints as one line)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for failure in failures.values():
        seen: set[int] = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, UserError):
                return failure
            failure = failure.__cause__ or getattr(failure, "cause", None)
    return None


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


class UserErrorsAreFinal:
    """Ray Train failure policy: a worker group that failed with a :class:`UserError` ends the run at once (no
    retry, nothing logged); anything else goes to Ray Train's own policy (``distributed.max_failures``).

    Ray Train takes a failure policy only through its trainer's controller arguments
    (:func:`torch_trainer`'s subclass); the policy object travels to the controller actor, so it lives here at
    module level. It needs only ``make_decision`` of Ray's ``FailurePolicy``.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # e.g. failure_config, for whatever else Ray reads
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def make_decision(self, training_failed_error: Any) -> Any:
        if _user_error_of(training_failed_error) is not None:
            from ray.train.v2._internal.execution.failure_handling import FailureDecision

            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


def torch_trainer(fn: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], dist: DistributedConfig, *,
                  name: str, storage_path: str | Path, max_failures: int) -> Any:
    """A Ray Train ``TorchTrainer`` running ``fn(loop_config)`` on ``distributed.num_workers`` workers of
    ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs, and a share of ``worker_resource``), placed by
    ``distributed.placement`` (:data:`PLACEMENT_STRATEGIES`), with the process-group backend and worker
    environment of :mod:`uniemo.distributed.env`, whose user errors are final (:class:`UserErrorsAreFinal`).
    Used by training and by the evaluation."""
    _keep_embedded_ray_on_loopback(dist)
    from ray.train.torch import TorchConfig

    if TYPE_CHECKING:  # what ray.train exports under Train v2 (Ray's default, which the controller hook needs)
        from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig
        from ray.train.v2.torch.torch_trainer import TorchTrainer
    else:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer


    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["failure_policy"] = UserErrorsAreFinal(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    resources: dict[str, float] = {"CPU": dist.cpus_per_worker}
    if dist.gpus_per_worker > 0:
        resources["GPU"] = dist.gpus_per_worker
    if dist.worker_resource:
        resources[dist.worker_resource] = RESOURCE_SHARE
    return Trainer(
        fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=dist.gpus_per_worker > 0, resources_per_worker=resources,
            placement_strategy=PLACEMENT_STRATEGIES[dist.placement],
        ),
        torch_config=TorchConfig(backend=backend_for(dist)),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": worker_env_vars(dist)},
        ),
    )


def fit(trainer: Any) -> None:
    """``trainer.fit()``; a :class:`UserError` raised in a worker reaches the caller as itself (one line)."""
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as exc:
        user_error = _user_error_of(exc)
        if user_error is not None:
            raise user_error from None
        raise


def run_training(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """``uniemo train``: plan, start Ray Train with ``distributed.num_workers`` workers, wait, summarise."""
    _keep_embedded_ray_on_loopback(cfg.distributed)

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
        fit(trainer)
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
