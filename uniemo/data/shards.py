"""Shard writer and manifest (``data/FORMAT.md``).

Records from a reader become plain WebDataset tars ``{split}-{NNNNNN}.tar`` plus ``attributes.json`` and, last,
``manifest.json``. What is unusual here:

- **Deterministic plan.** All records are read first (metadata only) and cut into shards up-front: shard
  ``i`` of a split always holds the same records, whatever ``workers`` is. Tar headers carry a fixed mtime and
  owner, so the same input gives byte-identical shards (same sha256).
- **Atomic shards, resumable runs.** A shard is written to a hidden temporary file and renamed when complete;
  a sidecar in ``.progress/`` then records its plan digest and sha256. A re-run keeps each shard whose
  sidecar matches (re-hashing the tar), removes temporary files and rewrites the rest; the manifest is
  written last, so the result equals an uninterrupted run's. A killed run never leaves a half shard under a
  shard name, and a shard folder is usable by readers only once its manifest exists.
- The feedback pool reuses :func:`write_sample_shard` and :func:`update_manifest` (both atomic).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import tarfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from errno import ENOSPC
from pathlib import Path
from typing import Any

from uniemo.atomic import atomic_file, atomic_write, is_temp_file
from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS, LimitsConfig
from uniemo.data.attributes import (
    ATTRIBUTES_FILE,
    AttributeTable,
    count_attributes,
    merge_counts,
    write_json_atomic,
)
from uniemo.data.images import load_image_bytes
from uniemo.data.limits import active_limits, limits_of, over_cap, read_capped, use_limits
from uniemo.data.records import SPLITS, CompactStringSet, Record, RecordProblem, SkipLog
from uniemo.data.remote import (
    SourceUnavailable,
    Storage,
    check_location,
    fetch,
    is_file_name,
    is_url,
    join_location,
    sizes_of,
)
from uniemo.data.synthetic import SYNTH_MARKER, WORLD_FILE
from uniemo.diskspace import human_bytes, space_report
from uniemo.errors import DISK_FULL_ERRNOS, ConfigError, DataError, DiskFullError

MANIFEST_FILE = "manifest.json"
REMOTE_FILE = "remote.json"
"""In the local mirror of a URL source: the URL and how to reach it (:func:`mirror_source`)."""
REMOTE_DIR = "remote"
"""Under ``data.cache_dir``: one mirror folder per URL source."""
FORMAT_VERSION = 1
PROGRESS_DIR = ".progress"
LOCK_FILE = ".lock"
SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")
READERS = ("emoset", "folder")

# Fixed tar header fields so that equal inputs give byte-identical shards (resumed == uninterrupted run).
_TAR_MTIME = 0
_TAR_OWNER = "uniemo"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


# ---------------------------------------------------------------------------------------------------------
# Samples and single shards (also used by the feedback pool)
# ---------------------------------------------------------------------------------------------------------
def sample_key(source: str, record_id: str) -> str:
    """``<source>_<original id>`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.

    WebDataset splits a member name at its first dot into key and extension, so keys must hold no dot
    (and no slash, which would read as a folder).
    """
    return _KEY_UNSAFE.sub("_", f"{source}_{record_id}")


def sample_metadata(record: Record) -> dict[str, Any]:
    """The ``json`` member of a sample written from a reader record (``data/FORMAT.md``)."""
    return {
        "emotion": record.emotion,
        "scene": record.scene,
        "objects": list(record.objects),
        "brightness": record.brightness,
        "colorfulness": record.colorfulness,
        "source": record.source,
        "id": record.id,
    }


def write_sample_shard(
    samples: Iterable[dict[str, Any]], path: str | Path, *, split: str = "train", source: str | None = None
) -> dict[str, Any]:
    """Write ``samples`` as one tar at ``path``, atomically, and return its manifest entry.

    Each sample is a dict with ``__key__``, one of ``jpg``/``png`` (bytes), ``cls`` (int or digits) and
    ``json`` (a dict or encoded bytes); further members (bytes or str) are kept. ``samples`` may be a
    generator: it is consumed while writing. The tar goes to a hidden temporary file beside ``path`` that is
    fsynced and renamed onto ``path`` only when complete, so a reader (or a crash) never sees a partial shard.
    ``source`` defaults to the ``json.source`` of the first sample. The entry is
    ``{name, split, source, samples, bytes, sha256, emotion_counts}``.

    Raises:
        DiskFullError: no space for the shard (the temporary file is removed first); the message names ``path``
            and the shard's size so far.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    emotion_counts = [0] * NUM_EMOTIONS
    n = 0
    writer = _TarWriter()
    try:
        with atomic_file(path, mode=0o644) as f:
            for sample in samples:
                members = _encode_sample(sample)
                label = int(members["cls"])
                if not 0 <= label < NUM_EMOTIONS:
                    raise DataError(f"sample {sample['__key__']}: cls {label} is not an emotion index 0-7")
                if source is None:
                    source = str(json.loads(members["json"]).get("source", ""))
                emotion_counts[label] += 1
                n += 1
                for ext in sorted(members):
                    writer.add(f, f"{sample['__key__']}.{ext}", members[ext])
            writer.close(f)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(
                f"cannot write shard {path} ({os.strerror(exc.errno)}); it had {human_bytes(writer.size)} when the "
                "write failed; free some space and run again (complete shards are kept)"
            ) from exc
        raise
    return {
        "name": path.name,
        "split": split,
        "source": source or "",
        "samples": n,
        "bytes": writer.size,
        "sha256": writer.sha256.hexdigest(),
        "emotion_counts": emotion_counts,
    }


def _encode_sample(sample: dict[str, Any]) -> dict[str, bytes]:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or _KEY_UNSAFE.search(key):
        raise DataError(f"sample key {key!r} must be a non-empty string of letters, digits, '_' and '-'")
    members: dict[str, bytes] = {}
    for ext, value in sample.items():
        if ext.startswith("_"):
            continue
        if isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False, sort_keys=False).encode("utf-8")
        elif isinstance(value, int):
            value = str(value).encode("ascii")
        elif isinstance(value, str):
            value = value.encode("utf-8")
        members[ext] = bytes(value)
    if ("jpg" in members) == ("png" in members):
        raise DataError(f"sample {key}: needs exactly one image member, jpg or png")
    for ext in ("cls", "json"):
        if ext not in members:
            raise DataError(f"sample {key}: missing member {ext!r}")
    return members


_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_NUL = b"\0"
# The fixed parts of a member's ustar header (tarfile's layout): mode 0444, uid and gid 0, mtime _TAR_MTIME, a
# regular file, no link, "ustar" magic, owner _TAR_OWNER, no device numbers, no prefix.
_HEAD_IDS = b"0000444\0" + b"0000000\0" * 2
_HEAD_MTIME = b"%011o\0" % _TAR_MTIME
_HEAD_TAIL = (
    tarfile.REGTYPE + _NUL * 100 + tarfile.POSIX_MAGIC + _TAR_OWNER.encode().ljust(32, _NUL) * 2 + _NUL * (16 + 155)
)
_HEAD_SUM = 256 + sum(_HEAD_IDS) + sum(_HEAD_MTIME) + sum(_HEAD_TAIL)  # 256: the checksum field as 8 spaces


class _TarWriter:
    """Writes tar members with fixed headers straight to a file, hashing what it writes.

    The bytes are what ``tarfile`` writes in ``PAX_FORMAT`` for these fields (ustar headers, a pax header only
    for a name over 100 bytes, two zero blocks and padding to a 10 KiB record at the end); building each header
    from a template costs a fraction of ``tarfile.addfile``, which was the largest cost per sample of writing a
    shard (BENCHMARKS.md, EmoSet scale). The sha256 is computed on the way, so the shard is not read back."""

    def __init__(self) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256()

    def add(self, f: Any, name: str, data: bytes) -> None:
        header = _ustar_header(name, len(data))
        pad = -len(data) % _BLOCK
        self._write(f, header + data + _NUL * pad if len(data) < 1 << 16 else header)
        if len(data) >= 1 << 16:  # large members: no copy
            self._write(f, data)
            self._write(f, _NUL * pad)

    def close(self, f: Any) -> None:
        end = self.size + 2 * _BLOCK
        self._write(f, _NUL * (2 * _BLOCK + -end % _RECORD))

    def _write(self, f: Any, chunk: bytes) -> None:
        f.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)


def _ustar_header(name: str, size: int) -> bytes:
    """The header block(s) ``tarfile`` writes for a member of ours (class :class:`_TarWriter`)."""
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not raw or len(raw) > 100 or size >= 8**11:  # tarfile adds a pax header here: let it
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o444
        info.uname = info.gname = _TAR_OWNER
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    name_field = raw.ljust(100, _NUL)
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_HEAD_SUM + sum(name_field) + sum(size_field))
    return b"".join(
        (name_field, _HEAD_IDS, size_field, _HEAD_MTIME, checksum, _HEAD_TAIL, _NUL * 12)
    )


def sample_shard_bytes(samples: Iterable[dict[str, Any]]) -> int:
    """The size of the shard :func:`write_sample_shard` writes from ``samples`` (without writing it)."""
    return tar_bytes(len(data) for sample in samples for data in _encode_sample(sample).values())


def tar_bytes(member_sizes: Iterable[int]) -> int:
    """The size of a tar holding members of these sizes, as :class:`_TarWriter` writes it (names within 100
    bytes): a header block per member, data padded to 512 bytes, two end blocks, padding to 10 KiB."""
    total = 2 * _BLOCK
    for size in member_sizes:
        total += _BLOCK + size + -size % _BLOCK
    return total + -total % _RECORD


def read_shard_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one local shard, in order: ``{"__key__": key, ext: bytes, ...}`` per sample (its members
    are consecutive and named ``<key>.<ext>``; keys hold no dot, :func:`sample_key`)."""
    with tarfile.open(path, mode="r|") as tar:
        sample: dict[str, Any] = {}
        for member in tar:
            content = tar.extractfile(member) if member.isfile() else None
            if content is None:
                continue
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            if sample and stem != sample["__key__"]:
                yield sample
                sample = {}
            sample["__key__"] = stem
            sample[ext] = content.read()
        if sample:
            yield sample


def file_digest(path: Path) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------
def compute_totals(entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split: number of shards, samples and samples per emotion."""
    totals: dict[str, dict[str, Any]] = {}
    for e in entries:
        t = totals.setdefault(e["split"], {"shards": 0, "samples": 0, "emotion_counts": [0] * NUM_EMOTIONS})
        t["shards"] += 1
        t["samples"] += e["samples"]
        for k, c in enumerate(e.get("emotion_counts", [0] * NUM_EMOTIONS)):
            t["emotion_counts"][k] += c
    order = {s: i for i, s in enumerate(SPLITS)}
    return {s: totals[s] for s in sorted(totals, key=lambda s: (order.get(s, len(order)), s))}


def read_manifest(folder: str | Path, limits: LimitsConfig | None = None) -> dict[str, Any]:
    """Load and check ``<folder>/manifest.json``; :class:`DataError` naming the folder when absent or malformed."""
    path = Path(folder) / MANIFEST_FILE
    limits = active_limits(limits)
    try:
        with open(path, "rb") as f:
            data = read_capped(f, limits.max_manifest_bytes, _manifest_too_large(str(path), limits))
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: {folder} is not a (complete) shard folder; write it with `uniemo data shards`"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: unreadable manifest ({e}); rewrite the shard folder") from None
    return parse_manifest(data, str(path), limits)


def _manifest_too_large(path: str, limits: LimitsConfig) -> Callable[[], DataError]:
    return lambda: over_cap(f"{path} is larger than the cap", "max_manifest_bytes", limits.max_manifest_bytes)


def parse_manifest(data: bytes, path: str, limits: LimitsConfig | None = None) -> dict[str, Any]:
    """Check the bytes of a manifest read from ``path`` (a file or a URL); :class:`DataError` naming it.

    Every entry must name a shard of the manifest's own folder by a plain file name ending in ``.tar``
    (:func:`check_shard_entry`): a manifest never points at another path, a URL or a command."""
    limits = active_limits(limits)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: unreadable manifest ({_one_line(e)}); rewrite the shard folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: not a uniemo manifest of format {FORMAT_VERSION}; rewrite the shard folder")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path}: malformed shard list; rewrite the shard folder")
    if len(shards) > limits.max_manifest_entries:
        raise over_cap(f"{path} lists {len(shards):,} shards", "max_manifest_entries",
                       limits.max_manifest_entries, unit="shards")
    for i, entry in enumerate(shards):
        check_shard_entry(entry, i, path)
    return manifest


def check_shard_entry(entry: Any, index: int, path: str) -> None:
    """A :class:`DataError` naming manifest ``path`` and entry ``index`` unless the entry is well-formed: ``name``
    a plain file name ending in ``.tar``, ``split`` a string, ``samples`` (and ``bytes`` when given) a count."""
    if not isinstance(entry, dict) or not {"name", "split", "samples"} <= entry.keys():
        raise DataError(f"{path} entry {index}: malformed shard entry (needs name, split, samples); rewrite the "
                        "shard folder")
    name = entry["name"]
    if not (is_file_name(name) and name.endswith(".tar")):
        shown = repr(name[:200] + ("..." if len(name) > 200 else "")) if isinstance(name, str) else repr(name)
        raise DataError(
            f"{path} entry {index}: shard name {shown} is not a plain file name ([A-Za-z0-9._-], starting with a "
            "letter or digit, ending in .tar); a manifest lists shards of its own folder only, never a path, URL "
            "or command: rewrite the shard folder with `uniemo data shards`"
        )
    counts = [entry["samples"]] + ([entry["bytes"]] if entry.get("bytes") is not None else [])
    if not isinstance(entry["split"], str) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts
    ):
        raise DataError(f"{path} entry {index} ({name}): split must be a string and samples, bytes counts; "
                        "rewrite the shard folder")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def check_shard_files(folder: str | Path, limits: LimitsConfig | None = None) -> dict[str, Any]:
    """Every shard ``<folder>/manifest.json`` lists exists with the size it was written with (a cheap ``stat`` per
    shard, no reading): :class:`DataError` naming the first missing or truncated shard. Returns the manifest.

    The shards of a mirrored URL source are checked by their size as the server reports it (HTTP ``HEAD``, S3
    ``HeadObject``; not for ``pipe:``), once per process and manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder, limits)
    base, storage = folder_location(folder)
    remote: list[tuple[str, dict[str, Any]]] = []
    for entry in manifest["shards"]:
        where = join_location(base, entry["name"])
        if is_url(where):
            remote.append((where, entry))
            continue
        path = Path(where)
        if not path.is_file():
            raise DataError(
                f"{folder / MANIFEST_FILE} lists shard {entry['name']}, which is missing; restore it or rewrite "
                "the shard folder with `uniemo data shards`"
            )
        size, expected = path.stat().st_size, entry.get("bytes")
        if isinstance(expected, int) and size != expected:
            raise DataError(
                f"shard {path} has {size} bytes, the manifest says {expected}: it is truncated or damaged; "
                "restore it or rewrite the shard folder with `uniemo data shards`"
            )
    if remote:
        _check_remote_shards(base, remote, storage)
    return manifest


_CHECKED_REMOTE: set[tuple[str, ...]] = set()
"""Remote shard lists whose sizes this process has checked (every rank and call would otherwise ask again)."""


def _check_remote_shards(base: str, shards: list[tuple[str, dict[str, Any]]], storage: Storage) -> None:
    memo = (base, *(f"{where}:{entry.get('bytes')}" for where, entry in shards))
    if memo in _CHECKED_REMOTE:
        return
    listed = join_location(base, MANIFEST_FILE)
    for (where, entry), size in zip(shards, sizes_of([w for w, _ in shards], storage), strict=True):
        if isinstance(size, SourceUnavailable):
            if size.missing:
                raise DataError(
                    f"{listed} lists shard {entry['name']}, which is missing at {where} ({size.reason}); upload "
                    "it again, or the whole shard folder written by `uniemo data shards`"
                )
            raise DataError(
                f"cannot read shard {where} ({size.reason}); check the address, that the server runs and the "
                "credentials"
            )
        expected = entry.get("bytes")
        if size is not None and isinstance(expected, int) and size != expected:
            raise DataError(
                f"shard {where} has {size} bytes, {listed} says {expected}: it is truncated or damaged; upload "
                "it again, or the whole shard folder written by `uniemo data shards`"
            )
    _CHECKED_REMOTE.add(memo)


# ---------------------------------------------------------------------------------------------------------
# URL sources: a local mirror of their metadata
# ---------------------------------------------------------------------------------------------------------
def mirror_name(location: str) -> str:
    """The folder name of the URL source ``location``'s mirror (under ``<data.cache_dir>/remote/``)."""
    return hashlib.sha256(location.encode()).hexdigest()[:16]


def folder_location(folder: str | Path) -> tuple[str, Storage]:
    """Where the shards of a shard folder are: the folder itself, or for a URL source's mirror the URL and
    its :class:`~uniemo.data.remote.Storage` (recorded in ``remote.json``).

    A ``remote.json`` redirects every shard read, so it is honoured only in a mirror folder that
    :func:`mirror_source` writes: ``.../remote/<mirror_name(URL)>/``, whose name is bound to the URL it names.
    One anywhere else (a local dataset folder, someone else's download) is refused with one line."""
    folder = Path(folder)
    path = folder / REMOTE_FILE
    try:
        with open(path, "rb") as f:
            data = read_capped(f, 1 << 16, lambda: DataError(f"{path} is larger than a remote.json can be"))
        info = json.loads(data)
        location = info["location"]
        storage = Storage(str(info.get("endpoint_url", "")), float(info.get("timeout_s", 10.0)))
    except FileNotFoundError:
        return str(folder), Storage()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: unreadable ({_one_line(e)}); delete {folder} and run again") from None
    if not (
        isinstance(location, str) and is_url(location) and folder.parent.name == REMOTE_DIR
        and folder.name == mirror_name(location)
    ):
        raise DataError(
            f"{path}: a {REMOTE_FILE} redirects shard reads and is honoured only in uniemo's own mirror folders "
            f"(<data.cache_dir>/{REMOTE_DIR}/); delete it, or set data.shards to the URL itself"
        )
    return location, storage


def mirror_source(location: str, data_cfg: Any, *, key: str, require_attributes: bool) -> Path:
    """The local mirror of the URL source ``location``: its ``manifest.json`` (and ``attributes.json``), fetched
    now into ``<data.cache_dir>/remote/<sha256 of the URL>/`` beside a ``remote.json`` naming the URL.

    Every reader of manifests then reads a local folder, and only the loader's shard opener (and
    :func:`check_shard_files`) see the URL; shards themselves are streamed, never copied. A missing or
    unreachable manifest (or a required attribute table) is one :class:`DataError` line naming ``key``.
    """
    check_location(location, key)
    storage = Storage.of(data_cfg)
    limits = limits_of(data_cfg)
    use_limits(limits)
    folder = Path(data_cfg.cache_dir).expanduser() / REMOTE_DIR / mirror_name(location)
    files: dict[str, bytes] = {}
    for name in (MANIFEST_FILE, ATTRIBUTES_FILE):
        where = join_location(location, name)
        try:
            files[name] = fetch(where, storage, limits.max_manifest_bytes, _manifest_too_large(where, limits))
        except SourceUnavailable as exc:
            if not exc.missing:
                raise DataError(
                    f"{key}={location!r}: cannot read {where} ({exc.reason}); check the address, that the server "
                    "runs and the credentials"
                ) from None
            if name == MANIFEST_FILE or require_attributes:
                raise DataError(
                    f"{key}={location!r}: {where} is missing ({exc.reason}); give the URL of a whole shard folder "
                    f"written by `uniemo data shards` ({MANIFEST_FILE} and {ATTRIBUTES_FILE} included)"
                ) from None
    parse_manifest(files[MANIFEST_FILE], join_location(location, MANIFEST_FILE), limits)
    folder.mkdir(parents=True, exist_ok=True)
    remote = {"location": location, "endpoint_url": storage.endpoint_url, "timeout_s": storage.timeout_s}
    _write_if_changed(folder / REMOTE_FILE, json.dumps(remote, indent=1).encode())
    for name, data in files.items():
        _write_if_changed(folder / name, data)
    return folder


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomically, and only when the content differs: ranks mirror concurrently."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    atomic_write(path, data)


def resolve_shard_folder(location: str, data_cfg: Any, *, key: str, require_attributes: bool = False) -> Path:
    """The local folder whose manifest describes the source ``location`` (a config value, ``key`` names it):
    the folder itself, or the mirror of a URL source (:func:`mirror_source`, shards checked)."""
    if not is_url(location):
        return Path(location).expanduser()
    folder = mirror_source(location, data_cfg, key=key, require_attributes=require_attributes)
    check_shard_files(folder, limits_of(data_cfg))
    return folder


def manifest_folders(folder: str | Path) -> list[Path]:
    """The shard folders under ``folder``: itself when it holds a manifest, else its sub-folders that do.

    A feedback source keeps one sub-folder per round (``round-0/``, ``round-1/``, ...), each with its own
    manifest; listing them at each epoch start is how trainers pick up new rounds. Sorted by name.
    """
    folder = Path(folder)
    if (folder / MANIFEST_FILE).is_file():
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file())


def update_manifest(
    folder: str | Path, new_entries: Iterable[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """Add (or replace, by name) shard entries in ``<folder>/manifest.json`` and rewrite it atomically.

    Creates the manifest when absent. Entries come from :func:`write_sample_shard`; each named shard must
    exist. Concurrent updaters are serialised by a lock file, and the manifest is replaced by rename, so a
    reader sees either the old or the new list. Extra top-level ``fields`` (e.g. ``round=3``) are stored.
    """
    from filelock import FileLock

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    new_entries = list(new_entries)
    for e in new_entries:
        if not (folder / e["name"]).is_file():
            raise DataError(
                f"shard {folder / e['name']} does not exist; write it before listing it in the manifest"
            )
    with FileLock(str(folder / ".manifest.lock")):
        if (folder / MANIFEST_FILE).exists():
            manifest = read_manifest(folder)
        else:
            manifest = {"format": FORMAT_VERSION, "shards": [], "totals": {}, "skipped": SkipLog().as_dict()}
        by_name = {e["name"]: e for e in manifest["shards"]}
        for e in new_entries:
            by_name[e["name"]] = dict(e)
        manifest["shards"] = sorted(by_name.values(), key=lambda e: e["name"])
        manifest["totals"] = compute_totals(manifest["shards"])
        manifest.update(fields)
        write_json_atomic(folder / MANIFEST_FILE, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# The writer of a whole dataset
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ShardJob:
    """One shard to write, fixed before any writing starts: its name and its records, as the byte offsets of
    their lines in the plan's spool file (:class:`DatasetPlan`), in shard order."""

    name: str
    split: str
    spool: str
    offsets: array
    digest: str
    """sha256 over the shard's keys, labels, metadata and image paths: a changed plan redoes the shard."""

    @property
    def size(self) -> int:
        return len(self.offsets)


class DatasetPlan:
    """The records of a dataset, checked, and written one line each to a spool file; their cut into shards.

    A line is ``[key, label, metadata, image path]`` as JSON: exactly what a shard's digest covers and what its
    writer needs, so the workers read their records from the spool and no record stays in memory. Per record the
    plan holds the 8-byte offset of its line, and while cutting one split its shuffled order (the same
    permutation ``random.shuffle`` gives a list of that length: shards equal those of earlier versions). Made by
    :func:`plan_dataset`; :meth:`close` removes the spool.
    """

    def __init__(self, spool: Path, offsets: dict[str, array], shard_size: int, shuffle_seed: int | None,
                 log: SkipLog, ignored: SkipLog) -> None:
        self.spool = spool
        self.offsets = offsets
        self.shard_size = shard_size
        self.shuffle_seed = shuffle_seed
        self.log = log
        self.ignored = ignored

    @property
    def records(self) -> int:
        return sum(len(o) for o in self.offsets.values())

    def jobs(self) -> list[ShardJob]:
        """Shards per split (train, val, test order), each split shuffled unless the seed is None."""
        jobs: list[ShardJob] = []
        with open(self.spool, "rb") as f:
            for split in SPLITS:
                lines = self.offsets[split]
                order = array("Q", range(len(lines)))
                if self.shuffle_seed is not None:
                    random.Random(f"uniemo-shards:{self.shuffle_seed}:{split}").shuffle(order)
                for i in range(0, len(order), self.shard_size):
                    offsets = array("Q", (lines[k] for k in order[i : i + self.shard_size]))
                    h = hashlib.sha256()
                    for offset in offsets:
                        f.seek(offset)
                        h.update(f.readline())
                    name = f"{split}-{i // self.shard_size:06d}.tar"
                    jobs.append(ShardJob(name, split, str(self.spool), offsets, h.hexdigest()))
        return jobs

    def close(self) -> None:
        self.spool.unlink(missing_ok=True)


def plan_dataset(
    source: str,
    root: Path,
    spool: Path,
    *,
    on_error: str,
    shard_size: int,
    shuffle_seed: int | None,
    folder_seed: int = 0,
) -> DatasetPlan:
    """Read and check every record of ``root`` with the ``source`` reader into a :class:`DatasetPlan` spooled to
    ``spool``. A record whose key repeats an earlier one's is a ``duplicate_key`` problem."""
    log, ignored = SkipLog(), SkipLog()
    offsets = {split: array("Q") for split in SPLITS}
    keys = CompactStringSet()
    position = 0
    try:
        with open(spool, "wb") as f:
            for r in _read_records(source, root, on_error, log, folder_seed, ignored):
                key = sample_key(r.source, r.id)
                if keys.add(key) is not None:  # two ids can map to one key after sanitising (a.b and a_b)
                    problem = RecordProblem(
                        "duplicate_key", f"record {r.id!r} gives sample key {key!r}, which an earlier record has"
                    )
                    if on_error == "fail":
                        raise problem
                    log.add(problem.reason, str(problem))
                    continue
                line = json.dumps([key, r.label, sample_metadata(r), str(r.image_path)]).encode() + b"\n"
                offsets[r.split].append(position)
                f.write(line)
                position += len(line)
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    return DatasetPlan(spool, offsets, shard_size, shuffle_seed, log, ignored)


def plan_digest(jobs: Iterable[ShardJob]) -> str:
    """The ``plan_sha256`` of a manifest: which record goes to which shard."""
    return hashlib.sha256("".join(j.name + j.digest for j in jobs).encode()).hexdigest()


def read_job(job: ShardJob) -> Iterator[tuple[str, int, dict[str, Any], str]]:
    """``(key, label, metadata, image path)`` of each record of ``job``, in shard order, from the spool."""
    with open(job.spool, "rb") as f:
        for offset in job.offsets:
            f.seek(offset)
            key, label, metadata, image = json.loads(f.readline())
            yield key, label, metadata, image


def write_shards(
    source: str,
    root: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    on_error: str = "skip",
    progress: bool = True,
    folder_seed: int = 0,
    *,
    shuffle_seed: int | None = 0,
    min_attribute_count: int = 5,
    phi_beta: float = 1.0,
) -> dict[str, Any]:
    """Shard a dataset read by the ``source`` reader (``emoset`` or ``folder``) from ``root`` into ``out``.

    Writes ``{split}-{NNNNNN}.tar`` (``shard_size`` records each, in ``workers`` processes, each writing
    whole shards), ``attributes.json`` from the train samples, and last ``manifest.json``; returns the
    manifest. Records that a reader rejects, or whose image is damaged (:func:`load_image_bytes` with
    ``decode=False``), are skipped and counted by reason (``on_error="skip"``) or stop the run with a
    :class:`DataError` naming the problem (``"fail"``).

    ``shuffle_seed`` shuffles each split before cutting (None keeps the reader's order): readers list
    records emotion by emotion, and a shard of one emotion would fill the training shuffle buffer with one
    class. ``min_attribute_count`` and ``phi_beta`` are ``m`` and ``beta`` of METHOD D6 for attributes.json.

    Memory does not grow with the dataset beyond a few bytes per record (:class:`DatasetPlan`): records are
    spooled to a hidden file in ``out`` and read back by the shard's worker; the attribute counts are made per
    shard and summed.

    Re-running the same call resumes: finished shards are kept (their sha256 is checked), partial
    temporary files are removed, the rest is written; the result is identical to an uninterrupted run.
    ``out`` holding shards of another source, root or shard size, or other files, is an error.

    Raises:
        DiskFullError: the disk of ``out`` is full; one line naming ``out`` and the space the unfinished shards
            need. Complete shards stay (with their progress records), temporary files are removed.
    """
    if source not in READERS:
        raise ConfigError(f"unknown shard source {source!r}; expected one of {', '.join(READERS)}")
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if shard_size < 1:
        raise ConfigError(f"shard size must be >= 1, got {shard_size}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    root = Path(root).resolve()
    out = Path(out)
    origin = {"reader": source, "root": str(root), "shard_size": shard_size, "shuffle_seed": shuffle_seed}
    if source == "folder":
        origin["folder_seed"] = folder_seed

    if not root.is_dir():
        raise DataError(f"--root {root} does not exist or is not a folder; give the dataset folder to shard")
    _check_out_folder(out, origin)
    out.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DataError(
            f"another process is writing shards into {out}; wait for it or use another --out"
        ) from None
    try:
        return _write_shards_locked(
            origin, root, out, workers, on_error, progress, folder_seed, min_attribute_count, phi_beta
        )
    finally:
        lock.release()  # the lock file stays: unlinking it could let two later writers lock different inodes


@dataclass
class _Progress:
    """What a run of the writer has finished so far (for its results, and for a disk-full message)."""

    jobs: list[ShardJob] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: str = ""
    """The shard (or file) of ``out`` whose write ran out of space."""
    errno: int = ENOSPC


def _write_shards_locked(
    origin: dict,
    root: Path,
    out: Path,
    workers: int,
    on_error: str,
    progress: bool,
    folder_seed: int,
    min_attribute_count: int,
    phi_beta: float,
) -> dict[str, Any]:
    # Remove leftovers of a killed run first: temporary files (shards, spools) never become anything.
    for p in out.iterdir():
        if is_temp_file(p.name):
            p.unlink(missing_ok=True)
    done = _Progress()
    plan: DatasetPlan | None = None
    spool = out / f".records.{os.getpid()}.tmp"
    try:
        plan = plan_dataset(origin["reader"], root, spool, on_error=on_error, shard_size=origin["shard_size"],
                            shuffle_seed=origin["shuffle_seed"], folder_seed=folder_seed)
        return _write_planned(plan, origin, root, out, workers, on_error, progress, min_attribute_count, phi_beta,
                              done)
    except (OSError, DiskFullError) as exc:
        if not isinstance(exc, DiskFullError) and exc.errno not in DISK_FULL_ERRNOS:
            raise
        needed = _unfinished_bytes(done) if done.jobs else _source_bytes(origin["reader"], root)
        spool.unlink(missing_ok=True)  # before measuring what is free
        errno = exc.errno if isinstance(exc, OSError) and exc.errno else done.errno
        failed = out / done.failed if done.failed else spool if not done.jobs else out
        what = "shard " if SHARD_NAME.match(failed.name) else "the record list " if failed == spool else ""
        unfinished = f"the {len(done.jobs) - len(done.results)} unfinished shards" if done.jobs else "all shards"
        raise DiskFullError(
            f"cannot write {what}{failed} ({os.strerror(errno)}): about {space_report(out, needed)} for "
            f"{unfinished}; free some space and run the same command again (the {len(done.results)} complete "
            "shards are kept)"
        ) from None
    finally:
        if plan is not None:
            plan.close()


def _write_planned(
    plan: DatasetPlan,
    origin: dict,
    root: Path,
    out: Path,
    workers: int,
    on_error: str,
    progress: bool,
    min_attribute_count: int,
    phi_beta: float,
    done: _Progress,
) -> dict[str, Any]:
    if not plan.records:
        raise DataError(f"no usable records under {root} ({plan.log.total} skipped); check the folder layout")
    jobs = done.jobs = plan.jobs()
    digest = plan_digest(jobs)

    existing = out / MANIFEST_FILE
    if existing.exists():
        manifest = read_manifest(out)
        if manifest.get("plan_sha256") != digest:
            raise DataError(
                f"the records under {root} changed since {out} was written; write the new shards into an "
                f"empty --out folder, or delete {out}"
            )
        if (out / ATTRIBUTES_FILE).is_file() and all(
            _shard_matches(out / e["name"], e) for e in manifest["shards"]
        ):
            return manifest  # complete already: re-running the same command is a no-op
        # A listed shard is missing or changed: rewrite the folder (no sidecars left, so every shard).
        existing.unlink()

    results = done.results
    todo: list[ShardJob] = []
    for job in jobs:
        sidecar = _load_sidecar(out, job)
        if sidecar is not None:
            results[job.name] = sidecar
        else:
            todo.append(job)

    from tqdm.auto import tqdm

    bar = tqdm(total=plan.records, unit="img", desc=f"shards -> {out}", disable=not progress)
    bar.update(sum(j.size for j in jobs if j.name in results))
    try:
        for job, result in _run_jobs(todo, out, on_error, workers):
            if "error" in result:
                reason, message = result["error"]
                raise RecordProblem(reason, f"{message}; fix or remove it, or use --on-error skip")
            if "disk_full" in result:
                done.failed, done.errno = job.name, result["errno"]
                raise DiskFullError(result["disk_full"])
            results[job.name] = result
            bar.update(job.size)
    finally:
        bar.close()

    # Remove stale shard files a previous plan may have left (e.g. fewer shards now).
    planned = {j.name for j in jobs}
    for p in out.iterdir():
        if SHARD_NAME.match(p.name) and p.name not in planned:
            p.unlink()

    skipped = SkipLog(Counter(plan.log.counts), {k: list(v) for k, v in plan.log.examples.items()})
    scene_counts: dict[str, list[int]] = {}
    object_counts: dict[str, list[int]] = {}
    for job in jobs:  # in plan order: the skip examples are the first ones, whatever order shards finished in
        result = results[job.name]
        for reason, count in result["skipped"]["by_reason"].items():
            skipped.counts[reason] += count
            examples = skipped.examples.setdefault(reason, [])
            examples += result["skipped"]["examples"].get(reason, [])[: max(0, 5 - len(examples))]
        merge_counts(scene_counts, result["attributes"]["scenes"])
        merge_counts(object_counts, result["attributes"]["objects"])
    done.failed = ATTRIBUTES_FILE
    table = AttributeTable.from_counts(scene_counts, object_counts, min_attribute_count, phi_beta)
    table.save(out / ATTRIBUTES_FILE)

    entries = [results[j.name]["entry"] for j in jobs]
    manifest = {
        "format": FORMAT_VERSION,
        **origin,
        "plan_sha256": digest,
        "shards": entries,
        "totals": compute_totals(entries),
        "skipped": skipped.as_dict(),
        "ignored": plan.ignored.as_dict(),
    }
    done.failed = MANIFEST_FILE
    write_json_atomic(out / MANIFEST_FILE, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return manifest


def _unfinished_bytes(done: _Progress) -> int:
    """What the shards not written yet will take: each one's tar of its images (JPEG and PNG are stored as they
    are on disk), labels and metadata, plus room for the attribute table and the manifest."""
    total = 64 * 1024 + 1024 * len(done.jobs)
    for job in done.jobs:
        if job.name in done.results:
            continue
        sizes = []
        for _, label, metadata, image in read_job(job):
            try:
                sizes.append(os.stat(image).st_size)
            except OSError:
                continue
            sizes += [len(str(label)), len(json.dumps(metadata, ensure_ascii=False).encode())]
        total += tar_bytes(sizes)
    return total


def _source_bytes(reader: str, root: Path) -> int:
    """About what the shards of a whole dataset take: its image files plus 10 % (a disk filled while planning)."""
    from uniemo.diskspace import folder_bytes

    images = root / "image" if reader == "emoset" else root
    return int(folder_bytes(images.resolve()) * 1.1)


def _read_records(
    reader: str, root: Path, on_error: str, log: SkipLog, folder_seed: int, ignored: SkipLog
) -> Iterator[Record]:
    # Imported here: the shard writer's worker processes import this module and need no reader.
    from uniemo.data.emoset import read_emoset
    from uniemo.data.folders import read_folder

    if reader == "emoset":
        return read_emoset(root, on_error=on_error, skiplog=log)
    return read_folder(root, seed=folder_seed, on_error=on_error, skiplog=log, ignored=ignored)


def _check_out_folder(out: Path, origin: dict) -> None:
    """Refuse an ``out`` that holds shards of another origin or files that are not ours."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if not out.is_dir():
        return
    if (out / MANIFEST_FILE).exists():
        manifest = read_manifest(out)
        theirs = {k: manifest.get(k) for k in origin}
        if theirs != origin:
            diff = ", ".join(
                f"{k}={theirs[k]!r} (now {origin[k]!r})" for k in origin if theirs[k] != origin[k]
            )
            raise DataError(
                f"{out} already holds shards written with {diff}; use an empty --out folder or delete {out}"
            )
        return
    ours = {ATTRIBUTES_FILE, PROGRESS_DIR, LOCK_FILE, ".manifest.lock"}
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if not (
            SHARD_NAME.match(p.name) or p.name in ours or is_temp_file(p.name)
        )
    )
    if foreign:
        raise DataError(
            f"--out {out} is not empty and not a shard folder (found {', '.join(foreign[:3])}); use an empty folder"
        )


def _shard_matches(path: Path, entry: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return file_digest(path)[1] == entry.get("sha256")


SIDECAR_VERSION = 2
"""Sidecars of version 1 (no attribute counts) are not reused: their shards are written again."""


def _sidecar_path(out: Path, name: str) -> Path:
    return out / PROGRESS_DIR / f"{name}.json"


def _load_sidecar(out: Path, job: ShardJob) -> dict[str, Any] | None:
    """The finished shard's result when its sidecar matches the plan and the tar its sha256; else None."""
    try:
        sidecar = json.loads(_sidecar_path(out, job.name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("plan") != job.digest:
        return None
    if sidecar.get("version") != SIDECAR_VERSION:
        return None
    if not _shard_matches(out / job.name, sidecar.get("entry", {})):
        return None
    return sidecar


def _run_jobs(
    jobs: list[ShardJob], out: Path, on_error: str, workers: int
) -> Iterator[tuple[ShardJob, dict[str, Any]]]:
    """Yield ``(job, result)`` as shards finish, in this process (``workers == 1``) or a process pool."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            result = write_job(job, out, on_error)
            yield job, result
            if "error" in result or "disk_full" in result:
                return
        return
    # spawn: the parent may hold threads (torch, a progress bar); a forked child could deadlock on their locks.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        pending = {pool.submit(write_job, job, out, on_error): job for job in jobs}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = pending.pop(fut)
                    yield job, fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def write_job(job: ShardJob, out: Path, on_error: str) -> dict[str, Any]:
    """Write one planned shard and its sidecar. Runs in a worker process; returns plain data: the shard's entry,
    its skipped records (counts and examples) and the attribute counts of its samples (train shards).

    A :class:`RecordProblem` with ``on_error="fail"`` comes back as ``{"error": (reason, message)}``
    (exceptions with custom constructors do not survive pickling between processes), a full disk as
    ``{"disk_full": message, "errno": errno}`` (the shard's temporary file removed).
    """
    skipped = SkipLog()
    scenes: dict[str, list[int]] = {}
    objects: dict[str, list[int]] = {}
    source = ""

    def samples() -> Iterator[dict[str, Any]]:
        nonlocal source
        for n, (key, label, metadata, image) in enumerate(read_job(job)):
            if n == 0:
                source = str(metadata.get("source", ""))
            try:
                data, ext = load_image_bytes(image, decode=False)
            except RecordProblem as problem:
                if on_error == "fail":
                    raise
                skipped.add(problem.reason, f"{metadata.get('id')}: {problem}")
                continue
            if job.split == "train":
                count_attributes(scenes, objects, label, metadata.get("scene"), metadata.get("objects") or [])
            yield {"__key__": key, ext: data, "cls": label, "json": metadata}

    try:
        entry = write_sample_shard(samples(), out / job.name, split=job.split, source=_job_source(job))
        result = {"version": SIDECAR_VERSION, "plan": job.digest, "entry": entry, "skipped": skipped.as_dict(),
                  "attributes": {"scenes": scenes, "objects": objects}}
        write_json_atomic(_sidecar_path(out, job.name), result)
    except RecordProblem as problem:
        return {"error": (problem.reason, str(problem))}
    except (OSError, DiskFullError) as exc:  # the shard (a DiskFullError from its OSError) or its sidecar
        cause = exc.__cause__ if isinstance(exc, DiskFullError) else exc
        errno = cause.errno if isinstance(cause, OSError) else None
        if isinstance(exc, DiskFullError) or errno in DISK_FULL_ERRNOS:
            return {"disk_full": str(exc), "errno": errno or ENOSPC}
        raise
    return result


def _job_source(job: ShardJob) -> str:
    for _, _, metadata, _ in read_job(job):
        return str(metadata.get("source", ""))
    return ""


def synthetic_world(manifest: dict[str, Any]) -> str | None:
    """The world of the synthetic set a shard folder was written from (``world`` in the manifest, else
    ``world.json`` beside the set; a synthetic set without one is the easy world), or None when the folder was
    not written from a synthetic set."""
    if manifest.get("world"):
        return str(manifest["world"])
    root = manifest.get("root")
    if manifest.get("reader") != "emoset" or not root:
        return None
    root = Path(root)
    try:
        return str(json.loads((root / WORLD_FILE).read_text(encoding="utf-8"))["world"])
    except (OSError, ValueError, KeyError):
        pass
    return "easy" if root.parent.name.startswith("synthetic-") or (root / SYNTH_MARKER).is_file() else None


# ---------------------------------------------------------------------------------------------------------
# The synthetic set on first use
# ---------------------------------------------------------------------------------------------------------
def synthetic_shards_folder(data_cfg: Any) -> Path:
    """Where :func:`ensure_synthetic_shards` writes the synthetic set's shards (whether or not they exist yet)."""
    syn = data_cfg.synthetic
    world = "" if syn.world == "easy" else f"{syn.world}-"  # the easy world keeps the name it always had
    base = Path(data_cfg.cache_dir).expanduser() / f"synthetic-{world}{syn.images}-{syn.size}-{syn.seed}"
    return base / f"shards-{syn.shard_size}"


def ensure_synthetic_shards(data_cfg: Any, progress: bool = False) -> Path:
    """The shard folder a run reads: ``data.shards`` when set, else the synthetic set, made on first use; with
    ``data.labelled_per_emotion`` > 0, its label-scarce subset (:func:`ensure_label_scarce`).

    With ``data.shards`` set, the folder must hold ``manifest.json`` (:class:`DataError` otherwise); a URL is
    mirrored (:func:`mirror_source`) and its shards checked, and the mirror folder is returned. Else the
    synthetic set of ``data.synthetic`` is generated into
    ``<cache_dir>/synthetic-[<world>-]<images>-<size>-<seed>/raw`` (the world's name unless it is ``easy``) and
    sharded into ``.../shards-<shard_size>`` under a file lock, so concurrent processes (several ranks)
    generate it once; a later call finds it complete and returns at once.
    """
    full = _full_shards(data_cfg, progress)
    if not data_cfg.labelled_per_emotion:
        return full
    return _label_scarce(data_cfg, full)[0]


def left_out_shards(data_cfg: Any) -> Path:
    """The train images that ``data.labelled_per_emotion`` leaves out, as a shard folder (train split only)."""
    if not data_cfg.labelled_per_emotion:
        raise ConfigError("data.labelled_per_emotion is 0: every train image is labelled, none is left out; set it")
    return _label_scarce(data_cfg, _full_shards(data_cfg, False))[1]


def _label_scarce(data_cfg: Any, full: Path) -> tuple[Path, Path]:
    if data_cfg.shards and is_url(data_cfg.shards):
        raise ConfigError("data.labelled_per_emotion needs local shards; data.shards is a URL: copy it first")
    return ensure_label_scarce(full, data_cfg.labelled_per_emotion, data_cfg.cache_dir,
                               from_data_shards=bool(data_cfg.shards),
                               min_attribute_count=data_cfg.min_attribute_count, phi_beta=data_cfg.phi_beta)


def _full_shards(data_cfg: Any, progress: bool) -> Path:
    use_limits(limits_of(data_cfg))
    if data_cfg.shards:
        if is_url(data_cfg.shards):
            return resolve_shard_folder(data_cfg.shards, data_cfg, key="data.shards", require_attributes=True)
        folder = Path(data_cfg.shards).expanduser()
        if not (folder / MANIFEST_FILE).is_file():
            raise DataError(
                f"data.shards={data_cfg.shards!r} holds no {MANIFEST_FILE}; write it with `uniemo data shards "
                f"--out {data_cfg.shards} ...`, or set data.shards='' to use the synthetic set"
            )
        check_shard_files(folder, limits_of(data_cfg))
        return folder
    shards = synthetic_shards_folder(data_cfg)
    base = shards.parent
    syn = data_cfg.synthetic
    if (shards / MANIFEST_FILE).is_file():
        _check_world_version(base / "raw", syn.world)
        return shards
    from filelock import FileLock

    base.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base) + ".lock"):
        if (shards / MANIFEST_FILE).is_file():  # another process finished while we waited
            return shards
        raw, done = base / "raw", base / "raw.done"
        if not done.is_file():
            from uniemo.data.synthetic import generate_synthetic_set

            shutil.rmtree(raw, ignore_errors=True)  # a partial set of a killed run
            generate_synthetic_set(
                raw, images=syn.images, size=syn.size, seed=syn.seed, workers=1, progress=progress, world=syn.world
            )
            done.write_text("complete\n")
        write_shards(
            source="emoset",
            root=raw,
            out=shards,
            shard_size=syn.shard_size,
            workers=1,
            progress=progress,
            min_attribute_count=data_cfg.min_attribute_count,
            phi_beta=data_cfg.phi_beta,
        )
    return shards


