"""Retention of feedback rounds and the pinned schedule, on real shard folders without Ray: which rounds a listing
reads (``feedback.keep_rounds``, ``keep_bytes``, the pinned round limit), what the trainers' loader position
records, and which round folders :func:`uniemo.feedback.retention.prune_rounds` deletes (never one a kept checkpoint
or a running trainer reads). The whole loop with retention runs for real in ``tests/test_feedback_loop.py``
(``test_pinned_async_runs_twice_to_the_same_numbers``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from uniemo.config import load_config
from uniemo.config.schema import FeedbackConfig
from uniemo.data.loader import Source, build_loader
from uniemo.data.shards import manifest_folders, read_manifest, update_manifest, write_sample_shard
from uniemo.data.transforms import SampleTransform
from uniemo.errors import ConfigError
from uniemo.feedback.retention import folder_bytes, prune_rounds, rounds_in_use
from uniemo.run_layout import SYNTHETIC_DIR, round_dir, round_report_path
from uniemo.training import feedback_schedule as schedule


@pytest.fixture(scope="module")
def real_samples(synth_shards) -> list[dict]:
    name = next(e["name"] for e in read_manifest(synth_shards)["shards"] if e["split"] == "train")
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in wds.WebDataset(str(synth_shards / name), shardshuffle=False)]


def _write_round(run: Path, r: int, samples: list[dict], report: bool = True) -> Path:
    """A published round: its folder with one shard and a manifest, and its report."""
    folder = round_dir(run, r)
    folder.mkdir(parents=True)
    renamed = [{**s, "__key__": f"r{r}-{s['__key__']}"} for s in samples]
    written = {"version": 3, "round": r, "checkpoint": "x"}
    update_manifest(folder, [write_sample_shard(renamed, folder / "train-000000.tar", source="synthetic")], round=r,
                    report=written)
    if report:
        round_report_path(run, r).parent.mkdir(parents=True, exist_ok=True)
        round_report_path(run, r).write_text(json.dumps(written))
    return folder


def _loader(synth_shards: Path, run: Path, **window):
    return build_loader([Source.of("real", synth_shards), Source.of("synthetic", run / SYNTHETIC_DIR, 1.0, **window)],
                        "train", rank=0, world_size=1, batch_size=8, num_workers=0,
                        transform=SampleTransform(image_size=16), training=True)


def test_listing_reads_the_window_in_round_order(synth_shards, real_samples, tmp_path):
    run = tmp_path / "run"
    for r in range(11):  # round-10 sorts before round-2 by name: the listing orders rounds by number
        _write_round(run, r, real_samples[: 2 + r % 3])
    everything = _loader(synth_shards, run)
    assert everything.listed["synthetic"] == [f"round-{r}" for r in range(11)]
    newest = _loader(synth_shards, run, keep_rounds=3)
    assert newest.listed["synthetic"] == ["round-8", "round-9", "round-10"]
    assert newest.state_dict()["listed"] == newest.listed  # checkpoints record what each rank reads

    sizes = {r: sum(e["bytes"] for e in read_manifest(round_dir(run, r))["shards"]) for r in range(11)}
    capped = _loader(synth_shards, run, keep_bytes=sizes[10] + sizes[9])
    assert capped.listed["synthetic"] == ["round-9", "round-10"]
    assert _loader(synth_shards, run, keep_bytes=1).listed["synthetic"] == ["round-10"]  # the newest always
    both = _loader(synth_shards, run, keep_rounds=1, keep_bytes=10**9)
    assert both.listed["synthetic"] == ["round-10"]

    # The pinned limit: rounds above it are not listed even though they are published; the window applies below.
    newest.set_round_limit(4)
    assert newest.listing_changed() and newest.listed["synthetic"] == ["round-8", "round-9", "round-10"]
    newest.set_epoch(newest.epoch + 1)
    batch = next(iter(newest))
    assert newest.listed["synthetic"] == ["round-2", "round-3", "round-4"]
    assert {k.split("-", 1)[0] for k, s in zip(batch["key"], batch["source"], strict=True) if s == "synthetic"} \
        <= {"r2", "r3", "r4"}
    newest.set_round_limit(-1)
    newest.set_epoch(newest.epoch + 1)
    with pytest.warns(UserWarning, match="no train shards yet"):  # as before a pinned run's first round
        assert {s for s in next(iter(newest))["source"]} == {"real"} and newest.listed["synthetic"] == []


def test_pinned_schedule_and_its_config():
    fb = FeedbackConfig(mode="async", pinned=True, rounds=3, steps_per_round=10)
    assert fb.delay == 5
    assert [schedule.generation_step(fb, r) for r in range(3)] == [0, 10, 20]
    assert [schedule.pickup_step(fb, r) for r in range(3)] == [5, 15, 25]
    assert [schedule.rounds_due(fb, s) for s in (0, 4, 5, 14, 15, 29)] == [-1, -1, 0, 0, 1, 2]
    assert schedule.generation_steps(fb) == [10, 20]
    with pytest.raises(ConfigError, match="feedback.pinned=true .* feedback.mode is 'sequential'"):
        load_config(None, ["feedback.pinned=true"])
    with pytest.raises(ConfigError, match=r"feedback.pinned_delay must lie in \[0, feedback.steps_per_round=50\]"):
        load_config(None, ["feedback.mode=async", "feedback.pinned=true", "feedback.pinned_delay=51"])
    with pytest.raises(ConfigError, match="feedback.keep_rounds must be >= 0"):
        load_config(None, ["feedback.keep_rounds=-1"])


def _checkpoint(run: Path, step: int, listings: list[list[int] | None], latest: bool = False,
                rotate: bool = True) -> None:
    """A complete step folder whose ranks' loader positions list ``listings`` (None: an older uniemo's position);
    as ``latest``, with the others rotated away unless ``rotate`` is off."""
    folder = run / "checkpoints" / f"step-{step:06d}"
    if latest and rotate:
        for old in (run / "checkpoints").glob("step-*"):
            shutil.rmtree(old)
    folder.mkdir(parents=True)
    positions = [{} if rounds is None else {"listed": {"real": ["shards"], "synthetic": [f"round-{r}" for r in rounds]}}
                 for rounds in listings]
    (folder / "trainer_state.json").write_text(json.dumps({"version": 1, "step": step, "loader_positions": positions}))
    (folder / "COMPLETE").write_text("done\n")
    if latest:
        (run / "checkpoints" / "latest").write_text(folder.name + "\n")


def test_prune_keeps_every_round_a_checkpoint_or_a_trainer_reads(real_samples, tmp_path):
    cfg = load_config(None, ["feedback.keep_rounds=1"])
    logs: list[str] = []
    run = tmp_path / "run"
    for r in range(6):
        _write_round(run, r, real_samples[:3])
    assert prune_rounds(cfg, run, logs.append) == []  # no checkpoint yet: a starting trainer may list any round

    # The older kept checkpoint resumes an epoch that reads round 1; in the latest, rank 0 reads 3-4, rank 1 4-5.
    _checkpoint(run, 4, [[1], [1]])
    _checkpoint(run, 8, [[3, 4], [4, 5]], latest=True, rotate=False)
    assert rounds_in_use(run) == ({1, 3, 4, 5}, 3)
    size = folder_bytes(round_dir(run, 0))
    assert prune_rounds(cfg, run, logs.append) == [0, 2]
    assert [p.name for p in manifest_folders(run / SYNTHETIC_DIR)] == ["round-1", "round-3", "round-4", "round-5"]
    assert not (run / "shards" / ".retired").exists() or not any((run / "shards" / ".retired").iterdir())
    retired = json.loads(round_report_path(run, 0).read_text())
    assert retired["retired"]["bytes"] == size and retired["checkpoint"] == "x"  # the report stays
    assert schedule.round_published(run, 0) and schedule.round_published(run, 2)  # never made again
    assert "round(s) 0, 2" in logs[-1]

    # Without the old checkpoint, round 1 goes too; a latest where a rank lists no round protects every round.
    (run / "checkpoints" / "step-000004" / "COMPLETE").unlink()
    assert prune_rounds(cfg, run, logs.append) == [1]
    _checkpoint(run, 12, [[5], []], latest=True)
    assert prune_rounds(cfg, run, logs.append) == []
    _checkpoint(run, 16, [[5], None], latest=True)  # a position without `listed` (an older uniemo)
    assert prune_rounds(cfg, run, logs.append) == []
    _checkpoint(run, 20, [[5], [5]], latest=True)
    assert prune_rounds(cfg, run, logs.append) == [3, 4]
    assert [p.name for p in manifest_folders(run / SYNTHETIC_DIR)] == ["round-5"]
    # A round report missing (a crash right after the round appeared): the manifest's copy is marked retired.
    _write_round(run, 6, real_samples[:3], report=False)
    _checkpoint(run, 24, [[6], [6]], latest=True)
    assert prune_rounds(cfg, run, logs.append) == [5]
    _checkpoint(run, 28, [[7], [7]], latest=True)
    assert prune_rounds(cfg, run, logs.append) == [6]
    assert json.loads(round_report_path(run, 6).read_text())["retired"]["bytes"] > 0
    # Retention off: nothing is ever deleted.
    _write_round(run, 7, real_samples[:3])
    _checkpoint(run, 32, [[8], [8]], latest=True)
    assert prune_rounds(load_config(None, []), run, logs.append) == []
