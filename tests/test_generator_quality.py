"""launchers/generator_quality.py on a tiny random generator and the session's judge: every caption of the test split
is drawn once, and the report has Emo-A, FID and the generated-vs-real diversity per emotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launchers import load_launcher  # tests/_launchers.py

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_report_of_a_tiny_generator(synth_shards, judge_dir, tmp_path):
    from uniemo.config.schema import EMOTIONS
    from uniemo.models.generator import Generator

    Generator.build_random("tiny", image_size=32, seed=3).save_pretrained(tmp_path / "gen")
    out = tmp_path / "quality.json"
    quality = load_launcher("generator_quality")
    code = quality.main(["--config", str(REPO / "configs" / "tiny_stage2.yaml"), "--generator", str(tmp_path / "gen"),
                         "--judge", str(judge_dir), "--steps", "2", "--guidance", "3", "--out", str(out),
                         f"data.shards={synth_shards}", "data.image_size=32", "data.generator_image_size=32",
                         "evaluation.diversity_pairs=20"])
    assert code == 0
    (result,) = json.loads(out.read_text())["results"]
    test_samples = json.loads((synth_shards / "manifest.json").read_text())["totals"]["test"]["samples"]
    assert result["test_captions"] == test_samples and result["guidance_scale"] == 3.0
    assert 0.0 <= result["caption_emo_a"] <= 1.0 and result["fid_judge_features"] > 0
    per_emotion = result["diversity_vs_real_per_emotion"]
    assert set(per_emotion) == set(EMOTIONS)
    ratios = [v for v in per_emotion.values() if v is not None]
    assert ratios and all(v > 0 for v in ratios)
    assert result["diversity_vs_real"] == pytest.approx(sum(ratios) / len(ratios))
