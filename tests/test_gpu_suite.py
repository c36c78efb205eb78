"""benchmarks/gpu_suite.py cannot rot: its ``--tiny`` form runs every part on the CPU (tiny presets, real DeepSpeed
engines on a one-rank gloo group, the real loader, checkpointer and feedback pool on an embedded Ray), and without
CUDA the full form refuses in one line. The numbers of a ``--tiny`` run measure nothing; only that each part ran
and reported what its row promises is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")


def test_without_cuda_the_full_suite_refuses_in_one_line():
    proc = subprocess.run([sys.executable, str(SUITE)], capture_output=True, text=True, timeout=300, env=_env(),
                          cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--tiny" in lines[0]


@pytest.mark.slow
def test_tiny_suite_runs_every_part(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(SUITE), "--tiny", "--pool-actors", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=1500, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| part | variant | batch | time | rate | MFU | note |" in proc.stdout
    assert proc.stdout.splitlines()[0].startswith("card: CPU")
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert not [r for r in rows if r["note"] in ("failed", "skipped")], rows
    by_part: dict[str, list[dict]] = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(r)
    assert set(by_part) == {"joint step", "stage 1", "data wait", "checkpoint", "pool"}

    baseline, optimised = by_part["joint step"]
    assert baseline["variant"].startswith("baseline") and optimised["variant"].startswith("optimised")
    # The optimised step skips the VAE encoder: it executes fewer FLOPs than the baseline counts.
    assert 0 < optimised["executed_flops_per_sample"] < baseline["flops_per_sample"]
    assert optimised["samples_per_s"] > 0 and baseline["samples_per_s"] > 0
    assert by_part["stage 1"][0]["flops_per_sample"] > 0
    assert 0.0 <= by_part["data wait"][0]["wait_share"] <= 1.0
    checkpoints = by_part["checkpoint"]
    assert len(checkpoints) == 4 and all(r["bytes"] > 0 and r["blocking_s"] >= 0 for r in checkpoints)
    assert {"synchronous" in r["variant"] for r in checkpoints} == {True, False}
    (pool,) = by_part["pool"]
    assert pool["images_per_s"] > 0 and pool["flops_per_image"] > 0 and 0 < pool["generators_busy"] <= 1.05
