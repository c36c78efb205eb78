"""The DeepSpeed engine around a task module: the DeepSpeed config (derived from the typed config in ONE place,
:func:`deepspeed_config`), the optimiser and learning-rate schedule, and frozen sub-models kept out of ZeRO.

- **Batch arithmetic** (:func:`check_batch_arithmetic`): global batch = ``data.batch_size`` (micro-batch per
  rank) x ``training.gradient_accumulation`` x world size; a ``training.global_batch_size`` that disagrees is a
  :class:`ConfigError` naming the keys.
- **Optimiser**: a client ``torch.optim.AdamW`` over :func:`uniemo.training.task.build_param_groups` (METHOD
  §2.5 / §3.1: betas (0.9, 0.999), eps 1e-8), torch's fused kernel on CUDA (:func:`adamw_options`). Never a
  DeepSpeed Adam: those JIT-compile FusedAdam with gcc (~40 s) on a CPU. ZeRO accepts a client optimiser with
  ``zero_allow_untested_optimizer``.
- **Fast paths** (``training.channels_last``, ``training.compile``): :func:`uniemo.models.acceleration.accelerate_task`
  on the task's models before DeepSpeed wraps it.
- **Schedule** (:func:`lr_factor`): a ``LambdaLR`` multiplying each group's own learning rate; DeepSpeed steps
  it once per optimiser step (skipped steps of fp16 overflow do not count).
- **Frozen sub-models** (:class:`FrozenParts`, STYLE 13): the VAE, the text encoder, the UNet unless trained,
  the stage-2 ViT backbone and emotion head, and frozen scalars are taken out of the module DeepSpeed wraps
  before ``deepspeed.initialize``: ZeRO-3 would otherwise partition them (and gather them at every forward),
  and none of them has optimiser state anyway. They stay reachable as plain attributes, are moved to the
  device and compute dtype by hand, and keep their train/eval modes.
- **Precision**: ``fp32``; ``bf16`` / ``fp16`` are DeepSpeed's mixed precision (low-precision weights,
  activations and buffers, fp32 master weights in the optimiser; fp16 with a dynamic loss scale). Batches are
  cast by :meth:`Engine.prepare_batch`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from uniemo.errors import ConfigError
from uniemo.models.acceleration import accelerate_task
from uniemo.training.task import Task, build_param_groups

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config, TrainingConfig

__all__ = [
    "Engine",
    "adamw_options",
    "FrozenParts",
    "build_engine",
    "check_batch_arithmetic",
    "compute_dtype",
    "deepspeed_config",
    "lr_factor",
    "prepare_deepspeed",
    "warmup_steps",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DS_DTYPE_NAMES = {"bf16": "bf16", "fp16": "fp16"}


# -- configuration --------------------------------------------------------------------------------------------


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and activations for ``training.precision``."""
    return _DTYPES[precision]


def check_batch_arithmetic(cfg: Config, world_size: int) -> int:
    """The global batch ``data.batch_size x training.gradient_accumulation x world_size``.

    Raises:
        ConfigError: when ``training.global_batch_size`` is set and differs, naming every key involved.
    """
    micro, accum = cfg.data.batch_size, cfg.training.gradient_accumulation
    derived = micro * accum * world_size
    wanted = cfg.training.global_batch_size
    if wanted and wanted != derived:
        hint = ""
        if wanted % (micro * world_size) == 0:
            hint = f"; e.g. training.gradient_accumulation={wanted // (micro * world_size)}"
        raise ConfigError(
            f"training.global_batch_size={wanted} but data.batch_size x training.gradient_accumulation x "
            f"distributed.num_workers = {micro} x {accum} x {world_size} = {derived}; make them agree{hint} "
            "(or set training.global_batch_size=0 to derive it)"
        )
    return derived


