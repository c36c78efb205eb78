"""Precomputed VAE latents for stage 2 (data/FORMAT.md, "Precomputed latents"): the encoder runs once per image.

Stage 2 gives the VAE the whole image resized to G x G (no random crop), flipped left-right with p = 0.5 in
training (METHOD §3.2 b). So each image has exactly two VAE inputs, and the VAE's latent distribution of each,
its mean and std, can be computed once and stored beside the shards. A training step then draws
``z_0 = (mean + std * eps) * scaling_factor`` from the stored moments of the orientation the step's flip picked,
with the same single ``eps`` draw the encoder's own ``latent_dist.sample`` makes: given the same random state the
latents, and so the loss, are the on-the-fly path's (tests/test_latents.py). A flip changes the latent (the
encoder's convolutions are not mirror-symmetric), which is why both orientations are stored rather than one.

Layout, beside the shard folder's ``manifest.json``::

    <shards>/latents-<G>/
      manifest.json               format, G, resize filter, VAE digest, dtype, one entry per shard
      train-000000.safetensors    "mean", "std": [N, 2, C, h, w] (orientation 0 = as is, 1 = flipped);
      ...                         metadata "keys": the sample keys of rows 0..N-1 (JSON list)

An entry is used only while its ``shard_sha256`` equals the shard manifest's ``sha256`` (a rewritten shard makes
its latents stale), and a run uses the folder only when the VAE digest, G and the resize filter
(``data.generator_resample``) match its own
(:func:`check_latents`): latents of another VAE are an error, never silently mixed in.

Written by ``uniemo data latents`` (:func:`write_latents`): resumable per shard (each file is written to a
temporary name and renamed; the manifest is updated under a lock after each shard), and ``--part K/N`` lets N
processes (one per GPU) share the shards. Read in the loader's workers by :class:`LatentReader`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uniemo.atomic import atomic_write
from uniemo.data.attributes import write_json_atomic
from uniemo.data.images import image_member, open_image, to_rgb
from uniemo.data.limits import active_limits, over_cap, read_capped
from uniemo.data.remote import is_file_name
from uniemo.data.shards import MANIFEST_FILE, manifest_folders, read_manifest
from uniemo.data.transforms import GENERATOR_RESAMPLE, generator_pixels
from uniemo.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from uniemo.models.generator import Generator

FORMAT = 1
KIND = "uniemo-vae-latents"
DIR_PREFIX = "latents-"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
ORIENTATIONS = 2
"""Row 0: the image as is; row 1: flipped left-right."""
_LOCK = ".manifest.lock"


def latents_folder(shard_folder: str | Path, image_size: int) -> Path:
    """Where the latents of ``G = image_size`` live for a shard folder (one with ``manifest.json``)."""
    return Path(shard_folder) / f"{DIR_PREFIX}{image_size}"


def vae_digest(vae: nn.Module) -> str:
    """sha256 over the VAE's state (names, shapes and float32 values): which VAE a latents folder was made with."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(value.shape)};".encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


