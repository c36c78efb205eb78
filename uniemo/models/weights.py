"""Loading CLIP weights into the understanding model, from local transformers-format folders only (D3).

A folder written by ``CLIPModel.save_pretrained`` (or ``CLIPVisionModel.save_pretrained``) holds ``config.json``
and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or one variant of either such as
``model.fp16.safetensors``). Only safetensors are read: pickled ``pytorch_model.bin`` files and OpenAI's
``ViT-L-14.pt`` are refused with the conversion to run, never unpickled. The understanding model's backbone carries CLIP's own
parameter names, so the mapping is the checkpoint key minus ``vision_model.``; CLIP's ``logit_scale`` becomes
the scene logit scale, as in the official code (METHOD §2.3). Everything else the model owns (queries,
interactive blocks, heads, projections, the object logit scale) is new and listed in the :class:`LoadReport`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from uniemo.config.schema import ModelConfig, UnderstandingConfig
from uniemo.errors import ConfigError, UserError
from uniemo.models.generator import check_generator_folder
from uniemo.models.understanding import UnderstandingDims, UnderstandingModel, resolve_dims
from uniemo.models.weight_files import (
    TRANSFORMERS_STEM,
    find_safetensors,
    resave_command,
    single_file_clip_error,
)

log = logging.getLogger(__name__)

VISION_PREFIX = "vision_model."
_VISION_DEFAULTS = dict(  # transformers' CLIPVisionConfig defaults, for keys a config.json leaves out
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)


class WeightsError(UserError):
    """A CLIP folder that is missing, unreadable, or does not fit the configured model."""


@dataclass
class LoadReport:
    """What :func:`load_clip_into_understanding` did."""

    new: list[str]
    """Model parameters that the checkpoint did not provide (fresh initialisation)."""
    ignored: list[str]
    """Checkpoint tensors that were not used (text tower, projections, ...)."""
    loaded: list[str] = field(default_factory=list)
    """Model parameters copied from the checkpoint."""


@dataclass
class ClipFolder:
    """The parsed ``config.json`` of a transformers CLIP folder."""

    path: Path
    vision: dict
    """Vision-tower config with transformers' defaults filled in."""
    projection_dim: int
    """The joint embedding width (``projection_dim``)."""
    has_text: bool
    """True for a full ``CLIPModel`` folder (text tower present)."""
    raw: dict


