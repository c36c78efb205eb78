"""What makes stage 1 and stage 2 different: the task, its data, its initialisation, and what happens at the end.

The loop (:mod:`uniemo.training.trainer`) is the same for both stages; :func:`build_stage` hands it a
:class:`uniemo.training.parts.StageParts`:

- **stage 1** (METHOD §2): :func:`uniemo.training.task.build_stage1_task`, the train and validation streams.
- **stage 2** (METHOD §3): :func:`uniemo.training.task.build_stage2_task` with the understanding model loaded from
  stage 1 (:func:`resolve_init_from`: ``training.init_from``, else the latest stage-1 run under
  ``run.output_dir``), through :func:`uniemo.training.run_weights.load_stage2_task` of that run's checkpoint.
  ``training.init_from`` may also name a stage-2 run (the feedback loop continues one, :mod:`uniemo.feedback.loop`):
  then the frozen backbone and head come from that run's own stage-1 checkpoint and every weight it trained
  (understanding queries and blocks, attribute classifiers, mappers, the UNet with ``train_unet``) from its
  checkpoint (:func:`uniemo.training.run_weights.split_init`); the new run records the stage-1 checkpoint as its
  ``init_from``.
  At the end (:func:`finish_stage2`): the emotion space over the whole train split with evaluation transforms,
  its sufficient statistics summed over all ranks (METHOD §4.1, D9), saved as ``emotion_space.safetensors``;
  then sample grids per emotion (METHOD §4.2) on rank 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from uniemo.config.schema import EMOTIONS
from uniemo.data.latents import check_latents
from uniemo.data.loader import build_loader_from_config, load_attribute_table
from uniemo.data.source import data_source
from uniemo.errors import ConfigError
from uniemo.models.conditioner import Conditioner
from uniemo.models.generation import generate, sampling_settings
from uniemo.models.generator import build_generator
from uniemo.models.weights import build_understanding
from uniemo.run_layout import (
    COMPLETE_FILE,
    CONFIG_FILE,
    EMOTION_SPACE_COUNTS_FILE,
    EMOTION_SPACE_FILE,
    TRAINER_STATE_FILE,
)
from uniemo.seeds import sample_grid_seeds
from uniemo.training.checkpoint import (
    CheckpointError,
    consolidated_state_dict,
    latest_checkpoint,
    resolve_checkpoint,
)
from uniemo.training.emotion_space import (
    all_reduce_emotion_space,
    compute_emotion_space,
    emotion_space_loader,
)
from uniemo.training.generator_task import annotation_note, build_generator_task, finish_generator
from uniemo.training.parts import FinishedTraining, StageParts
from uniemo.training.run_weights import (
    UNDERSTANDING,
    load_stage2_task,
    load_weights,
    split_init,
    strip,
    untrained_state,
)
from uniemo.training.task import Stage2Task, Task, build_stage1_task, build_stage2_task

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.distributed.env import DistEnv
    from uniemo.models.emotion_space import EmotionSpace
    from uniemo.models.understanding import UnderstandingModel

_T = TypeVar("_T")
_M = TypeVar("_M", bound=nn.Module)



# -- stage-2 initialisation -----------------------------------------------------------------------------------


def _stage_of_run(run_dir: Path) -> int | None:
    import yaml

    try:
        data = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        return int(data["training"]["stage"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def find_latest_run(
    output_dir: str | Path,
    stage: int,
    exclude: Path | None = None,
    skip: Callable[[Path], bool] | None = None,
) -> Path | None:
    """The latest checkpoint of the stage-``stage`` run under ``output_dir`` whose latest checkpoint is the newest
    (runs for which ``skip(run_dir)`` is true, and ``exclude``, left out); None when there is none."""
    root = Path(output_dir)
    best: tuple[float, Path] | None = None
    if root.is_dir():
        for run_dir in root.iterdir():
            if not run_dir.is_dir() or (exclude is not None and run_dir.resolve() == exclude.resolve()):
                continue
            if _stage_of_run(run_dir) != stage or (skip is not None and skip(run_dir)):
                continue
            try:
                step_dir = latest_checkpoint(run_dir)
            except CheckpointError:
                continue
            if step_dir is None:
                continue
            mtime = (step_dir / COMPLETE_FILE).stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, step_dir)
    return best[1] if best is not None else None


def find_latest_stage1_run(output_dir: str | Path, exclude: Path | None = None) -> Path:
    """The latest checkpoint of the stage-1 run under ``output_dir`` whose latest checkpoint is the newest.

    Raises:
        ConfigError: when there is none.
    """
    root = Path(output_dir)
    found = find_latest_run(root, 1, exclude)
    if found is None:
        raise ConfigError(
            f"stage 2 starts from stage-1 weights, but no stage-1 run with a checkpoint is under {root}/; run "
            "stage 1 first (e.g. `uniemo train --config configs/tiny_stage1.yaml`) or set training.init_from"
        )
    return found


def resolve_init_from(cfg: Config, run_dir: Path) -> Path | None:
    """Stage 2: the complete checkpoint folder to start from (stage 1's, or a stage-2 run's to continue it, see
    :func:`split_init`); stage 1: None."""
    if cfg.training.stage != 2:
        return None
    if cfg.training.init_from:
        try:
            return resolve_checkpoint(cfg.training.init_from)
        except CheckpointError as e:
            raise ConfigError(f"training.init_from: {e}") from None
    return find_latest_stage1_run(cfg.run.output_dir, exclude=run_dir)


# -- building a stage ------------------------------------------------------------------------------------------


_INIT_HINT = "use the model settings of the run training.init_from names"


def _stage2_init(init_from: Path | None) -> tuple[Path, Path | None]:
    """:func:`split_init` of stage 2's ``init_from``, which :func:`resolve_init_from` always finds."""
    if init_from is None:
        raise ValueError("stage 2 needs a stage-1 checkpoint (resolve_init_from)")
    return split_init(init_from)


