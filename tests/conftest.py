"""Shared fixtures: one synthetic set and one shard folder per test session (tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def make_synth_shards(folder: Path) -> Path:
    """The session's data: a synthetic EmoSet-layout set (400 images of 32 px, seed 0) under ``folder/synth``,
    written as shards of 25 samples (about 12 train, 2 val, 3 test) under ``folder/shards``. Also used by
    ``tests/test_golden_loss.py --regenerate``."""
    from uniemo.data.shards import write_shards
    from uniemo.data.synthetic import generate_synthetic_set

    root, out = folder / "synth", folder / "shards"
    generate_synthetic_set(root, images=400, size=32, seed=0, workers=1, progress=False)
    write_shards(source="emoset", root=root, out=out, shard_size=25, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """:func:`make_synth_shards`, once per session."""
    return make_synth_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def synth_root(synth_shards) -> Path:
    """The synthetic set the session's shards were written from."""
    return synth_shards.parent / "synth"


@pytest.fixture(scope="session")
def start_runs(synth_shards, tmp_path_factory) -> Path:
    """The feedback tests' start runs, once per session: ``s1`` (stage 1) and ``s2`` (stage 2 from s1, with its
    emotion space), two steps each on the session's shards, each written by ``tests/test_feedback_loop.py`` run as a
    script (one process per run). The tests put their own runs, under names of their own, beside them."""
    root = tmp_path_factory.mktemp("fb_runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               WANDB_MODE="disabled")
    script = Path(__file__).with_name("test_feedback_loop.py")
    for stage in (1, 2):
        proc = subprocess.run([sys.executable, str(script), str(synth_shards), str(root), str(stage)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=str(root))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "s2" / "emotion_space.safetensors").is_file()
    return root


@pytest.fixture(scope="session")
def judge_dir(synth_shards, tmp_path_factory) -> Path:
    """The evaluation classifier (judge) trained on the session's shards, once per session."""
    from test_evaluation import _judge_cfg

    from uniemo.evaluation.judge import train_judge

    return train_judge(_judge_cfg(synth_shards), tmp_path_factory.mktemp("judge") / "judge")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray of 4 CPUs for a test module, started by uniemo's own :func:`ray_session` (its own temp
    folder, never a stale cluster) and stopped afterwards. The drivers of uniemo use a cluster they find
    initialised."""
    from uniemo.config.schema import DistributedConfig
    from uniemo.distributed.ray_session import ray_session

    with ray_session(DistributedConfig(num_workers=1, cpus_per_worker=1.0), extra_cpus=3.0):
        yield