_DS_DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default reduce / prefetch bucket size, in elements."""


def deepspeed_config(cfg: Config, world_size: int, trainable_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict, derived from the typed config (the only place that writes one).

    ``trainable_params`` (the number of trained elements) caps ZeRO's communication buckets: DeepSpeed's default
    of 5e8 elements is a ~1.9 GB fp32 buffer per rank whatever the model's size.
    """
    t = cfg.training
    global_batch = check_batch_arithmetic(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.distributed.zero_stage}
    if cfg.distributed.zero_stage == 3:
        # Gather-on-demand for every parameter: the small ones too (the default keeps < 100k-element tensors
        # unpartitioned, which would leave tiny test models entirely unpartitioned).
        zero["stage3_param_persistence_threshold"] = 0
    if trainable_params is not None and cfg.distributed.zero_stage >= 2:
        bucket = int(min(_DS_DEFAULT_BUCKET, max(trainable_params, 1)))
        zero["reduce_bucket_size"] = bucket
        if cfg.distributed.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket
    ds: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        # A client torch AdamW: DeepSpeed's own Adam would JIT-compile FusedAdam (module docstring).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # 0: dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**31 - 1,  # uniemo logs itself (metrics.jsonl, wandb)
        "wall_clock_breakdown": False,
    }
    if t.precision in _DS_DTYPE_NAMES:
        # Buffers (text features, Phi, attribute embeddings) meet low-precision activations: same dtype.
        ds["data_types"] = {"buffer_dtype": _DS_DTYPE_NAMES[t.precision]}
    return ds


