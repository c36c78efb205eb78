"""The filter's control on real images (uniemo/feedback/filter_control.py, launchers/filter_control.py), on the
session's tiny stage-2 run: pools of real test images of each emotion go through the real scoring and filter, and
the funnel's accounting follows the thresholds."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from _launchers import load_launcher  # tests/_launchers.py


@pytest.mark.slow
def test_real_images_through_the_filter(start_runs, tmp_path, capsys):
    from uniemo.config.schema import EMOTIONS
    from uniemo.data.loader import build_loader_from_config
    from uniemo.feedback.actors import load_bundle

    run = start_runs / "s2"
    cfg = load_bundle(run).config
    counts = Counter(int(k) for b in build_loader_from_config(cfg.data, "test", stage=2, training=False,
                                                              batch_size=16, num_workers=0)
                     for k in b["label"].tolist())
    size = 3
    pools = sum(n // size for n in counts.values())
    assert pools >= 8, counts  # the session's test split has a pool of every emotion at least

    out = tmp_path / "control.json"
    code = load_launcher("filter_control").main([str(run), "--tau", "0", "--deltas", "1.0,-1.0", "--caps", "1.0",
                                                 "--pool-size", str(size), "--out", str(out)])
    assert code == 0
    assert "| real (test) |" in capsys.readouterr().out
    control = json.loads(out.read_text())
    q = control["within_pool_cosine"]
    assert -1.0 <= q["q05"] <= q["q50"] <= q["q95"] <= 1.0
    off, strict = control["funnels"]
    for funnel in (off, strict):
        t = funnel["total"]
        assert t["pools"] == pools and t["candidates"] == pools * size
        assert t["candidates"] == t["kept"] + sum(t[r] for r in ("fidelity_argmax", "fidelity_threshold",
                                                                 "duplicate", "attribute_cap", "not_selected"))
        assert t["fidelity_threshold"] == 0  # tau 0: only a wrong argmax fails fidelity
        assert set(funnel["per_emotion"]) <= set(EMOTIONS)
        assert {e: c["pools"] for e, c in funnel["per_emotion"].items()} == \
            {EMOTIONS[k]: n // size for k, n in counts.items() if n >= size}
    keep = cfg.feedback.keep_per_emotion
    # delta 1.0, no cap: no image is a near-duplicate or capped; every pool keeps min(K, what passed fidelity).
    t = off["total"]
    assert t["duplicate"] == 0 and t["attribute_cap"] == 0
    assert t["kept"] + t["not_selected"] == off["passed_fidelity"] and 0 < t["kept"] <= keep * pools
    assert t["not_selected"] == 0 or keep < size
    # delta -1.0: every image after a pool's first surviving one is a near-duplicate of it.
    passed = strict["passed_fidelity"]
    pools_with_a_survivor = strict["total"]["kept"]
    assert 0 < pools_with_a_survivor <= pools
    assert strict["total"]["duplicate"] == passed - pools_with_a_survivor


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    code = load_launcher("filter_control").main([str(tmp_path / "nothing")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


@pytest.mark.slow
def test_the_judge_on_a_runs_kept_images(synth_shards, judge_dir, tmp_path):
    """judge_kept_images reads every round's shards of a run and scores their labels: rightly labelled real images
    give the judge's own accuracy on them, the same images relabelled k -> k+1 the share it calls k+1."""
    import numpy as np

    from uniemo.config.schema import LimitsConfig
    from uniemo.data.images import image_member, open_image, to_rgb
    from uniemo.data.shards import read_manifest, read_shard_samples, update_manifest, write_sample_shard
    from uniemo.evaluation.judge import load_judge
    from uniemo.feedback.controls import wrong_label
    from uniemo.feedback.filter_control import judge_kept_images
    from uniemo.run_layout import SYNTHETIC_DIR

    samples = [s for e in read_manifest(synth_shards)["shards"] if e["split"] == "test"
               for s in read_shard_samples(synth_shards / e["name"])][:24]
    labels = np.asarray([int(s["cls"]) for s in samples])
    images = [np.asarray(to_rgb(open_image(s[image_member(s)], LimitsConfig().max_image_pixels))) for s in samples]
    predicted = load_judge(judge_dir).classify(images).argmax(1)
    for name, relabel in (("right", lambda k: k), ("wrong", wrong_label)):
        run = tmp_path / name
        for r, part in enumerate((samples[:10], samples[10:])):  # two rounds, as a feedback run has them
            folder = run / SYNTHETIC_DIR / f"round-{r}"
            entry = write_sample_shard(({**s, "cls": relabel(int(s["cls"]))} for s in part),
                                       folder / "train-000000.tar", source="synthetic")
            update_manifest(folder, [entry], round=r)
        result = judge_kept_images(run, judge_dir)
        expected = [relabel(int(k)) for k in labels]
        assert result["images"] == len(samples)
        assert result["judge_agrees"] == pytest.approx(float((predicted == np.asarray(expected)).mean()))
    assert judge_kept_images(tmp_path / "empty", judge_dir)["images"] == 0
