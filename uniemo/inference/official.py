"""Official UniEmo checkpoints in and out: ``uniemo convert official``, ``uniemo export --official`` and the official
defaults of ``uniemo transfer --official`` (the files and their names: :mod:`uniemo.models.official`).

**In** (:func:`convert_official`). ``--stage1 best.pth`` and/or ``--stage2 DIR`` (``VIT_query.pth``, ``mapper*.pth``,
``params.json``, ``UniEmo_space/``) become run folders under ``OUT``::

    OUT/stage1/   a stage-1 run: config.yaml, conversion.json, checkpoints/step-000000/model.safetensors
    OUT/stage2/   a stage-2 run: the same, and emotion_space.safetensors from UniEmo_space/

Each step folder holds consolidated fp32 weights (``model.safetensors``, read by
:func:`uniemo.training.checkpoint.consolidated_state_dict` without any pickle) and ``trainer_state.json`` (step 0,
the stage; stage 2 records its stage-1 weights as ``init_from``: ``OUT/stage1``'s checkpoint, or, without
``--stage1``, its own, since ``VIT_query.pth`` holds the whole understanding model). So ``evaluate``, ``generate``,
``transfer``, ``classify``, ``export`` and ``feedback`` (``feedback.from_run=OUT/stage2``) take them like trained
runs; ``uniemo train --resume`` does not (there is no optimizer state: ``trainer_state.json``'s ``compat`` says so).
The models are built from ``--config`` (the uniemo config the official model fits, e.g.
``configs/emoset_stage2.yaml``) and every official tensor must fit them; the mappers' settings come from
``params.json``. What the official files do not hold is initialised from the config's seed and listed in
``conversion.json``: the stage-2 scene/object classifiers (the official code does not save them) and, in stage 1,
those classifiers too (unused there).

**Out** (:func:`export_official`): a run (or export) folder back in the official layout, so the official
``training/inference.py`` (``file = [OUT]``, ``UniEmo_space/`` copied to its working directory) loads it; a stage-2
run whose stage-1 checkpoint is known also gets ``best.pth`` for ``inference_transfer.py``.

**Transfer** (:func:`official_transfer_run`, :func:`emoset_images`): ``inference_transfer.py`` renders with the
STAGE-1 ViT (``runs/train_vit/best.pth``) feeding the stage-2 mappers, the prompt ``"<emotion> bag"``, and a random
image of the target emotion's EmoSet folder per output.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from uniemo.config import load_config, save_resolved
from uniemo.config.loader import code_version
from uniemo.config.schema import Config
from uniemo.data.loader import load_attribute_table
from uniemo.errors import ConfigError, UserError
from uniemo.logging import say
from uniemo.models import official as fmt
from uniemo.run_layout import (
    CHECKPOINTS_DIR,
    CONSOLIDATED_FILE,
    CONVERSION_FILE,
    EMOTION_SPACE_FILE,
    TRAINER_STATE_FILE,
    is_export,
    run_of_checkpoint,
    step_dir_name,
)
from uniemo.training.checkpoint import (
    STATE_VERSION,
    CheckpointError,
    atomic_write_text,
    publish,
    resolve_checkpoint,
)
from uniemo.training.emotion_space import compute_emotion_space, emotion_space_dims, emotion_space_loader
from uniemo.training.run_weights import (
    UNDERSTANDING,
    load_initial_weights,
    load_stage1_understanding,
    recorded_init,
)

__all__ = [
    "ConversionReport",
    "check_official_architecture",
    "check_official_transfer_source",
    "convert_official",
    "emoset_images",
    "export_official",
    "official_transfer_run",
]

OFFICIAL_OBJECT = "bag"
"""The object word of the official transfer prompt (``inference_transfer.py``'s ``"{} bag"`` template)."""
CONVERTED_STEP = 0
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _say(message: str) -> None:
    say(message, topic="official")


# ---------------------------------------------------------------------------------------------------------
# In: official files -> run folders
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What :func:`convert_official` wrote."""

    out: Path
    runs: dict[str, Path] = field(default_factory=dict)
    """``stage1`` / ``stage2`` -> the run folder."""
    notes: list[str] = field(default_factory=list)


def convert_official(
    *,
    config: str | Path,
    out: str | Path,
    stage1: str | Path | None = None,
    stage2: str | Path | None = None,
    space: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ConversionReport:
    """Official stage-1 / stage-2 files -> uniemo run folders under ``out`` (module docstring).

    The folders are written into a temporary sibling of ``out`` and renamed into place: ``out`` is either absent
    or complete.

    Raises:
        UserError: a missing or foreign official file, an ``out`` that exists and is not empty, or a config whose
            models the official tensors do not fit (the message names the tensor and both shapes).
    """
    if stage1 is None and stage2 is None:
        raise UserError("give --stage1 best.pth and/or --stage2 DIR (the official stage-2 output_dir)")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    if stage2 is not None and not Path(stage2).is_dir():
        raise UserError(f"--stage2 {str(stage2)!r} is not a folder; give the official stage-2 output_dir")
    if stage1 is not None and not Path(stage1).is_file():
        raise UserError(f"--stage1 {str(stage1)!r} does not exist; give the official best.pth")
    space_dir = Path(space) if space is not None else (Path(stage2) / fmt.SPACE_DIR if stage2 is not None else None)
    if space is not None and not Path(space).is_dir():
        raise UserError(f"--space {str(space)!r} is not a folder; give the official UniEmo_space/ folder")
    base = load_config(config, list(overrides))
    report = ConversionReport(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        stage1_step = None
        stage1_understanding = None
        if stage1 is not None:
            cfg1 = _stage_config(base, 1, out, report.notes)
            stage1_understanding = _convert_stage1(Path(stage1), cfg1, tmp / "stage1", report.notes)
            stage1_step = out / "stage1" / CHECKPOINTS_DIR / step_dir_name(CONVERTED_STEP)
            report.runs["stage1"] = out / "stage1"
        if stage2 is not None:
            cfg2 = _stage_config(base, 2, out, report.notes)
            _convert_stage2(Path(stage2), space_dir, cfg2, tmp / "stage2", out / "stage2", stage1_step,
                            stage1_understanding, report.notes)
            report.runs["stage2"] = out / "stage2"
        if out.exists():
            out.rmdir()  # the empty folder the user named
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _stage_config(base: Config, stage: Literal[1, 2], out: Path, notes: list[str]) -> Config:
    """The converted run's config: ``base`` at ``stage``, named ``stage<N>`` under ``out``."""
    cfg = copy.deepcopy(base)
    given = cfg.training.stage
    cfg.training.stage = stage
    cfg.training.init_from = ""
    cfg.run.name = f"stage{stage}"
    cfg.run.output_dir = str(out)
    if stage == 1 and given == 2:
        # The official stage-1 model is evaluated with EmoSet.py's test view (METHOD §2.6); a stage-2 config
        # describes the stage-2 ViT input instead.
        cfg.data.crop_resize, cfg.data.normalization = 0, "imagenet"
        notes.append("stage1: data.crop_resize=0 and data.normalization=imagenet, the official stage-1 test view "
                     "(the given config is a stage-2 one)")
    if stage == 2 and cfg.model.generator.train_unet:
        cfg.model.generator.train_unet = False
        notes.append("stage2: model.generator.train_unet=false (the official stage 2 never trains the UNet)")
    cfg.validate()
    return cfg


def check_official_architecture(und: Any, what: str) -> None:
    """The official Emotion_clip ViT has width // 64 heads (blocks and interactive blocks) and reads its queries out
    after blocks depth/3 and 2 depth/3 (``Transformer_Vis``): a model that differs computes something else there.

    Raises:
        ConfigError: naming the key, for ``what`` (the files being read, or the run being exported).
    """
    d = und.dims
    if d.heads * 64 != d.width:
        raise ConfigError(
            f"model.understanding.heads is {d.heads} for {what}, but the official model has width // 64 = "
            f"{d.width // 64} heads (Emotion_clip); the official layout needs model.understanding.heads={d.width // 64}"
        )
    if 3 * d.scene_layer != d.depth or 3 * d.object_layer != 2 * d.depth:
        raise ConfigError(
            f"model.understanding.scene_layer/object_layer are {d.scene_layer}/{d.object_layer} for {what}; the "
            f"official model reads its queries out after depth/3 and 2 depth/3 of {d.depth} blocks: leave them unset"
        )


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, official_name) -> list[str]:
    """Copy ``state`` into ``module``; returns the module's parameters it did not provide.

    Raises:
        UserError: a tensor the module has no place for, or one of another shape (named by its official name).
    """
    own = module.state_dict()
    for key, value in state.items():
        if key not in own:
            raise UserError(
                f"{source}: {official_name(key)} has no place in the model built from the config (no {key}); "
                "the config must describe the official model (model.understanding, data annotations)"
            )
        if own[key].shape != value.shape:
            raise UserError(
                f"{source}: {official_name(key)} is {list(value.shape)}, the config's model has {list(own[key].shape)}; "
                "set model.understanding / model.conditioner to the official model's sizes"
            )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    return sorted(n for n, _ in module.named_parameters() if n not in state)


