"""Loading a trained run (or an export) for inference, and the ``generate`` / ``classify`` commands.

:func:`load_run` rebuilds the models of a run from its resolved config and its latest checkpoint:

- stage 1: the understanding model (``understanding.*`` of the checkpoint);
- stage 2: the whole task of :func:`uniemo.training.task.build_stage2_task`. The checkpoint holds only what stage 2
  trains (queries + interactive blocks, attribute classifiers, mappers; the UNet with ``train_unet``), because the
  trainer saves with ``exclude_frozen_parameters``. The frozen ViT backbone and emotion head come from the stage-1
  checkpoint the run records (``init_from`` in ``trainer_state.json``); the frozen generator from
  ``model.generator.path`` or its preset's own seed. Parameters that never train and are in no checkpoint (the
  contrastive logit scales, frozen projections) come from the run's ``initial_weights.safetensors``; a run written
  before uniemo saved that file gets them by replaying its training's random draws.

Every weight goes through :mod:`uniemo.training.run_weights`, the one loader.

or from an export folder (:mod:`uniemo.inference.export`), which is self-contained.

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
from uniemo.models.generation import generate, sampling_settings
from uniemo.models.generator import Generator
from uniemo.models.understanding import UnderstandingDims, UnderstandingModel
from uniemo.models.weights import build_understanding
from uniemo.run_layout import (
    ATTRIBUTE_BASE_FILE,
    ATTRIBUTES_FILE,
    CONFIG_FILE,
    EMOTION_SPACE_FILE,
    EXPORT_MANIFEST,
    GENERATIONS_FILE,
    INITIAL_WEIGHTS_FILE,
    PIPELINE_DIR,
    WEIGHTS_FILE,
    is_export,
)
from uniemo.seeds import request_seeds
from uniemo.training.checkpoint import checkpoint_step, consolidated_state_dict, require_checkpoint
from uniemo.training.emotion_space import compute_emotion_space, emotion_space_loader
from uniemo.training.run_weights import (
    UNDERSTANDING,
    load_initial_weights,
    load_stage1_understanding,
    load_stage2_weights,
    load_weights,
    recorded_init,
    strip,
    trained_names,
)
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
    "require_stage2",
    "save_generations",
]

EXPORT_FORMAT = "uniemo-export-1"
"""The format of ``uniemo_export.json`` this module reads (and :mod:`uniemo.inference.export` writes)."""


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


_RUN_HINT = "the run folder mixes configs or is damaged"


def _load_run_dir(
    run_dir: Path, device: torch.device, compute_missing_emotion_space: bool, checkpoint: str | Path | None = None
) -> LoadedRun:
    cfg = load_config(run_dir / CONFIG_FILE)
    step_dir = Path(checkpoint) if checkpoint is not None else require_checkpoint(run_dir)
    attributes = load_attribute_table(cfg.data)
    stage = int(cfg.training.stage)
    transform = build_sample_transform(cfg.data, stage=1, training=False)
    with torch.random.fork_rng(devices=[]):
        if not (run_dir / INITIAL_WEIGHTS_FILE).is_file():
            # A run written before its never-trained parameters were saved with it: they are rebuilt by the
            # random draws its training made (stages._build_task seeds the same way before building).
            torch.manual_seed(cfg.run.seed)
        if stage == 1:
            understanding = build_understanding(
                cfg.model.understanding, len(attributes.scenes), len(attributes.objects))
            load_initial_weights(understanding, run_dir, prefix=UNDERSTANDING)
            load_weights(understanding, strip(consolidated_state_dict(step_dir), UNDERSTANDING), step_dir,
                         required=trained_names(understanding), hint=_RUN_HINT)
            run = LoadedRun(cfg, 1, checkpoint_step(step_dir), step_dir, understanding.eval(), transform, attributes)
            return run.to(device)
        task = build_stage2_task(cfg, attributes)
    load_initial_weights(task, run_dir)
    load_stage1_understanding(task.understanding, _stage1_checkpoint(run_dir, step_dir), _RUN_HINT)
    load_stage2_weights(task, step_dir, _RUN_HINT)
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


def _stage1_checkpoint(run_dir: Path, step_dir: Path) -> Path:
    """The stage-1 checkpoint the stage-2 checkpoint ``step_dir`` builds on (the one it records)."""
    stage1 = recorded_init(step_dir)
    if stage1 is None:
        raise UserError(
            f"stage-2 run {str(run_dir)!r} does not record its stage-1 checkpoint (no init_from in "
            f"{step_dir.name}'s trainer state), and its checkpoint holds only the stage-2 trained weights; it was not "
            "written by uniemo's trainer"
        )
    return stage1


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
    understanding = UnderstandingModel(
        cfg.model.understanding,
        int(info["num_scenes"]),
        int(info["num_objects"]),
        dims=UnderstandingDims(**info["understanding_dims"]),
    )
    _load_export_weights(understanding, strip(weights, UNDERSTANDING), folder)
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
    _load_export_weights(conditioner, strip(weights, "conditioner."), folder)
    run.conditioner = conditioner.eval()
    run.generator = generator.eval()
    run.attribute_embeddings = base["embeddings"]
    run.phi = base["phi"]
    run.emotion_space = EmotionSpace.load(folder / EMOTION_SPACE_FILE)
    return run


def _load_export_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    load_weights(module, state, folder / WEIGHTS_FILE, required=module.state_dict(),
                 hint=f"it does not match {EXPORT_MANIFEST}: export the run again")


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
    steps, guidance_scale, sampler = sampling_settings(gen_cfg, steps, guidance_scale, sampler)
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
    records = []
    for i in range(len(result.images)):
        name = f"{EMOTIONS[k]}_{result.seeds[i]}.{image_format}"
        record = {
            "file": name,
            "emotion": EMOTIONS[k],
            **image_record(result, i, run.attribute_names, steps, guidance_scale, sampler),
            "checkpoint": str(run.source),
            "step": run.step,
        }
        records.append(record)
    save_generations(out, result.images, records)
    return records


def image_record(
    result: Any, i: int, names: list[str], steps: int, guidance_scale: float, sampler: str
) -> dict[str, Any]:
    """What ``generate`` and ``transfer`` record of their ``i``-th image: its seed, the sampler settings, its
    alphas and the attributes its condition retrieved (named from ``names``; None outside them)."""

    def attribute(index: int) -> str | None:
        return names[index] if 0 <= index < len(names) else None

    return {
        "seed": int(result.seeds[i]),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "alpha_scene": float(result.alpha_scene[i]),
        "alpha_object": float(result.alpha_object[i]),
        "scene_attribute": attribute(int(result.scene_attribute[i])),
        "object_attribute": attribute(int(result.object_attribute[i])),
    }


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
