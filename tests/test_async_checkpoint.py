"""Checkpoints written in the background (``training.async_checkpoint``, uniemo.training.checkpoint_writer).

The writer's files are what ``torch.save`` writes; a run with background saves publishes the same checkpoints
as a run without, resumes from them to the same losses, and reports ``data_wait_share`` in its metrics.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uniemo.training.checkpoint_writer import BackgroundCheckpointEngine

REPO = Path(__file__).resolve().parents[1]
WORKER = r"""
import sys
from uniemo.config import load_config
from uniemo.training.driver import prepare_run
from uniemo.training.worker import run_worker

overrides = [a for a in sys.argv[2:] if a != "--resume"]
plan = prepare_run(load_config(sys.argv[1], overrides), resume="--resume" in sys.argv)
run_worker(plan.config, plan.run_dir)
"""


def test_background_engine_writes_what_torch_save_writes(tmp_path):
    """The bytes torch.save writes into a buffer (a file written by path differs only in the zip's inner folder
    name, which torch.load ignores), taken when ``save`` is called."""
    state = {"module": {"w": torch.randn(5, 3), "b": torch.zeros(3)}, "step": 7, "shape": torch.Size([5, 3])}
    reference = io.BytesIO()
    torch.save(state, reference, _use_new_zipfile_serialization=True)
    before = state["module"]["w"].clone()
    engine = BackgroundCheckpointEngine(zipfile_serialization=True)
    engine.save(state, str(tmp_path / "a.pt"))
    state["module"]["w"].add_(1.0)  # the step after the save changes the weights: the file must not see it
    engine.wait()
    assert engine.done() and engine.bytes_written == (tmp_path / "a.pt").stat().st_size
    assert (tmp_path / "a.pt").read_bytes() == reference.getvalue()
    loaded = engine.load(str(tmp_path / "a.pt"))
    assert torch.equal(loaded["module"]["w"], before) and isinstance(loaded["shape"], torch.Size)
    engine.save(state, str(tmp_path / "missing" / "b.pt"))  # the writer's error comes back to the caller
    with pytest.raises(FileNotFoundError):
        engine.wait()
    engine.cleanup()


def _run(shards: Path, out: Path, name: str, *overrides: str, resume: bool = False) -> list[dict]:
    args = [
        f"run.output_dir={out}", f"run.name={name}", "run.seed=0", f"data.shards={shards}",
        f"data.cache_dir={out / 'cache'}", "data.image_size=32", "model.understanding.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "distributed.num_workers=1", "training.precision=fp32",
        "training.steps=6", "training.eval_every=0", "training.checkpoint_every=3", "logging.every=1",
        "logging.progress=false", "logging.wandb.mode=disabled", *overrides,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-c", WORKER, str(REPO / "configs" / "tiny_stage1.yaml"), *args]
    proc = subprocess.run(command + (["--resume"] if resume else []), capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
def test_background_saves_publish_and_resume_like_synchronous_ones(synth_shards, tmp_path):
    plain = _run(synth_shards, tmp_path, "sync")
    _run(synth_shards, tmp_path, "async", "training.async_checkpoint=true", "training.stop_at_step=3")
    resumed = _run(synth_shards, tmp_path, "async", "training.async_checkpoint=true", resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(plain, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(a["loss"])), (a, b)
        assert 0.0 <= b["data_wait_share"] <= 1.0
    for name in ("sync", "async"):
        checkpoints = tmp_path / name / "checkpoints"
        assert (checkpoints / "latest").read_text().strip() == "step-000006"
        assert all((checkpoints / f"step-00000{s}" / "COMPLETE").is_file() for s in (3, 6))
    files = {name: sorted(p.relative_to(tmp_path / name / "checkpoints" / "step-000006").as_posix()
                          for p in (tmp_path / name / "checkpoints" / "step-000006").rglob("*") if p.is_file())
             for name in ("sync", "async")}
    assert files["sync"] == files["async"]
