"""A non-finite loss stops a run without touching ``latest``; foreign pickles are refused before anything of them
runs; a wandb key never reaches the run's files or output; the embedded Ray stays on loopback.

The runs are real and tiny: one rank, DeepSpeed ZeRO-2 on gloo, in a child process that runs the driver's checks
(:func:`uniemo.training.driver.prepare_run`) and one rank's job (:func:`uniemo.training.worker.run_worker`)
without Ray, over the session's shards at 32 px. The loss becomes non-finite honestly: learning rates of 1e30
blow the weights up at the first update, so the second step's loss is not finite.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import uniemo_command  # tests/reliability/_cli.py

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_stage1.yaml")
SECRET = "wandb-secret-0123456789abcdef0123456789abcdef"

# One rank's job without Ray: the driver's checks, then the worker loop (what `uniemo train` runs per rank).
WORKER = r"""
import sys
from uniemo.config import load_config
from uniemo.training.driver import prepare_run
from uniemo.errors import UserError
from uniemo.training.worker import run_worker

try:
    plan = prepare_run(load_config(sys.argv[2], sys.argv[3:]), resume=sys.argv[1] == "resume")
    run_worker(plan.config, plan.run_dir)
except UserError as exc:
    print(f"uniemo: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _overrides(runs: Path, shards: Path, cache: Path, name: str, *extra: str) -> list[str]:
    return [
        f"run.output_dir={runs}", f"run.name={name}", f"data.shards={shards}", f"data.cache_dir={cache}",
        "data.image_size=32", "model.understanding.image_size=32", "data.batch_size=8", "data.num_workers=0",
        "distributed.num_workers=1", "logging.every=1", "logging.progress=false", "training.eval_every=0",
        "training.steps=4", "training.checkpoint_every=1", "training.lr_schedule=constant", "training.warmup_steps=0",
        "training.lr_backbone=1e30", "training.lr_queries=1e30", "training.lr_head=1e30", *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def _worker(mode: str, overrides: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORKER, mode, TINY, *overrides], capture_output=True, text=True,
                          timeout=300, env=_env(**env))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*uniemo_command(), *args], capture_output=True, text=True, timeout=300, env=_env())


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("uniemo: error: ")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, synth_shards):
    root = tmp_path_factory.mktemp("nan")
    return lambda name, *extra: _overrides(root / "runs", synth_shards, root / "cache", name, *extra)


@pytest.fixture(scope="module")
def one_step_run(base) -> Path:
    """Step 1 of the blow-up run, saved (``training.stop_at_step=1``), with wandb offline and a key in the env."""
    out = _worker("fresh", base("blown", "training.stop_at_step=1", "logging.wandb.mode=offline"),
                  WANDB_API_KEY=SECRET, WANDB_MODE="offline")
    assert out.returncode == 0, out.stderr[-3000:]
    assert SECRET not in out.stdout + out.stderr
    run_dir = Path(base("blown")[0].split("=", 1)[1]) / "blown"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000001"
    return run_dir


def _copy_run(run_dir: Path, name: str) -> Path:
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(one_step_run, base):
    run_dir = _copy_run(one_step_run, "stop")
    before = _tree_hashes(run_dir / "checkpoints")
    out = _worker("resume", base("stop"))
    line = _error_line(out)
    assert "non-finite loss at step 2" in line and "training.max_bad_steps=0" in line
    assert "stopped without saving, the latest checkpoint stays step-000001" in line
    assert _tree_hashes(run_dir / "checkpoints") == before  # nothing written, nothing removed: latest is step 1


@pytest.mark.slow
def test_max_bad_steps_skips_and_counts_then_stops(one_step_run, base):
    run_dir = _copy_run(one_step_run, "skip")
    before = _tree_hashes(run_dir / "checkpoints")
    out = _worker("resume", base("skip", "training.max_bad_steps=2"))
    line = _error_line(out)
    skipped = [s for s in out.stderr.splitlines() if "non-finite loss, step skipped" in s]
    assert [s.split("(")[1] for s in skipped] == ["1 of training.max_bad_steps=2)", "2 of training.max_bad_steps=2)"]
    assert "bad steps so far: 3, training.max_bad_steps=2" in line and "stays step-000001" in line
    assert _tree_hashes(run_dir / "checkpoints") == before


def test_max_bad_steps_needs_no_gradient_accumulation():
    from uniemo.config import load_config
    from uniemo.errors import ConfigError

    with pytest.raises(ConfigError, match="max_bad_steps > 0 needs training.gradient_accumulation=1"):
        load_config(None, ["training.max_bad_steps=1", "training.gradient_accumulation=2"])


class _Evil:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint from a stranger would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    import torch

    torch.save({"module": _Evil(marker)}, path)


@pytest.mark.slow
def test_malicious_checkpoint_is_refused_before_it_runs(one_step_run, base, tmp_path):
    run_dir = _copy_run(one_step_run, "evil")
    marker = tmp_path / "pwned"
    target = run_dir / "checkpoints" / "step-000001" / "ds" / "mp_rank_00_model_states.pt"
    _plant(target, marker)

    out = _cli("export", "--run", str(run_dir), "--out", str(tmp_path / "export"))
    assert f"refusing to load {target}: it would run code when unpickled (unsupported GLOBAL" in _error_line(out)
    out = _cli("train", "--config", TINY, *base("evil"), "--resume")  # the driver refuses: Ray never starts
    assert f"refusing to load {target}" in _error_line(out)
    assert not marker.exists()


def test_pickled_weights_are_refused_before_they_run(tmp_path, synth_shards):
    marker = tmp_path / "pwned"
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text('{"model_type": "clip"}')
    _plant(clip / "pytorch_model.bin", marker)
    sd = tmp_path / "sd"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (sd / sub).mkdir(parents=True)
    _plant(sd / "unet" / "diffusion_pytorch_model.bin", marker)
    common = ["train", "--config", TINY, f"run.output_dir={tmp_path / 'runs'}", f"data.shards={synth_shards}"]

    out = _cli(*common, f"model.understanding.clip_path={clip}", "model.understanding.preset=from_clip")
    assert f"{clip} holds only pickled weights (pytorch_model.bin), which uniemo never unpickles" in _error_line(out)
    out = _cli(*common, "training.stage=2", f"model.generator.path={sd}")
    assert f"{sd / 'unet'} holds only pickled weights (diffusion_pytorch_model.bin), which uniemo never unpickles" in (
        _error_line(out)
    )
    assert not marker.exists()


@pytest.mark.slow
def test_wandb_key_is_never_written(one_step_run):
    files = [p for p in one_step_run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("wandb" in p.parts for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_embedded_ray_binds_loopback_by_default(monkeypatch):
    from uniemo.config.schema import DistributedConfig
    from uniemo.distributed.ray_session import keep_embedded_ray_on_loopback

    cfg = DistributedConfig()
    assert cfg.bind_host == "127.0.0.1" and cfg.dashboard is False and cfg.ray_address == ""
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    keep_embedded_ray_on_loopback(cfg)  # Ray's local-only switch: the node advertises 127.0.0.1, not the LAN
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
