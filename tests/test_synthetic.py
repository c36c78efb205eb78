"""The synthetic emotion set: EmoSet layout, determinism, balance, and informative-but-overlapping attributes."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniemo.config.schema import EMOTIONS
from uniemo.data.records import SPLITS
from uniemo.data.synthetic import OBJECTS, SCENES, generate_synthetic_set
from uniemo.errors import ConfigError

BINS = {i / 10 for i in range(11)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _annotations(root: Path) -> list[dict]:
    out = []
    for split in SPLITS:
        for row in json.loads((root / f"{split}.json").read_text()):
            out.append(json.loads((root / row[3]).read_text()))
    return out


def test_layout_matches_emoset(synth_root):
    root = Path(synth_root)
    assert {p.name for p in root.iterdir()} == {
        "info.json",
        "train.json",
        "val.json",
        "test.json",
        "image",
        "annotation",
    }

    info = json.loads((root / "info.json").read_text())
    assert set(info) == {"emotion", "brightness", "colorfulness", "scene", "object"}
    assert info["emotion"]["label2idx"] == {e: i for i, e in enumerate(EMOTIONS)}
    assert info["emotion"]["idx2label"] == {str(i): e for i, e in enumerate(EMOTIONS)}
    assert set(info["scene"]["label2idx"]) == set(SCENES)
    assert set(info["object"]["label2idx"]) == set(OBJECTS)
    assert list(info["brightness"]["label2idx"]) == [f"{i / 10:.1f}" for i in range(11)]

    seen_ids = set()
    per_split = Counter()
    for split in SPLITS:
        rows = json.loads((root / f"{split}.json").read_text())
        for row in rows:
            assert len(row) == 4
            emotion, image_id, image_rel, ann_rel = row
            assert re.fullmatch(rf"{emotion}_\d{{5}}", image_id)
            assert image_rel == f"image/{emotion}/{image_id}.jpg"
            assert ann_rel == f"annotation/{emotion}/{image_id}.json"
            assert image_id not in seen_ids
            seen_ids.add(image_id)
            per_split[split] += 1

            ann = json.loads((root / ann_rel).read_text())
            assert set(ann) == {"emotion", "scene", "object", "brightness", "colorfulness"}
            assert ann["emotion"] == emotion
            assert ann["scene"] in SCENES and re.fullmatch(r"[a-z]+(_[a-z]+)*", ann["scene"])
            assert 1 <= len(ann["object"]) <= 3 and len(set(ann["object"])) == len(ann["object"])
            for name in ann["object"]:
                assert name in OBJECTS and re.fullmatch(r"[A-Z][a-z]*( [a-z]+)*", name)
            assert ann["brightness"] in BINS and ann["colorfulness"] in BINS
            assert str(ann["brightness"]) in info["brightness"]["label2idx"]

    # 400 images: 50 per emotion, split 37/5/8 per emotion (75/10/15 % rounded, stratified)
    assert per_split == {"train": 8 * 37, "val": 8 * 5, "test": 8 * 8}
    # no stray files: every image and annotation on disk is listed once
    assert len(list((root / "image").rglob("*.jpg"))) == len(seen_ids) == 400
    assert len(list((root / "annotation").rglob("*.json"))) == 400


def test_images_are_jpegs_whose_brightness_matches_the_annotation(synth_root):
    root = Path(synth_root)
    rows = json.loads((root / "test.json").read_text())[:40]
    for _, _, image_rel, ann_rel in rows:
        with Image.open(root / image_rel) as img:
            assert img.format == "JPEG" and img.size == (32, 32)
            hsv = np.asarray(img.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
        ann = json.loads((root / ann_rel).read_text())
        # measured on the drawn image before JPEG encoding: within one bin after compression
        assert abs(hsv[..., 2].mean() - ann["brightness"]) <= 0.1
        assert abs(hsv[..., 1].mean() - ann["colorfulness"]) <= 0.1


def test_deterministic_for_a_seed_and_independent_of_workers(tmp_path):
    a = generate_synthetic_set(tmp_path / "a", images=40, size=24, seed=3, workers=1, progress=False)
    b = generate_synthetic_set(tmp_path / "b", images=40, size=24, seed=3, workers=2, progress=False)
    c = generate_synthetic_set(tmp_path / "c", images=40, size=24, seed=4, workers=1, progress=False)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert files_a == files_b
    assert a["splits"] == b["splits"]
    # a new seed redraws the images, the annotations and the split assignment
    images_a = {k: v for k, v in files_a.items() if k.endswith(".jpg")}
    images_c = {k: v for k, v in files_c.items() if k.endswith(".jpg")}
    assert images_a.keys() == images_c.keys()
    assert sum(images_a[k] != images_c[k] for k in images_a) == len(images_a)
    assert c["totals"] == a["totals"]
    assert files_a["train.json"] != files_c["train.json"]
    # regenerating into the same folder gives the same bytes again
    generate_synthetic_set(tmp_path / "a", images=40, size=24, seed=3, workers=1, progress=False)
    assert _files(tmp_path / "a") == files_a


def test_emotions_balanced_with_deterministic_remainder(tmp_path):
    summary = generate_synthetic_set(tmp_path, images=19, size=16, seed=0, workers=1, progress=False)
    per_emotion = [sum(summary["splits"][s][e] for s in SPLITS) for e in EMOTIONS]
    assert per_emotion == [3, 3, 3, 2, 2, 2, 2, 2]
    assert sum(summary["totals"].values()) == 19
    counts = Counter(row[0] for s in SPLITS for row in json.loads((tmp_path / f"{s}.json").read_text()))
    assert [counts[e] for e in EMOTIONS] == per_emotion


def test_attributes_informative_but_overlapping(synth_root):
    anns = _annotations(Path(synth_root))
    by_scene: dict[str, Counter] = defaultdict(Counter)
    by_object: dict[str, Counter] = defaultdict(Counter)
    for ann in anns:
        by_scene[ann["scene"]][ann["emotion"]] += 1
        for name in ann["object"]:
            by_object[name][ann["emotion"]] += 1

    def top_shares(table: dict[str, Counter]) -> list[float]:
        return [max(c.values()) / sum(c.values()) for c in table.values() if sum(c.values()) >= 15]

    scene_shares, object_shares = top_shares(by_scene), top_shares(by_object)
    assert len(scene_shares) >= 10 and len(object_shares) >= 10
    # informative: several attributes clearly favour one emotion (chance is 1/8 = 0.125) ...
    assert sum(s > 0.4 for s in scene_shares) >= 3
    assert sum(s > 0.35 for s in object_shares) >= 3
    # ... unevenly: some are spread over many emotions ...
    assert min(scene_shares) < 0.3 and min(object_shares) < 0.3
    # ... and overlapping: no attribute belongs to a single emotion, most occur with at least 4 emotions
    assert max(scene_shares) < 0.95 and max(object_shares) < 0.95
    assert sum(len(c) >= 4 for c in by_scene.values()) >= 10
    # the palette carries emotion too: amusement images are brighter than fear images
    mean_b = {e: np.mean([a["brightness"] for a in anns if a["emotion"] == e]) for e in ("amusement", "fear")}
    assert mean_b["amusement"] > mean_b["fear"] + 0.2


@pytest.mark.parametrize(
    "kwargs", [{"images": 4}, {"size": 8}, {"seed": -1}], ids=["too-few-images", "too-small", "negative-seed"]
)
def test_bad_arguments_are_config_errors(tmp_path, kwargs):
    args = {"images": 16, "size": 16, "seed": 0, **kwargs}
    with pytest.raises(ConfigError):
        generate_synthetic_set(tmp_path, workers=1, progress=False, **args)


def test_hard_world_rates_and_phi_from_its_tables():
    """The hard world: colour alone is capped well below the Bayes rate (both from the generative tables), and
    P(emotion | attribute) has sharp, two-peaked and flat rows; the easy world is what it was."""
    from uniemo.data.synthetic import EASY, HARD, decision_rates, world_of

    hard, easy = decision_rates(HARD), decision_rates(EASY)
    assert hard["colour_only"] <= 0.65 and hard["bayes"] >= 0.90
    assert easy["colour_only"] > 0.9  # colour nearly decides the easy world
    assert hard["scene_and_objects"] < hard["bayes"]  # colour still tells the pair
    # Emotions share palettes in pairs.
    assert len(set(HARD.palettes.values())) == 4
    assert all(list(HARD.palettes.values()).count(p) == 2 for p in HARD.palettes.values())
    phi = HARD.p_scene.T / HARD.p_scene.T.sum(axis=1, keepdims=True)  # P(emotion | scene), uniform emotions
    peaks = sorted(phi.max(axis=1))
    assert peaks[-1] > 0.75 and peaks[0] < 0.2  # sharp rows and a flat one
    assert all(sorted(row)[-2] > 0.15 for row in phi if row.max() > 0.5)  # each sharp row has a second peak
    # Mirror pairs: the two emotions of a palette never share a scene that decides between them.
    for k, e in enumerate(EMOTIONS):
        mate = next(j for j, other in enumerate(EMOTIONS) if other != e and HARD.palettes[other] == HARD.palettes[e])
        assert HARD.p_scene[k].argmax() != HARD.p_scene[mate].argmax()
    with pytest.raises(ConfigError, match="easy, hard"):
        world_of("medium")


def test_hard_world_set_records_its_world(tmp_path):
    from uniemo.data.synthetic import HARD, WORLD_FILE, decision_rates

    summary = generate_synthetic_set(tmp_path / "hard", images=16, size=16, seed=0, progress=False, world="hard")
    assert summary["world"] == "hard"
    record = json.loads((tmp_path / "hard" / WORLD_FILE).read_text())
    assert record["world"] == "hard" and record["bayes"] == round(decision_rates(HARD)["bayes"], 4)
    easy = generate_synthetic_set(tmp_path / "easy", images=16, size=16, seed=0, progress=False)
    assert not (tmp_path / "easy" / WORLD_FILE).exists() and easy["world"] == "easy"
    # same images per emotion, other pictures: the world changes what is drawn
    assert _files(tmp_path / "hard" / "image") != _files(tmp_path / "easy" / "image")
