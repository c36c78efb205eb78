"""Controls of the feedback check: runs that prove the check could see an effect of feedback on understanding.

A check that feedback changes understanding counts only if a control shows it can see such a change. A control
run is an ordinary sequential feedback run (``feedback.control``, :func:`uniemo.feedback.loop.run_feedback`):
same start checkpoint, same steps and schedule, same synthetic source mixed at rho, through the same shard
writer and loader, except that round r is not generated: it mirrors round r of a finished feedback run
(``feedback.control_of``), published at the same step:

- ``wrong_labels``: the images that run kept, each relabelled to another emotion, :func:`wrong_label` (k -> k+1
  mod 8; ``json.generated_for`` keeps the emotion it was generated for). Must LOWER test top-1: images that the
  filter judged to be of emotion k now teach the trainers that they are k+1.
- ``real_extra``: for every emotion, as many real labelled train images as that run kept, taken in order from
  the train images that ``data.labelled_per_emotion`` left out (never the same image twice over the rounds).
  Must RAISE test top-1: more real labels in a label-scarce regime.

Each control round's report is the mirrored round's report (its funnel, so the counts match) with a
``control`` entry: what was done, from which round folder, and the labels written per emotion.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS, Config
from uniemo.data.attributes import write_json_atomic
from uniemo.data.shards import (
    MANIFEST_FILE,
    left_out_shards,
    read_manifest,
    read_shard_samples,
    write_sample_shard,
)
from uniemo.errors import ConfigError
from uniemo.feedback.actors import FeedbackError
from uniemo.feedback.rounds import publish_round
from uniemo.run_files import RoundReport
from uniemo.run_layout import STAGING_DIR, round_dir, round_report_path

CONTROLS = ("wrong_labels", "real_extra")


def wrong_label(k: int) -> int:
    """The emotion a ``wrong_labels`` control gives an image generated for emotion ``k``: always another one."""
    return (k + 1) % NUM_EMOTIONS


def check_control(cfg: Config) -> None:
    """:class:`ConfigError` when ``feedback.control`` cannot run with this config (before any work)."""
    fb = cfg.feedback
    if not fb.control:
        return
    if fb.control not in CONTROLS:
        raise ConfigError(f"feedback.control={fb.control!r}; choose one of {', '.join(CONTROLS)}")
    if not Path(fb.control_of).is_dir():
        raise ConfigError(f"feedback.control_of={fb.control_of!r} is not a folder; give the feedback run to mirror")
    if fb.control == "real_extra" and not cfg.data.labelled_per_emotion:
        raise ConfigError("feedback.control=real_extra takes the train images data.labelled_per_emotion leaves out; "
                          "set data.labelled_per_emotion")


def _mirrored(cfg: Config, index: int) -> tuple[Path, RoundReport]:
    source = round_dir(cfg.feedback.control_of, index)
    if not (source / MANIFEST_FILE).is_file():
        raise FeedbackError(
            f"control round {index}: {source} has no complete round; finish the feedback run "
            f"{cfg.feedback.control_of} first (same feedback.rounds)"
        )
    return source, read_manifest(source)["report"]


def _relabelled(source: Path, entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for sample in read_shard_samples(source / entry["name"]):
        meta = json.loads(sample["json"])
        k = int(sample["cls"])
        meta.update(emotion=EMOTIONS[wrong_label(k)], generated_for=EMOTIONS[k], control="wrong_labels")
        yield {**sample, "cls": wrong_label(k), "json": meta}


def _real_extra(cfg: Config, index: int, wanted: list[int]) -> list[dict[str, Any]]:
    """Round ``index``'s real images: ``wanted[k]`` of each emotion, after those earlier rounds took."""
    taken = [0] * NUM_EMOTIONS
    for r in range(index):
        counts = _mirrored(cfg, r)[1]["emotions"]
        for k, e in enumerate(EMOTIONS):
            taken[k] += int(counts[e]["kept"])
    folder = left_out_shards(cfg.data)
    by_emotion: list[list[dict[str, Any]]] = [[] for _ in range(NUM_EMOTIONS)]
    for entry in read_manifest(folder)["shards"]:
        for sample in read_shard_samples(folder / entry["name"]):
            k = int(sample["cls"])
            if len(by_emotion[k]) < taken[k] + wanted[k]:
                by_emotion[k].append(sample)
    short = [EMOTIONS[k] for k in range(NUM_EMOTIONS) if len(by_emotion[k]) < taken[k] + wanted[k]]
    if short:
        raise ConfigError(
            f"control real_extra, round {index}: {folder} has too few left-out train images of {', '.join(short)}; "
            "lower data.labelled_per_emotion or use a larger data set"
        )
    picked = []
    for k in range(NUM_EMOTIONS):
        for sample in by_emotion[k][taken[k] : taken[k] + wanted[k]]:
            meta = json.loads(sample["json"])
            meta.update(control="real_extra", round=index)
            picked.append({**sample, "json": meta})
    return picked


def run_control_round(cfg: Config, run_dir: Path, index: int, log: Callable[[str], None]) -> RoundReport:
    """Write round ``index`` of a control run into ``run_dir``'s synthetic source (module docstring); returns its
    report. The round is published like a generated one: staged, manifest last, one rename."""
    source, mirrored = _mirrored(cfg, index)
    kind = cfg.feedback.control
    staging = run_dir / STAGING_DIR / f"round-{index}"
    shutil.rmtree(staging, ignore_errors=True)
    entries = []
    if kind == "wrong_labels":
        for entry in read_manifest(source)["shards"]:
            entries.append(write_sample_shard(_relabelled(source, entry), staging / entry["name"], source="synthetic"))
    else:
        wanted = [int(mirrored["emotions"][e]["kept"]) for e in EMOTIONS]
        samples = _real_extra(cfg, index, wanted)
        size = cfg.feedback.shard_size
        for start in range(0, len(samples), size):
            entries.append(write_sample_shard(samples[start : start + size],
                                              staging / f"train-{start // size:06d}.tar", source="synthetic"))
    labels = [0] * NUM_EMOTIONS
    for entry in entries:
        labels = [a + b for a, b in zip(labels, entry["emotion_counts"], strict=True)]
    report = copy.deepcopy(mirrored)
    report["control"] = {"kind": kind, "of": str(source), "labels": dict(zip(EMOTIONS, labels, strict=True))}
    report["shards"] = [e["name"] for e in entries]
    report["samples"] = sum(e["samples"] for e in entries)
    if report["samples"] != mirrored["totals"]["kept"]:
        raise RuntimeError(f"control round {index}: {report['samples']} samples written, "
                           f"{mirrored['totals']['kept']} kept in {source}")
    staging.mkdir(parents=True, exist_ok=True)  # a round that kept nothing still publishes its (empty) folder
    publish_round(staging, round_dir(run_dir, index), entries, report, f"control:{kind}:{source}", index)
    write_json_atomic(round_report_path(run_dir, index), report)
    log(f"control round {index} ({kind}): {report['samples']} images from {source}, labels {labels}")
    return report
