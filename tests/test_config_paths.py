"""Config paths: one rule, one function (uniemo/config/paths.py). A path written in a config file is relative to
that file's folder (the repository for the shipped configs), one given on the command line or left at its default
is relative to the current directory, and every shipped config works from any working directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from uniemo.cli import main as cli_main
from uniemo.config import load_config
from uniemo.config.paths import REPO_ROOT, path_keys

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_every_path_field_is_tagged():
    assert path_keys() == [
        "run.output_dir", "data.shards", "data.cache_dir", "data.extra_sources[].path", "data.attribute_base",
        "model.understanding.clip_path", "model.generator.path", "model.conditioner.attribute_clip_path",
        "training.init_from", "distributed.ray_temp_dir", "feedback.from_run", "evaluation.judge",
        "evaluation.weights.inception", "evaluation.weights.clip", "evaluation.weights.emo_a_probe",
        "evaluation.weights.lpips_alexnet", "evaluation.weights.places365_resnet50",
        "evaluation.weights.imagenet_resnet50", "evaluation.real_images",
    ]


def test_a_config_files_paths_are_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "c.yaml").write_text(yaml.safe_dump({
        "run": {"output_dir": "out"},
        "data": {"shards": "../shards", "extra_sources": [{"name": "x", "path": "extra"}]},
        "model": {"generator": {"path": "~/gen"}},
        "evaluation": {"judge": "/abs/judge"},
    }))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.yaml", ["training.init_from=s1", "feedback.from_run="])
    assert cfg.run.output_dir == str(folder / "out")
    assert cfg.data.shards == str(tmp_path / "shards")
    assert cfg.data.extra_sources[0].path == str(folder / "extra")
    assert cfg.model.generator.path == str(Path.home() / "gen")
    assert cfg.evaluation.judge == "/abs/judge"
    # The command line and the defaults: the current directory; empty stays "not set".
    assert cfg.training.init_from == str(elsewhere / "s1")
    assert cfg.feedback.from_run == ""
    assert cfg.data.cache_dir == str(elsewhere / ".cache" / "uniemo")
    # A URL source is no path.
    url = load_config(folder / "c.yaml", ["data.shards=s3://bucket/shards"])
    assert url.data.shards == "s3://bucket/shards"
    # An override of a whole list resolves its paths against the current directory too.
    listed = load_config(None, ["data.extra_sources=[{name: y, path: rel}]"])
    assert listed.data.extra_sources[0].path == str(elsewhere / "rel")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve_against_the_repository_from_anywhere(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    written = yaml.safe_load(path.read_text())
    for key in path_keys():
        if "[]" in key:
            continue
        value: object = cfg
        raw: object = written
        for part in key.split("."):
            value = getattr(value, part)
            raw = raw.get(part, {}) if isinstance(raw, dict) else {}
        if isinstance(raw, str) and raw and not raw.startswith("/"):
            assert value == str(REPO_ROOT / raw), key  # written in the file: the repository's
        elif not raw and value:
            assert Path(str(value)).is_relative_to(tmp_path), key  # a default: the current directory
    generator = cfg.model.generator.path
    if generator and generator.startswith(str(REPO_ROOT)):
        assert Path(generator, "model_index.json").is_file()


def test_train_with_a_shipped_config_from_another_folder_finds_the_generator(tmp_path, monkeypatch, capsys):
    """The newcomer's case: `uniemo train --config <repo>/configs/tiny_stage2.yaml` from a folder of their own. The
    generator folder is found (the driver gets past its weights check to the next one: no stage-1 run yet)."""
    monkeypatch.chdir(tmp_path)
    code = cli_main(["train", "--config", str(REPO_ROOT / "configs" / "tiny_stage2.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "generators/cpu-world" not in err and "does not exist" not in err, err
    assert "stage-1 run" in err and str(tmp_path / "runs") in err  # runs/ is the current folder's


def test_config_show_prints_absolute_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["config", "show", "--config", str(REPO_ROOT / "configs" / "demo.yaml")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["generator"]["path"] == str(REPO_ROOT / "generators" / "cpu-world")
    assert shown["run"]["output_dir"] == str(tmp_path / "runs")
    assert dataclasses.asdict(load_config(REPO_ROOT / "configs" / "demo.yaml")) == shown
