"""Loading a trained run (or an export) for inference, and the ``generate`` / ``classify`` commands.

:func:`load_run` rebuilds the models of a run from its resolved config and its latest checkpoint:

- stage 1: the understanding model (``understanding.*`` of the checkpoint);
- stage 2: the whole task of :func:`uniemo.training.task.build_stage2_task`. The checkpoint holds only what stage 2
  trains (queries + interactive blocks, attribute classifiers, mappers; the UNet with ``train_unet``), because the
  trainer saves with ``exclude_frozen_parameters``. The frozen ViT backbone and emotion head come from the stage-1
  checkpoint the run started from (``training.init_from``, or ``init_from`` in ``trainer_state.json``); the
  frozen generator from ``model.generator.path`` or the random preset, which is rebuilt bit for bit from the
  config's seed. Parameters that never train and are in no checkpoint (the contrastive logit scales, frozen
  projections) are rebuilt from config and the run seed; neither generation nor classification reads them.

or from an export folder (:mod:`uniemo.training.export`), which is self-contained.

Generation samples a condition per image from the emotion space (METHOD §4.2, D10) through
:func:`uniemo.models.generation.generate`; classification runs the understanding model with evaluation transforms.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniemo.config import load_config
from uniemo.config.loader import from_dict
from uniemo.config.schema import EMOTIONS, Config
from uniemo.data.attributes import AttributeTable
from uniemo.data.images import load_image_bytes
from uniemo.data.loader import load_attribute_table
from uniemo.data.records import RecordProblem
from uniemo.data.transforms import SampleTransform, build_sample_transform
from uniemo.errors import UserError
from uniemo.logging import say
from uniemo.models.acceleration import compile_for_generation
from uniemo.models.conditioner import Conditioner
from uniemo.models.emotion_space import EmotionSpace
from uniemo.models.generation import SAMPLERS, generate
from uniemo.models.generator import Generator
from uniemo.models.understanding import UnderstandingDims, UnderstandingModel
from uniemo.models.weights import build_understanding
from uniemo.run_layout import (
    ATTRIBUTE_BASE_FILE,
    ATTRIBUTES_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EMOTION_SPACE_FILE,
    EXPORT_MANIFEST,
    GENERATIONS_FILE,
    PIPELINE_DIR,
    STEP_DIR_PREFIX,
    WEIGHTS_FILE,
    is_export,
)
from uniemo.training.checkpoint import (
    checkpoint_step,
    consolidated_state_dict,
    is_complete,
    read_trainer_state,
    require_checkpoint,
    resolve_checkpoint,
)
from uniemo.training.emotion_space import compute_emotion_space, emotion_space_loader
from uniemo.training.task import build_stage2_task

__all__ = [
    "LoadedRun",
    "Stage2Parts",
    "classify_images",
    "default_device",
    "emotion_index",
    "generate_images",
    "load_run",
    "mean_conditions",
    "request_seeds",
    "require_stage2",
    "sampling_settings",
    "save_generations",
]

EXPORT_FORMAT = "uniemo-export-1"
"""The format of ``uniemo_export.json`` this module reads (and :mod:`uniemo.training.export` writes)."""


@dataclass
class LoadedRun:
    """The models and tables of a trained run, ready for inference (fp32, eval mode)."""

    config: Config
    stage: int
    step: int | None
    """Optimizer step of the checkpoint (None when unknown)."""
    source: Path
    """The checkpoint step folder or export folder the weights were read from."""
    understanding: UnderstandingModel
    transform: SampleTransform
    """Evaluation transform of the understanding input (Resize + CenterCrop, ``data.normalization``)."""
    attributes: AttributeTable
    conditioner: Conditioner | None = None
    generator: Generator | None = None
    emotion_space: EmotionSpace | None = None
    attribute_embeddings: torch.Tensor | None = None
    """[A,Dt] the attribute base in the generator's token space (D6); stage 2."""
    phi: torch.Tensor | None = None
    """[A,8] Φ aligned with the base; stage 2."""
    notes: list[str] = field(default_factory=list)
    """What loading had to do beyond reading files (e.g. computing a missing emotion space)."""

    def to(self, device: torch.device | str) -> LoadedRun:
        """Move the models and tables to ``device`` (the emotion space stays on the CPU, where draws are made)."""
        device = torch.device(device)
        for module in (self.understanding, self.conditioner, self.generator):
            if module is not None:
                module.to(device)
        if self.attribute_embeddings is not None:
            self.attribute_embeddings = self.attribute_embeddings.to(device)
        if self.phi is not None:
            self.phi = self.phi.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.understanding.parameters()).device

    @property
    def attribute_names(self) -> list[str]:
        """Names of the attribute base, aligned with ``attribute_embeddings`` / ``phi``."""
        return list(self.attributes.base_names)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What the export stores: ``understanding.*`` (all of it), ``conditioner.*`` and, with ``train_unet``
        (D8), ``generator.unet.*``."""
        state = {f"understanding.{k}": v for k, v in self.understanding.state_dict().items()}
        if self.conditioner is not None:
            state.update({f"conditioner.{k}": v for k, v in self.conditioner.state_dict().items()})
        if self.generator is not None and self.config.model.generator.train_unet:
            state.update({f"generator.unet.{k}": v for k, v in self.generator.unet.state_dict().items()})
        return state


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(
    path: str | Path, *, device: torch.device | str | None = None, compute_missing_emotion_space: bool = True,
    checkpoint: str | Path | None = None,
) -> LoadedRun:
    """Load a run folder (its latest checkpoint, or the step folder ``checkpoint`` of it) or an export folder for
    inference, in fp32 on ``device`` (default :func:`default_device`).

    A stage-2 run without ``emotion_space.safetensors`` (training stopped before its end) gets one computed from
    the loaded weights over the train split, on this process, when ``compute_missing_emotion_space``.

    Raises:
        UserError: the folder is missing, has no checkpoint, or its checkpoint does not fit its config.
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"run directory {str(p)!r} does not exist; pass a run folder (runs/<name>) or an export folder")
    device = default_device() if device is None else torch.device(device)
    if is_export(p):
        return _load_export(p).to(device)
    if not (p / CONFIG_FILE).is_file():
        raise UserError(
            f"{str(p)!r} is neither a run folder (no config.yaml) nor an export (no {EXPORT_MANIFEST}); "
            "pass runs/<name> or the folder written by `uniemo export`"
        )
    return _load_run_dir(p, device, compute_missing_emotion_space, checkpoint)


