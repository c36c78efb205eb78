"""The EmoSet recipes (configs/emoset_*.yaml) are valid configs, and without the weights folders they stop at once
with one line naming the missing folder (exit code 2), before any worker, model or data work starts. Each recipe
resolves to the values of docs/RECIPES.md's tables (official hyperparameter -> config key -> value), parsed from the
document so that the two cannot drift apart."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uniemo.config.loader import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "emoset_stage1.yaml": {"stage": 1, "preset": "vit-l14"},
    "emoset_stage2.yaml": {"stage": 2, "preset": "vit-l14"},
    "emoset_feedback.yaml": {"stage": 2, "preset": "vit-l14"},
}
TABLE_RECIPES = {"stage1": "emoset_stage1.yaml", "stage2": "emoset_stage2.yaml", "feedback": "emoset_feedback.yaml"}
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


def _table_rows() -> list[tuple[str, str, str, str]]:
    """(recipe, official hyperparameter, config key, value) of every docs/RECIPES.md row that names a key."""
    rows = []
    for line in (REPO / "docs" / "RECIPES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] not in TABLE_RECIPES:
            continue
        key = re.fullmatch(r"`([^`]+)`", cells[3])
        value = re.match(r"`([^`]+)`", cells[4])
        if key:
            assert value, f"docs/RECIPES.md row {cells[1]!r} names {cells[3]} but no `value`"
            rows.append((cells[0], cells[1], key.group(1), value.group(1)))
    return rows


def _resolve(cfg, key: str):
    if key == "(global batch)":
        return cfg.data.batch_size * cfg.training.gradient_accumulation * cfg.distributed.num_workers
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_recipes_table_covers_every_recipe():
    rows = _table_rows()
    assert {r[0] for r in rows} == set(TABLE_RECIPES)
    assert len(rows) >= 60


@pytest.mark.parametrize(("recipe", "official", "key", "value"), _table_rows(),
                         ids=lambda x: x if isinstance(x, str) and "." in x else None)
def test_recipe_resolves_to_the_documented_value(recipe, official, key, value):
    cfg = load_config(REPO / "configs" / TABLE_RECIPES[recipe])
    want = yaml.safe_load(value)
    got = _resolve(cfg, key)
    if isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-9), f"{recipe}: {official} ({key})"
    else:
        assert got == want, f"{recipe}: {official} ({key})"


def test_feedback_recipe_is_the_full_scale_async_loop():
    cfg = load_config(REPO / "configs" / "emoset_feedback.yaml")
    fb = cfg.feedback
    assert (fb.mode, fb.sampler, fb.sampling_steps, fb.guidance_scale) == ("async", "unipc", 50, 7.5)
    assert (fb.tau, fb.delta, fb.attribute_cap, fb.synthetic_fraction) == (0.6, 0.95, 0.25, 0.25)
    assert fb.keep_per_emotion == fb.candidates_per_emotion // 4
    # the 8 GPUs of the header: 4 trainers + 6 x 0.5 generator + 2 x 0.5 filter
    gpus = cfg.distributed.num_workers * cfg.distributed.gpus_per_worker
    gpus += fb.generator_actors * fb.generator_gpus + fb.filter_actors * fb.filter_gpus
    assert gpus == 8
    assert cfg.model.generator.path == SD and cfg.data.generator_image_size == 512