def adamw_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``torch.optim.AdamW`` for parameters on ``device``: ``fused=True`` on CUDA (one kernel
    for every tensor instead of a dozen per tensor; the same update to float rounding); on the CPU torch's
    default implementation, so CPU runs keep their numbers (tests/test_golden_loss.py)."""
    return {"fused": True} if device.type == "cuda" else {}


def warmup_steps(training_cfg: TrainingConfig, total_steps: int) -> int:
    """Warm-up length: ``training.warmup_steps``, or 5 % of the run."""
    if training_cfg.warmup_steps is not None:
        return min(training_cfg.warmup_steps, total_steps)
    return int(round(0.05 * total_steps))


def lr_factor(training_cfg: TrainingConfig, total_steps: int, global_batch: int = 1) -> Callable[[int], float]:
    """The schedule as a factor on each group's learning rate, a function of completed optimiser steps.

    - ``cosine``: linear warm-up ``(s+1)/(W+1)``, then ``r + (1-r)(1+cos(pi p))/2`` with ``p`` the progress
      after warm-up and ``r`` = ``min_lr_ratio``.
    - ``cyclic_cosine``: the closed form of ``CosineAnnealingLR(T_max)`` with eta_min 0, ``(1+cos(pi s/T))/2``,
      which falls to 0 at T and comes back at 2T (METHOD §2.5; §9.11 "cyclic cosines"). T is
      ``cyclic_period`` steps, or ``cyclic_period_samples / global_batch`` steps when that is set (the official
      cycle counted in samples, kept at any global batch; docs/RECIPES.md).
    - ``constant``: linear warm-up then 1.
    """
    schedule = training_cfg.lr_schedule
    warm = warmup_steps(training_cfg, total_steps)
    floor = training_cfg.min_lr_ratio
    period = (
        training_cfg.cyclic_period_samples / global_batch
        if training_cfg.cyclic_period_samples
        else training_cfg.cyclic_period
    )

    def factor(step: int) -> float:
        if schedule == "cyclic_cosine":
            return 0.5 * (1.0 + math.cos(math.pi * step / period))
        if step < warm:
            return (step + 1) / (warm + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def group_lr_factors(
    task: Task, groups: list[dict[str, Any]], training_cfg: TrainingConfig, total_steps: int,
    global_batch: int = 1,
) -> Callable[[int], float] | list[Callable[[int], float]]:
    """The schedule of :func:`lr_factor` for every group, or, for a task with ``role_phases(total_steps)`` (role ->
    ``[start, end)``, generator pretraining), one per group: the schedule over the group's own phase and 0 outside
    it, so a part trains only in its phase (weight decay included, since AdamW scales it by the learning rate)."""
    phases = task.role_phases(total_steps)
    if phases is None:
        return lr_factor(training_cfg, total_steps, global_batch)
    factors = []
    for group in groups:
        start, end = phases[group["name"].split("/")[0]]
        factors.append(_phase_factor(lr_factor(training_cfg, max(1, end - start), global_batch), start, end))
    return factors


def _phase_factor(factor: Callable[[int], float], start: int, end: int) -> Callable[[int], float]:
    def phased(step: int) -> float:
        return factor(step - start) if start <= step < end else 0.0

    return phased


# -- DeepSpeed process-wide preparation ---------------------------------------------------------------------

_PREPARED = False


def prepare_deepspeed() -> None:
    """Make DeepSpeed deterministic and fast to start on this stack; idempotent, call before ``initialize``.

    1. Skip the ``deepspeed_shm_comm`` op. DeepSpeed JIT-compiles it with gcc on the first communicator set-up
       (23-46 s and ~4 GB on a CPU machine). ``deepspeed/comm/torch.py::build_shm_op`` returns None when
       ``deepspeed.ops.__compatible_ops__[<its name>]`` is False, and then every collective goes through
       torch.distributed (gloo on CPU, NCCL on GPU), which is what we use anyway.
    2. Let DeepSpeed broadcast 0-dim parameters (e.g. a trainable logit scale). DeepSpeed 0.19 broadcasts every
       parameter as ``p.data.view(torch.uint8)``, which torch refuses for 0-dim tensors; both broadcast sites
       (``DeepSpeedEngine._broadcast_model`` and ZeRO-3's ``Init._zero_init_param``) get a wrapper that shows
       them a 1-element view of the same storage, so the broadcast still writes the real parameter. ZeRO-3
       records the parameter's true 0-dim shape afterwards.
    """
    global _PREPARED
    if _PREPARED:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    _patch_scalar_broadcast()
    _PREPARED = True


def _patch_scalar_broadcast() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    if getattr(DeepSpeedEngine._broadcast_model, "_uniemo_scalar_safe", False):
        return
    if _view_of_scalar_works():
        return  # nothing to work around on this torch
    original_broadcast = DeepSpeedEngine._broadcast_model
    original_init_param = Init._zero_init_param

    def _broadcast_model(self: Any) -> None:
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        saved = [p.data for p in scalars]
        for p in scalars:
            p.data = p.data.reshape(1)  # a view: the broadcast writes the parameter's own storage
        try:
            original_broadcast(self)
        finally:
            for p, data in zip(scalars, saved, strict=True):
                p.data = data

    # ``param`` is a ZeRO-3 parameter: DeepSpeed gives it ``ds_*`` attributes that torch's types do not know.
    def _zero_init_param(self: Any, param: Any) -> None:
        if param.dim() != 0:
            return original_init_param(self, param)
        param.data = param.data.reshape(1)
        original_init_param(self, param)
        param.ds_shape = torch.Size([])  # gathered back as a 0-dim tensor; checkpoints record the true shape
        return None

    _broadcast_model._uniemo_scalar_safe = True  # type: ignore[attr-defined]
    DeepSpeedEngine._broadcast_model = _broadcast_model
    Init._zero_init_param = _zero_init_param


def _view_of_scalar_works() -> bool:
    try:
        torch.zeros(()).view(torch.uint8)
    except RuntimeError:
        return False
    return True


# -- frozen parts ---------------------------------------------------------------------------------------------


@dataclass
class _Detached:
    owner: nn.Module
    attr: str
    value: nn.Module | nn.Parameter
    name: str
    """Dotted name in the task (``generator.vae``, ``understanding.logit_scale_scene``)."""
    order: list[str]
    """The owner's module (or parameter) names before detaching, to restore their order."""


@dataclass
class FrozenParts:
    """Frozen sub-modules and parameters held outside the module tree DeepSpeed wraps (module docstring).

    :meth:`detach` moves each top-most frozen sub-module, and each frozen parameter left, from its owner's
    ``_modules`` / ``_parameters`` into the owner's ``__dict__``: ``task.generator.vae`` still works, but
    ``task.parameters()``, ``state_dict()``, ``.to()`` and ``.train()`` no longer see them.
    """

    entries: list[_Detached] = field(default_factory=list)
    train_mode: frozenset[str] = frozenset()
    """Detached modules that follow the task's train mode (the stage-2 emotion head with dropout, METHOD §3.1)."""

    @classmethod
    def detach(cls, task: Task) -> FrozenParts:
        keep_training = frozenset(getattr(task, "frozen_modules_in_train_mode", lambda: set())())
        entries: list[_Detached] = []
        for name in task.frozen_modules():
            owner_name, _, attr = name.rpartition(".")
            owner = task.get_submodule(owner_name) if owner_name else task
            order = list(owner._modules)
            module = owner.get_submodule(attr)
            del owner._modules[attr]
            object.__setattr__(owner, attr, module)
            entries.append(_Detached(owner, attr, module, name, order))
        for owner_name, owner in task.named_modules():
            for attr, param in list(owner._parameters.items()):
                if param is not None and not param.requires_grad:
                    order = list(owner._parameters)
                    del owner._parameters[attr]
                    object.__setattr__(owner, attr, param)
                    full = f"{owner_name}.{attr}" if owner_name else attr
                    entries.append(_Detached(owner, attr, param, full, order))
        return cls(entries, keep_training)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every detached parameter with its full dotted name in the task."""
        for e in self.entries:
            if isinstance(e.value, nn.Parameter):
                yield e.name, e.value
            else:
                for sub, p in e.value.named_parameters():
                    yield f"{e.name}.{sub}", p

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move to ``device`` and cast floating-point weights to ``dtype`` (the activations they meet)."""
        for e in self.entries:
            if isinstance(e.value, nn.Parameter):
                target = dtype if e.value.is_floating_point() else e.value.dtype
                e.value.data = e.value.data.to(device=device, dtype=target)
            else:
                e.value.to(device=device, dtype=dtype)

    def train(self, mode: bool) -> None:
        """Eval mode always, except the listed modules, which follow ``mode``."""
        for e in self.entries:
            if isinstance(e.value, nn.Module):
                e.value.train(mode and e.name in self.train_mode)

    def reattach(self) -> None:
        """Put everything back into the module tree (in reverse order)."""
        for e in reversed(self.entries):
            e.owner.__dict__.pop(e.attr, None)
            if isinstance(e.value, nn.Parameter):
                _insert_in_order(e.owner._parameters, e.attr, e.value, e.order)
            else:
                _insert_in_order(e.owner._modules, e.attr, e.value, e.order)
        self.entries = []


_Entry = TypeVar("_Entry", nn.Module, nn.Parameter)


def _insert_in_order(table: dict[str, _Entry | None], attr: str, value: _Entry, order: list[str]) -> None:
    """Put ``value`` back into a module's ``_modules`` / ``_parameters`` at its place in ``order``."""
    table[attr] = value
    ordered = {k: table[k] for k in order if k in table}
    ordered.update({k: v for k, v in table.items() if k not in ordered})
    table.clear()
    table.update(ordered)


# -- the engine -------------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """A DeepSpeed engine with what the loop needs next to it."""

    ds_engine: Any
    """``deepspeed.DeepSpeedEngine``; ``ds_engine.module`` is the task."""
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    frozen: FrozenParts
    dtype: torch.dtype
    device: torch.device
    config: dict[str, Any]
    group_names: list[str]

    @property
    def task(self) -> Task:
        return self.ds_engine.module

    def set_train(self, mode: bool) -> None:
        """Train/eval mode of the task and of its detached frozen parts."""
        self.ds_engine.train(mode)
        self.frozen.train(mode)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Floating-point tensors of the batch in the compute dtype, on the device."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and value.dtype != self.dtype:
                    value = value.to(self.dtype)
                value = value.to(self.device, non_blocking=True)
            out[key] = value
        return out

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate of each parameter group, by group name."""
        return {
            name: float(lr) for name, lr in zip(self.group_names, self.scheduler.get_last_lr(), strict=True)
        }


def build_engine(
    task: Task,
    cfg: Config,
    *,
    world_size: int,
    device: torch.device,
    total_steps: int,
    optimizer_options: dict[str, Any] | None = None,
) -> Engine:
    """Detach the frozen parts, build AdamW + schedule, and ``deepspeed.initialize`` the task.

    The process group must exist (Ray Train's, or one made by the caller); DeepSpeed reuses it.
    ``optimizer_options``: AdamW's implementation keywords (None: :func:`adamw_options`; benchmarks pass ``{}``
    for the unfused baseline).
    """

    prepare_deepspeed()
    import deepspeed

    dtype = compute_dtype(cfg.training.precision)
    frozen = FrozenParts.detach(task)
    ds_config = deepspeed_config(
        cfg, world_size, trainable_params=sum(p.numel() for p in task.parameters() if p.requires_grad)
    )
    frozen.to(device, dtype)
    frozen.train(True)
    task.to(device)
    accelerate_task(task, cfg.training)
    groups = build_param_groups(task, cfg.training)
    group_names = [g["name"] for g in groups]
    options = adamw_options(device) if optimizer_options is None else optimizer_options
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_lr_factors(
        task, groups, cfg.training, total_steps, global_batch=ds_config["train_batch_size"]
    ))
    ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=task,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    return Engine(
        ds_engine=ds_engine,
        optimizer=ds_optimizer,
        scheduler=ds_scheduler,
        frozen=frozen,
        dtype=dtype,
        device=device,
        config=ds_config,
        group_names=group_names,
    )
