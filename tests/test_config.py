"""The config tree: every shipped YAML loads; errors name the full key path; runs record config + code version."""

from __future__ import annotations

from pathlib import Path

import pytest

from uniemo.cli import main
from uniemo.config import load_config, save_resolved, valid_keys
from uniemo.config.schema import Config
from uniemo.errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
# Run configs; sweep files (configs/sweeps/) are expanded and checked by tests/test_sweep.py.
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if "sweeps" not in p.relative_to(CONFIG_ROOT).parts)


def test_configs_folder_is_not_empty():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_yaml_and_overrides_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  steps: 7\ndata:\n  batch_size: 4\n")
    cfg = load_config(p, ["data.batch_size=8", "training.lr_head=2e-4", "run.name=x"])
    assert cfg.training.steps == 7  # YAML over default
    assert cfg.data.batch_size == 8  # override over YAML
    assert cfg.training.lr_head == pytest.approx(2e-4)
    assert cfg.run.name == "x"
    assert cfg.distributed.num_workers == Config().distributed.num_workers  # untouched default


def test_list_of_sections(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  extra_sources:\n    - {name: synthetic, path: /x, weight: 0.25}\n")
    cfg = load_config(p)
    assert cfg.data.extra_sources[0].name == "synthetic"
    assert cfg.data.extra_sources[0].weight == 0.25
    p.write_text("data:\n  extra_sources:\n    - {name: synthetic, pth: /x}\n")
    with pytest.raises(ConfigError, match=r"data\.extra_sources\[0\]\.pth"):
        load_config(p)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("training.stpes=3", r"unknown config key training\.stpes; did you mean training\.steps\?"),
        ("model.understanding.scen_layer=2", r"did you mean model\.understanding\.scene_layer"),
        ("data.batch_size=eight", r"data\.batch_size must be an integer, got 'eight'"),
        ("data.batch_size=-1", r"data\.batch_size must be > 0"),
        ("data.batch_size=2.5", r"data\.batch_size must be an integer"),
        ("distributed.zero_stage=5", r"distributed\.zero_stage must be 0, 1, 2 or 3, got 5"),
        ("training.stage=3", r"training\.stage must be one of 1, 2"),
        ("data.normalization=foo", r"data\.normalization must be one of"),
        ("data.train_augment=maybe", r"data\.train_augment must be true or false"),
        ("training", r"not of the form key=value"),
        ("training.steps.x=1", r"training\.steps must be an integer"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_yaml_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run:\n  name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips_with_code_version(tmp_path):
    cfg = load_config(None, ["training.steps=3", "data.extra_sources=[{name: s, path: p}]"])
    out = save_resolved(cfg, tmp_path / "run")
    text = out.read_text()
    assert text.startswith("# code_version: ")
    assert load_config(out) == cfg


def test_valid_keys_cover_nested_sections():
    keys = set(valid_keys())
    assert {"data.synthetic.images", "model.understanding.preset", "logging.wandb.mode"} <= keys


def test_cli_config_errors_are_one_line_exit_2(capsys):
    assert main(["config", "show", "training.stpes=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.stpes" in err and "Traceback" not in err
    assert main(["config", "show", "training.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out


def test_cli_debug_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["config", "show", "training.stpes=3", "--debug"])
