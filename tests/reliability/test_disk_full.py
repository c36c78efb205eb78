"""Full disks: a small tmpfs the test mounts runs out of space during shard writing, a checkpoint save and a feedback
round's shard write. Each ends in one ``uniemo: error:`` line naming the path and the space needed, exit code 2;
what was complete before (shards, the previous checkpoint, earlier rounds) is unchanged, no temporary file is
left, and once space is freed the same command (``--resume`` for a run) finishes the job.

Mounting needs root (CI runs as root): elsewhere the tests skip with that message, except under ``CI=true``, where
they fail, as the SLURM tests do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _cli import uniemo_command  # tests/reliability/_cli.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the modules whose fixtures are reused

from test_feedback_loop import _check_round, _config, _metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ERROR = "uniemo: error: "
_SIZE = re.compile(r"about ([\d.]+) (B|KiB|MiB|GiB) needed, ([\d.]+) (B|KiB|MiB|GiB) free on (\S+)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


# -------------------------------------------------------------------------------------------------------------
# A small file system
# -------------------------------------------------------------------------------------------------------------
def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the full-disk tests must run)")
    pytest.skip(reason)


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``path`` (created) for the block; unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        _skip_or_fail("the full-disk tests mount a small tmpfs, which needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _skip_or_fail(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: int) -> None:
    """Give the tmpfs on ``path`` ``size`` bytes (more or less, but not less than it holds)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def used_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(stderr: str) -> str:
    """The one error line; no traceback anywhere."""
    errors = [line for line in stderr.splitlines() if ERROR in line]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0].split(ERROR, 1)[1]


def _needed(line: str) -> int:
    match = _SIZE.search(line)
    assert match, line
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", **extra}


def _kept_ray_logs(stderr: str) -> None:
    for match in re.finditer(r"Ray's logs of this run are kept in (\S+)", stderr):
        shutil.rmtree(match.group(1), ignore_errors=True)


# -------------------------------------------------------------------------------------------------------------
# Shard writing
# -------------------------------------------------------------------------------------------------------------
def test_shard_writing_on_a_full_disk_ends_in_one_line_and_resumes(synth_root, synth_shards, tmp_path):
    """The session's 400 images in shards of 25 (about 1.6 MB) into a 512 KiB tmpfs."""
    out = tmp_path / "out"
    command = [*uniemo_command(), "data", "shards", "--source", "emoset", "--root", str(synth_root), "--out",
               str(out), "--shard-size", "25", "--no-progress"]
    reference = json.loads((synth_shards / "manifest.json").read_text())  # the same command, uninterrupted
    with tmpfs(out, 512 * 1024):
        full = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
        assert full.returncode == 2, full.stderr[-3000:]
        line = _one_error(full.stderr)
        assert re.match(rf"cannot write shard {re.escape(str(out))}/(train|val|test)-\d{{6}}\.tar \(No space left on device\): about ",
                        line), line
        unfinished = int(re.search(r"the (\d+) unfinished shards", line).group(1))
        complete = int(re.search(r"the (\d+) complete shards are kept", line).group(1))

        # Every shard finished before the disk filled is whole (its recorded sha256), nothing half-written is left.
        sidecars = sorted((out / ".progress").glob("*.tar.json"))
        assert len(sidecars) == complete > 0 and unfinished == len(reference["shards"]) - complete
        kept = {}
        for sidecar in sidecars:
            entry = json.loads(sidecar.read_text())["entry"]
            assert hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
            assert entry in reference["shards"]
            kept[entry["name"]] = (out / entry["name"]).stat().st_ino
        assert not list(out.glob(".*.tmp")) and not (out / "manifest.json").exists()
        assert {p.name for p in out.glob("*.tar")} == set(kept)

        # The space named is what the unfinished shards and the folder's JSON files take, within a margin.
        rest = sum(e["bytes"] for e in reference["shards"] if e["name"] not in kept)
        assert rest < _needed(line) < 1.1 * rest + 128 * 1024, (line, rest)

        # Space freed: the same command finishes, keeping the complete shards, equal to an uninterrupted run.
        resize(out, 16 * 2**20)
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "manifest.json").read_text()) == reference
        assert (out / "attributes.json").read_bytes() == (synth_shards / "attributes.json").read_bytes()
        assert {name: (out / name).stat().st_ino for name in kept} == kept  # not rewritten
        assert not list(out.glob(".*.tmp")) and not (out / ".progress").exists()


