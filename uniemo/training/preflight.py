"""Checks of the data against the config, on the driver, before Ray or any worker starts.

Everything about the data's shape that the manifest and the config already tell is checked here and reported
as one :class:`DataError` line (exit 2), instead of failing inside the workers after the cluster started:

- a split the command reads is empty (train always; val when ``training.eval_every > 0``; test for
  ``uniemo evaluate``);
- the train split holds fewer samples than one batch per rank (``distributed.num_workers x data.batch_size``):
  no rank would ever get a full batch;
- a URL source (``data.shards`` or an extra source at ``http(s)://``, ``s3://``, ``pipe:``) whose manifest is
  missing or unreachable, or whose shards are missing or of another size than listed (HTTP ``HEAD``, S3
  ``HeadObject``, each with ``data.storage.timeout_s``): :func:`uniemo.data.shards.resolve_shard_folder`.

Fewer shards than ranks x loader workers is no longer a problem: training draws shards with replacement, and
evaluation streams deal out samples instead of shards when there are fewer shards than readers
(:mod:`uniemo.data.loader`). The checks also return the one-line note of :func:`uniemo.training.task.left_out_note`
(what the method leaves out for data without annotations), which the caller prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from uniemo.data.loader import load_attribute_table
from uniemo.data.records import SPLITS
from uniemo.data.remote import is_url
from uniemo.data.shards import read_manifest, resolve_shard_folder
from uniemo.data.source import data_source
from uniemo.errors import DataError
from uniemo.training.task import left_out_note, parts_left_out

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config

_SPLIT_HINT = (
    "the image-folder reader gives an emotion val and test images once it has 3 images; "
    "check the folder with `uniemo data inspect`"
)


def split_samples(folder: Path) -> dict[str, int]:
    """Samples per split listed in the manifest of ``folder`` (0 for a split it does not list)."""

    totals = read_manifest(folder).get("totals", {})
    return {split: int(totals.get(split, {}).get("samples", 0)) for split in SPLITS}


def require_split(folder: Path, samples: dict[str, int], split: str, why: str, fix: str) -> None:
    """One line when ``split`` of ``folder`` has no samples: what needs it (``why``) and what to do (``fix``)."""
    if samples.get(split, 0) == 0:
        raise DataError(f"the {split} split of {folder} has no samples, but {why}; {fix} ({_SPLIT_HINT})")


def require_batches(folder: Path, samples: int, split: str, ranks: int, batch_size: int, batch_key: str,
                    ranks_key: str = "distributed.num_workers") -> None:
    """One line when ``samples`` cannot give every one of ``ranks`` a batch of ``batch_size``."""
    if samples >= ranks * batch_size:
        return
    fit = samples // ranks
    fix = (f"lower {batch_key} to at most {fit}" if fit >= 1
           else f"use at most {samples} ranks ({ranks_key}) and {batch_key}=1")
    raise DataError(
        f"the {split} split of {folder} has {samples} samples, fewer than {ranks_key} x {batch_key} = "
        f"{ranks} x {batch_size} = {ranks * batch_size}, so no rank gets a full batch; {fix}, or add images"
    )


def check_url_sources(cfg: Config) -> None:
    """The extra training sources given as URLs are there and reachable, with every shard their manifests list
    (``data.shards`` itself is checked by :func:`uniemo.data.source.data_source`). A local extra source may still be
    empty (a feedback source before its first round), so it is not checked here."""
    for i, source in enumerate(cfg.data.extra_sources):
        if is_url(source.path):
            resolve_shard_folder(source.path, cfg.data, key=f"data.extra_sources[{i}].path")


def check_training_data(cfg: Config, world_size: int) -> list[str]:
    """``uniemo train`` (stage 1 and 2, feedback training): the train split fills a batch on every rank, and
    the val split exists when the run validates. Returns the notes to print (what the data leaves out)."""

    folder = data_source(cfg.data)
    check_url_sources(cfg)
    samples = split_samples(folder)
    require_split(folder, samples, "train", "training reads it", "give the data a train split")
    require_batches(folder, samples["train"], "train", world_size, cfg.data.batch_size, "data.batch_size")
    if cfg.training.eval_every > 0:
        require_split(folder, samples, "val", f"training.eval_every={cfg.training.eval_every} validates on it",
                      "set training.eval_every=0")
    if cfg.training.stage not in (1, 2):
        return []
    note = left_out_note(cfg, load_attribute_table(cfg.data))
    return [note] if note else []


def check_judge_data(cfg: Config) -> None:
    """``uniemo train-judge`` (one process): a train batch of ``evaluation.judge_batch_size``, and a val split
    for the accuracy it records at the end."""

    folder = data_source(cfg.data, progress=True)
    samples = split_samples(folder)
    require_split(folder, samples, "train", "the judge trains on it", "give the data a train split")
    require_batches(folder, samples["train"], "train", 1, cfg.evaluation.judge_batch_size,
                    "evaluation.judge_batch_size", ranks_key="processes")
    require_split(folder, samples, "val", "the judge reports its accuracy on it", "give the data a val split")


def check_evaluation_data(cfg: Config) -> tuple[list[str], list[str]]:
    """``uniemo evaluate``: the test split exists. Returns what the evaluated run left out
    (:func:`uniemo.training.task.parts_left_out`) and the notes for ``metrics.json`` that say so."""

    folder = data_source(cfg.data, progress=True)
    require_split(folder, split_samples(folder), "test", "uniemo evaluate classifies it", "give the data a test split")
    if cfg.training.stage not in (1, 2):
        return [], []
    attributes = load_attribute_table(cfg.data)
    note = left_out_note(cfg, attributes)
    return parts_left_out(cfg, attributes), [note] if note else []
