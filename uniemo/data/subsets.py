"""The label-scarce regime (``data.labelled_per_emotion``): N labelled train images per emotion, the rest left out.

Where synthetic data can matter is where real labels are few. With ``data.labelled_per_emotion = N > 0`` a run
reads, instead of its shard folder (the synthetic set's, or ``data.shards``), a **labelled** folder derived from
it:

- train: N samples of each emotion, chosen deterministically (the N with the smallest ``blake2b(key)``, so the
  choice depends only on the sample keys, not on shard order or worker count);
- val and test: the full folder's shards, whole (copied);
- ``attributes.json`` (vocabularies, base and Phi, METHOD D6) counted over the N x 8 labelled train samples only.

Beside it a **left-out** folder holds the other train samples (train split only): real labelled images the run
never sees, for the control that adds real data instead of synthetic (``feedback.control=real_extra``,
:mod:`uniemo.feedback.controls`).

Both folders are written once, under a file lock, next to the full folder (``<full>-labelled-<N>`` and
``<full>-left-out-<N>``) or, for ``data.shards``, under ``<cache_dir>/labelled/``; a manifest is written last, so
a folder with a manifest is complete. The manifests record ``subset_of`` (the full folder) and
``labelled_per_emotion``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS
from uniemo.data.attributes import ATTRIBUTES_FILE, AttributeTable, write_json_atomic
from uniemo.data.records import Record
from uniemo.data.shards import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    compute_totals,
    read_manifest,
    read_shard_samples,
    synthetic_world,
    write_sample_shard,
)
from uniemo.errors import ConfigError, DataError

LABELLED = "labelled"
LEFT_OUT = "left-out"


def _order(key: str) -> bytes:
    """The deterministic rank of a sample among its emotion's train samples."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()


def subset_folders(full: Path, per_emotion: int, cache_dir: str | Path, from_data_shards: bool) -> tuple[Path, Path]:
    """Where the labelled and left-out folders of ``full`` live (whether or not they exist yet)."""
    full = Path(full)
    if from_data_shards:
        digest = hashlib.sha256(str(full.resolve()).encode()).hexdigest()[:12]
        base = Path(cache_dir).expanduser() / "labelled" / f"{full.name}-{digest}"
    else:
        base = full
    return (base.with_name(f"{base.name}-{LABELLED}-{per_emotion}"),
            base.with_name(f"{base.name}-{LEFT_OUT}-{per_emotion}"))


def _train_samples(full: Path, manifest: dict[str, Any]) -> Iterator[dict[str, bytes]]:
    for entry in manifest["shards"]:
        if entry["split"] == "train":
            yield from read_shard_samples(full / entry["name"])


def _label(sample: dict[str, bytes]) -> int:
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        raise DataError(f"sample {sample.get('__key__')} has no readable cls; check the folder with "
                        "`uniemo data inspect`") from None
    if not 0 <= label < NUM_EMOTIONS:
        raise DataError(f"sample {sample.get('__key__')}: cls {label} is not an emotion index 0-7")
    return label


def _record(sample: dict[str, bytes]) -> Record:
    """The metadata of a shard sample as a record (for the attribute counts)."""
    import json

    meta = json.loads(sample["json"])
    return Record(id=sample["__key__"], split="train", emotion=EMOTIONS[_label(sample)], image_path=Path(),
                  scene=meta.get("scene"), objects=list(meta.get("objects") or []))


def _write(samples: list[dict[str, bytes]], out: Path, shard_size: int) -> list[dict[str, Any]]:
    return [
        write_sample_shard(samples[start : start + shard_size], out / f"train-{start // shard_size:06d}.tar",
                           split="train", source="real")
        for start in range(0, len(samples), shard_size)
    ]


def ensure_label_scarce(
    full: Path, per_emotion: int, cache_dir: str | Path, *, from_data_shards: bool, min_attribute_count: int,
    phi_beta: float,
) -> tuple[Path, Path]:
    """Write (once) and return the labelled and left-out folders of ``full`` (module docstring).

    Raises:
        ConfigError: ``per_emotion`` is larger than the train samples of some emotion.
    """
    labelled, left_out = subset_folders(full, per_emotion, cache_dir, from_data_shards)
    if (labelled / MANIFEST_FILE).is_file() and (left_out / MANIFEST_FILE).is_file():
        return labelled, left_out
    from filelock import FileLock

    labelled.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(labelled) + ".lock"):
        if (labelled / MANIFEST_FILE).is_file() and (left_out / MANIFEST_FILE).is_file():
            return labelled, left_out
        manifest = read_manifest(full)
        by_emotion: list[list[dict[str, bytes]]] = [[] for _ in range(NUM_EMOTIONS)]
        for sample in _train_samples(full, manifest):
            by_emotion[_label(sample)].append(sample)
        short = [f"{EMOTIONS[k]} {len(s)}" for k, s in enumerate(by_emotion) if len(s) < per_emotion]
        if short:
            raise ConfigError(
                f"data.labelled_per_emotion={per_emotion} is more than the train samples of {', '.join(short)} in "
                f"{full}; lower it"
            )
        chosen: list[dict[str, bytes]] = []
        rest: list[dict[str, bytes]] = []
        for samples in by_emotion:
            ranked = sorted(samples, key=lambda s: _order(s["__key__"]))
            chosen += ranked[:per_emotion]
            rest += ranked[per_emotion:]
        # Mixed emotions in every shard (a one-emotion shard would fill a shuffle buffer with one class).
        chosen.sort(key=lambda s: _order("shard" + s["__key__"]))
        rest.sort(key=lambda s: _order("shard" + s["__key__"]))
        size = max(1, min(int(manifest["shards"][0]["samples"]) if manifest["shards"] else 1000, 1000))
        origin: dict[str, Any] = {"subset_of": str(Path(full).resolve()), "labelled_per_emotion": per_emotion}
        world = synthetic_world(manifest)
        if world:
            origin["world"] = world

        for folder, samples, keep_eval in ((left_out, rest, False), (labelled, chosen, True)):
            shutil.rmtree(folder, ignore_errors=True)  # a partial folder of a killed run
            folder.mkdir(parents=True)
            entries = _write(samples, folder, size)
            if keep_eval:
                for entry in manifest["shards"]:
                    if entry["split"] != "train":
                        shutil.copyfile(full / entry["name"], folder / entry["name"])
                        entries.append(dict(entry))
                table = AttributeTable.from_records([_record(s) for s in samples], min_attribute_count, phi_beta)
                table.save(folder / ATTRIBUTES_FILE)
            write_json_atomic(folder / MANIFEST_FILE, {
                "format": FORMAT_VERSION, **origin, "split": "train" if not keep_eval else "all",
                "shards": entries, "totals": compute_totals(entries),
                "skipped": {"total": 0, "by_reason": {}, "examples": {}},
            })
    return labelled, left_out
