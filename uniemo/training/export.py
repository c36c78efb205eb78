"""Checkpoints to plain weights, and ``uniemo export``: safetensors, the emotion space, a diffusers pipeline.

Run layout read here (ARCHITECTURE.md "Where a run keeps its things"; written by the trainer)::

    runs/<name>/config.yaml                        resolved config
    runs/<name>/checkpoints/latest                 text: the name of the newest complete step folder
    runs/<name>/checkpoints/step-NNNNNN/ds/        DeepSpeed checkpoint (tag "ds") of every rank
    runs/<name>/checkpoints/step-NNNNNN/trainer_state.json, COMPLETE
    runs/<name>/emotion_space.safetensors          stage 2, at the end of training (METHOD §4.1, D9)

:func:`consolidated_state_dict` turns one step folder into fp32 tensors: ZeRO 1-3 through DeepSpeed's own
``zero_to_fp32``, ZeRO 0 from the model-states file (with the fp32 master copies when the run was bf16/fp16).
The trainer saves with ``exclude_frozen_parameters=True``, so a checkpoint holds only what its stage trains (plus
persistent buffers): stage-2 checkpoints lack the frozen ViT backbone and emotion head (they come from the
stage-1 checkpoint) and the frozen generator (from ``model.generator.path`` or the seeded random preset).
:func:`uniemo.training.inference.load_run` puts these pieces back together.

An export folder (:func:`export_run`)::

    uniemo_export.json          what to rebuild the models from (config sections, dims, stage, step, version)
    model.safetensors           understanding + conditioner weights (+ the UNet when it was trained, D8), fp32
    attributes.json             the attribute table (vocabularies, base, Phi) of the run
    attribute_base.safetensors  stage 2: the base embedded in the generator's token space, and Phi (D6)
    emotion_space.safetensors   stage 2: per-emotion Gaussians (METHOD §4.1)
    pipeline/                   stage 2: StableDiffusionPipeline.save_pretrained layout; tokens <amusement> ...
                                <sadness> whose input embeddings hold each emotion's mean condition (METHOD §4.2)

so ``diffusers.StableDiffusionPipeline.from_pretrained("pipeline")("<awe>")`` generates awe images without uniemo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.training.inference import LoadedRun

__all__ = [
    "CHECKPOINT_TAG",
    "EXPORT_MANIFEST",
    "consolidated_state_dict",
    "emotion_token",
    "export_run",
    "is_checkpoint",
    "is_export",
    "latest_checkpoint",
    "resolve_checkpoint",
]

CHECKPOINT_TAG = "ds"
"""The DeepSpeed tag every step folder is saved under (``engine.save_checkpoint(step_dir, tag="ds")``)."""
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
EXPORT_MANIFEST = "uniemo_export.json"
EXPORT_FORMAT = "uniemo-export-1"
MODEL_FILE = "model.safetensors"
ATTRIBUTES_FILE = "attributes.json"
ATTRIBUTE_BASE_FILE = "attribute_base.safetensors"
EMOTION_SPACE_FILE = "emotion_space.safetensors"
PIPELINE_DIR = "pipeline"

_STEP_RE = re.compile(r"step-(\d+)$")
# The layout is written and validated by uniemo.training.checkpoint (the trainer's); this module reads it.


def emotion_token(emotion: str) -> str:
    """The token of an emotion in an exported pipeline: ``<awe>`` for ``awe``."""
    return f"<{emotion}>"


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------
def is_checkpoint(step_dir: str | Path) -> bool:
    """Whether ``step_dir`` holds a DeepSpeed checkpoint under the tag ``ds`` (a model-states file)."""
    ds_dir = Path(step_dir) / CHECKPOINT_TAG
    return ds_dir.is_dir() and any(ds_dir.glob("*model_states.pt"))


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an export written by :func:`export_run`."""
    return (Path(folder) / EXPORT_MANIFEST).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete step folder of a run (``checkpoints/latest``, :mod:`uniemo.training.checkpoint`).

    Raises:
        UserError: the run folder does not exist, has no checkpoint yet (train first), or ``latest`` names a
            missing or incomplete folder.
    """
    from uniemo.training import checkpoint

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {str(run)!r} does not exist; pass a folder under runs/ (see `uniemo train`)")
    found = checkpoint.latest_checkpoint(run)
    if found is None:
        raise UserError(
            f"run {str(run)!r} has no checkpoint yet (no checkpoints/{LATEST_FILE}); train it first with "
            "`uniemo train --config ...`"
        )
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete step folder from a run folder, its ``checkpoints/`` folder, or a step folder itself.

    Raises:
        UserError: when ``path`` is none of these.
    """
    from uniemo.training import checkpoint

    return checkpoint.resolve_checkpoint(path)


def checkpoint_step(step_dir: str | Path) -> int | None:
    """The optimizer step of a step folder: ``trainer_state.json``'s ``step``, else the folder's number."""
    step_dir = Path(step_dir)
    state = read_trainer_state(step_dir)
    for key in ("step", "global_step"):
        if isinstance(state.get(key), int):
            return int(state[key])
    match = _STEP_RE.search(step_dir.name)
    return int(match.group(1)) if match else None


