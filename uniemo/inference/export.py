"""``uniemo export``: a run's weights as safetensors, the emotion space, and a diffusers pipeline.

The run is loaded by :func:`uniemo.inference.runs.load_run`, which puts the checkpoint's trained weights and
the frozen parts back together (checkpoints are read by :mod:`uniemo.training.checkpoint`).

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

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from uniemo.config.loader import code_version, to_dict
from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError
from uniemo.inference.runs import EXPORT_FORMAT, LoadedRun, load_run, mean_conditions, require_stage2
from uniemo.logging import say
from uniemo.models.generator import save_pipeline, token_embedding
from uniemo.run_layout import (
    ATTRIBUTE_BASE_FILE,
    ATTRIBUTES_FILE,
    EMOTION_SPACE_FILE,
    EXPORT_DIR,
    EXPORT_MANIFEST,
    PIPELINE_DIR,
    WEIGHTS_FILE,
    is_export,
)

__all__ = ["emotion_token", "export_run", "write_export", "write_pipeline"]


def emotion_token(emotion: str) -> str:
    """The token of an emotion in an exported pipeline: ``<awe>`` for ``awe``."""
    return f"<{emotion}>"


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
    source = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else source / EXPORT_DIR
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    weights = run.trained_state_dict()
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE),
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
        "files": {"weights": WEIGHTS_FILE, "attributes": ATTRIBUTES_FILE},
    }
    if run.stage == 2:
        parts = require_stage2(run, "an export")
        save_file(
            {"embeddings": parts.attribute_embeddings.detach().float().contiguous(),
             "phi": parts.phi.detach().float().contiguous()},
            str(folder / ATTRIBUTE_BASE_FILE),
        )
        parts.emotion_space.save(folder / EMOTION_SPACE_FILE)
        conditions = write_pipeline(run, folder / PIPELINE_DIR)
        counts = parts.emotion_space.counts("cls").tolist()
        info["token_dim"] = int(parts.generator.token_dim)
        info["emotion_tokens"] = {e: emotion_token(e) for e in EMOTIONS}
        info["emotion_space_counts"] = dict(zip(EMOTIONS, counts, strict=True))
        info["emotions_without_samples"] = [e for e, n in zip(EMOTIONS, counts, strict=True) if n < 1]
        info["mean_condition_norms"] = {e: float(conditions[k].norm()) for k, e in enumerate(EMOTIONS)}
        info["files"].update(attribute_base=ATTRIBUTE_BASE_FILE, emotion_space=EMOTION_SPACE_FILE,
                             pipeline=PIPELINE_DIR)
        if info["emotions_without_samples"]:
            say(f"warning: no training image of {', '.join(info['emotions_without_samples'])}: their "
                "pipeline tokens hold the condition of a zero feature")
    (folder / EXPORT_MANIFEST).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def write_pipeline(run: LoadedRun, folder: str | Path) -> torch.Tensor:
    """Save a diffusers ``StableDiffusionPipeline`` whose tokens ``<amusement>`` ... ``<sadness>`` hold the fused
    condition of each emotion's mean (METHOD §4.2 with the sample replaced by the mean); returns them, [8,Dt].

    The pipeline uses the run's generator (VAE, UNet, text encoder) and UniPC from its scheduler config (D10);
    the text encoder and tokenizer are copies, so ``run.generator`` is not changed.
    """
    # Heavy: only when exporting stage 2. From the defining module, which a type checker reads as the real class
    # (``from diffusers import X`` it reads as diffusers' torch-less placeholder).
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    generator = require_stage2(run, "a pipeline").generator
    conditions_KD = mean_conditions(run)
    tokenizer = copy.deepcopy(generator.tokenizer)
    text_encoder = copy.deepcopy(generator.text_encoder)
    tokens = [emotion_token(e) for e in EMOTIONS]
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert isinstance(ids, list), "a list of tokens converts to a list of ids"
    if max(ids) >= token_embedding(text_encoder).num_embeddings:
        with torch.random.fork_rng(devices=[]):  # the new rows are overwritten below; keep the global RNG as is
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        for token_id, condition_D in zip(ids, conditions_KD, strict=True):
            weight[token_id] = condition_D.to(weight.dtype, copy=True)
    scheduler = UniPCMultistepScheduler.from_config(generator.scheduler.config)
    save_pipeline(folder, generator.unet, generator.vae, text_encoder, tokenizer, scheduler)
    return conditions_KD
