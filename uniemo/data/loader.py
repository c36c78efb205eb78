"""The streaming loader: shard folders -> batches of the ``data/FORMAT.md`` contract, per rank.

The stream is one visible list of stages (STYLE.md 11; read :meth:`ShardStream.__iter__`):

    manifest -> shard list -> split by node -> split by worker -> tar samples -> (shuffle) -> mix -> decode
    -> transforms -> batches

built on ``webdataset`` (``DataPipeline``, its tar reading and grouping) inside torch ``DataLoader``
workers, which start from a fork server, never as forks of the (threaded) process that iterates the loader
(:mod:`uniemo.data.workers`). Two kinds of stream:

**Evaluation** (``training=False``). The split's shards, in manifest order, are dealt out
``shards[rank::world_size]`` and then ``[worker::num_workers]``; each worker reads its shards once, in order,
and batches them, keeping its last partial batch. With fewer shards than readers (``world_size *
num_workers``, e.g. the one val shard of a small folder), samples are dealt out instead: every reader reads
all the split's shards and keeps samples ``i`` with ``i % readers == rank * num_workers + worker``. Either
way every sample of the split is seen exactly once across ranks and workers. Ranks may yield different
numbers of batches, a rank none.

**Training** (``training=True``). An epoch is ``batches_per_epoch = floor(train_samples / (world_size *
batch_size))`` batches on **every** rank, where ``train_samples`` is the number of train samples over all sources
listed in the manifests when the epoch starts (new feedback rounds join at the next epoch;
:meth:`ShardLoader.listing_changed` lets a trainer end an epoch early when a round appears). Of a source's round
sub-folders an epoch lists those up to :attr:`ShardLoader.round_limit` (the pinned feedback mode) within the
source's retention window (:class:`Source`); :attr:`ShardLoader.listed` names them, and the position saves it.
Worker ``w`` of a rank yields batches ``w, w+W, ...`` of the epoch, which is the order in which ``DataLoader`` returns them.
Each source is read in **passes without replacement**: pass ``p`` of an epoch puts the source's shards in an
order seeded by ``(seed, epoch, source, p)``, the same on every rank, and the samples of that sequence are cut
into one contiguous slice per reader (rank x worker), sized in proportion to the batches the reader owes
(:func:`reader_slice`); a reader that finishes its slice goes on with its slice of the next pass. With one source
(the real data, no feedback), every sample is therefore delivered **at most once per epoch** over all ranks and
workers, and all but ``train_samples - world_size x batches_per_epoch x batch_size`` (fewer than ``world_size x
batch_size``) are delivered: exactly once per epoch, the samples left out changing from epoch to epoch. (A shard
that turns out corrupt leaves its reader short, which then reads into its next pass.) A seeded shuffle buffer mixes
the samples of each pass, and is emptied before the next pass begins (a buffer filled across passes would take
samples beyond the slice). Sources (``real``, feedback rounds, ...) are mixed sample by sample by weight. Earlier
versions drew shards with replacement, which left about a third of the samples of an EmoSet-sized set out of each
epoch (BENCHMARKS.md, EmoSet scale).

**Skipped samples.** A shard that cannot be opened (``missing_shard``) or read to its end (``corrupt_shard``,
e.g. a truncated tar, one longer than its manifest says, or one holding a link, device or a member named with an
absolute path or ``..``) and a sample that is incomplete (``incomplete_sample``), has a bad label or JSON
(``bad_metadata``), an image that does not decode (``undecodable_image``) or one over ``data.limits.
max_image_pixels`` (``image_too_large``) are skipped and counted by reason, never fatal; only a training source
whose shard reads give no sample many times in a row is a :class:`DataError` (instead of an endless loop), and so
is a shard that goes over a cap of ``data.limits`` (fetched bytes, a decompressed member or shard; one line
naming the cap). Workers send their counts inside the batches (``_stats``,
removed before the batch is yielded; a worker with counts left and no batch sends a stats-only marker), so
:meth:`ShardLoader.stats` in the main process sees every worker's.

**Position.** :meth:`ShardLoader.state_dict` holds the epoch, the batches delivered in it and, per worker, how
many raw samples its stream has consumed (``_cursor``, also carried in batches). Every random choice of a
worker - the pass orders (shared by all readers), mixing, shuffle, and each sample's augmentation (seeded by its
position in the worker's stream) - depends only on ``(seed, epoch, rank, worker)``; so :meth:`ShardLoader.load_state_dict` replays the
epoch's raw stream, drops the consumed samples **without decoding them**, and re-assigns logical workers so the
round-robin continues where it stopped. Guarantee: with the same shard manifests, ``world_size``,
``batch_size``, ``num_workers`` and ``seed``, the batches after a restore equal the uninterrupted stream's,
at any batch, mid-epoch included. If any of these differ, the restore keeps the epoch counter and
``samples_consumed`` and starts the next epoch (a warning says so). Leaving a training iteration early
(``break``) and iterating again also continues at the next batch. Evaluation streams always start afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from uniemo.config.schema import NUM_EMOTIONS, LimitsConfig
from uniemo.data.attributes import AttributeTable, resolve_attribute_table
from uniemo.data.images import TooManyPixels, image_member, open_image
from uniemo.data.latents import LatentReader, covered_shards
from uniemo.data.limits import DEFAULT_LIMITS, BoundedStream, active_limits, limits_of, over_cap
from uniemo.data.remote import Storage, join_location, open_stream, worker_modules
from uniemo.data.shards import (
    folder_location,
    manifest_folders,
    read_manifest,
    resolve_shard_folder,
)
from uniemo.data.source import data_source
from uniemo.data.tar_members import tar_members
from uniemo.data.transforms import SampleTransform, build_sample_transform
from uniemo.data.workers import loader_worker_options, start_server
from uniemo.errors import ConfigError, DataError
from uniemo.run_layout import ATTRIBUTES_FILE, round_of
from uniemo.seeds import stream_seed

STATE_VERSION = 1
_PRIVATE_KEYS = ("_stats", "_worker", "_cursor", "_marker")


@dataclass(frozen=True)
class Source:
    """A named set of shard folders mixed into training streams with ``weight``.

    Each folder holds a ``manifest.json``, or sub-folders that do (one per feedback round); they are listed
    again at every epoch start. Of round sub-folders (``round-<r>``) a listing reads the rounds up to the
    loader's :attr:`ShardLoader.round_limit`, and of those the newest ``keep_rounds`` (0: all) whose shards add
    up to at most ``keep_bytes`` (0: no cap; the newest round always) - the retention window of the feedback
    loop (:mod:`uniemo.feedback.retention`).
    """

    name: str
    folders: tuple[Path, ...]
    weight: float = 1.0
    keep_rounds: int = 0
    keep_bytes: int = 0

    @classmethod
    def of(
        cls, name: str, folders: str | Path | Sequence[str | Path], weight: float = 1.0, keep_rounds: int = 0,
        keep_bytes: int = 0,
    ) -> Source:
        if isinstance(folders, (str, Path)):
            folders = [folders]
        return cls(name, tuple(Path(f) for f in folders), float(weight), int(keep_rounds), int(keep_bytes))

    def listed_folders(self, round_limit: int | None = None) -> list[Path]:
        """The shard folders a listing of this source reads now (class docstring), rounds in round order."""
        out: list[Path] = []
        for folder in self.folders:
            found = manifest_folders(folder)
            if found == [Path(folder)]:  # the folder itself is the shard folder
                out += found
                continue
            rounds = sorted((r, f) for f in found if (r := round_of(f)) is not None)
            if round_limit is not None:
                rounds = [(r, f) for r, f in rounds if r <= round_limit]
            out += [f for f in found if round_of(f) is None] + self._window([f for _, f in rounds])
        return out

    def _window(self, rounds: list[Path]) -> list[Path]:
        """The newest rounds within ``keep_rounds`` and ``keep_bytes`` (oldest first)."""
        if not self.keep_rounds and not self.keep_bytes:
            return rounds
        kept: list[Path] = []
        total = 0
        for folder in reversed(rounds):
            size = sum(int(e.get("bytes", 0)) for e in read_manifest(folder)["shards"])
            if kept and (
                (self.keep_rounds and len(kept) >= self.keep_rounds)
                or (self.keep_bytes and total + size > self.keep_bytes)
            ):
                break
            kept.append(folder)
            total += size
        return kept[::-1]


@dataclass(frozen=True)
class ShardRef:
    url: str
    """A local path or a URL (:mod:`uniemo.data.remote`)."""
    samples: int
    storage: Storage = Storage()
    """How to reach ``url`` when it is an ``s3://`` URL (endpoint)."""
    bytes: int | None = None
    """The shard's size as its manifest lists it: the loader reads no further (``None``: not listed)."""
    latents: str = ""
    """The file of the shard's precomputed VAE latents (:mod:`uniemo.data.latents`); empty: none."""


