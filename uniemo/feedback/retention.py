"""Retention of synthetic rounds (``feedback.keep_rounds``, ``feedback.keep_bytes``): old round folders are deleted
so that a long loop's disk stays bounded, but never a round that a trainer or a kept checkpoint still reads.

**The window.** The trainers' listing of the synthetic source reads only the newest ``keep_rounds`` rounds whose
shards add up to at most ``keep_bytes`` (:class:`uniemo.data.loader.Source`). A round older than the window
leaves the mix at the trainers' next listing: an epoch start, a ``refresh_every`` refresh, a pinned pickup.

**When a folder goes.** :func:`prune_rounds` deletes round r when both hold:

1. no kept checkpoint lists it. Every complete step folder's ``trainer_state.json`` holds each rank's loader
   position, whose ``listed`` names the round folders that rank's epoch reads; a resume from any kept checkpoint
   replays its epoch exactly, so all of those rounds stay;
2. r is older than every rank's oldest listed round in the ``latest`` checkpoint. A running trainer reads the
   listing of the latest checkpoint's epoch or of a newer epoch, and a newer listing never holds a round older
   than the oldest of the listing before it (rounds are published in order and the window only moves forward).
   So such a round is read by nobody now and will not be listed again. A latest checkpoint in which some rank
   lists no round (or that an older uniemo wrote, without ``listed``) protects every round; so does a run without
   a checkpoint.

The disk then holds the window, the rounds of the kept checkpoints' listings, the rounds published since the
latest checkpoint's listing, and the round being written. Its measured ceiling is in RELIABILITY.md ("Soak").

**How.** The round report first gets ``retired`` (when, bytes), then the folder leaves the synthetic source in one
rename (to ``shards/.retired/round-R``, so no listing sees half a round) and is removed. The report stays: the loop
does not make the round again (:func:`uniemo.training.feedback_schedule.round_published`), and the evaluation and the
HTML report still show its funnel. A crash between the steps leaves a retired report beside its folder (the next
prune moves it) or a folder under ``.retired`` (the next prune removes it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uniemo.config.schema import Config
from uniemo.data.attributes import write_json_atomic
from uniemo.data.shards import manifest_folders, read_manifest
from uniemo.run_layout import RETIRED_DIR, SYNTHETIC_DIR, checkpoints_dir, round_of, round_report_path
from uniemo.training.checkpoint import (
    CheckpointError,
    is_complete,
    latest_checkpoint,
    read_trainer_state,
    step_of,
)
from uniemo.training.feedback_schedule import SYNTHETIC_SOURCE, listed_rounds

__all__ = ["folder_bytes", "prune_rounds", "rounds_in_use"]


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is gone)."""
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(base, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def _listings(step_dir: Path) -> list[list[int] | None]:
    """Per rank, the synthetic rounds the loader position of ``step_dir`` lists (None: not recorded)."""
    positions = read_trainer_state(step_dir).get("loader_positions") or []
    return [listed_rounds(p["listed"], SYNTHETIC_SOURCE) if isinstance(p.get("listed"), dict) else None
            for p in positions]


def rounds_in_use(run_dir: str | Path) -> tuple[set[int], int]:
    """The rounds the kept checkpoints list, and the oldest round a running trainer may read (module docstring;
    0 protects every round)."""
    run_dir = Path(run_dir)
    listed: set[int] = set()
    root = checkpoints_dir(run_dir)
    for step_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if step_of(step_dir) is None or not is_complete(step_dir):
            continue
        try:
            for rounds in _listings(step_dir):
                listed.update(rounds or [])
        except (CheckpointError, OSError, ValueError):
            continue  # rotated away while being read: not kept
    try:
        latest = latest_checkpoint(run_dir)
        ranks = _listings(latest) if latest is not None else []
    except (CheckpointError, OSError, ValueError):
        ranks = []
    if not ranks or any(not rounds for rounds in ranks):
        return listed, 0
    return listed, min(min(rounds) for rounds in ranks if rounds)


def prune_rounds(cfg: Config, run_dir: str | Path, log: Callable[[str], None]) -> list[int]:
    """Delete the round folders that retention lets go (module docstring); returns their rounds."""
    fb = cfg.feedback
    if not fb.keep_rounds and not fb.keep_bytes:
        return []
    run_dir = Path(run_dir)
    retired_root = run_dir / RETIRED_DIR
    if retired_root.is_dir():  # folders a crash left after their rename
        for leftover in retired_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
    published = {r: f for f in manifest_folders(run_dir / SYNTHETIC_DIR) if (r := round_of(f)) is not None}
    listed, floor = rounds_in_use(run_dir)
    doomed = sorted(r for r in published if r < floor and r not in listed)
    for r in doomed:
        size = folder_bytes(published[r])
        _mark_retired(run_dir, r, published[r], size)
        retired_root.mkdir(parents=True, exist_ok=True)
        target = retired_root / published[r].name
        os.rename(published[r], target)  # out of the synthetic source in one step
        shutil.rmtree(target, ignore_errors=True)
    if doomed:
        log(f"retention: deleted the shards of round(s) {', '.join(map(str, doomed))} (no trainer or kept "
            f"checkpoint reads them; reports kept)")
    return doomed


def _mark_retired(run_dir: Path, r: int, folder: Path, size: int) -> None:
    path = round_report_path(run_dir, r)
    if path.is_file():
        report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    else:  # the report is written just after the round's folder appears: a crash in between
        report = dict(read_manifest(folder).get("report") or {"round": r})
    report["retired"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "bytes": size}
    write_json_atomic(path, report)
