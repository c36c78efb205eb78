"""Ray Train's ``TorchTrainer`` as uniemo runs it: N workers placed by ``distributed.*``, each a rank of one process
group (gloo on CPU, NCCL on GPU), with the worker environment of :mod:`uniemo.distributed.env`.

With ``FailureConfig(max_failures=...)`` a dead worker makes Ray Train restart the whole group (training resumes
from ``checkpoints/latest``). A :class:`UserError` raised in a worker (config, data, weights, a non-finite loss) is
not retried (:class:`UserErrorsAreFinal`): retrying would fail the same way. It reaches the caller as itself, one
line (:func:`fit`), without the worker's traceback in the log
(:func:`uniemo.distributed.ray_session.quiet_ray_internals`). Used by training and by the evaluation.

A node that never returns: Ray Train alone would retry starting the group every 60 s (a placement group that no
node can hold), without end for ``strict_*`` placements. :class:`LostNodeWatch` (training, with
``distributed.node_timeout_s``) watches the nodes the latest group of trainers started on (the run's placement
record, :mod:`uniemo.distributed.placement`); when one of them has been dead for the timeout and no new group has
started since, it stops Ray Train's controller and :func:`fit` raises one line naming the node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.distributed.env import backend_for, worker_env_vars
from uniemo.distributed.placement import PLACEMENT_STRATEGIES, RESOURCE_SHARE, read_placement
from uniemo.distributed.ray_session import keep_embedded_ray_on_loopback
from uniemo.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import DistributedConfig


def user_error_of(exc: BaseException) -> UserError | None:
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
        if user_error_of(training_failed_error) is not None:
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
    keep_embedded_ray_on_loopback(dist)
    from ray.train.torch import TorchConfig

    if TYPE_CHECKING:  # what ray.train exports under Train v2 (Ray's default, which the controller hook needs)
        from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig
        from ray.train.v2.torch.torch_trainer import TorchTrainer
    else:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer


    class Trainer(TorchTrainer):
        controller: Any = None
        """Ray Train's controller actor while :meth:`fit` runs (in the main thread), for :class:`LostNodeWatch`."""

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["failure_policy"] = UserErrorsAreFinal(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

        def _register_sigint_handler(self, controller: Any) -> None:
            # Ray hands its controller's handle only to this hook (called from the main thread): keep it.
            self.controller = controller
            super()._register_sigint_handler(controller)

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


def lost_trainer_nodes(records: list[dict[str, Any]], num_workers: int, alive: set[str]) -> list[dict[str, Any]]:
    """The placement records (one per node) of the nodes that the latest group of trainers started on and that are
    no longer ``alive`` (Ray node ids). ``records``: this run's trainer records, oldest first; the latest group is
    the last ``num_workers`` of them (a group that started again on live nodes clears the loss)."""
    lost: dict[str, dict[str, Any]] = {}
    for record in records[-num_workers:]:
        if record["node_id"] not in alive:
            lost.setdefault(record["node_id"], record)
    return list(lost.values())


def describe_node(record: dict[str, Any]) -> str:
    """A node as Ray reports it: its id and address (and host name when it differs)."""
    where = [record.get("node_ip") or "", record.get("host") or ""]
    where = [w for i, w in enumerate(where) if w and w not in where[:i]]
    return f"{record['node_id']} ({', '.join(where)})" if where else str(record["node_id"])


class LostNodeWatch:
    """While :func:`fit` runs: every ``poll_s``, the Ray nodes alive (``ray.nodes()``) against the nodes of the
    latest group of trainers (the run's placement record since :func:`fit` started). A node of that group dead for
    ``timeout_s`` with no new group started since (:func:`lost_trainer_nodes`) stops Ray Train's controller
    (``ray.kill``; the workers and the placement group it owns go with it); :func:`fit` then raises
    :meth:`error`. A node back in time (or another with room) lets Ray Train start a new group, which records its
    nodes and clears the loss. ``resume_hint()``: the end of the error's line, what to resume from and how."""

    def __init__(self, run_dir: str | Path, num_workers: int, timeout_s: float,
                 resume_hint: Callable[[], str], poll_s: float = 2.0) -> None:
        self.run_dir = Path(run_dir)
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.resume_hint = resume_hint
        self.poll_s = poll_s
        self.lost: list[dict[str, Any]] = []
        self.fired = threading.Event()
        self._done = threading.Event()
        self._first = 0

    def _trainer_records(self) -> list[dict[str, Any]]:
        return [r for r in read_placement(self.run_dir) if r.get("role") == "trainer"]

    @contextmanager
    def watching(self, trainer: Any) -> Iterator[None]:
        """Watch in a daemon thread while the block runs ``trainer.fit()``."""
        self._first = len(self._trainer_records())  # an earlier attempt's records (before --resume) are not ours
        self._done.clear()
        thread = threading.Thread(target=self._watch, args=(trainer,), name="uniemo-lost-node-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._done.set()
            thread.join(timeout=10)

    def _watch(self, trainer: Any) -> None:
        import ray

        since: float | None = None
        while not self._done.wait(self.poll_s):
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                lost = lost_trainer_nodes(self._trainer_records()[self._first:], self.num_workers, alive)
            except Exception:  # a GCS hiccup or a record being appended: look again at the next poll
                continue
            if not lost:
                since = None
                continue
            since = time.monotonic() if since is None else since
            if time.monotonic() - since < self.timeout_s:
                continue
            controller = getattr(trainer, "controller", None)
            if controller is None:  # fit() ran outside the main thread: Ray never handed the controller over
                continue
            self.lost = lost
            self.fired.set()
            ray.kill(controller, no_restart=True)
            return

    def error(self) -> UserError:
        nodes = ", ".join(describe_node(r) for r in self.lost)
        return UserError(
            f"lost node {nodes}: it held trainers of this run and is not back after distributed.node_timeout_s="
            f"{self.timeout_s:g} s, so training stopped; {self.resume_hint()}"
        )


def fit(trainer: Any, lost_node: LostNodeWatch | None = None) -> None:
    """``trainer.fit()``; a :class:`UserError` raised in a worker reaches the caller as itself (one line), and so
    does a node lost for good (``lost_node``, :class:`LostNodeWatch`: Ray then raises the stopped controller's
    ``ActorDiedError``)."""
    try:
        with lost_node.watching(trainer) if lost_node else nullcontext():
            trainer.fit()
    except Exception as exc:
        user_error = user_error_of(exc)
        if user_error is not None:
            raise user_error from None
        if lost_node is not None and lost_node.fired.is_set():
            raise lost_node.error() from None
        raise
