"""The EmoSet recipes (configs/emoset_*.yaml) are valid configs, and without the weights folders they stop at once
with one line naming the missing folder (exit code 2), before any worker, model or data work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uniemo.config.loader import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "emoset_stage1.yaml": {"stage": 1, "preset": "vit-l14"},
    "emoset_stage2.yaml": {"stage": 2, "preset": "vit-l14"},
}
CLIP = "/models/clip-vit-large-patch14"
SD = "/models/stable-diffusion-v1-5"


def _uniemo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("uniemo")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "uniemo"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_a_valid_config(name):
    cfg = load_config(REPO / "configs" / name)
    want = RECIPES[name]
    assert cfg.training.stage == want["stage"] and cfg.model.understanding.preset == want["preset"]
    assert cfg.model.understanding.clip_path == CLIP and cfg.data.shards == "/data/EmoSet-118K/shards"
    assert cfg.training.precision == "bf16" and cfg.distributed.zero_stage == 2
    assert cfg.distributed.gpus_per_worker == 1 and cfg.data.image_size == 224
    if want["stage"] == 2:
        assert cfg.model.generator.path == SD and cfg.data.generator_image_size == 512


@pytest.mark.parametrize(
    ("name", "overrides", "missing"),
    [
        ("emoset_stage1.yaml", [], CLIP),
        ("emoset_stage2.yaml", [], CLIP),
        ("emoset_stage2.yaml", ["model.understanding.clip_path="], SD),
    ],
)
def test_recipe_without_weights_names_the_missing_folder(name, overrides, missing, tmp_path):
    if Path(missing).exists():
        pytest.skip(f"{missing} exists on this machine")
    out = _uniemo("train", "--config", str(REPO / "configs" / name), *overrides, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("uniemo: error: ") and missing in lines[0] and "does not exist" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written: no run dir, no cache
