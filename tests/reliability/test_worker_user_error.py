"""A user error raised inside a Ray Train worker is final: no retry, no traceback, one ``uniemo: error:`` line that
names the kept Ray logs.

The real ``uniemo train`` console script (its own embedded Ray, 2 workers, ZeRO-2) with learning rates of 1e30: the
loss is not finite at step 2 and the trainer raises its one-line error on every rank (a ``UserError``). With
``distributed.max_failures=2``, Ray Train would restart the worker group twice for a crash; for this error it must
not, since every retry fails the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _cli import uniemo_command  # tests/reliability/_cli.py

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


_TRACEBACK = re.compile(r"[^\n]*Traceback \(most recent call last\):\n(?:[^\n]*\n)*?[^\n]*Error:[^\n]*\n")


def _without_ray_startup_retries(stderr: str) -> str:
    """stderr without the tracebacks Ray Train's controller logs when a resource request times out on a loaded
    machine and is retried (``autoscaling_coordinator_client`` ... ``GetTimeoutError``): Ray's start-up, not
    the error under test."""
    return _TRACEBACK.sub(
        lambda m: "" if "autoscaling_coordinator_client" in m.group(0) and "GetTimeoutError" in m.group(0)
        else m.group(0),
        stderr,
    )


def test_a_user_error_in_a_worker_is_one_line_and_not_retried(tmp_path, synth_shards):
    args = [
        "train", "--config", str(REPO / "configs" / "tiny_stage1.yaml"), f"data.shards={synth_shards}",
        f"run.output_dir={tmp_path / 'runs'}", "run.name=blows-up", "logging.wandb.mode=disabled",
        "data.image_size=32", "model.understanding.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "training.steps=4", "training.eval_every=0", "training.checkpoint_every=4", "distributed.max_failures=2",
        "training.lr_backbone=1e30", "training.lr_queries=1e30", "training.lr_head=1e30",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([*uniemo_command(), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    errors = [line for line in out.stderr.splitlines() if "uniemo: error:" in line]
    try:
        assert out.returncode == 2, out.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith("uniemo: error: non-finite loss at step 2"), errors
        stderr = _without_ray_startup_retries(out.stderr)
        assert "Traceback" not in stderr and "Error in training function" not in stderr, stderr[-3000:]
        # One worker group ran: rank 0 announces each start of the training loop.
        assert out.stderr.count("uniemo: stage 1: 2 rank(s)") == 1, out.stderr[-3000:]
        kept = re.search(r"; Ray's logs of this run are kept in (\S+)$", errors[0])
        assert kept and Path(kept.group(1)).is_dir()
        assert "Ray's logs" not in out.stderr.replace(errors[0], "")  # named once, in the error line
    finally:
        for match in re.finditer(r"Ray's logs of this run are kept in (\S+)", out.stderr):
            shutil.rmtree(match.group(1), ignore_errors=True)