def _load_understanding(model: Any, mapped: dict[str, torch.Tensor], source: Path) -> list[str]:
    """Put an official understanding state into ``model``; returns what stayed at its initialisation."""
    check_official_architecture(model, str(source))
    roles = model.parameter_roles()
    absent = {k for k in mapped if k not in model.state_dict()}
    # Heads of a query type whose data has no annotations are not built (UnderstandingModel): nothing to put there.
    skippable = {k for k in absent if k.startswith(("scene_projection", "object_projection", "logit_scale"))}
    kept = {k: v for k, v in mapped.items() if k not in skippable}
    fresh = _fill(model, kept, source, fmt.official_name)
    missing = [k for k in fresh if roles.get(k) in ("backbone", "queries", "head")]
    if missing:
        raise UserError(f"{source} lacks {fmt.official_name(missing[0])} (and {len(missing) - 1} more tensors of the "
                        "official model); give a complete checkpoint of the official code")
    return fresh + sorted(skippable)


def _read_pair(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``model`` and ``Emo_classifier`` of an official best.pth / VIT_query.pth, and its other entries (plain)."""
    value = fmt.read_official_file(path)
    if not isinstance(value, dict) or "model" not in value or "Emo_classifier" not in value:
        have = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise fmt.OfficialFileError(
            f"{path} has no 'model' and 'Emo_classifier' entries (it holds {have}); give the official {path.name}"
        )
    states = []
    for key in ("model", "Emo_classifier"):
        state = value[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise fmt.OfficialFileError(f"{path} [{key!r}] is not a state dict of tensors")
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        states.append(state)
    rest = {k: v for k, v in value.items() if k not in ("model", "Emo_classifier", "optimizer", "lr_scheduler")}
    return states[0], states[1], rest


def _convert_stage1(path: Path, cfg: Config, run_dir: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    from uniemo.models.weights import build_understanding

    _say(f"reading {path}")
    model_state, head_state, rest = _read_pair(path)
    mapped, left_out = fmt.understanding_from_official(model_state, head_state, path)
    attributes = load_attribute_table(cfg.data)
    torch.manual_seed(cfg.run.seed)
    understanding = build_understanding(cfg.model.understanding, len(attributes.scenes), len(attributes.objects))
    fresh = _load_understanding(understanding, mapped, path)
    state = {f"understanding.{k}": v for k, v in understanding.state_dict().items()}
    sources = {"stage1": _source(path)}
    record = {"stage": 1, "official": {k: v for k, v in rest.items() if k != "config"}, "config": rest.get("config")}
    _write_run(run_dir, cfg, state, None, sources, fresh, left_out, record, init_from=None)
    notes.append(f"stage1: {len(mapped)} tensors from {path.name}; initialised from the config: "
                 f"{_summary(fresh)}; left out: {len(left_out)} official tensors (text tower, unused projections)")
    return {k: v for k, v in understanding.state_dict().items()}


def _convert_stage2(
    folder: Path,
    space_dir: Path | None,
    cfg: Config,
    run_dir: Path,
    final_dir: Path,
    stage1_step: Path | None,
    stage1_understanding: dict[str, torch.Tensor] | None,
    notes: list[str],
) -> None:
    from uniemo.training.task import build_stage2_task

    params = fmt.read_params(folder / fmt.PARAMS_FILE)
    mappers = {name: fmt.mapper_from_official(fmt.read_state_dict(folder / file), folder / file)
               for name, file in fmt.MAPPER_FILES.items()}
    for key, value in fmt.conditioner_settings(params, mappers["emotion"], folder / fmt.PARAMS_FILE).items():
        setattr(cfg.model.conditioner, key, value)
    cfg.validate()
    vit = folder / fmt.VIT_QUERY_FILE
    _say(f"reading {vit}")
    model_state, head_state, _ = _read_pair(vit)
    mapped, left_out = fmt.understanding_from_official(model_state, head_state, vit)
    if stage1_understanding is not None:
        differ = sorted(k for k, v in mapped.items() if k.startswith(("embeddings.", "pre_layrnorm.", "encoder.",
                        "post_layernorm.", "emotion_head.")) and not torch.equal(v, stage1_understanding[k]))
        if differ:
            notes.append(f"stage2: warning: the backbone/head of {vit.name} differ from --stage1's ({len(differ)} "
                         "tensors, e.g. " + differ[0] + "): the files are not from one official run")
    attributes = load_attribute_table(cfg.data)
    torch.manual_seed(cfg.run.seed)
    task = build_stage2_task(cfg, attributes)
    fresh = _load_understanding(task.understanding, mapped, vit)
    conditioner_state = {}
    for name, state in mappers.items():
        if getattr(task.conditioner, f"mapper_{name}") is None:
            raise UserError(
                f"the config's conditioner has no {name} mapper (its attribute base is empty, or "
                "model.conditioner says so), but {folder / fmt.MAPPER_FILES[name]} is one; use the official tables: "
                "data.attributes=emogen"
            )
        conditioner_state.update({f"mapper_{name}.{k}": v for k, v in state.items()})
    _fill(task.conditioner, conditioner_state, folder, _mapper_name)
    state = {f"understanding.{k}": v for k, v in task.understanding.state_dict().items()}
    state.update({f"conditioner.{k}": v for k, v in task.conditioner.state_dict().items()})
    sources = {"vit_query": _source(vit), "params": _source(folder / fmt.PARAMS_FILE)}
    sources.update({f"mapper_{n}": _source(folder / f) for n, f in fmt.MAPPER_FILES.items()})
    space = None
    if space_dir is not None and space_dir.is_dir():
        space, missing = fmt.read_official_space(space_dir, emotion_space_dims(task.understanding))
        sources["emotion_space"] = {"folder": str(space_dir.resolve())}
        if missing:
            notes.append(f"stage2: {space_dir} has no files of {', '.join(missing)}: generation refuses them")
    else:
        notes.append(f"stage2: no {fmt.SPACE_DIR}/ ({space_dir}): the emotion space is computed over the train split "
                     "on first use (D9)")
    own_step = final_dir / CHECKPOINTS_DIR / step_dir_name(CONVERTED_STEP)
    init_from = stage1_step if stage1_step is not None else own_step
    if stage1_step is None:
        notes.append("stage2: no --stage1: the run's own checkpoint stands for its stage-1 weights (VIT_query.pth "
                     "holds the whole understanding model); transfer --official then uses the stage-2 ViT")
    record = {"stage": 2, "params": params, "conditioner": dataclasses.asdict(cfg.model.conditioner),
              "emotion_space_count": fmt.OFFICIAL_SPACE_COUNT if space is not None else None}
    _write_run(run_dir, cfg, state, space, sources, fresh, left_out, record, init_from=init_from)
    notes.append(f"stage2: {len(mapped)} tensors from {vit.name} and 3 mappers; initialised from the config: "
                 f"{_summary(fresh)}")


def _mapper_name(key: str) -> str:
    """``mapper_scene.layers.0.weight`` -> ``mapper_scene.pth mlp.0.weight`` (for messages)."""
    mapper, rest = key.split(".", 1)
    return f"{fmt.MAPPER_FILES[mapper[len('mapper_'):]]} {fmt.mapper_to_official({rest: torch.zeros(1)}).popitem()[0]}"


def _summary(names: list[str]) -> str:
    groups = sorted({n.split(".")[0] for n in names})
    return ", ".join(groups) if groups else "nothing"


def _source(path: Path) -> dict[str, str]:
    return {"path": str(Path(path).resolve()), "sha256": fmt.sha256_of(path)}


def _write_run(
    run_dir: Path,
    cfg: Config,
    state: dict[str, torch.Tensor],
    space: Any,
    sources: dict[str, Any],
    fresh: list[str],
    left_out: list[str],
    record: dict[str, Any],
    init_from: Path | None,
) -> None:
    """A run folder of one consolidated checkpoint at step 0 (module docstring)."""
    save_resolved(cfg, run_dir)
    step_dir = run_dir / CHECKPOINTS_DIR / step_dir_name(CONVERTED_STEP)
    step_dir.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in state.items()}, str(step_dir / CONSOLIDATED_FILE), metadata={"format": "uniemo-official-1"})
    trainer_state: dict[str, Any] = {
        "version": STATE_VERSION,
        "step": CONVERTED_STEP,
        "stage": cfg.training.stage,
        "init_from": str(init_from) if init_from is not None else None,
        "continued_from": None,
        # Not resumable (no optimizer state): check_compatible names this key when `train --resume` is tried.
        "compat": {"converted": "from official UniEmo files, no optimizer state: start a new run from it"},
        "loader_positions": [],
        "world_size": 1,
        "converted_from": sources,
    }
    atomic_write_text(step_dir / TRAINER_STATE_FILE, json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")
    publish(run_dir, step_dir)
    if space is not None:  # after COMPLETE: it belongs to this checkpoint (feedback checks the order)
        space.save(run_dir / EMOTION_SPACE_FILE)
    conversion = {
        "format": "uniemo-official-conversion-1",
        "code_version": code_version(),
        "sources": sources,
        "initialised_from_config": fresh,
        "official_tensors_left_out": left_out,
        **record,
    }
    (run_dir / CONVERSION_FILE).write_text(json.dumps(conversion, indent=1, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Out: a run -> official files
# ---------------------------------------------------------------------------------------------------------
def export_official(run: str | Path, out: str | Path) -> list[Path]:
    """Write a run (or export) in the official layout into ``out`` (new or empty); returns the files written.

    Stage 1: ``best.pth`` (``{model, Emo_classifier}``). Stage 2: ``VIT_query.pth``, ``mapper.pth``,
    ``mapper_scene.pth``, ``mapper_object.pth``, ``params.json`` (``output_dir`` = ``out``), ``UniEmo_space/`` and,
    when the run's stage-1 checkpoint is known, that checkpoint as ``best.pth``.

    Raises:
        UserError: ``out`` is not empty; the run has no scene or object queries, or its mappers are not the official
            MLP (the official layout cannot hold them).
    """
    from uniemo.inference.runs import load_run

    source = Path(run)
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    loaded = load_run(source, device="cpu", compute_missing_emotion_space=False)
    und = loaded.understanding
    check_official_architecture(und, str(source))  # before any heavy work
    if loaded.stage == 2 and loaded.emotion_space is None:
        _say(f"{source} has no emotion space (stage 2 did not finish): computing it over the train split")
        loaded.emotion_space = compute_emotion_space(und, emotion_space_loader(loaded.config), loaded.device)
    if und.scene_queries is None or und.object_queries is None:
        raise UserError(f"{source} has its scene or object queries switched off (D13); the official model has both")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        model_state, head_state, _ = fmt.understanding_to_official(und.state_dict())
        names: list[str] = []
        if loaded.stage == 1:
            torch.save({"model": model_state, "Emo_classifier": head_state}, tmp / fmt.STAGE1_FILE)
            names.append(fmt.STAGE1_FILE)
        else:
            names += _export_stage2(loaded, source, model_state, head_state, tmp, out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / n for n in names]


def _export_stage2(loaded: Any, source: Path, model_state, head_state, tmp: Path, out: Path) -> list[str]:
    from uniemo.inference.runs import require_stage2

    parts = require_stage2(loaded, "an official export")
    conditioner = parts.conditioner
    if conditioner.mapper_scene is None or conditioner.mapper_object is None:
        raise UserError(f"{source} has no scene/object mappers (no attribute base); the official model has all three")
    torch.save({"model": model_state, "Emo_classifier": head_state}, tmp / fmt.VIT_QUERY_FILE)
    names = [fmt.VIT_QUERY_FILE]
    for name, file in fmt.MAPPER_FILES.items():
        torch.save(fmt.mapper_to_official(getattr(conditioner, f"mapper_{name}").state_dict()), tmp / file)
        names.append(file)
    stage1_file = None
    stage1 = _stage1_checkpoint(loaded)
    if stage1 is not None:
        from uniemo.models.understanding import UnderstandingModel

        # Parameters no stage-1 checkpoint holds (frozen projections, logit scales) come from the stage-1 run's
        # initial weights (a run written before they were saved: its seed, as load_run does); the official stage 2
        # and inference do not use them.
        stage1_run = run_of_checkpoint(stage1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(loaded.config.run.seed)
            understanding = UnderstandingModel(loaded.config.model.understanding, len(loaded.attributes.scenes),
                                               len(loaded.attributes.objects), dims=loaded.understanding.dims)
        load_initial_weights(understanding, stage1_run, prefix=UNDERSTANDING)
        load_stage1_understanding(understanding, stage1, hint="use the stage-1 run this stage-2 run records")
        model1, head1, _ = fmt.understanding_to_official(understanding.state_dict())
        torch.save({"model": model1, "Emo_classifier": head1}, tmp / fmt.STAGE1_FILE)
        names.append(fmt.STAGE1_FILE)
        stage1_file = out / fmt.STAGE1_FILE
    params = fmt.official_params(loaded.config, int(loaded.understanding.width), out, stage1_file)
    (tmp / fmt.PARAMS_FILE).write_text(json.dumps(params) + "\n", encoding="utf-8")
    names.append(fmt.PARAMS_FILE)
    written = fmt.write_official_space(parts.emotion_space, tmp / fmt.SPACE_DIR)
    names += [str(p.relative_to(tmp)) for p in written]
    return names


def _stage1_checkpoint(loaded: Any) -> Path | None:
    """The stage-1 checkpoint a stage-2 run (not an export) records, unless it is the run's own (a conversion
    without --stage1); None when there is none."""
    if is_export(loaded.source) or not (Path(loaded.source) / TRAINER_STATE_FILE).is_file():
        return None
    step = recorded_init(loaded.source)
    if step is None or not step.is_dir():
        return None
    return None if step.resolve() == Path(loaded.source).resolve() else step


# ---------------------------------------------------------------------------------------------------------
# Transfer: the official defaults
# ---------------------------------------------------------------------------------------------------------
def official_transfer_run(run: Any) -> tuple[Any, str]:
    """``run`` with its understanding model replaced by the stage-1 one the run started from (the official
    ``inference_transfer.py`` loads ``runs/train_vit/best.pth``); the mappers stay the stage-2 run's.

    Returns:
        The new :class:`LoadedRun` (``run`` is not changed) and a one-line note of where the ViT came from.

    Raises:
        UserError: ``run`` is an export (it does not hold the stage-1 weights).
    """
    check_official_transfer_source(run.source)
    step = recorded_init(run.source)
    if step is None:
        raise UserError(f"{run.source} does not record its stage-1 checkpoint (init_from); pass a stage-2 run folder")
    try:
        step = resolve_checkpoint(step)
    except CheckpointError as e:
        raise UserError(f"the stage-1 checkpoint of {run.source} cannot be read: {e}") from None
    if step.resolve() == Path(run.source).resolve():
        return run, f"ViT: the run's own ({step}; a conversion without --stage1 records no stage-1 weights)"
    device = run.device
    understanding = copy.deepcopy(run.understanding).cpu()
    load_stage1_understanding(understanding, step, hint="use the stage-1 run this stage-2 run records")
    return dataclasses.replace(run, understanding=understanding.to(device).eval()), f"ViT: stage 1 ({step})"


def check_official_transfer_source(path: str | Path) -> None:
    """UserError unless ``path`` can give the stage-1 ViT: an export does not hold it (checked before loading)."""
    if is_export(path):
        raise UserError(
            f"transfer --official renders with the stage-1 ViT the stage-2 run started from, which the export "
            f"{path} does not hold; pass the stage-2 run folder"
        )


def emoset_images(root: str | Path, emotion: str, seeds: list[int]) -> list[Path]:
    """One source image per seed, drawn at random (``random.Random(seed)``) from the target emotion's EmoSet folder
    ``root/image/<emotion>/`` (or ``root/<emotion>/``), as ``inference_transfer.py`` draws one per output.

    Raises:
        UserError: no such folder, or no image in it.
    """
    root = Path(root)
    folder = next((f for f in (root / "image" / emotion, root / emotion) if f.is_dir()), None)
    if folder is None:
        raise UserError(f"--emoset {str(root)!r} has no image/{emotion}/ (nor {emotion}/) folder; give the EmoSet root")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder} holds no image files ({', '.join(_IMAGE_SUFFIXES)})")
    return [files[random.Random(seed).randrange(len(files))] for seed in seeds]