def _build_task(cfg: Config, attributes: Any, init_from: Path | None) -> tuple[Task, dict[str, torch.Tensor]]:
    """The task with its initial weights (same on every rank) and what of them no checkpoint will hold
    (:func:`uniemo.training.run_weights.untrained_state`)."""
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    if cfg.training.stage == 1:
        task: Task = build_stage1_task(cfg, attributes)
        return task, untrained_state(task)
    task = build_stage2_task(cfg, attributes)
    if init_from is None:
        raise ValueError("stage 2 needs a stage-1 checkpoint (resolve_init_from)")
    from_stage1 = load_stage2_task(task, init_from, _INIT_HINT)
    return task, untrained_state(task, supplied=from_stage1)


def build_stage(cfg: Config, env: DistEnv, init_from: Path | None) -> StageParts:
    """Task (same initial weights on every rank) and this rank's train and validation streams.

    Rank 0 builds first (it fills the caches: synthetic shards, attribute text features); the others wait at a
    barrier and then read them.
    """

    def build() -> tuple[Task, dict[str, torch.Tensor]]:
        attributes = load_attribute_table(cfg.data)
        return _build_task(cfg, attributes, init_from)

    if cfg.training.stage == "generator":
        return _build_generator_stage(cfg, env)
    task, untrained = _rank0_first(env, build)
    stage = cfg.training.stage
    latents = stage == 2 and cfg.data.precomputed_latents
    if latents and isinstance(task, Stage2Task):  # the stored latents must be this VAE's (uniemo.data.latents)
        check_latents(data_source(cfg.data), cfg.data.generator_image_size, cfg.data.generator_resample,
                      task.generator.vae)
    # Pinned batches copy to the GPU asynchronously (the engine moves them with non_blocking=True).
    pin = cfg.distributed.gpus_per_worker > 0 and torch.cuda.is_available()
    train_loader = build_loader_from_config(
        cfg.data, "train", rank=env.rank, world_size=env.world_size, stage=stage, training=True, seed=cfg.run.seed,
        latents=latents, pin_memory=pin,
    )
    val_loader = None
    if cfg.training.eval_every > 0:
        val_loader = build_loader_from_config(
            cfg.data, "val", rank=env.rank, world_size=env.world_size, stage=stage, training=False, seed=cfg.run.seed,
            latents=latents, pin_memory=pin,
        )
    initial: dict[str, torch.Tensor] = {}
    stage1, stage2 = (init_from, None)
    if isinstance(task, Stage2Task):  # the frozen weights the final model is rebuilt from (finish_stage2)
        initial = {k: v.detach().float().cpu().clone() for k, v in task.understanding.state_dict().items()}
        stage1, stage2 = _stage2_init(init_from)
    return StageParts(
        task=task,
        train_loader=train_loader,
        val_loader=val_loader,
        init_from=str(stage1) if stage1 is not None else None,
        continued_from=str(stage2) if stage2 is not None else None,
        initial_understanding=initial,
        untrained=untrained,
        finish=finish_stage2 if stage == 2 else None,
    )


