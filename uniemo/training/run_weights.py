"""A run's weights read back into models: the one loader of checkpoint (and export) weights, used where stage 2 starts
from stage 1, at the end of stage 2, and for inference (:mod:`uniemo.inference.runs`).

- :func:`load_weights`: copy a state dict into a module with one strictness rule: every key must name an entry of the
  module with the same shape, and every name the caller requires must be there.
- Which stage-1 checkpoint a run builds on: a stage-2 checkpoint holds only what stage 2 trains (the trainer saves
  with ``exclude_frozen_parameters``); its frozen backbone and head come from the stage-1 checkpoint its
  ``trainer_state.json`` records as ``init_from`` (:func:`recorded_init`, :func:`split_init`).
- The parameters no checkpoint holds and no weights folder gives back (never trained: frozen contrastive scales
  and projections, ...) are saved once at a run's start as ``initial_weights.safetensors``
  (:func:`untrained_state`, :func:`save_initial_weights`), so loading a run replays no random draws. The generator
  is not among them: it comes from ``model.generator.path`` or its preset's own seed, both fixed by the config.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from uniemo.atomic import atomic_path
from uniemo.errors import ConfigError, UserError
from uniemo.run_layout import INITIAL_WEIGHTS_FILE, path_for_run_file, path_from_run_file, run_of_checkpoint
from uniemo.training.checkpoint import CheckpointError, consolidated_state_dict, read_trainer_state

UNDERSTANDING = "understanding."
GENERATOR = "generator."
STAGE1_OPTIONAL_ROLES = frozenset({"logit_scales", "projections"})
"""Stage-1 parameters that may be absent from a stage-1 checkpoint: frozen there (so not saved) and unused in
stage 2 (METHOD §3.1: the contrastive heads are not part of the joint loss)."""


def strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path, *,
                 required: Iterable[str] = (), hint: str) -> set[str]:
    """Copy ``state`` into ``module`` (cast to each entry's dtype); returns the names loaded.

    Raises:
        UserError: a key names no entry of ``module`` or has another shape, or a ``required`` name is missing;
            one line naming ``source``, the first offending names and ``hint`` (what to do).
    """
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(n for n in required if n not in state)
    if unexpected or shapes or missing:
        detail = (f"unknown keys {unexpected[:3]}" if unexpected
                  else f"shape mismatch at {shapes[:3]}" if shapes
                  else f"missing {missing[:3]}")
        raise UserError(f"the weights in {source} do not fit the model built from the config ({detail}); {hint}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    return set(state)


def trained_names(module: nn.Module) -> list[str]:
    """The parameters of ``module`` that train (``requires_grad`` after the task's freezing)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


# -- which checkpoint a run builds on ----------------------------------------------------------------------------


def recorded_init(step_dir: str | Path) -> Path | None:
    """The checkpoint the run of ``step_dir`` started from, as its ``trainer_state.json`` records it (relative to
    the run folder since runs are movable; absolute in older runs); None when it records none (stage 1)."""
    value = read_trainer_state(step_dir).get("init_from")
    return path_from_run_file(value, run_of_checkpoint(step_dir)) if value else None


def stored_init(init_from: str | Path | None, run_dir: str | Path) -> str | None:
    """How a checkpoint of ``run_dir`` records ``init_from`` (:func:`recorded_init` reads it back)."""
    return path_for_run_file(init_from, run_dir) if init_from else None


def split_init(step_dir: Path) -> tuple[Path, Path | None]:
    """``(stage-1 checkpoint, stage-2 checkpoint or None)`` of a checkpoint a stage-2 model is built from.

    A stage-1 checkpoint is its own first part. A stage-2 checkpoint holds only what stage 2 trains; its frozen
    backbone and head come from the stage-1 checkpoint it records (:func:`recorded_init`).

    Raises:
        ConfigError: ``step_dir`` is no complete checkpoint, or the stage-1 checkpoint it records is gone.
    """
    try:
        state = read_trainer_state(step_dir)
        stage1 = recorded_init(step_dir)
    except CheckpointError as e:
        raise ConfigError(f"training.init_from: {e}") from None
    if int(state.get("stage", 1)) != 2:
        return step_dir, None
    if stage1 is None or not stage1.is_dir():
        raise ConfigError(
            f"{step_dir} is a stage-2 checkpoint whose stage-1 weights ({stage1}) are gone; restore that stage-1 "
            "run or start from another run"
        )
    return stage1, step_dir


# -- loading checkpoints into a task ----------------------------------------------------------------------------


def load_stage1_understanding(understanding: nn.Module, step_dir: str | Path, hint: str) -> set[str]:
    """Load the understanding weights of a stage-1 checkpoint folder (fp32); returns the names loaded.

    Every parameter must be there except those stage 1 may have kept frozen and stage 2 does not use
    (:data:`STAGE1_OPTIONAL_ROLES`: they keep the values the run starts with).
    """
    state = strip(consolidated_state_dict(step_dir), UNDERSTANDING)
    if not state:
        raise ConfigError(f"{step_dir} holds no understanding weights; training.init_from must be a stage-1 run")
    roles = understanding.parameter_roles()  # type: ignore[operator]
    required = [n for n, _ in understanding.named_parameters() if roles.get(n) not in STAGE1_OPTIONAL_ROLES]
    return load_weights(understanding, state, step_dir, required=required, hint=hint)


def load_stage2_weights(task: nn.Module, step_dir: str | Path, hint: str) -> set[str]:
    """Load every weight a stage-2 checkpoint trained into a stage-2 ``task`` (fp32); each trainable parameter of
    ``task`` must be among them, except a role that trains in stage 2 only with
    ``training.stage2_whole_understanding`` (the backbone, the emotion head) when the checkpoint holds none of it:
    its run kept them frozen, so they are stage 1's (loaded before this). A role the checkpoint holds must be
    whole."""
    from uniemo.training.task import STAGE2_WHOLE_UNDERSTANDING_ROLES

    state = consolidated_state_dict(step_dir)
    roles = task.parameter_roles()  # type: ignore[operator]
    required = trained_names(task)
    for role in STAGE2_WHOLE_UNDERSTANDING_ROLES:
        names = {n for n in required if roles.get(n) == role}
        if not names & state.keys():
            required = [n for n in required if n not in names]
    return load_weights(task, state, step_dir, required=required, hint=hint)


def load_stage2_task(task: nn.Module, init: Path, hint: str) -> set[str]:
    """Fill a freshly built stage-2 ``task`` from the checkpoint ``init`` (stage 1's, or a stage-2 one with the
    stage-1 one it records, :func:`split_init`); returns the ``understanding.*`` names stage 1 gave."""
    stage1, stage2 = split_init(init)
    loaded = load_stage1_understanding(task.understanding, stage1, hint)  # type: ignore[arg-type]
    if stage2 is not None:
        load_stage2_weights(task, stage2, hint)
    return {UNDERSTANDING + name for name in loaded}


# -- parameters that never train ---------------------------------------------------------------------------------


def untrained_state(task: nn.Module, supplied: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """What :data:`INITIAL_WEIGHTS_FILE` holds of a freshly built ``task``: its entries that do not train, except the
    generator's (its folder or preset gives them back) and ``supplied`` (given by the stage-1 checkpoint)."""
    trained, skip = set(trained_names(task)), set(supplied)
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in task.state_dict().items()
            if k not in trained and k not in skip and not k.startswith(GENERATOR)}


def save_initial_weights(run_dir: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``<run_dir>/initial_weights.safetensors`` (once per run: a restarted or resumed run keeps the first)."""
    from safetensors.torch import save_file

    path = Path(run_dir) / INITIAL_WEIGHTS_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return path


def load_initial_weights(module: nn.Module, run_dir: str | Path, prefix: str = "") -> bool:
    """Load the run's :data:`INITIAL_WEIGHTS_FILE` (its entries under ``prefix``) into ``module``; False when the
    run has none (written before uniemo saved them)."""
    from safetensors.torch import load_file

    path = Path(run_dir) / INITIAL_WEIGHTS_FILE
    if not path.is_file():
        return False
    state = strip(load_file(str(path)), prefix) if prefix else load_file(str(path))
    load_weights(module, state, path, hint="the run folder mixes configs or is damaged")
    return True
