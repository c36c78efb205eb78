"""Crash at every stage: a real SIGKILL (of the whole process group) at a known moment, then the re-run completes
and what it leaves is complete and consistent.

- a checkpoint save, killed twice at two moments: after DeepSpeed wrote its shards but before ``trainer_state.json``
  and ``COMPLETE``, then after ``COMPLETE`` but before ``latest`` moves (one rank without Ray, as
  ``test_nan_and_safe_loading.py`` runs it; the moment is made deterministic by pausing the real save there);
- ``uniemo feedback`` while it generates round 1 (after round 0 and its training were done);
- ``uniemo evaluate`` while it generates its images (over an earlier complete evaluation).

Covered elsewhere, not repeated here: a kill during sharding (``tests/test_shards.py::
test_interrupted_run_resumes_to_the_same_result``), of the whole ``uniemo run`` during stage-2 training
(``tests/test_pipeline.py::test_whole_loop_killed_in_stage2_then_resumed``), of one Ray Train worker
(``tests/test_train_distributed.py``) and of a generator actor mid-round (``tests/test_feedback_pool.py``).

The start runs, the judge and the one-rank worker script are the other test modules' (imported, not copied).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the modules whose fixtures are reused

from _cli import uniemo_command  # noqa: E402  (tests/reliability/_cli.py)
from test_feedback_loop import _check_round, _config, _metrics  # noqa: E402
from test_nan_and_safe_loading import TINY, WORKER, _env, _worker  # noqa: E402

# -------------------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------------------


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A command in its own session (process group), stdout and stderr to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_env(**env))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc``, then anything else left in its session (Ray daemons that made a
    group of their own), by pid."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # ended already
        pass
    proc.wait()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {what}:\n"
                                 + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            _kill_session(proc)
            raise AssertionError(f"no {what} in {timeout} s:\n" + log.read_text()[-3000:])
        time.sleep(0.05)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _metrics(run_dir)]


# -------------------------------------------------------------------------------------------------------------
# A checkpoint save
# -------------------------------------------------------------------------------------------------------------

# Pauses the real save of step UNIEMO_PAUSE_STEP just before it writes the file UNIEMO_PAUSE_BEFORE
# ("trainer_state.json": DeepSpeed's shards and the RNG files are on disk; "latest": COMPLETE is written), and
# says so in UNIEMO_PAUSE_MARKER, so the test's SIGKILL lands exactly there. Nothing else changes.
PAUSE = r"""
import os, time
from pathlib import Path
import uniemo.training.checkpoint as _ckpt

_write = _ckpt.atomic_write_text
_name, _step = os.environ["UNIEMO_PAUSE_BEFORE"], int(os.environ["UNIEMO_PAUSE_STEP"])

def _pausing_write(path, text):
    tag = _ckpt.step_dir_name(_step)
    if Path(path).name == _name and (Path(path).parent.name == tag or text.strip() == tag):
        Path(os.environ["UNIEMO_PAUSE_MARKER"]).write_text(str(os.getpid()))
        time.sleep(600)
    _write(path, text)