@dataclass
class EpochPlan:
    """What the workers of one rank do in one pass; built in the main process at each ``iter()``."""

    epoch: int
    shards: list[list[ShardRef]]
    """Per source (evaluation: one), the split's shards of every folder, manifest order."""
    weights: list[float]
    names: list[str]
    offset: int = 0
    """Logical worker of DataLoader worker 0: ``batches already delivered this epoch % num_workers``."""
    batches: list[int] | None = None
    """Training: batches each DataLoader worker yields (``None``: evaluation, read shards to the end)."""
    cursors: list[int] = field(default_factory=list)
    """Per logical worker: raw samples its stream already consumed (dropped undecoded on restore)."""
    split_samples: bool = False
    """Evaluation with fewer shards than readers: deal out samples, not shards (module docstring)."""
    epoch_batches: int = 0
    """Training: batches per rank in the whole epoch (every reader's slice of a pass is sized from it)."""


# ---------------------------------------------------------------------------------------------------------
# Manifest -> shard lists
# ---------------------------------------------------------------------------------------------------------
def list_split_shards(
    folders: Sequence[Path], split: str, *, required: bool, latent_size: int = 0, limits: LimitsConfig | None = None
) -> list[ShardRef]:
    """The shards of ``split`` listed in the manifests under ``folders`` (each folder or its round sub-folders),
    with the file of their current precomputed latents of ``latent_size`` px where there is one (0: not looked
    for; a URL source has none)."""
    refs: list[ShardRef] = []
    for folder in folders:
        found = manifest_folders(folder)
        if not found and required:
            read_manifest(folder, limits)  # raises the DataError that names the folder
        for sub in found:
            base, storage = folder_location(sub)  # a URL source's mirror: its shards are at the URL
            latents = covered_shards(sub, latent_size) if latent_size and base == str(sub) else {}
            for entry in read_manifest(sub, limits)["shards"]:
                if entry["split"] == split:
                    refs.append(ShardRef(join_location(base, entry["name"]), int(entry["samples"]), storage,
                                         bytes=entry.get("bytes"), latents=latents.get(entry["name"], "")))
    return refs


