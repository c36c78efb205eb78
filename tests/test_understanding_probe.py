"""launchers/understanding_probe.py: the data it reads is the science checks' regime, the wrong-labels arm
relabels every extra image, and a run writes its table and probe.json."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from _launchers import load_launcher  # tests/_launchers.py

from uniemo.config import load_config


@pytest.fixture(scope="module")
def probe_module():
    return load_launcher("understanding_probe")


def test_probe_reads_the_regime_and_relabels_the_extra_images(probe_module, tmp_path):
    cfg = load_config("configs/demo.yaml", [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.images=96",
                                            "data.labelled_per_emotion=2"])
    probe = probe_module.Probe(cfg, extra=3)
    assert len(probe.train) == 16 and sorted(np.bincount(probe.train_y)) == [2] * 8
    assert len(probe.extra) == 24 and sorted(np.bincount(probe.extra_y)) == [3] * 8
    assert len(probe.test_y) == probe.test.shape[0] > 0
    wrong = probe.extra_labels("wrong_labels")
    assert (wrong == (probe.extra_y + 1) % 8).all() and (wrong != probe.extra_y).all()
    assert (probe.extra_labels("real_extra") == probe.extra_y).all()
    # A batch of the extra set only (rho 1) carries exactly the arm's labels of the images it drew.
    _, labels = probe.batch(np.random.default_rng(0), random.Random(0), 32, 1.0, "wrong_labels")
    drawn = np.random.default_rng(0).integers(0, len(probe.extra), 32)
    assert labels.tolist() == wrong[drawn].tolist()


def test_probe_runs_and_writes_its_record(probe_module, tmp_path, capsys):
    out = tmp_path / "out"
    assert probe_module.main(["--world", "easy", "--per-emotion", "2", "--extra", "2", "--steps", "2",
                              "--continue-steps", "1", "--seeds", "0", "--out", str(out),
                              f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.images=96"]) == 0
    record = json.loads((out / "probe.json").read_text())
    assert set(record["runs"]["seed-0"]) == {"stage1", "none", "real_extra", "wrong_labels"}
    assert record["labelled"] == 16 and record["extra"] == 16
    assert "| wrong_labels |" in capsys.readouterr().out
