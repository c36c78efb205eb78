"""Which safetensors files a transformers or diffusers model folder holds, and what to say when it holds none.

Real folders come in more shapes than ``save_pretrained`` writes by default:

- the plain layout, ``<stem>.safetensors`` or a sharded ``<stem>.safetensors.index.json``;
- a *variant* layout, as the hub's ``fp16`` branches ship it: ``<stem>.fp16.safetensors`` or
  ``<stem>.safetensors.index.fp16.json`` (the names transformers' and diffusers' ``variant=`` argument reads);
- pickles only (``pytorch_model.bin``, ``diffusion_pytorch_model.bin``), which uniemo never unpickles (D3);
- a single file where a folder is expected: OpenAI's ``ViT-L-14.pt`` (a TorchScript archive, a pickle inside a
  zip), a CompVis ``v1-5-pruned*.safetensors`` or ``*.ckpt`` checkpoint.

:func:`find_safetensors` picks the plain layout when it exists, else the one variant present; every other case
is one :class:`UserError` line that names the file found and the conversion to run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from uniemo.errors import UserError

TRANSFORMERS_STEM = "model"
"""transformers' weights name: ``model.safetensors`` (``CLIPModel``, ``CLIPTextModel``)."""
DIFFUSERS_STEM = "diffusion_pytorch_model"
"""diffusers' weights name: ``diffusion_pytorch_model.safetensors`` (UNet, VAE)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Files that hold pickles (a TorchScript ``.pt`` is a zip with a pickle inside): never opened."""


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of one model folder."""

    folder: Path
    variant: str | None
    """``None`` for the plain layout, else the variant (``fp16``) to pass as ``variant=`` to from_pretrained."""
    files: tuple[Path, ...]
    """The single file, or the shards the index lists (sorted, each once)."""
    index: Path | None = None
    """The ``*.safetensors.index*.json`` the shards come from, if sharded."""


def _variant_of(name: str, stem: str) -> str | None:
    """``fp16`` for ``<stem>.fp16.safetensors`` and ``<stem>.safetensors.index.fp16.json``; else None."""
    single = (f"{stem}.", ".safetensors")
    if name.startswith(single[0]) and name.endswith(single[1]):
        middle = name[len(single[0]) : -len(single[1])]
        if middle and "." not in middle and "-of-" not in middle:
            return middle
    index = (f"{stem}.safetensors.index.", ".json")
    if name.startswith(index[0]) and name.endswith(index[1]):
        middle = name[len(index[0]) : -len(index[1])]
        return middle or None
    return None


def _files_of(folder: Path, stem: str, variant: str | None) -> WeightFiles | None:
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    if single.is_file():
        return WeightFiles(folder, variant, (single,))
    index = folder / f"{stem}.safetensors.index{suffix}.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"cannot read {index}: {exc}; re-download or re-save the folder") from exc
    shards = tuple(folder / name for name in sorted(set(weight_map.values())))
    missing = [s.name for s in shards if not s.is_file()]
    if missing or not shards:
        first = missing[0] if missing else "(none listed)"
        raise UserError(f"shard {first} listed in {index} is missing; re-download the folder")
    return WeightFiles(folder, variant, shards, index)


def resave_command(folder: Path, loader: str) -> str:
    """A one-line command that re-saves a pickled folder as safetensors, for the user to run outside uniemo (it
    unpickles; transformers' and diffusers' ``save_pretrained`` write safetensors by default)."""
    module, name = loader.rsplit(".", 1)
    return (
        f"python -c \"from {module} import {name}; "
        f"{name}.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\""
    )


def find_safetensors(folder: str | Path, stem: str, what: str, resave: str) -> WeightFiles:
    """The safetensors weights of ``folder`` (plain layout first, else its one variant).

    ``what`` names the folder in messages (``"CLIP folder"``, ``"generator part"``); ``resave`` is the command that
    converts pickles (:func:`resave_command`), named when the folder holds only pickles. Raises a one-line
    :class:`UserError` when the folder holds only pickles, several variants and no plain file, or nothing.
    """
    path = Path(folder)
    plain = _files_of(path, stem, None)
    if plain is not None:
        return plain
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    variants = sorted({v for v in (_variant_of(n, stem) for n in names) if v})
    if len(variants) == 1:
        found = _files_of(path, stem, variants[0])
        if found is not None:
            return found
    if len(variants) > 1:
        raise UserError(
            f"{what} {path} holds the weight variants {', '.join(variants)} and no plain {stem}.safetensors; "
            f"keep the files of one variant (e.g. {stem}.{variants[0]}.safetensors) and move the others away"
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UserError(
            f"{what} {path} holds only pickled weights ({', '.join(pickles)}), which uniemo never unpickles; "
            f"convert them to safetensors: {resave}"
        )
    raise UserError(
        f"{what} {path} has no {stem}.safetensors (nor an fp16 variant or a sharded index); "
        "point the config at a folder written by save_pretrained"
    )


SD15_CONFIG_DOWNLOAD = (
    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' '*.txt' --local-dir sd15-config"
)
"""Fetches SD-1.5's configs and tokenizer (a few kB, no weights): the ``--config`` of ``uniemo convert sd-single-file``."""