# ---------------------------------------------------------------------------------------------------------
# The per-worker stream
# ---------------------------------------------------------------------------------------------------------
class _WorkerState:
    """Counters of one worker's pass: skipped samples by reason, and corrupt-shard bookkeeping per source."""

    def __init__(self, num_sources: int):
        self.skips: Counter = Counter()
        self.reported: Counter = Counter()
        self.current_read = [0] * num_sources
        self.failed_reads: set[tuple[int, int]] = set()
        self.empty_reads = [0] * num_sources

    def tar_error(self, source: int, exn: Exception) -> bool:
        """webdataset handler: count a shard that cannot be opened or read (once per read), keep going."""
        read = (source, self.current_read[source])
        if read not in self.failed_reads:
            self.failed_reads.add(read)
            self.skips["missing_shard" if isinstance(exn, FileNotFoundError) else "corrupt_shard"] += 1
        return True

    def delta(self) -> dict[str, int]:
        """Counts since the last call (sent with the next batch)."""
        out = {k: v - self.reported[k] for k, v in self.skips.items() if v != self.reported[k]}
        self.reported = Counter(self.skips)
        return out


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's stream of collated batches; ``DataLoader`` runs ``__iter__`` in each worker."""

    def __init__(
        self,
        plan: EpochPlan,
        *,
        split: str,
        training: bool,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        transform: SampleTransform,
        attributes: AttributeTable,
        limits: LimitsConfig = DEFAULT_LIMITS,
    ):
        super().__init__()
        self.limits = limits
        self.plan = plan
        self.split = split
        self.training = training
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.attributes = attributes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.plan.offset) % num_workers  # logical worker: continues a restored epoch
        state = _WorkerState(len(self.plan.shards))
        key = (self.seed, self.plan.epoch, self.rank, worker)

        # manifest -> shard list -> split by node -> split by worker -> open (file or URL) -> tar samples ->
        # (training) shuffle within each pass, before decoding: the buffer holds bytes; per source
        per_source = []
        for i in range(len(self.plan.shards)):
            source_stages: list[Callable] = [
                partial(self._shard_urls, i, worker, num_workers, state, key),
                partial(_read_pieces, handler=partial(state.tar_error, i), limits=self.limits),
            ]
            if self.training:
                rng = random.Random(stream_seed("shuffle", *key, i))
                source_stages.append(partial(_shuffle_within_passes, size=self.shuffle_buffer, rng=rng))
            per_source.append(wds.DataPipeline(*source_stages))
        # mix sources by weight
        stages: list[Callable] = [partial(self._mix, per_source, state, key)]
        if self.plan.split_samples:  # evaluation, fewer shards than readers: this reader's share of samples
            stages.append(partial(_every, start=self.rank * num_workers + worker, step=self.world_size * num_workers))
        # number samples (drop those a restored position already consumed) -> decode + transforms (+ the sample's
        # precomputed latents) -> batches
        skip = self.plan.cursors[worker] if self.plan.cursors else 0
        latents = {ref.url: ref.latents for refs in self.plan.shards for ref in refs if ref.latents}
        stages += [
            partial(_number, skip=skip),
            partial(self._decode_transform, state, key, latents),
            partial(self._batch, state, worker, physical),
        ]
        return iter(wds.DataPipeline(*stages))

    # -- stages -----------------------------------------------------------------------------------------
    def _shard_urls(
        self, source: int, worker: int, num_workers: int, state: _WorkerState, key: tuple
    ) -> Iterator[dict[str, Any]]:
        """Evaluation: this (rank, worker)'s slice of the split's shards, once. Training: this reader's slice of
        each pass over the source (module docstring), pass after pass, as pieces of shards."""
        shards = self.plan.shards[source]
        if not self.training:
            if self.plan.split_samples:
                by_worker = shards  # every reader reads every shard and keeps its share (_every)
            else:
                by_node = shards[self.rank :: self.world_size]  # split by node
                by_worker = by_node[worker::num_workers]  # split by worker
            for ref in by_worker:
                state.current_read[source] += 1
                yield {"url": ref.url, "storage": ref.storage, "bytes": ref.bytes, "start": 0, "stop": None}
            return
        counts = [r.samples for r in shards]
        start, stop = reader_slice(sum(counts), self.plan.epoch_batches, self.rank, self.world_size, worker,
                                   num_workers)
        patience = max(64, 4 * len(shards))
        for npass in itertools.count():
            order = list(range(len(shards)))
            random.Random(stream_seed("pass", self.seed, self.plan.epoch, source, npass)).shuffle(order)
            first = 0  # index of the pass's sequence where the current shard begins
            for i in order:
                lo, hi = max(start, first), min(stop, first + counts[i])
                first += counts[i]
                if lo >= hi:
                    if first >= stop:
                        break
                    continue
                if state.empty_reads[source] > patience:
                    raise DataError(
                        f"source {self.plan.names[source]!r}: {patience} shard reads in a row gave no sample "
                        "(every shard corrupt?); check the folder with `uniemo data inspect`"
                    )
                state.current_read[source] += 1
                state.empty_reads[source] += 1
                ref = shards[i]
                yield {"url": ref.url, "storage": ref.storage, "bytes": ref.bytes, "start": lo - (first - counts[i]),
                       "stop": hi - (first - counts[i]), "pass": npass}

    def _mix(self, per_source: list, state: _WorkerState, key: tuple) -> Iterator[dict[str, Any]]:
        """Tag samples with their source; training with several sources draws a source per sample by weight."""
        iters = [iter(p) for p in per_source]
        if len(iters) == 1:
            for sample in iters[0]:
                state.empty_reads[0] = 0
                sample["__source__"] = 0
                yield sample
            return
        rng = random.Random(stream_seed("mix", *key))
        choices = list(range(len(iters)))
        while True:
            i = rng.choices(choices, self.plan.weights)[0]
            sample = next(iters[i])  # training sources are endless
            state.empty_reads[i] = 0
            sample["__source__"] = i
            yield sample

    def _decode_transform(
        self, state: _WorkerState, key: tuple, latents: dict[str, str], src: Iterator
    ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        fixed = None if self.transform.is_random else random.Random(0)  # deterministic transforms: no seeding
        reader = LatentReader() if latents else None
        for index, sample in src:
            found = None
            if reader is not None and sample.get("__url__") in latents:
                path = latents[sample["__url__"]]
                row = reader.row(path, sample["__key__"])
                found = (reader, path, row) if row is not None else None
            item = self._decode(sample, fixed or random.Random(stream_seed("sample", *key, index)), found)
            if isinstance(item, str):
                state.skips[item] += 1
                yield index, None
            else:
                yield index, item

    def _decode(
        self, sample: dict[str, Any], rng: random.Random, latents: tuple[LatentReader, str, int] | None = None
    ) -> dict[str, Any] | str:
        """One raw sample -> the per-sample fields of the batch contract, or the reason it is skipped. With the
        sample's precomputed ``latents`` (reader, file, row), its latent moments replace ``pixel_values``."""
        ext = image_member(sample)
        if ext is None or "cls" not in sample or "json" not in sample:
            return "incomplete_sample"
        try:
            label = int(sample["cls"])
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            return "bad_metadata"
        if not 0 <= label < NUM_EMOTIONS or not isinstance(meta, dict):
            return "bad_metadata"
        try:
            image = open_image(sample[ext], self.limits.max_image_pixels)
            image.load()
        except TooManyPixels:
            return "image_too_large"
        except Exception:  # PIL raises many types for bad bytes; any of them means "skip this sample"
            return "undecodable_image"
        objects = meta.get("objects") or []
        if not isinstance(objects, list):
            objects = []
        table = self.attributes
        item: dict[str, Any] = self.transform(image, rng, pixels=latents is None)
        if latents is not None and "pixel_flip" in item:
            reader, path, row = latents
            item["latent_mean"], item["latent_std"] = reader.read(path, row, item.pop("pixel_flip"))
        item.update(
            label=label,
            scene_idx=table.scene_index(meta.get("scene")),
            # METHOD §2.3: the object text (and index) is the LAST object of the annotation.
            object_idx=table.object_index(objects[-1]) if objects else -1,
            object_ids=[i for i in (table.object_index(o) for o in objects) if i >= 0],
            key=sample["__key__"],
            source=self.plan.names[sample["__source__"]],
        )
        return item

    def _batch(
        self, state: _WorkerState, worker: int, physical: int, src: Iterator
    ) -> Iterator[dict[str, Any]]:
        quota = None if self.plan.batches is None else self.plan.batches[physical]
        if quota == 0:
            return
        items: list[dict[str, Any]] = []
        produced = 0
        cursor = 0
        for index, item in src:
            cursor = index + 1
            if item is None:
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield self._finish(collate(items, len(self.attributes.objects)), state, worker, cursor)
                items = []
                produced += 1
                if quota is not None and produced >= quota:
                    break
        else:
            if items:  # evaluation keeps the last partial batch
                yield self._finish(collate(items, len(self.attributes.objects)), state, worker, cursor)
                return
        leftover = state.delta()
        if leftover:
            yield {"_marker": True, "_stats": leftover, "_worker": worker, "_cursor": cursor}

    @staticmethod
    def _finish(batch: dict[str, Any], state: _WorkerState, worker: int, cursor: int) -> dict[str, Any]:
        batch["_stats"] = state.delta()
        batch["_worker"] = worker
        batch["_cursor"] = cursor
        return batch


def reader_slice(
    total: int, epoch_batches: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[int, int]:
    """``[start, stop)`` of the samples of a pass (``total`` of them) that reader ``(rank, worker)`` reads.

    Readers are ordered rank by rank, worker by worker; each one's slice is in proportion to the batches it owes
    in an epoch (worker ``w`` yields batches ``w, w + W, ...`` of its rank's ``epoch_batches``), so when the pass
    holds at least the epoch's samples every reader's slice holds at least its batches. A reader whose slice
    would be empty (a source of fewer samples than readers) reads the whole pass."""
    w = max(1, num_workers)
    owed = [len(range(j, epoch_batches, w)) for j in range(w)]
    everyone = world_size * epoch_batches
    if everyone < 1:
        return 0, total
    before = rank * epoch_batches + sum(owed[:worker])
    start, stop = total * before // everyone, total * (before + owed[worker]) // everyone
    return (start, stop) if stop > start else (0, total)


def _read_pieces(
    src: Iterator[dict[str, Any]], handler: Callable[[Exception], bool], limits: LimitsConfig = DEFAULT_LIMITS
) -> Iterator[dict[str, Any]]:
    """Open -> tar samples for each piece ``{url, storage, bytes, start, stop}``: the piece's shard, samples
    ``start`` to ``stop`` (``None``: to the end). Samples before ``start`` are read past, not decoded."""
    for piece in src:
        samples = wds.tariterators.group_by_keys(
            tar_members(_open_shards(iter([piece]), handler, limits), handler=handler, limits=limits),
            handler=handler,
        )
        try:
            for sample in itertools.islice(samples, piece["start"], piece["stop"]):
                sample["__pass__"] = piece.get("pass", 0)
                yield sample
        finally:
            samples.close()  # a piece that ends inside its shard closes the shard's stream now


class ShardLongerThanListed(OSError):
    """A shard stream that goes on past the size its manifest lists (changed, or a lying server): a corrupt shard."""


def _open_shards(
    src: Iterator[dict[str, Any]], handler: Callable[[Exception], bool], limits: LimitsConfig = DEFAULT_LIMITS
) -> Iterator[dict[str, Any]]:
    """Open each shard's byte stream (a local file or a URL, :func:`uniemo.data.remote.open_stream`) and close it
    once the next stage has read it; a failure to open or close (a ``pipe:`` or ``curl`` that exited with an
    error) goes to ``handler``, which counts it against that shard's read.

    The stream is read no further than the shard's listed size (past it: a corrupt shard) nor than
    ``data.limits.max_fetch_bytes`` (past it: a :class:`DataError` naming the cap)."""
    for item in src:
        url, listed = item["url"], item.get("bytes")
        try:
            raw = open_stream(url, item.get("storage"))
        except Exception as exn:  # FileNotFoundError, an HTTP or S3 error: the shard's read is counted and skipped
            if handler(exn):
                continue
            return
        if isinstance(listed, int) and listed <= limits.max_fetch_bytes:
            stream = BoundedStream(raw, listed, partial(ShardLongerThanListed, f"{url} is longer than listed"))
        else:
            stream = BoundedStream(raw, limits.max_fetch_bytes, partial(
                over_cap, f"shard {url} is larger than the cap", "max_fetch_bytes", limits.max_fetch_bytes
            ))
        try:
            yield {"url": item["url"], "stream": stream}
        except GeneratorExit:  # the consumer stopped mid-shard (a full quota): nothing to report
            with contextlib.suppress(Exception):
                stream.close()
            raise
        try:
            stream.close()
        except Exception as exn:
            if not handler(exn):
                return


def _shuffle_within_passes(
    src: Iterator[dict[str, Any]], size: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """A shuffle buffer of ``size`` samples that is emptied whenever the pass (``__pass__``) changes, so a reader
    never takes a sample of its next pass while its slice of this one lasts."""
    buffer: list[dict[str, Any]] = []
    current = None

    def take() -> dict[str, Any]:
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return buffer.pop()

    for sample in src:
        if sample["__pass__"] != current:
            while buffer:
                yield take()
            current = sample["__pass__"]
        buffer.append(sample)
        if len(buffer) >= size:
            yield take()
    while buffer:
        yield take()


def _skip_unreadable(exn: Exception) -> bool:
    return True


def read_split_samples(
    folder: str | Path, split: str, limits: LimitsConfig = DEFAULT_LIMITS
) -> Iterator[dict[str, Any]]:
    """The raw samples (``__key__`` and each member's bytes: ``jpg`` or ``png``, ``json``, ``cls``) of ``split`` of
    a shard folder, in manifest order, through the loader's own stages: the shard list of the manifest, the shard
    opener (a local file, or a URL source's shards at their URL), the capped tar reader (:func:`uniemo.data.tar_members.tar_members`),
    members grouped by key. A shard or sample that cannot be read is skipped. For readers that want the stored
    images as they are (the report)."""
    refs = list_split_shards([Path(folder)], split, required=False)
    streams = _open_shards(({"url": r.url, "storage": r.storage} for r in refs), handler=_skip_unreadable)
    members = tar_members(streams, handler=_skip_unreadable, limits=limits)
    return wds.tariterators.group_by_keys(members, handler=_skip_unreadable)


def _every(src: Iterator[dict[str, Any]], start: int, step: int) -> Iterator[dict[str, Any]]:
    """Samples ``start, start + step, ...`` of the stream."""
    for i, sample in enumerate(src):
        if i % step == start:
            yield sample


def _number(src: Iterator[dict[str, Any]], skip: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """Pair each raw sample with its position in the worker's stream; drop the first ``skip`` undecoded."""
    for index, sample in enumerate(src):
        if index >= skip:
            yield index, sample


def _as_is(batch: Any) -> Any:
    return batch


def collate(items: list[dict[str, Any]], num_objects: int) -> dict[str, Any]:
    """Per-sample fields -> the batch contract of ``data/FORMAT.md``."""
    # default_collate stacks straight into shared memory inside a worker, saving a copy of the largest
    # tensors on their way to the main process.
    stack = torch.utils.data.default_collate
    batch: dict[str, Any] = {"image": stack([it["image"] for it in items])}
    with_latents = [b for b, it in enumerate(items) if "latent_mean" in it]
    if with_latents:
        batch.update(_collate_latents(items, with_latents))
    elif "pixel_values" in items[0]:
        batch["pixel_values"] = stack([it["pixel_values"] for it in items])
    # One storage for the three index rows: a worker ships one shared-memory block instead of three.
    indices_3B = torch.tensor(
        [
            [it["label"] for it in items],
            [it["scene_idx"] for it in items],
            [it["object_idx"] for it in items],
        ],
        dtype=torch.int64,
    )
    batch["label"], batch["scene_idx"], batch["object_idx"] = indices_3B.unbind(0)
    multi_hot_BO = torch.zeros(len(items), num_objects, dtype=torch.float32)
    for b, it in enumerate(items):
        if it["object_ids"]:
            multi_hot_BO[b, it["object_ids"]] = 1.0
    batch["objects_multi_hot"] = multi_hot_BO
    batch["key"] = [it["key"] for it in items]
    batch["source"] = [it["source"] for it in items]
    return batch


def _collate_latents(items: list[dict[str, Any]], with_latents: list[int]) -> dict[str, torch.Tensor]:
    """``latent_mean`` / ``latent_std`` of every row; rows without precomputed latents (a source without them, e.g.
    a feedback round) are zero there and listed in ``pixel_rows``, with their ``pixel_values`` in that order."""
    like = items[with_latents[0]]
    mean = torch.zeros((len(items), *like["latent_mean"].shape), dtype=like["latent_mean"].dtype)
    std = torch.zeros_like(mean)
    for b in with_latents:
        mean[b], std[b] = items[b]["latent_mean"], items[b]["latent_std"]
    out = {"latent_mean": mean, "latent_std": std}
    missing = [b for b, it in enumerate(items) if "pixel_values" in it]
    if missing:
        out["pixel_rows"] = torch.tensor(missing, dtype=torch.int64)
        out["pixel_values"] = torch.stack([items[b]["pixel_values"] for b in missing])
    return out


# ---------------------------------------------------------------------------------------------------------
# The loader object of one rank
# ---------------------------------------------------------------------------------------------------------
class ShardLoader:
    """Iterates one epoch (training) or one full pass (evaluation) of batches per ``iter()``.

    Training epochs advance automatically at the end of each pass; :meth:`batches` is the endless form.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        split: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        transform: SampleTransform,
        training: bool,
        attributes: AttributeTable,
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer: int = 256,
        multiprocessing_context: Any = None,
        pin_memory: bool = False,
        limits: LimitsConfig | None = None,
        latent_size: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"loader workers must be >= 0, got {num_workers}")
        if not sources:
            raise ConfigError("a loader needs at least one source")
        if not training and len(sources) > 1:
            raise ConfigError("evaluation streams read one source (the given shard folder), not a mix")
        for s in sources:
            if s.weight <= 0:
                raise ConfigError(f"source {s.name!r}: weight must be > 0, got {s.weight}")
        self.sources = list(sources)
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.transform = transform
        self.training = training
        self.attributes = attributes
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.multiprocessing_context = multiprocessing_context
        self.pin_memory = pin_memory
        self.limits = active_limits(limits)  # fixed now: it travels to the loader workers with the stream
        self.latent_size = latent_size
        """Stage 2 with precomputed latents: G of the latents read instead of ``pixel_values`` (0: none)."""
        self.samples_consumed = 0
        self._batches_in_epoch = 0
        self._cursors = [0] * max(1, num_workers)
        self._skipped: Counter = Counter()
        self._by_source: Counter = Counter()
        self._batches_total = 0
        self._warned_empty: set[str] = set()
        self.round_limit: int | None = None
        """Round sub-folders above this round are not listed (None: every round; the pinned feedback mode)."""
        self.listed: dict[str, list[str]] = {}
        """Per source, the names of the folders the current epoch's listing reads (``state_dict``'s ``listed``)."""
        self._shards, self._digest = self._list_shards()  # checks shard counts now, not at the first batch
        if num_workers and multiprocessing_context is None:  # its imports overlap with the caller's set-up
            start_server(worker_modules(ref.url for refs in self._shards for ref in refs))

    # -- manifest -> shard lists ------------------------------------------------------------------------
    def _list_shards(self) -> tuple[list[list[ShardRef]], str]:
        shards = []
        listed: dict[str, list[str]] = {}
        for i, s in enumerate(self.sources):
            folders = s.folders if i == 0 else tuple(s.listed_folders(self.round_limit))
            listed[s.name] = [f.name for f in folders]
            refs = list_split_shards(folders, self.split, required=(i == 0), latent_size=self.latent_size,
                                     limits=self.limits)
            if i == 0 and not any(r.samples for r in refs):
                raise DataError(
                    f"source {s.name!r} ({', '.join(map(str, s.folders))}) has no {self.split} samples; "
                    f"check it with `uniemo data inspect`"
                )
            lacking = [r for r in refs if not r.latents] if self.latent_size and i == 0 else []
            if lacking:  # other sources (feedback rounds) may lack them: those samples are encoded in the step
                raise DataError(
                    f"{len(lacking)} of the {len(refs)} {self.split} shards of {', '.join(map(str, s.folders))} "
                    f"have no current {self.latent_size} px latents (e.g. {lacking[0].url}); run `uniemo data "
                    "latents --config <this config>` (it resumes), or set data.precomputed_latents=false"
                )
            if i > 0 and not any(r.samples for r in refs) and s.name not in self._warned_empty:
                self._warned_empty.add(s.name)  # e.g. a feedback source before its first round
                warnings.warn(
                    f"source {s.name!r} has no {self.split} shards yet; it joins when its manifest lists some",
                    stacklevel=3,
                )
            shards.append(refs)
        digest = hashlib.sha256(
            json.dumps(
                [
                    [s.name, s.weight, [[r.url, r.samples] for r in refs]]
                    for s, refs in zip(self.sources, shards, strict=True)
                ]
            ).encode()
        ).hexdigest()
        self.listed = listed
        return shards, digest

    def listing_changed(self) -> bool:
        """Whether the manifests now list other shards than the current epoch uses (e.g. a new feedback round).

        A trainer that wants them before the epoch ends calls ``set_epoch(epoch + 1)`` and iterates again.
        """
        listed = self.listed
        changed = self._list_shards()[1] != self._digest
        self.listed = listed  # still the current epoch's
        return changed

    def set_round_limit(self, limit: int | None) -> None:
        """List round sub-folders up to round ``limit`` from the next listing on (an epoch start)."""
        self.round_limit = limit

    @property
    def train_samples(self) -> int:
        """Samples of the split over all sources (the epoch length of training streams)."""
        return sum(r.samples for refs in self._shards for r in refs)

    @property
    def batches_per_epoch(self) -> int:
        """Training: ``floor(train_samples / (world_size * batch_size))``, the same on every rank."""
        return self.train_samples // (self.world_size * self.batch_size)

    @property
    def _split_samples(self) -> bool:
        """Evaluation with fewer shards than readers deals out samples (module docstring)."""
        return not self.training and len(self._shards[0]) < self.world_size * max(1, self.num_workers)

    def _reader_samples(self) -> list[int]:
        """Evaluation: samples each loader worker of this rank reads."""
        w = max(1, self.num_workers)
        refs = self._shards[0]
        if self._split_samples:
            total, readers = sum(r.samples for r in refs), self.world_size * w
            return [len(range(self.rank * w + k, total, readers)) for k in range(w)]
        mine = refs[self.rank :: self.world_size]
        return [sum(r.samples for r in mine[k::w]) for k in range(w)]

    @property
    def num_samples(self) -> int:
        """Evaluation: samples this rank reads (all ranks together: the split)."""
        return sum(self._reader_samples())

    def __len__(self) -> int:
        """Training: batches per epoch. Evaluation: this rank's batches when no sample is corrupt."""
        if self.training:
            return self.batches_per_epoch
        return sum(math.ceil(n / self.batch_size) for n in self._reader_samples())

    # -- iteration ----------------------------------------------------------------------------------------
    def _epoch_plan(self) -> EpochPlan:
        w = max(1, self.num_workers)
        active = [i for i, refs in enumerate(self._shards) if any(r.samples for r in refs)]
        plan = EpochPlan(
            epoch=self.epoch,
            shards=[self._shards[i] for i in active],
            weights=[self.sources[i].weight for i in active],
            names=[self.sources[i].name for i in active],
            split_samples=self._split_samples,
        )
        if self.training:
            bpe = self.batches_per_epoch
            if bpe < 1:
                raise DataError(
                    f"{self.train_samples} {self.split} samples are fewer than world_size x batch_size = "
                    f"{self.world_size} x {self.batch_size}: no full batch per rank; lower data.batch_size"
                )
            done = self._batches_in_epoch
            plan.offset = done % w
            plan.batches = [len(range(j, bpe - done, w)) for j in range(w)]
            plan.epoch_batches = bpe
            plan.cursors = list(self._cursors)
        return plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.training and self._batches_in_epoch == 0:
            self._shards, self._digest = self._list_shards()  # new feedback rounds join at epoch starts
        plan = self._epoch_plan()
        stream = ShardStream(
            plan,
            split=self.split,
            training=self.training,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            transform=self.transform,
            attributes=self.attributes,
            limits=self.limits,
        )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,  # batches are made in the workers
            collate_fn=_as_is,  # they are final: skip DataLoader's per-element conversion walk
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # never forked: from the fork server, with this process's environment (uniemo.data.workers)
            **loader_worker_options(
                self.num_workers, worker_modules(ref.url for refs in plan.shards for ref in refs),
                self.multiprocessing_context,
            ),
        )
        epoch_batches = self.batches_per_epoch
        try:
            yield from self._deliver(loader, epoch_batches)
        except DataError as exc:  # raised in a worker: DataLoader wraps it in a traceback; keep one line
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from exc

    def _deliver(self, loader: torch.utils.data.DataLoader, epoch_batches: int) -> Iterator[dict[str, Any]]:
        """Strip the worker bookkeeping from each batch into the loader's counters and position."""
        for batch in loader:
            self._skipped.update(batch.pop("_stats"))
            worker, cursor = batch.pop("_worker"), batch.pop("_cursor")
            if batch.pop("_marker", False):
                continue
            if self.training:
                self._cursors[worker] = cursor
                self._batches_in_epoch += 1
                self.samples_consumed += len(batch["key"])
                if self._batches_in_epoch == epoch_batches:
                    # The epoch's last batch: the position is already "start of the next epoch".
                    self.set_epoch(self.epoch + 1)
            self._batches_total += 1
            self._by_source.update(batch["source"])
            yield batch

    def batches(self) -> Generator[dict[str, Any], None, None]:
        """Training: an endless stream, epoch after epoch. Evaluation: one pass. A generator: ``close()`` ends the
        current epoch's DataLoader (the trainer does, when new feedback shards are listed)."""
        if not self.training:
            yield from self
            return
        while True:
            yield from self

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its first batch."""
        self.epoch = epoch
        self._batches_in_epoch = 0
        self._cursors = [0] * max(1, self.num_workers)

    # -- observability and position ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Skipped samples by reason (all workers), samples and batches delivered, samples per source."""
        return {
            "skipped": {"total": sum(self._skipped.values()), "by_reason": dict(self._skipped)},
            "batches": self._batches_total,
            "samples": sum(self._by_source.values()),
            "by_source": dict(self._by_source),
            "epoch": self.epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, for checkpoints (plain JSON-able data)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "seed": self.seed,
            "samples_consumed": self.samples_consumed,
            "batches_in_epoch": self._batches_in_epoch,
            "worker_cursors": list(self._cursors),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "shards_sha256": self._digest,
            "listed": {name: list(folders) for name, folders in self.listed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: exactly when the layout matches, else from the next epoch."""
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader position of version {state.get('version')!r} is not readable (expected {STATE_VERSION})"
            )
        self.seed = int(state["seed"])
        self.samples_consumed = int(state["samples_consumed"])
        self.set_epoch(int(state["epoch"]))
        if not self.training or state["batches_in_epoch"] == 0:
            return
        self._shards, self._digest = self._list_shards()
        same = {
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "shards_sha256": self._digest,
        }
        changed = [k for k, v in same.items() if state.get(k) != v]
        if changed:
            warnings.warn(
                f"loader position saved with other {', '.join(changed)}: cannot replay epoch {state['epoch']} "
                f"exactly; continuing at the start of epoch {state['epoch'] + 1}",
                stacklevel=2,
            )
            self.set_epoch(int(state["epoch"]) + 1)
            return
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._cursors = [int(c) for c in state["worker_cursors"]]


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------
def build_loader(
    shards: str | Path | Sequence[Source],
    split: str,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    transform: SampleTransform,
    training: bool,
    attributes: AttributeTable | None = None,
    seed: int = 0,
    epoch: int = 0,
    position: dict[str, Any] | None = None,
    shuffle_buffer: int = 256,
    multiprocessing_context: Any = None,
    pin_memory: bool = False,
    limits: LimitsConfig | None = None,
    latent_size: int = 0,
) -> ShardLoader:
    """The stream of one rank: a shard folder (or weighted :class:`Source` list) -> batches (``data/FORMAT.md``).

    ``shards`` is one folder (the source ``real``) or a list of sources whose first is the real data; the
    attribute table defaults to that folder's ``attributes.json``. ``position`` is a
    :meth:`ShardLoader.state_dict` to continue from; ``limits`` caps what the shards may make it read
    (``data.limits``); ``multiprocessing_context`` replaces how the workers start (default: from the fork server,
    :mod:`uniemo.data.workers`; the batches are the same either way). See the module docstring for the guarantees.
    """
    if isinstance(shards, (str, Path)):
        sources = [Source.of("real", shards)]
    else:
        sources = list(shards)
    if attributes is None:
        attributes = AttributeTable.load(_attribute_folder(sources[0]))
    loader = ShardLoader(
        sources,
        split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=transform,
        training=training,
        attributes=attributes,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
        limits=limits,
        latent_size=latent_size,
    )
    if position is not None:
        loader.load_state_dict(position)
    return loader


def build_loader_from_config(
    data_cfg: Any,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    stage: int = 1,
    training: bool | None = None,
    seed: int = 0,
    epoch: int = 0,
    position: dict[str, Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    multiprocessing_context: Any = None,
    transform: SampleTransform | None = None,
    latents: bool = False,
    pin_memory: bool = False,
) -> ShardLoader:
    """A rank's loader from ``DataConfig``: the real (or synthetic) shards, plus ``data.extra_sources`` in training.

    ``training`` defaults to ``split == "train"``; stage 2 adds ``pixel_values``, or with ``latents`` the
    precomputed VAE latents (``data.precomputed_latents``, :mod:`uniemo.data.latents`). The attribute table is
    the real folder's, re-based with ``data.min_attribute_count`` and ``data.phi_beta``. ``transform`` replaces the
    stream's transform (None: :func:`build_sample_transform` of the config, stage and ``training``).
    """

    folder = data_source(data_cfg)
    training = (split == "train") if training is None else training
    sources = [Source.of("real", folder)]
    if training:
        for i, s in enumerate(data_cfg.extra_sources):
            if not s.path:
                raise ConfigError(
                    f"data.extra_sources[{i}].path is empty; give the folder of source {s.name!r}"
                )
            path = resolve_shard_folder(s.path, data_cfg, key=f"data.extra_sources[{i}].path")
            sources.append(Source.of(s.name, path, s.weight, s.keep_rounds, s.keep_bytes))
    attributes = AttributeTable.load(folder).rebased(data_cfg.min_attribute_count, data_cfg.phi_beta)
    return build_loader(
        sources,
        split,
        rank=rank,
        world_size=world_size,
        batch_size=data_cfg.batch_size if batch_size is None else batch_size,
        num_workers=data_cfg.num_workers if num_workers is None else num_workers,
        transform=transform or build_sample_transform(data_cfg, stage=stage, training=training),
        training=training,
        attributes=attributes,
        seed=seed,
        epoch=epoch,
        position=position,
        shuffle_buffer=data_cfg.shuffle_buffer,
        multiprocessing_context=multiprocessing_context,
        limits=limits_of(data_cfg),
        pin_memory=pin_memory,
        latent_size=data_cfg.generator_image_size if latents and stage == 2 else 0,
    )


def load_attribute_table(data_cfg: Any) -> AttributeTable:
    """The attribute table of the run's real shards (making the synthetic set on first use), re-based per config,
    or with EmoGen's base and Phi (``data.attributes=emogen``)."""

    folder = data_source(data_cfg)
    return resolve_attribute_table(AttributeTable.load(folder), data_cfg)


def _attribute_folder(source: Source) -> Path:
    for folder in source.folders:
        for sub in manifest_folders(folder):
            if (sub / ATTRIBUTES_FILE).is_file():
                return sub
    return source.folders[0]