_ckpt.atomic_write_text = _pausing_write
"""


def _run_overrides(root: Path, shards: Path, name: str) -> list[str]:
    return [
        f"run.output_dir={root / 'runs'}", f"run.name={name}", f"data.shards={shards}",
        f"data.cache_dir={root / 'cache'}", "data.image_size=32", "model.understanding.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "distributed.num_workers=1", "logging.every=1",
        "logging.progress=false", "logging.wandb.mode=disabled", "training.eval_every=0", "training.steps=6",
        "training.checkpoint_every=2", "training.keep_checkpoints=1",
    ]


def _killed_in_save(mode: str, overrides: list[str], pause_before: str, step: int, marker: Path) -> str:
    """Run (``fresh`` or ``resume``), SIGKILL it while it saves ``step``, paused before ``pause_before``."""
    log = marker.with_suffix(".log")
    proc = _start([sys.executable, "-c", PAUSE + WORKER, mode, TINY, *overrides], log,
                  UNIEMO_PAUSE_BEFORE=pause_before, UNIEMO_PAUSE_STEP=str(step), UNIEMO_PAUSE_MARKER=str(marker))
    try:
        _wait_for(proc, log, marker.is_file, f"the save of step {step}")
    finally:
        _kill_session(proc)
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def _listing(run_dir: Path) -> dict[str, list[str]]:
    root = run_dir / "checkpoints"
    return {p.name: sorted(q.name for q in p.iterdir()) if p.is_dir() else [] for p in sorted(root.iterdir())}


@pytest.mark.slow
def test_killed_during_checkpoint_save_resumes_from_the_previous_one(synth_shards, tmp_path):
    from uniemo.training.checkpoint import latest_checkpoint, read_trainer_state

    run = tmp_path / "runs" / "save"
    overrides = _run_overrides(tmp_path, synth_shards, "save")

    # 1. Killed in the save of step 4 after DeepSpeed's files: the folder is there, half written.
    _killed_in_save("fresh", overrides, "trainer_state.json", 4, tmp_path / "kill1")
    assert latest_checkpoint(run).name == "step-000002"  # `latest` still names the previous complete one
    half = _listing(run)["step-000004"]
    assert "ds" in half and "rng" in half and "trainer_state.json" not in half and "COMPLETE" not in half
    # Step 4's line goes out before its checkpoint (a checkpoint never covers a step without its line); the resume
    # from step 2 drops it again.
    assert _steps(run) == [1, 2, 3, 4]

    # 2. Resumed from step 2, killed in the save of step 6 after COMPLETE, before `latest` moves.
    out = _killed_in_save("resume", overrides, "latest", 6, tmp_path / "kill2")
    assert "resumed at step 2" in out
    assert latest_checkpoint(run).name == "step-000004"  # rewritten in full by the resumed run
    assert "COMPLETE" in _listing(run)["step-000006"]  # complete, but never published
    assert "step-000002" not in _listing(run)  # rotated (keep_checkpoints=1) once step 4 was published
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # 3-4 written again after the truncation to step 2

    # 3. Resumed again: from step 4 (not from the unpublished step 6) to the end.
    done = _worker("resume", overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 4" in done.stderr
    assert _listing(run).keys() == {"latest", "step-000006"}
    state = read_trainer_state(latest_checkpoint(run))
    assert state["step"] == 6 and state["samples_seen"] == 6 * 8 and state["bad_steps"] == 0
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # one metrics line per step: none lost, none repeated

    # The same run without a crash: the same losses (the resumed runs continued exactly where they left).
    clean = _worker("fresh", _run_overrides(tmp_path, synth_shards, "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert [r["loss"] for r in _metrics(tmp_path / "runs" / "clean")] == pytest.approx(
        [r["loss"] for r in _metrics(run)], rel=1e-5)


# -------------------------------------------------------------------------------------------------------------
# A feedback round
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_feedback_round_resumes_without_partial_shards(start_runs, synth_shards, tmp_path):
    from uniemo.config import save_resolved
    from uniemo.data.shards import manifest_folders
    from uniemo.run_layout import STAGING_DIR, SYNTHETIC_DIR, round_dir, round_report_path
    from uniemo.training.checkpoint import latest_checkpoint

    s2 = latest_checkpoint(start_runs / "s2")
    cfg = _config(start_runs, synth_shards, "run.name=fbkill", "feedback.rounds=2", "feedback.steps_per_round=2",
                  "distributed.num_workers=1", f"feedback.from_run={start_runs / 's2'}")
    config = save_resolved(cfg, tmp_path / "config")
    run = start_runs / "fbkill"
    log = tmp_path / "feedback.log"
    proc = _start([*uniemo_command(), "feedback", "--config", str(config)], log)
    generating = re.compile(r"round 1 \w+: \d+ candidates")  # an emotion of round 1 is done, others are not
    try:
        _wait_for(proc, log, lambda: generating.search(log.read_text()) is not None, "round 1 generating")
    finally:
        _kill_session(proc)

    # Killed: round 0 and its training are there; round 1 is nowhere in the synthetic source.
    assert manifest_folders(run / SYNTHETIC_DIR) == [round_dir(run, 0)]
    assert sorted(p.name for p in (run / SYNTHETIC_DIR).iterdir()) == ["round-0"]  # no partial, unlisted shard
    assert not round_report_path(run, 1).exists()
    assert latest_checkpoint(run).name == "step-000002" and _steps(run) == [1, 2]
    round0 = sorted(round_dir(run, 0).iterdir())
    before = {p: p.stat().st_mtime_ns for p in round0}
    # The report gains what is known only after its round (when it entered the mix: set by the loop's end, which
    # the killed run never reached); the rest of it must not change.
    later = ("entered_step", "retired")
    report0 = {k: v for k, v in json.loads(round_report_path(run, 0).read_text()).items() if k not in later}

    done = subprocess.run([*uniemo_command(), "feedback", "--config", str(config), "--resume"],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 round(s)" in done.stdout and "step 4" in done.stdout
    assert "round 0 is complete already" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in round0} == before  # round 0 not generated again
    assert {k: v for k, v in json.loads(round_report_path(run, 0).read_text()).items() if k not in later} == report0
    assert json.loads(round_report_path(run, 0).read_text())["entered_step"] == 0  # recorded by the resumed loop
    _check_round(run, 0, s2)  # counts add up, manifest = report = the shards on disk
    _check_round(run, 1, run / "checkpoints" / "step-000002")  # round 1 with the step-2 checkpoint
    assert manifest_folders(run / SYNTHETIC_DIR) == [round_dir(run, 0), round_dir(run, 1)]
    assert not (run / STAGING_DIR).exists()  # the killed attempt's staging folder is gone
    assert _steps(run) == [1, 2, 3, 4]  # training resumed at step 2: every step once
    loop = json.loads((run / "rounds" / "loop.json").read_text())
    assert sorted(loop["rounds"]) == ["0", "1"] and loop["finished"] == 4


# -------------------------------------------------------------------------------------------------------------
# Evaluation
# -------------------------------------------------------------------------------------------------------------
def _evaluate_args(run: Path, judge: Path, images: int) -> list[str]:
    return [*uniemo_command(), "evaluate", "--run", str(run), "--judge", str(judge),
            "--images-per-emotion", str(images), "distributed.num_workers=1", "logging.wandb.mode=disabled",
            "logging.progress=false"]


@pytest.mark.slow
def test_killed_evaluation_leaves_the_old_metrics_and_reruns(start_runs, judge_dir, synth_shards, tmp_path):
    from uniemo.config.schema import EMOTIONS

    run = start_runs / "s2"
    first = subprocess.run(_evaluate_args(run, judge_dir, 1), capture_output=True, text=True, timeout=600,
                           env=_env())
    assert first.returncode == 0, first.stderr[-3000:]
    old = (run / "metrics.json").read_bytes()
    assert json.loads(old)["generation"]["emo_a"]["images"] == 8

    # Killed while generating: awe's second image exists (emotion 1, seeds 3..5) and six emotions are to go.
    log = tmp_path / "evaluate.log"
    proc = _start(_evaluate_args(run, judge_dir, 3), log)
    marker = run / "eval" / "generated" / "awe" / "awe_4.png"
    try:
        _wait_for(proc, log, marker.is_file, "evaluation images")
    finally:
        _kill_session(proc)
    assert (run / "metrics.json").read_bytes() == old  # the old complete file, never a half-written one

    again = subprocess.run(_evaluate_args(run, judge_dir, 3), capture_output=True, text=True, timeout=600,
                           env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    test_samples = json.loads((synth_shards / "manifest.json").read_text())["totals"]["test"]["samples"]
    u, g = metrics["understanding"], metrics["generation"]
    assert u["samples"] == sum(map(sum, u["confusion"])) == test_samples
    assert g["emo_a"]["images"] == g["fid"]["generated_images"] == 8 * 3
    for k, emotion in enumerate(EMOTIONS):  # the images on disk are exactly this evaluation's (no leftovers)
        assert g["seeds"][emotion] == [3 * k + i for i in range(3)]
        folder = run / "eval" / "generated" / emotion
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{emotion}_{s}.png" for s in g["seeds"][emotion])
        assert [json.loads(line)["seed"] for line in (folder / "generations.jsonl").read_text().splitlines()] == (
            g["seeds"][emotion])
    assert json.loads((run / "eval" / "confusion.json").read_text())["matrix"] == u["confusion"]
    assert not list(run.glob(".metrics.json.*"))  # no temporary file left by the killed run