def _check_world_version(raw: Path, world: str) -> None:
    """A cached set of a world other than ``easy`` must have been drawn from the world's current tables: its
    ``world.json`` (name and rates) equals what they give now. A world's tables changed under the same cache
    name would otherwise be read silently (the hard world's scenes did change once)."""
    if world == "easy":
        return
    from uniemo.data.synthetic import world_of, world_record

    try:
        recorded = json.loads((raw / WORLD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if recorded != world_record(world_of(world)):
        raise DataError(f"{raw.parent} was drawn from an older version of the {world} world (its {WORLD_FILE} "
                        f"differs from the world's tables now); delete that folder to draw it again")


# ---------------------------------------------------------------------------------------------------------
# The label-scarce regime (``data.labelled_per_emotion``): N labelled train images per emotion, the rest left out.
#
# Where synthetic data can matter is where real labels are few. With ``data.labelled_per_emotion = N > 0`` a run
# reads, instead of its shard folder (the synthetic set's, or ``data.shards``), a **labelled** folder derived from
# it:
#
# - train: N samples of each emotion, chosen deterministically (the N with the smallest ``blake2b(key)``, so the
#   choice depends only on the sample keys, not on shard order or worker count);
# - val and test: the full folder's shards, whole (copied);
# - ``attributes.json`` (vocabularies, base and Phi, METHOD D6) counted over the N x 8 labelled train samples only.
#
# Beside it a **left-out** folder holds the other train samples (train split only): real labelled images the run
# never sees, for the control that adds real data instead of synthetic (``feedback.control=real_extra``,
# :mod:`uniemo.feedback.controls`).
#
# Both folders are written once, under a file lock, next to the full folder (``<full>-labelled-<N>`` and
# ``<full>-left-out-<N>``) or, for ``data.shards``, under ``<cache_dir>/labelled/``; a manifest is written last, so
# a folder with a manifest is complete. The manifests record ``subset_of`` (the full folder) and
# ``labelled_per_emotion``.
# ---------------------------------------------------------------------------------------------------------
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


def _label(sample: dict[str, Any]) -> int:
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        raise DataError(f"sample {sample.get('__key__')} has no readable cls; check the folder with "
                        "`uniemo data inspect`") from None
    if not 0 <= label < NUM_EMOTIONS:
        raise DataError(f"sample {sample.get('__key__')}: cls {label} is not an emotion index 0-7")
    return label


def _record(sample: dict[str, Any]) -> Record:
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
        by_emotion: list[list[dict[str, Any]]] = [[] for _ in range(NUM_EMOTIONS)]
        for sample in _train_samples(full, manifest):
            by_emotion[_label(sample)].append(sample)
        short = [f"{EMOTIONS[k]} {len(s)}" for k, s in enumerate(by_emotion) if len(s) < per_emotion]
        if short:
            raise ConfigError(
                f"data.labelled_per_emotion={per_emotion} is more than the train samples of {', '.join(short)} in "
                f"{full}; lower it"
            )
        chosen: list[dict[str, Any]] = []
        rest: list[dict[str, Any]] = []
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
                # Counted over the labelled samples only, over the full folder's vocabularies: a scene that none
                # of the N x 8 shows keeps its (zero) row, so the attribute heads keep the full set's shapes.
                counted = AttributeTable.from_records([_record(s) for s in samples], min_attribute_count, phi_beta)
                vocab = AttributeTable.load(full)
                zeros = [0] * NUM_EMOTIONS
                table = AttributeTable.from_counts(
                    {n: counted.scene_counts.get(n, zeros) for n in sorted({*vocab.scenes, *counted.scenes})},
                    {n: counted.object_counts.get(n, zeros) for n in sorted({*vocab.objects, *counted.objects})},
                    min_attribute_count, phi_beta)
                table.save(folder / ATTRIBUTES_FILE)
            write_json_atomic(folder / MANIFEST_FILE, {
                "format": FORMAT_VERSION, **origin, "split": "train" if not keep_eval else "all",
                "shards": entries, "totals": compute_totals(entries),
                "skipped": {"total": 0, "by_reason": {}, "examples": {}},
            })
    return labelled, left_out