def _load_run_dir(
    run_dir: Path, device: torch.device, compute_missing_emotion_space: bool, checkpoint: str | Path | None = None
) -> LoadedRun:

    cfg = load_config(run_dir / CONFIG_FILE)
    step_dir = Path(checkpoint) if checkpoint is not None else require_checkpoint(run_dir)
    state = consolidated_state_dict(step_dir)
    attributes = load_attribute_table(cfg.data)
    stage = int(cfg.training.stage)
    transform = build_sample_transform(cfg.data, stage=1, training=False)
    torch.manual_seed(cfg.run.seed)  # parameters in no checkpoint (never trained) are rebuilt as at training
    if stage == 1:

        understanding = build_understanding(cfg.model.understanding, len(attributes.scenes), len(attributes.objects))
        _load_into(understanding, _strip(state, "understanding."), step_dir)
        run = LoadedRun(cfg, 1, checkpoint_step(step_dir), step_dir, understanding.eval(), transform, attributes)
        return run.to(device)


    task = build_stage2_task(cfg, attributes)
    # The frozen backbone and head are not in a stage-2 checkpoint: start from the stage-1 weights.
    frozen_understanding = [
        f"understanding.{n}"
        for n, role in task.understanding.parameter_roles().items()
        if role in ("backbone", "head") and f"understanding.{n}" not in state
    ]
    if frozen_understanding:
        stage1 = _stage1_understanding_state(run_dir, step_dir, cfg)
        _load_into(task.understanding, stage1, step_dir, partial=True)
    _load_into(task, state, step_dir)
    task.eval()
    run = LoadedRun(
        cfg,
        2,
        checkpoint_step(step_dir),
        step_dir,
        task.understanding,
        transform,
        attributes,
        conditioner=task.conditioner,
        generator=task.generator,
        attribute_embeddings=task.attribute_embeddings.detach().clone(),
        phi=task.phi.detach().clone(),
    ).to(device)
    run.emotion_space = _run_emotion_space(run, run_dir, compute_missing_emotion_space)
    return run


def _run_emotion_space(run: LoadedRun, run_dir: Path, compute: bool) -> EmotionSpace | None:

    path = run_dir / EMOTION_SPACE_FILE
    if path.is_file():
        return EmotionSpace.load(path)
    if not compute:
        return None

    note = f"{path} is missing (stage 2 did not finish): computing it from {run.source} over the train split"
    say(note)
    run.notes.append(note)
    return compute_emotion_space(run.understanding, emotion_space_loader(run.config), run.device)