def read_latents_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a latents folder, or None when there is none; :class:`DataError` when damaged."""
    path = Path(folder) / MANIFEST_FILE
    try:
        with open(path, "rb") as f:
            data = json.loads(read_capped(f, active_limits().max_manifest_bytes, lambda: over_cap(
                f"{path} is larger than the cap", "max_manifest_bytes", active_limits().max_manifest_bytes)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable latents manifest ({e}); delete {folder} and run `uniemo data latents` "
                        "again") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format") != FORMAT:
        raise DataError(f"{path} is not a uniemo latents manifest of format {FORMAT}; delete {folder} and run "
                        "`uniemo data latents` again")
    return data


def covered_shards(shard_folder: str | Path, image_size: int) -> dict[str, str]:
    """``{shard name: latents file}`` for the shards of one manifest folder whose latents are current (recorded for
    the shard's present sha256); empty when the folder has no latents of this size."""
    folder = latents_folder(shard_folder, image_size)
    manifest = read_latents_manifest(folder)
    if manifest is None:
        return {}
    current = {e["name"]: e.get("sha256") for e in read_manifest(shard_folder)["shards"]}
    for i, e in enumerate(manifest.get("shards", [])):
        if not is_file_name(e.get("file")):  # a latents file lies in its folder: never a path of the manifest's choosing
            raise DataError(f"{folder / MANIFEST_FILE} entry {i}: latents file {e.get('file')!r} is not a plain file "
                            f"name; delete {folder} and run `uniemo data latents` again")
    return {
        e["name"]: str(folder / e["file"])
        for e in manifest.get("shards", [])
        if e.get("shard_sha256") and current.get(e["name"]) == e["shard_sha256"] and (folder / e["file"]).is_file()
    }


def check_latents(shard_folder: str | Path, image_size: int, resample: str, vae: nn.Module) -> dict[str, Any]:
    """The latents manifest of a run's real shard folder, checked against the run: present, of this G, resize
    filter (``data.generator_resample``) and VAE. Raises a one-line :class:`ConfigError` saying what to run
    otherwise."""
    folder = latents_folder(shard_folder, image_size)
    manifest = read_latents_manifest(folder)
    rerun = "run `uniemo data latents --config <this config>` first, or set data.precomputed_latents=false"
    if manifest is None:
        raise ConfigError(f"data.precomputed_latents is on but {folder} holds no latents; {rerun}")
    if manifest.get("image_size") != image_size or manifest.get("resize") != resample:
        raise ConfigError(
            f"{folder} holds latents of {manifest.get('image_size')} px ({manifest.get('resize')} resize), this run "
            f"needs {image_size} px ({resample}, data.generator_resample); delete the folder and {rerun}"
        )
    if manifest.get("vae_sha256") != vae_digest(vae):
        raise ConfigError(
            f"{folder} holds latents of another VAE than model.generator's; delete the folder and {rerun}"
        )
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def _shard_images(path: Path) -> Iterator[tuple[str, Any]]:
    """``(key, RGB PIL image)`` of every sample of a tar whose image decodes (the loader skips the others). Read as
    the loader reads (its tar reader and image opener, with the caps of ``data.limits``)."""
    from webdataset.tariterators import group_by_keys

    from uniemo.data.tar_members import tar_members

    def reraise(exn: Exception) -> bool:
        raise exn

    limits = active_limits()
    with open(path, "rb") as stream:
        members = tar_members(iter([{"url": str(path), "stream": stream}]), reraise, limits)
        for sample in group_by_keys(members):
            ext = image_member(sample)
            if ext is None:
                continue
            try:
                image = open_image(sample[ext], limits.max_image_pixels)
                image.load()
            except Exception:  # an undecodable image or one over the pixel cap: the loader skips the sample too
                continue
            yield sample["__key__"], to_rgb(image)


@torch.no_grad()
def encode_shard(
    path: Path, generator: Generator, image_size: int, resample: str, batch_size: int, dtype: torch.dtype
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(keys, mean, std)`` of one shard: moments ``[N, 2, C, h, w]`` in ``dtype``, both orientations."""
    keys: list[str] = []
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        mean, std = generator.latent_moments(torch.stack(pending))
        shape = (-1, ORIENTATIONS, *mean.shape[1:])
        means.append(mean.float().reshape(shape).to("cpu", dtype))
        stds.append(std.float().reshape(shape).to("cpu", dtype))
        pending.clear()

    for key, image in _shard_images(path):
        keys.append(key)
        pending += [generator_pixels(image, image_size, flip, resample) for flip in (False, True)]
        if len(pending) >= 2 * batch_size:
            flush()
    if pending:
        flush()
    if not keys:
        empty = torch.zeros(0, ORIENTATIONS, 0, dtype=dtype)
        return keys, empty, empty
    return keys, torch.cat(means), torch.cat(stds)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """safetensors file through a temporary name and a rename; returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, data, mode=0o644)
    return hashlib.sha256(data).hexdigest()


def parse_part(part: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N; :class:`ConfigError` otherwise."""
    try:
        k, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise ConfigError(f"--part {part!r}: give K/N, e.g. 0/4 for the first of 4 processes") from None
    if not 0 <= k < n:
        raise ConfigError(f"--part {part!r}: need 0 <= K < N")
    return k, n


def write_latents(
    shard_folder: str | Path,
    generator: Generator,
    image_size: int,
    *,
    resample: str,
    splits: Sequence[str] = ("train", "val"),
    batch_size: int = 16,
    dtype: str = "float16",
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the latent moments of every shard of ``splits`` in ``shard_folder`` (module docstring):
    each image resized to ``image_size`` with the ``resample`` filter (``data.generator_resample``), both flips.

    Shards whose current latents are already stored are skipped (a re-run resumes). ``part = (K, N)`` takes the
    shards K, K+N, ... of the sorted list, so N processes can share the work. Returns the manifest.
    """
    from filelock import FileLock
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ConfigError(f"latents dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if resample not in GENERATOR_RESAMPLE:
        raise ConfigError(f"resize filter {resample!r}: choose one of {', '.join(GENERATOR_RESAMPLE)}")
    shard_folder = Path(shard_folder)
    if manifest_folders(shard_folder) != [shard_folder]:
        raise DataError(f"{shard_folder} is not a shard folder with {MANIFEST_FILE}; give the folder of "
                        "`uniemo data shards --out`")
    out = latents_folder(shard_folder, image_size)
    out.mkdir(exist_ok=True)
    digest = vae_digest(generator.vae)
    header = {"format": FORMAT, "kind": KIND, "image_size": image_size, "resize": resample,
              "vae_sha256": digest, "dtype": dtype, "orientations": ["as_is", "flipped"],
              "latent_channels": generator.latent_channels, "scaling_factor": generator.latent_scale}
    with FileLock(str(out / _LOCK)):
        existing = read_latents_manifest(out)
        if existing is not None:
            theirs = {k: existing.get(k) for k in ("image_size", "resize", "vae_sha256", "dtype")}
            ours = {k: header[k] for k in theirs}
            if theirs != ours:
                changed = ", ".join(k for k in ours if theirs[k] != ours[k])
                raise DataError(f"{out} holds latents made with another {changed}; delete it or keep those settings")
        else:
            write_json_atomic(out / MANIFEST_FILE, {**header, "shards": []})
    done = covered_shards(shard_folder, image_size)
    entries = sorted((e for e in read_manifest(shard_folder)["shards"] if e["split"] in splits),
                     key=lambda e: e["name"])
    k, n = part
    todo = [e for e in entries[k::n] if e["name"] not in done]
    bar = tqdm(total=sum(e["samples"] for e in todo), unit="img", desc=f"latents -> {out}", disable=not progress)
    for entry in todo:
        keys, mean, std = encode_shard(shard_folder / entry["name"], generator, image_size, resample, batch_size,
                                       DTYPES[dtype])
        file = Path(entry["name"]).with_suffix(".safetensors").name
        sha = _save_atomic(out / file, {"mean": mean, "std": std}, {"keys": json.dumps(keys)})
        record = {"name": entry["name"], "split": entry["split"], "shard_sha256": entry.get("sha256"),
                  "file": file, "samples": len(keys), "sha256": sha}
        with FileLock(str(out / _LOCK)):
            manifest = read_latents_manifest(out) or {**header, "shards": []}
            shards = {e["name"]: e for e in manifest["shards"]}
            shards[entry["name"]] = record
            manifest["shards"] = [shards[name] for name in sorted(shards)]
            write_json_atomic(out / MANIFEST_FILE, manifest)
        bar.update(entry["samples"])
    bar.close()
    final = read_latents_manifest(out)
    assert final is not None  # written above
    return final


# ---------------------------------------------------------------------------------------------------------
# Reading (inside loader workers)
# ---------------------------------------------------------------------------------------------------------
class LatentReader:
    """Reads single samples' moments from latents files; keeps the last few files open (memory-mapped)."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._files: OrderedDict[str, tuple[Any, dict[str, int]]] = OrderedDict()

    def _open(self, path: str) -> tuple[Any, dict[str, int]]:
        from safetensors import safe_open

        found = self._files.get(path)
        if found is None:
            handle = safe_open(path, framework="pt")
            keys = json.loads((handle.metadata() or {}).get("keys", "[]"))
            found = (handle, {key: row for row, key in enumerate(keys)})
            self._files[path] = found
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(path)
        return found

    def row(self, path: str, key: str) -> int | None:
        """The row of ``key`` in the file at ``path``, or None when it holds none for it."""
        return self._open(path)[1].get(key)

    def read(self, path: str, row: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` [C, h, w] of one sample and orientation."""
        handle, _ = self._open(path)
        o = int(flip)
        mean = handle.get_slice("mean")[row : row + 1, o : o + 1]
        std = handle.get_slice("std")[row : row + 1, o : o + 1]
        return mean.reshape(mean.shape[2:]).clone(), std.reshape(std.shape[2:]).clone()
