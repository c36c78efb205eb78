"""Ray Train's ``TorchTrainer`` as uniemo runs it: N workers placed by ``distributed.*``, each a rank of one process
group (gloo on CPU, NCCL on GPU), with the worker environment of :mod:`uniemo.distributed.env`.

With ``FailureConfig(max_failures=...)`` a dead worker makes Ray Train restart the whole group (training resumes
from ``checkpoints/latest``). A :class:`UserError` raised in a worker (config, data, weights, a non-finite loss) is
not retried (:class:`UserErrorsAreFinal`): retrying would fail the same way. It reaches the caller as itself, one
line (:func:`fit`), without the worker's traceback in the log
(:func:`uniemo.distributed.ray_session.quiet_ray_internals`). Used by training and by the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.distributed.env import backend_for, worker_env_vars
from uniemo.distributed.placement import PLACEMENT_STRATEGIES, RESOURCE_SHARE
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
        user_error = user_error_of(exc)
        if user_error is not None:
            raise user_error from None
        raise