def _stage1_understanding_state(run_dir: Path, step_dir: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The understanding weights of the stage-1 checkpoint a stage-2 run started from (bare names)."""
    from safetensors.torch import load_file

    candidates: list[tuple[str, str]] = []
    for source in (read_trainer_state(step_dir), _first_trainer_state(run_dir)):
        if isinstance(source.get("init_from"), str) and source["init_from"]:
            candidates.append(("trainer_state.json init_from", source["init_from"]))
    if cfg.training.init_from:
        candidates.append(("training.init_from", cfg.training.init_from))
    if not candidates:
        raise UserError(
            f"stage-2 run {str(run_dir)!r} does not record its stage-1 checkpoint (training.init_from is empty), "
            "and its checkpoint holds only the stage-2 trained weights; set training.init_from in its config.yaml "
            "to the stage-1 run folder"
        )
    where, value = candidates[0]
    init = Path(value)
    if not init.is_absolute() and not init.exists() and (run_dir / init).exists():
        init = run_dir / init
    if is_export(init):
        return _strip(load_file(str(init / WEIGHTS_FILE)), "understanding.")
    try:
        stage1_dir = resolve_checkpoint(init)
    except UserError as e:
        raise UserError(f"the stage-1 checkpoint of this stage-2 run ({where}={value!r}) cannot be read: {e}") from None
    return _strip(consolidated_state_dict(stage1_dir), "understanding.")


def _first_trainer_state(run_dir: Path) -> dict[str, Any]:
    """The trainer_state.json of the run's earliest step folder ({} if none): where the run began."""
    steps = [s for s in sorted((run_dir / CHECKPOINTS_DIR).glob(f"{STEP_DIR_PREFIX}*")) if is_complete(s)]
    return read_trainer_state(steps[0]) if steps else {}


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_into(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: Path,
    *,
    partial: bool = False,
) -> None:
    """Copy ``state`` into ``module`` and check that it fits.

    Every key must name a parameter or buffer of ``module`` with the same shape (else the checkpoint belongs to
    another config). Unless ``partial``, every parameter the stage trains (``requires_grad`` after the task's
    freezing) must be present; frozen ones are rebuilt from config (see the module docstring).
    """
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    shape_errors = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = [] if partial else sorted(
        n for n, p in module.named_parameters() if p.requires_grad and n not in state
    )
    if unexpected or shape_errors or missing:
        detail = (
            f"unknown keys {unexpected[:3]}" if unexpected
            else f"shape mismatch at {shape_errors[:3]}" if shape_errors
            else f"missing trained parameters {missing[:3]}"
        )
        raise UserError(
            f"checkpoint {str(source)!r} does not fit the model built from the run's config ({detail}); "
            "the run folder mixes configs or is damaged"
        )
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))


def _load_export(folder: Path) -> LoadedRun:
    from safetensors.torch import load_file


    try:
        info = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / EXPORT_MANIFEST} is not readable ({e}); export the run again") from None
    if info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{folder} is an export of format {info.get('format')!r}, not {EXPORT_FORMAT!r}; export again")
    cfg = from_dict(Config, info["config"])
    attributes = AttributeTable.load(folder / ATTRIBUTES_FILE)
    weights = load_file(str(folder / WEIGHTS_FILE))
    stage = int(info["stage"])
    torch.manual_seed(cfg.run.seed)
    understanding = UnderstandingModel(
        cfg.model.understanding,
        int(info["num_scenes"]),
        int(info["num_objects"]),
        dims=UnderstandingDims(**info["understanding_dims"]),
    )
    _load_strict(understanding, _strip(weights, "understanding."), folder)
    transform = build_sample_transform(cfg.data, stage=1, training=False)
    run = LoadedRun(cfg, stage, info.get("step"), folder, understanding.eval(), transform, attributes)
    if stage == 1:
        return run


    gen_cfg = cfg.model.generator
    generator = Generator.from_pretrained(
        folder / PIPELINE_DIR,
        placeholder_token=gen_cfg.placeholder_token,
        placeholder_init=gen_cfg.placeholder_init,
        train_unet=False,  # an export's UNet already holds the trained weights; inference never trains it
    )
    base = load_file(str(folder / ATTRIBUTE_BASE_FILE))
    conditioner = Conditioner(cfg.model.conditioner, in_dim=understanding.width, out_dim=generator.token_dim,
                              has_base=base["embeddings"].shape[0] > 0)
    _load_strict(conditioner, _strip(weights, "conditioner."), folder)
    run.conditioner = conditioner.eval()
    run.generator = generator.eval()
    run.attribute_embeddings = base["embeddings"]
    run.phi = base["phi"]
    run.emotion_space = EmotionSpace.load(folder / EMOTION_SPACE_FILE)
    return run


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{folder / WEIGHTS_FILE} does not fit {EXPORT_MANIFEST} ({first}); export the run again") from None


