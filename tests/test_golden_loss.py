"""Golden loss curve (STYLE 16): the first 10 steps of the tiny stage-1 run on one rank, checked in, so a
refactor that claims no numeric change proves it.

The run: ``configs/tiny_stage1.yaml`` on the session's synthetic shards (fixed seed), one rank without Ray
(the driver's checks, then the worker loop, in a child process with a one-rank gloo group), 32 px, batch 8,
fp32, ``data.num_workers=0``, one torch thread, a loss line every step. On one machine this is bit for bit
repeatable. The tolerance, relative 1e-3 per step, allows for other CPUs' float kernels (different summation
order in the matmuls; over 10 AdamW steps that moves the loss by about 1e-5 relative) and still fails on any real
change of the loss path: a changed loss weight, learning rate, initialisation, augmentation or data order moves
some step's loss by more than 1 %.

Regenerate after an intended change of the loss path (and say why in the commit):

    .venv/bin/python tests/test_golden_loss.py --regenerate
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden") / "tiny_stage1_loss.json"
STEPS = 10
RTOL = 1e-3

WORKER = r"""
import sys
from uniemo.config import load_config
from uniemo.training.driver import prepare_run
from uniemo.training.worker import run_worker

plan = prepare_run(load_config(sys.argv[1], sys.argv[2:]))
run_worker(plan.config, plan.run_dir)
"""


def loss_curve(shards: Path, out: Path) -> list[float]:
    """The ``loss`` of each of the first :data:`STEPS` steps of the tiny stage-1 run on one rank."""
    overrides = [
        f"run.output_dir={out}", "run.name=golden", "run.seed=0", f"data.shards={shards}",
        f"data.cache_dir={out / 'cache'}", "data.image_size=32", "model.understanding.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "distributed.num_workers=1", "training.precision=fp32",
        f"training.steps={STEPS}", "training.eval_every=0", "training.checkpoint_every=0", "logging.every=1",
        "logging.progress=false", "logging.wandb.mode=disabled",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(REPO / "configs" / "tiny_stage1.yaml"), *overrides],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "golden" / "metrics.jsonl").read_text().splitlines() if line]
    return [float(r["loss"]) for r in lines if "loss" in r][:STEPS]


@pytest.mark.slow
def test_loss_path_matches_the_golden_curve(synth_shards, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = loss_curve(synth_shards, tmp_path)
    assert len(losses) == STEPS == len(golden["loss"])
    drift = [(i + 1, got, want) for i, (got, want) in enumerate(zip(losses, golden["loss"], strict=True))
             if abs(got - want) > RTOL * abs(want)]
    assert not drift, f"the loss path drifted from {GOLDEN.name} (step, now, golden): {drift}; if intended, see " \
                      "this file's docstring to regenerate"


if __name__ == "__main__" and "--regenerate" in sys.argv:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_synth_shards  # the same shards as the session fixture

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_synth_shards(Path(tmp))
        curve = loss_curve(shards, Path(tmp) / "runs")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"config": "configs/tiny_stage1.yaml", "steps": STEPS, "loss": curve}, indent=1)
                      + "\n")
    print(f"wrote {GOLDEN}: {curve}")