# -------------------------------------------------------------------------------------------------------------
# A checkpoint save (Ray Train, 2 ranks, DeepSpeed ZeRO-2)
# -------------------------------------------------------------------------------------------------------------
def _train(run_root: Path, shards: Path, steps: int, *flags: str) -> subprocess.CompletedProcess:
    args = [
        *uniemo_command(), "train", "--config", str(REPO / "configs" / "tiny_stage1.yaml"), *flags,
        f"data.shards={shards}", f"run.output_dir={run_root}", "run.name=full", "logging.wandb.mode=disabled",
        "logging.progress=false", "data.image_size=32", "model.understanding.image_size=32", "data.batch_size=4",
        "data.num_workers=0", "logging.every=1", f"training.steps={steps}", "training.eval_every=0",
        "training.checkpoint_every=2",
        "training.keep_checkpoints=1", "distributed.max_failures=1",
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=_env(), cwd=run_root.parent)


@pytest.mark.slow
def test_checkpoint_save_on_a_full_disk_ends_in_one_line_and_resumes(synth_shards, tmp_path):
    from uniemo.training.checkpoint import latest_checkpoint, read_trainer_state

    root = tmp_path / "runs"
    run = root / "full"
    with tmpfs(run, 256 * 2**20):
        first = _train(root, synth_shards, 2)
        assert first.returncode == 0, first.stderr[-3000:]
        step2 = latest_checkpoint(run)
        assert step2 is not None and step2.name == "step-000002"
        before = _digests(step2)
        size = sum((step2 / name).stat().st_size for name in before)
        # Room for what the run writes besides checkpoints, not for a second checkpoint beside the first.
        resize(run, used_bytes(run) + size // 2)

        full = _train(root, synth_shards, 4, "--resume")
        try:
            assert full.returncode == 2, full.stderr[-3000:]
            line = _one_error(full.stderr)
        finally:
            _kept_ray_logs(full.stderr)
        assert re.match(rf"cannot save checkpoint {re.escape(str(run))}/checkpoints/step-000004: no space left on "
                        r"device, about .* \(the size of step-000002\); free some space and resume with --resume "
                        r"\(checkpoints/latest is still step-000002\)", line), line
        assert _needed(line) == pytest.approx(size, rel=0.05)
        # The previous checkpoint is untouched and still `latest`; the failed save left nothing behind.
        assert latest_checkpoint(run) == step2 and _digests(step2) == before
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]
        assert not list(run.rglob("*.tmp*"))

        resize(run, 256 * 2**20)
        done = _train(root, synth_shards, 4, "--resume")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed at step 2" in done.stderr
        state = read_trainer_state(latest_checkpoint(run))
        assert state["step"] == 4 and [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------------------------
# A feedback round's shards (sequential loop; its shards folder on a tmpfs)
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_feedback_round_on_a_full_disk_ends_in_one_line_and_resumes(start_runs, synth_shards, tmp_path):
    from uniemo.config import save_resolved
    from uniemo.data.shards import manifest_folders
    from uniemo.run_layout import STAGING_DIR, SYNTHETIC_DIR, round_dir, round_report_path
    from uniemo.training.checkpoint import latest_checkpoint

    s2 = latest_checkpoint(start_runs / "s2")
    cfg = _config(start_runs, synth_shards, "run.name=fbfull", "feedback.rounds=2", "feedback.steps_per_round=2",
                  "distributed.num_workers=1", f"feedback.from_run={start_runs / 's2'}")
    config = save_resolved(cfg, tmp_path / "config")
    run = start_runs / "fbfull"
    shards = run / "shards"  # the synthetic source and the staging folder live here
    command = [*uniemo_command(), "feedback", "--config", str(config)]
    with tmpfs(shards, 4 * 2**20):
        log = tmp_path / "feedback.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env())
        filler = shards / "filler"
        try:
            deadline = time.monotonic() + 600
            while not (round_dir(run, 0) / "manifest.json").is_file():  # round 0 is published: fill the disk
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            free = os.statvfs(shards).f_bavail * os.statvfs(shards).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - 8192))  # 8 KiB stay free: less than any round's shards
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        output = log.read_text()
        _kept_ray_logs(output)
        assert proc.returncode == 2, output[-3000:]
        line = _one_error(output)
        assert re.match(rf"cannot write feedback round 1's shards into {re.escape(str(shards))}: no space left on "
                        r"device, about .* for the round; free some space and run again with --resume", line), line
        # Round 0 and the step-2 checkpoint are there and whole; round 1 left nothing.
        round0 = round_dir(run, 0)
        before = _digests(round0)
        assert all(
            hashlib.sha256((round0 / e["name"]).read_bytes()).hexdigest() == e["sha256"]
            for e in json.loads((round0 / "manifest.json").read_text())["shards"]
        )
        assert manifest_folders(run / SYNTHETIC_DIR) == [round0]
        assert not (run / STAGING_DIR / "round-1").exists() and not round_report_path(run, 1).exists()
        assert latest_checkpoint(run).name == "step-000002"

        filler.unlink()
        done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600, env=_env())
        assert done.returncode == 0, done.stderr[-3000:]
        assert "round 0 is complete already" in done.stderr
        assert _digests(round0) == before
        _check_round(run, 0, s2)
        _check_round(run, 1, run / "checkpoints" / "step-000002")
        assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