# ---------------------------------------------------------------------------------------------------------
# Conditions, generation, classification
# ---------------------------------------------------------------------------------------------------------
def emotion_index(name: str) -> int:
    """EmoSet index of an emotion name (D1); UserError listing the 8 names otherwise."""
    key = name.strip().lower()
    if key not in EMOTIONS:
        raise UserError(f"unknown emotion {name!r}; choose one of {', '.join(EMOTIONS)}")
    return EMOTIONS.index(key)


@dataclass(frozen=True)
class Stage2Parts:
    """The stage-2 fields of a :class:`LoadedRun`, all present (what generation needs)."""

    generator: Generator
    conditioner: Conditioner
    emotion_space: EmotionSpace
    attribute_embeddings: torch.Tensor
    phi: torch.Tensor


def require_stage2(run: LoadedRun, what: str) -> Stage2Parts:
    if (
        run.stage != 2
        or run.generator is None
        or run.conditioner is None
        or run.attribute_embeddings is None
        or run.phi is None
    ):
        raise UserError(f"{str(run.source)!r} is a stage-{run.stage} run; {what} needs a stage-2 run (joint training)")
    if run.emotion_space is None:
        raise UserError(
            f"{str(run.source)!r} has no emotion space; finish stage 2 (or export the run, which computes it)"
        )
    return Stage2Parts(run.generator, run.conditioner, run.emotion_space, run.attribute_embeddings, run.phi)


@torch.no_grad()
def mean_conditions(run: LoadedRun) -> torch.Tensor:
    """The fused condition of each emotion's MEAN, float32 [8,Dt] (METHOD §4.2 with the draw replaced by μ_k):
    ``c_k = M_emo(μ_cls[k]) + α_s(k)·M_scene(μ_s[k]) + α_o(k)·M_obj(μ_o[k])``, α at the target emotion k."""
    parts = require_stage2(run, "a mean condition")
    space, conditioner = parts.emotion_space, parts.conditioner
    param = next(conditioner.parameters())
    means = {s: space.mean(s).to(param.device, param.dtype) for s in space.streams}
    labels_K = torch.arange(space.num_emotions, device=param.device)
    was_training = conditioner.training
    conditioner.eval()
    try:
        out = conditioner(
            means["cls"], means.get("scene"), means.get("object"), labels_K, parts.attribute_embeddings, parts.phi
        )
    finally:
        conditioner.train(was_training)
    return out.condition.detach().float().cpu()


def generate_images(
    run: LoadedRun,
    emotion: str,
    num: int,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    batch_size: int | None = None,
    image_format: str = "png",
) -> list[dict[str, Any]]:
    """Generate ``num`` images of ``emotion`` with sampled conditions (METHOD §4.2, D10) into ``out_dir``.

    Images are ``<emotion>_<seed>.png`` (``.jpg`` with ``image_format="jpg"``, :func:`save_generations`); one JSON
    line per image is appended to ``out_dir/generations.jsonl``
    (file, emotion, seed, steps, guidance, sampler, α_s, α_o, retrieved attributes, checkpoint). Seeds are
    ``seed, seed+1, ...`` when ``seed`` is given, else drawn at random; defaults for steps, guidance and sampler
    come from ``model.generator``.
    """
    k = emotion_index(emotion)
    parts = require_stage2(run, "generation")
    gen_cfg = run.config.model.generator
    steps, guidance_scale, sampler = sampling_settings(run, steps, guidance_scale, sampler)
    batch_size = gen_cfg.generation_batch_size if batch_size is None else int(batch_size)
    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    seeds = request_seeds(seed, num)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the images")
    out.mkdir(parents=True, exist_ok=True)
    if gen_cfg.compile and parts.generator.fixed_batch != batch_size:  # CUDA graphs at this batch (once)
        compile_for_generation(parts.generator, batch_size)
    result = generate(
        parts.generator,
        parts.conditioner,
        parts.emotion_space,
        parts.attribute_embeddings,
        parts.phi,
        k,
        num,
        seeds=seeds,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        batch_size=batch_size,
    )
    names = run.attribute_names

    def attribute(index: int) -> str | None:
        return names[index] if 0 <= index < len(names) else None

    records = []
    for i in range(len(result.images)):
        name = f"{EMOTIONS[k]}_{result.seeds[i]}.{image_format}"
        record = {
            "file": name,
            "emotion": EMOTIONS[k],
            "seed": int(result.seeds[i]),
            "steps": steps,
            "guidance_scale": guidance_scale,
            "sampler": sampler,
            "alpha_scene": float(result.alpha_scene[i]),
            "alpha_object": float(result.alpha_object[i]),
            "scene_attribute": attribute(int(result.scene_attribute[i])),
            "object_attribute": attribute(int(result.object_attribute[i])),
            "checkpoint": str(run.source),
            "step": run.step,
        }
        records.append(record)
    save_generations(out, result.images, records)
    return records