def _build_generator_stage(cfg: Config, env: DistEnv) -> StageParts:
    """Generator pretraining (METHOD D15): the task and streams with ``pixel_values`` (the stage-2 transforms)."""

    attributes = _rank0_first(env, lambda: load_attribute_table(cfg.data))
    torch.manual_seed(cfg.run.seed)
    task = build_generator_task(cfg, attributes)
    loaders = [
        build_loader_from_config(cfg.data, split, rank=env.rank, world_size=env.world_size, stage=2,
                                 training=split == "train", seed=cfg.run.seed)
        for split in (["train", "val"] if cfg.training.eval_every > 0 else ["train"])
    ]
    note = annotation_note(attributes)
    return StageParts(task=task, train_loader=loaders[0], val_loader=loaders[1] if len(loaders) > 1 else None,
                      finish=finish_generator, notes=[note] if note else [])


def _rank0_first(env: DistEnv, fn: Callable[[], _T]) -> _T:
    distributed = torch.distributed.is_initialized() and env.world_size > 1
    if env.is_main:
        result = fn()
    if distributed:
        torch.distributed.barrier()
    if not env.is_main:
        result = fn()
    return result


# -- end of stage 2 --------------------------------------------------------------------------------------------


_FINAL_HINT = "the run's own checkpoint does not fit its model: a bug, please report it"


def final_understanding(
    cfg: Config, parts: StageParts, trained: dict[str, torch.Tensor], device: torch.device
) -> UnderstandingModel:
    """A plain fp32 understanding model with the run's final weights: the initial ones overlaid with the trained
    parameters of ``trained`` (a consolidated checkpoint, task names)."""

    counts = _attribute_counts(_stage2_task(parts).understanding)
    model = _fresh(lambda: build_understanding(cfg.model.understanding, *counts))
    state = {**parts.initial_understanding, **strip(trained, UNDERSTANDING)}
    load_weights(model, state, "the final checkpoint", required=model.state_dict(), hint=_FINAL_HINT)
    return model.to(device).eval()


def _stage2_task(parts: StageParts) -> Stage2Task:
    if not isinstance(parts.task, Stage2Task):
        raise TypeError(f"the end of stage 2 needs the stage-2 task, got {type(parts.task).__name__}")
    return parts.task


def _attribute_counts(und: UnderstandingModel) -> tuple[int, int]:
    scenes = und.scene_classifier.out_features if und.scene_classifier is not None else 0
    objects = und.object_classifier.out_features if und.object_classifier is not None else 0
    return scenes, objects