def read_trainer_state(step_dir: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a step folder ({} when absent or unreadable)."""
    path = Path(step_dir) / TRAINER_STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Consolidation
# ---------------------------------------------------------------------------------------------------------
def consolidated_state_dict(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of one checkpoint folder, on the CPU, keyed by the task module's parameter names.

    ZeRO 1-3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` over every rank's optimizer shard (the fp32
    master weights). ZeRO 0: the model-states file; a bf16/fp16 run's weights come from the optimizer's fp32
    master copies (matched to names, see :func:`_zero0_state_dict`). Frozen parameters are included only when the
    checkpoint was saved with them; persistent buffers always are.

    Raises:
        UserError: ``step_dir`` holds no DeepSpeed checkpoint (tag ``ds``) or is incomplete.
    """
    step_dir = Path(step_dir)
    if not is_checkpoint(step_dir):
        raise UserError(
            f"{str(step_dir)!r} is not a checkpoint folder: it has no {CHECKPOINT_TAG}/*model_states.pt "
            "(expected runs/<name>/checkpoints/step-NNNNNN)"
        )
    from uniemo.training.safe_pickle import check_checkpoint_folder

    check_checkpoint_folder(step_dir)  # the loads below (and zero_to_fp32's) unpickle with weights_only=False
    ds_dir = step_dir / CHECKPOINT_TAG
    optim_files = sorted(ds_dir.glob("*_optim_states.pt"))
    if optim_files and _is_zero_optimizer_file(optim_files[0]):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 reports progress with print and tqdm; the CLI keeps its output to its own lines.
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(step_dir), tag=CHECKPOINT_TAG, exclude_frozen_parameters=False
                )
        except (ValueError, FileNotFoundError) as e:
            raise UserError(
                f"checkpoint {str(step_dir)!r} is incomplete or damaged ({_one_line(e)}); use an earlier step folder"
            ) from None
    else:
        model_files = sorted(ds_dir.glob("*model_states.pt"))
        state = _zero0_state_dict(model_files[0])
    return {k: v.detach().to("cpu").float().contiguous() if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def _is_zero_optimizer_file(path: Path) -> bool:
    """Whether an ``*_optim_states.pt`` file is a ZeRO 1-3 shard (zero_to_fp32's input) rather than ZeRO-0 bf16."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    data = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    inner = data.get(OPTIMIZER_STATE_DICT, {}) if isinstance(data, dict) else {}
    return isinstance(inner, dict) and ZERO_STAGE in inner


def _zero0_state_dict(model_file: Path) -> dict[str, torch.Tensor]:
    """ZeRO 0: the saved module, with 16-bit weights replaced by the optimizer's fp32 master copies.

    DeepSpeed's fp16/bf16 optimizers at ZeRO 0 save their fp32 masters per parameter group, without names. Each
    group lists its parameters in module order (``build_param_groups`` walks ``named_parameters``), so the module's
    trainable entries are a merge of the groups; walking the module in order, each entry is matched to the group
    whose next master has its shape and rounds to its 16-bit value. A parameter no master matches keeps its
    upcast 16-bit value (a warning says how many).
    """
    try:
        saved = torch.load(model_file, map_location="cpu", weights_only=False)
        module = saved["module"]
    except Exception as e:  # a truncated or foreign file: any load failure means "not a usable checkpoint"
        raise UserError(f"cannot read {str(model_file)!r} ({_one_line(e)}); use an earlier step folder") from None
    state = dict(module)
    low = [k for k, v in module.items() if v.dtype in (torch.float16, torch.bfloat16)]
    optimizer = saved.get("optimizer")
    if not low or not isinstance(optimizer, dict):
        return state
    groups = optimizer.get("fp32_groups")
    if groups is not None:
        flats = [torch.cat([t.detach().float().reshape(-1) for t in g]) if len(g) else torch.zeros(0) for g in groups]
    else:
        flats = [t.detach().float().reshape(-1) for t in optimizer.get("fp32_groups_flat") or []]
    if not flats:
        return state
    buffers = set(saved.get("buffer_names") or [])
    offsets = [0] * len(flats)
    unmatched = 0
    for name in low:
        if name in buffers:
            continue
        value = module[name]
        n = value.numel()
        match = None
        for g, flat in enumerate(flats):
            if offsets[g] + n > flat.numel():
                continue
            master = flat[offsets[g] : offsets[g] + n]
            if torch.equal(master.to(value.dtype), value.reshape(-1)):
                match = g
                break
        if match is None:
            unmatched += 1
            continue
        state[name] = flats[match][offsets[match] : offsets[match] + n].reshape(value.shape).clone()
        offsets[match] += n
    if unmatched:
        warnings.warn(
            f"{model_file}: {unmatched} 16-bit parameter(s) have no fp32 master copy; their 16-bit values are used",
            stacklevel=3,
        )
    return state


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------
def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export a run's latest checkpoint (or re-export an export) to ``out_dir`` (default ``<run>/export``).

    Writes the files listed in the module docstring into a temporary sibling folder and renames it into place,
    so ``out_dir`` is either the old export or the complete new one. Stage 2 without a saved emotion space
    computes it first (one process over the train split, METHOD §4.1).

    Raises:
        UserError: ``out_dir`` exists, is not empty and is not an earlier export; or the run cannot be loaded.
    """
    from uniemo.training.inference import load_run

    source = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else source / "export"
    _check_out_folder(out, source)
    run = load_run(source, device="cpu")  # files are written from CPU tensors; nothing heavy runs here

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is meant to be shared
        write_export(run, tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out_folder(out: Path, source: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(
            f"--out {str(out)!r} is not empty and is not a uniemo export; choose a new or empty folder"
        )
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UserError(f"--out {str(out)!r} is the export being read; choose another folder")


def write_export(run: LoadedRun, folder: str | Path) -> None:
    """Write the export files of a loaded run into ``folder`` (which should be empty)."""
    from safetensors.torch import save_file

    from uniemo.config.loader import code_version, to_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    weights = run.trained_state_dict()
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(folder / MODEL_FILE),
              metadata={"format": EXPORT_FORMAT})
    run.attributes.save(folder / ATTRIBUTES_FILE)

    data = cfg.data
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "code_version": code_version(),
        "stage": run.stage,
        "step": run.step,
        "source": str(Path(run.source).resolve()),
        "emotions": list(EMOTIONS),
        "config": {
            "run": {"seed": cfg.run.seed},
            "model": to_dict(cfg.model),
            "data": {
                "image_size": data.image_size,
                "normalization": data.normalization,
                "generator_image_size": data.generator_image_size,
                "min_attribute_count": data.min_attribute_count,
                "phi_beta": data.phi_beta,
            },
            "training": {"stage": run.stage},
        },
        "understanding_dims": dataclasses.asdict(run.understanding.dims),
        "num_scenes": len(run.attributes.scenes),
        "num_objects": len(run.attributes.objects),
        "files": {"weights": MODEL_FILE, "attributes": ATTRIBUTES_FILE},
    }
    if run.stage == 2:
        save_file(
            {"embeddings": run.attribute_embeddings.detach().float().contiguous(),
             "phi": run.phi.detach().float().contiguous()},
            str(folder / ATTRIBUTE_BASE_FILE),
        )
        run.emotion_space.save(folder / EMOTION_SPACE_FILE)
        conditions = write_pipeline(run, folder / PIPELINE_DIR)
        counts = run.emotion_space.counts("cls").tolist()
        info["token_dim"] = int(run.generator.token_dim)
        info["emotion_tokens"] = {e: emotion_token(e) for e in EMOTIONS}
        info["emotion_space_counts"] = dict(zip(EMOTIONS, counts, strict=True))
        info["emotions_without_samples"] = [e for e, n in zip(EMOTIONS, counts, strict=True) if n < 1]
        info["mean_condition_norms"] = {e: float(conditions[k].norm()) for k, e in enumerate(EMOTIONS)}
        info["files"].update(attribute_base=ATTRIBUTE_BASE_FILE, emotion_space=EMOTION_SPACE_FILE,
                             pipeline=PIPELINE_DIR)
        if info["emotions_without_samples"]:
            print(
                f"uniemo: warning: no training image of {', '.join(info['emotions_without_samples'])}: their "
                "pipeline tokens hold the condition of a zero feature",
                file=sys.stderr,
            )
    (folder / EXPORT_MANIFEST).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def write_pipeline(run: LoadedRun, folder: str | Path) -> torch.Tensor:
    """Save a diffusers ``StableDiffusionPipeline`` whose tokens ``<amusement>`` ... ``<sadness>`` hold the fused
    condition of each emotion's mean (METHOD §4.2 with the sample replaced by the mean); returns them, [8,Dt].

    The pipeline uses the run's generator (VAE, UNet, text encoder) and UniPC from its scheduler config (D10);
    the text encoder and tokenizer are copies, so ``run.generator`` is not changed.
    """
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from uniemo.training.inference import mean_conditions

    generator = run.generator
    conditions_KD = mean_conditions(run)
    tokenizer = copy.deepcopy(generator.tokenizer)
    text_encoder = copy.deepcopy(generator.text_encoder)
    tokens = [emotion_token(e) for e in EMOTIONS]
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= text_encoder.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng(devices=[]):  # the new rows are overwritten below; keep the global RNG as is
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id, condition_D in zip(ids, conditions_KD, strict=True):
            weight[token_id] = condition_D.to(weight.dtype, copy=True)
    pipeline = StableDiffusionPipeline(
        vae=generator.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=generator.unet,
        scheduler=UniPCMultistepScheduler.from_config(generator.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return conditions_KD