def read_clip_folder(clip_dir: str | Path) -> ClipFolder:
    """Parse a transformers CLIP folder's ``config.json`` (``CLIPModel`` or ``CLIPVisionModel`` layout)."""
    path = Path(clip_dir).expanduser()
    if path.is_file():
        raise single_file_clip_error(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(
            f"CLIP folder {path} has no config.json; set model.understanding.clip_path to a folder written by "
            "transformers' CLIPModel.save_pretrained"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {config_file}: {exc}; re-save the CLIP folder") from exc
    model_type = raw.get("model_type")
    if model_type == "clip":
        vision = raw.get("vision_config") or {}
        projection_dim = raw.get("projection_dim", 512)
        has_text = True
    elif model_type == "clip_vision_model":
        vision = raw
        projection_dim = raw.get("projection_dim", 512)
        has_text = False
    else:
        raise WeightsError(
            f"{config_file} has model_type {model_type!r}, not a CLIP model ('clip' or 'clip_vision_model'); "
            "point model.understanding.clip_path at a transformers CLIP folder"
        )
    vision = {**_VISION_DEFAULTS, **vision}
    return ClipFolder(
        path=path, vision=vision, projection_dim=int(projection_dim), has_text=has_text, raw=raw
    )


def dims_from_clip(clip_dir: str | Path, cfg: UnderstandingConfig | None = None) -> UnderstandingDims:
    """The understanding architecture of a CLIP folder's vision tower (``preset: from_clip``).

    Query counts, L1/L2 and other overrides come from ``cfg`` (None: defaults, 32 queries each, METHOD §1);
    the embedding width is CLIP's ``projection_dim`` unless ``cfg.embed_dim`` is set.
    """
    folder = read_clip_folder(clip_dir)
    v = folder.vision
    base = dict(
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        width=int(v["hidden_size"]),
        depth=int(v["num_hidden_layers"]),
        heads=int(v["num_attention_heads"]),
        mlp_dim=int(v["intermediate_size"]),
        embed_dim=folder.projection_dim,
        queries=32,
        activation=str(v["hidden_act"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
    )
    return resolve_dims(cfg or UnderstandingConfig(preset="from_clip"), base=base)


def _architecture_mismatches(dims: UnderstandingDims, vision: dict) -> list[str]:
    pairs = (
        ("width", dims.width, "hidden_size"),
        ("depth", dims.depth, "num_hidden_layers"),
        ("heads", dims.heads, "num_attention_heads"),
        ("patch_size", dims.patch_size, "patch_size"),
        ("image_size", dims.image_size, "image_size"),
        ("mlp_dim", dims.mlp_dim, "intermediate_size"),
        ("activation", dims.activation, "hidden_act"),
        ("layer_norm_eps", dims.layer_norm_eps, "layer_norm_eps"),
        ("channels", 3, "num_channels"),
    )
    return [
        f"{name} {ours} vs checkpoint {theirs_key}={vision[theirs_key]}"
        for name, ours, theirs_key in pairs
        if ours != vision[theirs_key]
    ]


def _check_fits(dims: UnderstandingDims, folder: ClipFolder) -> None:
    mismatches = _architecture_mismatches(dims, folder.vision)
    if mismatches:
        raise WeightsError(
            f"CLIP folder {folder.path} does not fit model.understanding: {'; '.join(mismatches)}. "
            "Set model.understanding.preset to the checkpoint's (or from_clip) and drop conflicting overrides"
        )


def check_model_folders(cfg: ModelConfig) -> None:
    """Check the weights folders a config names before any heavy work starts (the driver of ``uniemo train``).

    Reads only ``config.json`` files and folder listings: the CLIP folder exists, is a CLIP model, fits
    ``model.understanding`` and holds safetensors; the generator folder has the diffusers layout with
    safetensors. Raises the same one-line :class:`WeightsError` / :class:`UserError` the loaders raise.
    """

    und = cfg.understanding
    if und.clip_path:
        path = Path(und.clip_path).expanduser()
        if path.is_file():
            raise single_file_clip_error(path)
        if not path.is_dir():
            raise WeightsError(
                f"model.understanding.clip_path {path} does not exist; put a transformers CLIP folder there "
                "(CLIPModel.save_pretrained, e.g. openai/clip-vit-large-patch14) or fix the path"
            )
        folder = read_clip_folder(path)
        _check_fits(dims_from_clip(path, und) if und.preset == "from_clip" else resolve_dims(und), folder)
        safetensors_files(path)
    if cfg.generator.path:
        check_generator_folder(cfg.generator.path)
    attribute_clip = cfg.conditioner.attribute_clip_path
    if cfg.conditioner.attribute_space == "clip_text" and attribute_clip:
        if not Path(attribute_clip).expanduser().is_dir():
            raise WeightsError(
                f"model.conditioner.attribute_clip_path {attribute_clip} does not exist; put a transformers CLIP "
                "folder there (CLIPModel.save_pretrained, with its tokenizer) or fix the path"
            )
        if not read_clip_folder(attribute_clip).has_text:
            raise WeightsError(
                f"model.conditioner.attribute_clip_path {attribute_clip} holds only a CLIP vision tower; the attribute "
                "names need a full CLIPModel folder (text tower and text_projection)"
            )
        safetensors_files(Path(attribute_clip).expanduser())


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a CLIP folder: ``model.safetensors``, the shards of its index, or the same of its
    one variant (``model.fp16.safetensors``); pickles only are a :class:`WeightsError`, never unpickled."""
    try:
        found = find_safetensors(
            path, TRANSFORMERS_STEM, "CLIP folder", resave_command(path, "transformers.CLIPModel")
        )
    except UserError as exc:  # the same line, as this module's error type
        raise WeightsError(str(exc)) from None
    return list(found.files)


def read_safetensors(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors of a (possibly sharded) safetensors folder whose key passes ``keep`` (None: all)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if keep is None or keep(key):
                    tensors[key] = handle.get_tensor(key)
    return tensors


def _target_name(key: str, model: UnderstandingModel, bare: bool = False) -> str | None:
    """The model parameter a checkpoint key maps to, or None. ``bare``: a vision-only folder whose keys carry no
    ``vision_model.`` prefix (a ``CLIPVisionModel`` built and saved by transformers 5 writes them so)."""
    if key.startswith(VISION_PREFIX):
        return key[len(VISION_PREFIX) :]
    if bare:
        return key
    if key == "logit_scale" and model.logit_scale_scene is not None:
        # METHOD §2.3: the scene contrastive logits use CLIP's own (pretrained) logit scale.
        return "logit_scale_scene"
    return None


def load_clip_into_understanding(model: UnderstandingModel, clip_dir: str | Path) -> LoadReport:
    """Copy a local CLIP folder's vision tower (and logit scale) into ``model`` (D3).

    Raises :class:`WeightsError` (a :class:`UserError`) when the folder is missing, holds only pickles, or its
    architecture differs from the model's (naming each mismatch). Returns which parameters are new.
    """
    folder = read_clip_folder(clip_dir)
    _check_fits(model.dims, folder)
    checkpoint = read_safetensors(folder.path)
    bare = not folder.has_text and not any(k.startswith(VISION_PREFIX) for k in checkpoint)
    params = dict(model.named_parameters())
    loaded, ignored = [], []
    with torch.no_grad():
        for key, tensor in checkpoint.items():
            name = _target_name(key, model, bare)
            if name is None or name not in params:
                ignored.append(key)
                continue
            param = params[name]
            if param.shape != tensor.shape:
                raise WeightsError(
                    f"{key} in {folder.path} has shape {tuple(tensor.shape)}, model.understanding expects "
                    f"{tuple(param.shape)}; the folder does not match its config.json, re-save it"
                )
            param.copy_(tensor.to(dtype=param.dtype, device=param.device))
            loaded.append(name)
    roles = model.parameter_roles()
    missing_backbone = sorted(n for n in params if roles[n] == "backbone" and n not in loaded)
    if missing_backbone:
        raise WeightsError(
            f"CLIP folder {folder.path} lacks {len(missing_backbone)} vision-tower tensors "
            f"(first: {VISION_PREFIX}{missing_backbone[0]}); it is not a complete CLIP vision tower"
        )
    new = sorted(n for n in params if n not in set(loaded))
    log.info("loaded %d CLIP tensors from %s; %d new parameters", len(loaded), folder.path, len(new))
    return LoadReport(new=new, ignored=sorted(ignored), loaded=sorted(loaded))


def build_understanding(cfg: UnderstandingConfig, num_scenes: int, num_objects: int) -> UnderstandingModel:
    """Build the understanding model from config; load ``cfg.clip_path`` when set. ``preset: from_clip`` takes the
    architecture from the CLIP folder."""
    return build_understanding_reported(cfg, num_scenes, num_objects)[0]


def build_understanding_reported(
    cfg: UnderstandingConfig, num_scenes: int, num_objects: int
) -> tuple[UnderstandingModel, LoadReport | None]:
    """:func:`build_understanding`, and what loading ``cfg.clip_path`` did (None: no CLIP folder)."""
    dims = None
    if cfg.preset == "from_clip":
        if not cfg.clip_path:
            raise ConfigError("model.understanding.preset 'from_clip' needs model.understanding.clip_path")
        dims = dims_from_clip(cfg.clip_path, cfg)
    model = UnderstandingModel(cfg, num_scenes, num_objects, dims=dims)
    return model, load_clip_into_understanding(model, cfg.clip_path) if cfg.clip_path else None