def file_format(path: Path) -> str:
    """``"safetensors"``, ``"pickle"`` (a pickle, or a zip such as TorchScript and ``torch.save`` write) or
    ``"unknown"``, from the first bytes only: nothing is deserialised."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if head.startswith((b"PK\x03\x04", b"\x80")) or path.suffix in PICKLE_SUFFIXES:
        return "pickle"
    return "unknown"


def single_file_generator_error(path: Path) -> UserError:
    """What to do with a single checkpoint file given as ``model.generator.path`` (a diffusers folder is expected)."""
    if file_format(path) == "safetensors":
        return UserError(
            f"model.generator.path {path} is a single-file Stable Diffusion checkpoint, not a diffusers folder; "
            f"convert it once with `uniemo convert sd-single-file {path} {path.with_suffix('')}-diffusers "
            f"--config sd15-config` (sd15-config from `{SD15_CONFIG_DOWNLOAD}`) and point model.generator.path "
            "at the new folder"
        )
    if file_format(path) == "pickle":
        return UserError(
            f"model.generator.path {path} is a pickled checkpoint, which uniemo never unpickles; use the "
            f".safetensors release of the same weights with `uniemo convert sd-single-file`, or convert it with "
            f"diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py --checkpoint_path {path} "
            f"--dump_path {path.with_suffix('')}-diffusers --to_safetensors"
        )
    return UserError(
        f"model.generator.path {path} is a file, neither safetensors nor a checkpoint uniemo knows; set it to a "
        "diffusers-format Stable Diffusion folder (StableDiffusionPipeline.save_pretrained layout)"
    )


def single_file_clip_error(path: Path) -> UserError:
    """What to do with a single file given as ``model.understanding.clip_path`` (a transformers folder is expected),
    e.g. OpenAI's ``ViT-L-14.pt``."""
    convert = (
        "transformers' src/transformers/models/clip/convert_clip_original_pytorch_to_hf.py "
        f"--checkpoint_path {path} --pytorch_dump_folder_path {path.with_suffix('')}-hf "
        "--config_path <config.json of openai/clip-vit-large-patch14>"
    )
    if file_format(path) == "pickle":
        return UserError(
            f"model.understanding.clip_path {path} is an OpenAI/PyTorch CLIP archive (a pickle), which uniemo never "
            f"unpickles; use the transformers folder openai/clip-vit-large-patch14, or convert it with {convert}"
        )
    return UserError(
        f"model.understanding.clip_path {path} is a single file; point it at a transformers CLIP folder "
        "(config.json + model.safetensors, as CLIPModel.save_pretrained writes, e.g. openai/clip-vit-large-patch14); "
        "a transformers model.safetensors goes in a folder beside its config.json, open_clip/OpenAI-layout weights "
        "are not read (use the transformers release of the same model)"
    )
