"""`uniemo run`: the whole loop end to end (real Ray, DeepSpeed on gloo, the feedback pool, judge, evaluation,
report), killed for real (SIGKILL of the whole process group) in the middle of stage 2 and finished with
``--resume``; plus the checks made before any work."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def _uniemo(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniemo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, **kwargs)


def _tiny(out: Path) -> list[str]:
    """The demo config cut down to a few steps of everything."""
    return [
        f"run.output_dir={out}",
        f"data.cache_dir={out / 'cache'}",
        "data.synthetic.images=400",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        "training.checkpoint_every=4",
        "training.eval_every=4",
        "feedback.rounds=1",
        "feedback.steps_per_round=6",
        "feedback.candidates_per_emotion=4",
        "feedback.keep=2",
        "feedback.batch_size=8",
        "feedback.tau=0.0",
        "feedback.refresh_every=2",
        "evaluation.images_per_emotion=2",
        "evaluation.judge_steps=30",
        "evaluation.diversity_pairs=20",
        "pipeline.stage1=[training.steps=8]",
        "pipeline.stage2=[training.steps=12,data.batch_size=8]",
    ]


def test_bad_stage_and_bad_stage_override_fail_before_any_work(tmp_path):
    bad = _uniemo("run", "--config", str(DEMO), f"run.output_dir={tmp_path}", "pipeline.stages=[data,stage9]")
    assert bad.returncode == 2, bad.stderr
    assert "pipeline.stages" in bad.stderr and "stage9" in bad.stderr and "Traceback" not in bad.stderr
    bad = _uniemo("run", "--config", str(DEMO), f"run.output_dir={tmp_path}",
                  "pipeline.stage2=[training.stepz=3]")
    assert bad.returncode == 2, bad.stderr
    assert "pipeline.stage2" in bad.stderr and "training.steps" in bad.stderr  # names the key and the fix
    assert not (tmp_path / "demo").exists()  # nothing was started


def test_every_stages_overrides_are_checked_before_the_first_stage():
    """A typo in the overrides of the last stages (the judge, the evaluation) fails in plan(), before any
    training, with the stage and the key named."""
    from uniemo.config import load_config
    from uniemo.errors import ConfigError
    from uniemo.pipeline import plan

    for stage, override, key in (("judge", "evaluation.judge_stepz=3", "evaluation.judge_steps"),
                                 ("evaluate", "evaluation.images_per_emotion=0", "evaluation.images_per_emotion")):
        cfg = load_config(DEMO, [f"pipeline.{stage}=[{override}]"])
        with pytest.raises(ConfigError) as err:
            plan(cfg)
        assert str(err.value).startswith(f"pipeline.{stage}: ") and key in str(err.value)


def _state(root: Path) -> dict:
    try:
        return json.loads((root / "pipeline.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for_stage2_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    latest = root / "stage2" / "checkpoints" / "latest"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the pipeline ended (rc {proc.returncode}) before stage 2 checkpointed")
        if latest.is_file() and _state(root).get("stages", {}).get("stage2", {}).get("status") == "running":
            return
        time.sleep(0.5)
    raise AssertionError("stage 2 wrote no checkpoint in time")


@pytest.mark.slow
def test_whole_loop_killed_in_stage2_then_resumed(tmp_path):
    """Run from a folder of its own (not the repository): the shipped demo config finds generators/cpu-world."""
    root = tmp_path / "demo"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uniemo", "run", "--config", str(DEMO), *_tiny(tmp_path)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_stage2_checkpoint(proc, root)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its embedded Ray cluster and the trainers
        proc.wait()
        log.close()
    state = _state(root)
    assert state["stages"]["stage1"]["status"] == "done"
    assert state["stages"]["stage2"]["status"] == "running"
    killed_at = int((root / "stage2" / "checkpoints" / "latest").read_text().strip().rsplit("-", 1)[-1])
    assert 0 < killed_at < 12

    done = _uniemo("run", "--config", str(DEMO), *_tiny(tmp_path), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # A quiet console when nothing failed: no traceback, no other package's warning (Ray Train's internal
    # GetTimeoutError, torch's FutureWarning on every step); they are in the pipeline's uniemo.log.
    for text in ((tmp_path / "first.log").read_text(), done.stdout + done.stderr):
        assert "Traceback" not in text and not re.search(r"\w+Warning\b", text), text[-3000:]
    assert (root / "uniemo.log").is_file()
    state = _state(root)
    assert [state["stages"][s]["status"] for s in state["order"]] == ["done"] * 7
    assert "stage1: done before, skipped" in done.stderr and "stage2: stage 2" in done.stderr
    assert "(continuing)" in done.stderr

    # Stage 2 continued from its checkpoint: every step logged exactly once, none lost, none repeated.
    steps = [json.loads(line)["step"] for line in (root / "stage2" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    # The feedback loop: one round published and its counts add up; the continued run trained 6 steps.
    report = json.loads((root / "feedback" / "rounds" / "round-0.json").read_text())
    totals = report["totals"]
    assert totals["candidates"] == 8 * 4
    assert totals["candidates"] == totals["kept"] + sum(totals["rejections"].values()) + totals.get("lost", 0)
    assert (root / "feedback" / "shards" / "synthetic").is_dir()
    fb_steps = [json.loads(line) for line in (root / "feedback" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in fb_steps) == 6
    # The demo's pinned async loop: round 0 from the start checkpoint, in the mix after step 6 // 2, as recorded.
    feedback = state["stages"]["feedback"]["result"]
    assert feedback["pinned"] and state["version"] == 2
    assert [(t["round"], t["generated_from_step"], t["entered_step"]) for t in feedback["rounds"]] == [(0, 0, 3)]
    assert report["generated_from_step"] == 0 and report["entered_step"] == 3
    assert all(r["data/samples/synthetic"] == 0 for r in fb_steps if r["step"] <= 3)
    # Evaluation of the final run, judged by the pipeline's own judge, and the report.
    metrics = json.loads((root / "feedback" / "metrics.json").read_text())
    assert metrics["judge"]["dir"] == "../judge"  # relative to the evaluated run: the folder is movable
    assert sum(map(sum, metrics["understanding"]["confusion"])) == metrics["understanding"]["samples"]
    assert metrics["generation"]["emo_a"]["judge"].startswith("judge:")
    index = root / "report" / "index.html"
    assert index.is_file() and "report:" in done.stdout
    assert len([line for line in done.stdout.splitlines() if line.startswith("  ")]) == 5  # the summary

    # A finished pipeline resumed again does nothing (no stage re-run, no Ray started).
    again = _uniemo("run", "--config", str(DEMO), *_tiny(tmp_path), "--resume")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done before, skipped") == 7
    # Without --resume the finished pipeline is refused, and nothing in it changes.
    before = (root / "pipeline.json").read_text()
    refused = _uniemo("run", "--config", str(DEMO), *_tiny(tmp_path))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert (root / "pipeline.json").read_text() == before

    # The pipeline folder copied to another place, the original moved away: it evaluates and reports on its own,
    # because every run file names the paths inside it relative to its run folder.
    elsewhere = tmp_path / "elsewhere"
    copy = elsewhere / "demo-copy"
    shutil.copytree(root, copy, symlinks=True)
    moved = tmp_path / "moved-away"
    root.rename(moved)
    try:
        run_files = [copy / "pipeline.json", *copy.glob("*/config.yaml"), *copy.glob("*/checkpoints/*/trainer_state.json"),
                     *copy.glob("*/metrics.json"), *copy.glob("*/rounds/*.json"), copy / "report" / "report.json"]
        assert all(str(root) not in f.read_text() for f in run_files), [f for f in run_files if str(root) in f.read_text()]
        evaluated = _uniemo("evaluate", "--run", str(copy / "feedback"), "distributed.num_workers=1", cwd=elsewhere)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        metrics = json.loads((copy / "feedback" / "metrics.json").read_text())
        assert metrics["judge"]["dir"] == "../judge" and metrics["run"]["checkpoint"].startswith("checkpoints/")
        assert metrics["generation"]["emo_a"]["top1"] is not None
        reported = _uniemo("report", "--run", str(copy), cwd=elsewhere)
        assert reported.returncode == 0, reported.stderr[-3000:]
        state = json.loads((copy / "report" / "report.json").read_text())
        assert state["evaluated"] == "feedback" and state["sections"]["images"] == "ok", state["sections"]
    finally:
        moved.rename(root)
