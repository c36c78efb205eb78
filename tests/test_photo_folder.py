"""A newcomer's own photos, end to end, as the README shows it: a folder of mixed real-world files (written here:
RGB and grayscale JPEGs, an EXIF-rotated JPEG, RGBA, palette and 16-bit PNGs, WebP, BMP, TIFF, GIF, non-square
sizes, plus .DS_Store, Thumbs.db, text, HEIC, a sub-folder) -> ``uniemo data shards --source folder`` -> stage 1
and stage 2 with the shipped tiny configs at ZeRO-2 on 2 Ray workers -> ``uniemo train-judge`` ->
``uniemo evaluate`` (2 workers) -> ``uniemo report``. Every command runs through ``uniemo.cli.main``.

The folder has no scene or object annotations: the runs say what they leave out, in one line, and so do
``metrics.json`` and the report. Its val and test splits are one shard each, read by 2 ranks (samples dealt out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _photos import IGNORED, write_photo_folder  # tests/_photos.py

from uniemo.cli import main
from uniemo.logging import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.batch_size=4", "data.image_size=32", "data.generator_image_size=32", "model.understanding.image_size=32",
         "model.generator.sampling_steps=2", "logging.wandb.mode=disabled", "distributed.num_workers=2",
         "distributed.zero_stage=2",
         # the random tiny generator: this test is about the data path, not about generator weights
         "model.generator.path=", "model.generator.preset=tiny"]


def _uniemo(capsys, *args: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(list(args)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_folder_of_photos_trains_evaluates_and_reports(ray_cluster, tmp_path, capsys):
    photos, shards, runs = tmp_path / "my_images", tmp_path / "shards", tmp_path / "runs"
    assert write_photo_folder(photos, per_emotion=4) == 32

    out, _ = _uniemo(capsys, "data", "shards", "--source", "folder", "--root", str(photos), "--out", str(shards),
                     "--no-progress")
    assert "train 16 in 1 shards, val 8 in 1 shards, test 8 in 1 shards; skipped 0" in out
    assert f"ignored {sum(map(len, IGNORED.values()))} files: " in out and "excitement/IMG_2001.HEIC" in out

    common = [f"data.shards={shards}", f"run.output_dir={runs}", *SMALL]
    _, err = _uniemo(capsys, "train", "--config", str(REPO / "configs/tiny_stage1.yaml"), *common, "run.name=stage1",
                     "training.steps=4", "training.eval_every=2", "training.checkpoint_every=2")
    assert ("uniemo: the data has no scene or object annotations, so stage 1 leaves out the scene InfoNCE term and "
            "the object InfoNCE term; the other losses are the method's") in err.splitlines()
    records = read_metrics(runs / "stage1")
    assert records[-1]["step"] == 4
    assert not any("scene" in key or "object" in key for r in records for key in r)
    assert [r["val/samples"] for r in records if "val/samples" in r] == [8, 8]  # one shard, 2 ranks, each once

    _, err = _uniemo(capsys, "train", "--config", str(REPO / "configs/tiny_stage2.yaml"), *common, "run.name=stage2",
                     f"training.init_from={runs / 'stage1'}", "training.steps=2", "training.eval_every=2",
                     "training.checkpoint_every=2", "logging.sample_images=1")
    assert "so stage 2 leaves out the scene classifier, the object classifier and alpha" in err
    assert (runs / "stage2" / "emotion_space.safetensors").is_file()
    assert list((runs / "stage2" / "samples").iterdir())

    _uniemo(capsys, "train-judge", "--config", str(REPO / "configs/tiny_stage2.yaml"), "--out", str(runs / "judge"),
            *common, "evaluation.judge_steps=5", "evaluation.judge_batch_size=8")
    _uniemo(capsys, "evaluate", "--run", str(runs / "stage2"), "--judge", str(runs / "judge"),
            "evaluation.images_per_emotion=1", "evaluation.sampling_steps=2")
    metrics = json.loads((runs / "stage2" / "metrics.json").read_text())
    assert sum(map(sum, metrics["understanding"]["confusion"])) == 8  # the test split, each sample once
    assert metrics["evaluation"]["distributed"] == "ray-train"
    assert metrics["left_out"] == ["the scene classifier", "the object classifier",
                                   "alpha with the scene and object mappers (no attribute base: c = M_emo(f_cls))"]
    assert any("leaves out the scene classifier" in note for note in metrics["notes"])
    assert metrics["generation"]["emo_a"]["judge"].startswith("judge:")

    _uniemo(capsys, "report", "--run", str(runs / "stage2"), "--out", str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["sections"]["summary"] == "ok" and report["sections"]["images"] == "ok"
    assert report["notes"] == metrics["notes"]
    assert "leaves out the scene classifier" in (tmp_path / "report" / "index.html").read_text()