def sampling_settings(
    run: LoadedRun, steps: int | None, guidance_scale: float | None, sampler: str | None
) -> tuple[int, float, str]:
    """Steps, guidance and sampler of a request, each defaulting to ``model.generator``'s; an unknown sampler is a
    UserError."""
    gen_cfg = run.config.model.generator
    steps = gen_cfg.sampling_steps if steps is None else int(steps)
    guidance = gen_cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
    sampler = gen_cfg.sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return steps, guidance, sampler


def request_seeds(seed: int | None, num: int) -> list[int]:
    """``seed, seed+1, ...`` for ``num`` images, or ``num`` random seeds when ``seed`` is None (D10)."""
    if seed is None:
        return random.SystemRandom().sample(range(2**31 - 1), num)
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    return [seed + i for i in range(num)]


JPEG_QUALITY = 75
"""Quality of JPEG evaluation images: PIL's default, which EmoGen's ``img.save(f"...jpg")`` uses."""


def save_generations(out: Path, images: Any, records: list[dict[str, Any]]) -> None:
    """Write image i as ``records[i]["file"]`` in ``out`` with its record inside (D10: the seed travels with the
    image): a PNG's ``uniemo`` text chunk, or a JPEG's comment (``.jpg``, quality :data:`JPEG_QUALITY`); append
    the records to ``out/generations.jsonl``."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    for image, record in zip(images, records, strict=True):
        text = json.dumps(record)
        if str(record["file"]).endswith(".jpg"):
            Image.fromarray(image).save(out / record["file"], quality=JPEG_QUALITY, comment=text.encode("utf-8"))
            continue
        info = PngInfo()
        info.add_text("uniemo", text)
        Image.fromarray(image).save(out / record["file"], pnginfo=info)
    with open(out / GENERATIONS_FILE, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def classify_images(run: LoadedRun, paths: list[str | Path], batch_size: int = 16) -> list[dict[str, Any]]:
    """Emotion probabilities of image files with the understanding model (evaluation transforms).

    Returns one ``{"image", "emotion", "probability", "probabilities": {emotion: p}}`` per path, in order.

    Raises:
        UserError: a file is missing or does not decode (the message names it).
    """

    if not paths:
        raise UserError("give at least one image file to classify")
    tensors = []
    for path in paths:
        try:
            data, _ = load_image_bytes(path)
        except RecordProblem as e:
            raise UserError(str(e)) from None
        tensors.append(_image_tensor(run, data))
    model = run.understanding
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    probs = []
    try:
        for start in range(0, len(tensors), batch_size):
            images = torch.stack(tensors[start : start + batch_size]).to(param.device, param.dtype)
            probs.append(model(images).emotion_logits.float().softmax(dim=-1).cpu())
    finally:
        model.train(was_training)
    probs_NK = torch.cat(probs)
    results = []
    for path, p_K in zip(paths, probs_NK, strict=True):
        top = int(p_K.argmax())
        results.append({
            "image": str(path),
            "emotion": EMOTIONS[top],
            "probability": float(p_K[top]),
            "probabilities": {e: float(p_K[i]) for i, e in enumerate(EMOTIONS)},
        })
    return results


def _image_tensor(run: LoadedRun, data: bytes) -> torch.Tensor:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return run.transform(image, random.Random(0))["image"]  # the transform applies to_rgb
