"""A single-file Stable Diffusion checkpoint (CompVis layout, ``v1-5-pruned*.safetensors``) to a diffusers folder.

diffusers' ``StableDiffusionPipeline.from_single_file`` converts the CompVis keys; given ``config=`` a local
diffusers folder (its ``model_index.json``, part configs and tokenizer, no weights needed) it reads nothing from the
hub, so the conversion runs offline. The configs are what the single file lacks: the UNet/VAE/text-encoder shapes
and the CLIP tokenizer's vocabulary. ``.ckpt`` files are pickles and are refused before anything is read.

The folder is written beside ``out`` and renamed into place when complete, so an interrupted conversion leaves no
half folder; an existing ``out`` is never overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from uniemo.errors import UserError
from uniemo.models.generator import check_generator_folder, save_pipeline
from uniemo.models.weight_files import SD15_CONFIG_DOWNLOAD, file_format, single_file_generator_error

# Key prefixes of the CompVis (LDM) layout: UNet, VAE, text encoder.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)


@dataclass
class ConversionReport:
    """What :func:`convert_sd_single_file` wrote."""

    out: Path
    tensors: int
    """Tensors in the single file."""
    ema: bool
    """True when the UNet came from the file's EMA copy (``model_ema.*``)."""


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No diffusers/transformers loading bars: the command's output is its one result line (or one error line)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in enabled:
            if was:
                lib.enable_progress_bar()


def _check_config_dir(config_dir: Path) -> None:
    missing = [name for name in CONFIG_FILES if not (config_dir / name).is_file()]
    tokenizer = config_dir / "tokenizer"
    if not ((tokenizer / "vocab.json").is_file() or (tokenizer / "tokenizer.json").is_file()):
        missing.append("tokenizer/vocab.json")
    if missing:
        raise UserError(
            f"--config {config_dir} is not a diffusers Stable Diffusion config folder (missing {missing[0]}); "
            f"fetch SD-1.5's configs and tokenizer with `{SD15_CONFIG_DOWNLOAD}` and pass --config sd15-config"
        )


def _checkpoint_keys(checkpoint: Path) -> list[str]:
    if not checkpoint.is_file():
        raise UserError(f"single-file checkpoint {checkpoint} does not exist; check the path")
    if file_format(checkpoint) != "safetensors":
        raise single_file_generator_error(checkpoint)
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = list(handle.keys())
    for prefix in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX):
        if not any(k.startswith(prefix) for k in keys):
            raise UserError(
                f"{checkpoint} is not a CompVis Stable Diffusion checkpoint (no {prefix}* tensors); "
                "a diffusers folder needs no conversion, a UNet-only or LoRA file is not a whole model"
            )
    return keys


def convert_sd_single_file(
    checkpoint: str | Path, out: str | Path, config_dir: str | Path, ema: bool = True
) -> ConversionReport:
    """Convert ``checkpoint`` (CompVis-layout safetensors) into the diffusers folder ``out``, offline.

    ``config_dir`` is a diffusers SD folder of the same family (configs and tokenizer; weights are not read).
    ``ema``: take the UNet from the file's EMA copy when it has one (``v1-5-pruned.safetensors`` holds both; the
    diffusers release of SD-1.5 is the EMA weights), else the training weights. Raises one-line
    :class:`UserError`\\ s for pickles, a missing or foreign config folder, an existing ``out`` and a checkpoint
    whose shapes do not fit the configs.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    checkpoint, out, config_dir = Path(checkpoint), Path(out), Path(config_dir)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output folder (nothing was overwritten)")
    keys = _checkpoint_keys(checkpoint)
    _check_config_dir(config_dir)
    has_ema = sum(k.startswith(EMA_PREFIX) for k in keys) > 0
    try:
        with _quiet_loading():
            pipeline = StableDiffusionPipeline.from_single_file(
                str(checkpoint),
                config=str(config_dir),
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                extract_ema=ema and has_ema,
            )
    except (ValueError, RuntimeError, KeyError, OSError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's load_state_dict says "Error(s) in loading state_dict for X:" and the first mismatch below.
        first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        first = first if len(first) <= 240 else first[:237] + "..."
        raise UserError(
            f"{checkpoint} does not fit the configs in {config_dir} ({first}); pass --config the diffusers "
            "configs of the checkpoint's own model family (SD-1.x for v1-5-pruned*.safetensors)"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_pipeline(
            staging, pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler
        )
        check_generator_folder(staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionReport(out=out, tensors=len(keys), ema=ema and has_ema)