def _fresh(build: Callable[[], _M]) -> _M:
    """Build a module without touching the global RNG (its initial values are overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        return build()


def finish_stage2(trainer: FinishedTraining) -> None:
    """Emotion space over all ranks (METHOD §4.1, D9) and, on rank 0, sample grids per emotion (METHOD §4.2)."""

    cfg, env, parts = trainer.cfg, trainer.env, trainer.parts
    # The exported weights (fp32 masters of the final checkpoint), not the engine's bf16 copies.
    trained = consolidated_state_dict(trainer.final_checkpoint())
    understanding = final_understanding(cfg, parts, trained, trainer.device)
    loader = emotion_space_loader(cfg, rank=env.rank, world_size=env.world_size)
    space = compute_emotion_space(understanding, loader, trainer.device)
    all_reduce_emotion_space(space, trainer.reduce_device)  # collective: sufficient statistics summed (D9)
    # Rank-0 side effects through the logger (a null object elsewhere, STYLE 14).
    logger = trainer.logger
    path = logger.save_artifact(EMOTION_SPACE_FILE, space.save)
    counts = {EMOTIONS[k]: int(n) for k, n in enumerate(space.counts().tolist())}
    logger.info(f"emotion space over {sum(counts.values())} train images -> {path}")
    logger.write_json(EMOTION_SPACE_COUNTS_FILE, counts)
    if cfg.logging.sample_images > 0:
        logger.log_samples(trainer.step, lambda: sample_grids(cfg, parts, trainer, space, understanding, trained))
    if torch.distributed.is_initialized() and env.world_size > 1:
        torch.distributed.barrier()


def sample_grids(cfg: Config, parts: StageParts, trainer: FinishedTraining, space: EmotionSpace,
                 understanding: UnderstandingModel, trained: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``logging.sample_images`` generated images per emotion seen in the space, as uint8 ``[N,H,W,3]`` arrays."""

    task = _stage2_task(parts)
    device = trainer.device
    if cfg.model.generator.train_unet:
        # The trained UNet lives in the engine (partitioned under ZeRO-3): a fresh fp32 generator + its weights.
        generator = _fresh(lambda: build_generator(
            cfg.model.generator, image_size=cfg.data.generator_image_size, seed=cfg.run.seed))
        unet = strip(trained, "generator.unet.")
        load_weights(generator.unet, unet, "the final checkpoint", required=generator.unet.state_dict(),
                     hint=_FINAL_HINT)
        generator.to(device)
    else:
        generator = task.generator  # frozen, held outside the engine: plain tensors on this device
    conditioner = _fresh(lambda: Conditioner(
        cfg.model.conditioner, in_dim=understanding.width, out_dim=generator.token_dim,
        has_base=task.attribute_embeddings.shape[0] > 0))
    load_weights(conditioner, strip(trained, "conditioner."), "the final checkpoint",
                 required=conditioner.state_dict(), hint=_FINAL_HINT)
    conditioner.to(device).eval()
    attribute_embeddings = task.attribute_embeddings.to(device, torch.float32)
    phi = task.phi.to(device, torch.float32)
    grids = {}
    n = cfg.logging.sample_images
    counts = space.counts().tolist()
    for k, emotion in enumerate(EMOTIONS):
        if counts[k] == 0:
            continue
        # The generator casts to its own dtype at each part (a bf16 training run keeps bf16 frozen parts).
        result = generate(
            generator, conditioner, space, attribute_embeddings, phi, emotion, n,
            seeds=sample_grid_seeds(cfg.run.seed, k, n),
            **sampling_settings(cfg.model.generator)._asdict(), batch_size=cfg.model.generator.generation_batch_size,
        )
        grids[emotion] = result.images
    return grids


def describe_init(step_dir: Path | None) -> str:
    """One line about where stage 2 starts, for the log."""
    if step_dir is None:
        return "random initialisation"
    try:
        state = json.loads((step_dir / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("stage") == 2:
        return f"continuing the stage-2 weights of {step_dir} (step {state.get('step', '?')})"
    return f"stage-1 weights from {step_dir} (step {state.get('step', '?')})"
