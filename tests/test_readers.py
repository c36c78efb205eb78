"""EmoSet reader, image-folder reader and image loading, on real files written into tmp_path."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from uniemo.config.schema import EMOTIONS
from uniemo.data.emoset import read_emoset
from uniemo.data.folders import read_folder, split_counts
from uniemo.data.images import load_image_bytes
from uniemo.data.records import SPLITS, RecordProblem, SkipLog
from uniemo.data.synthetic import generate_synthetic_set
from uniemo.errors import ConfigError, DataError


@pytest.fixture
def emoset(tmp_path) -> Path:
    """A tiny writable EmoSet folder (24 images of 16 px, official 4-item splits)."""
    root = tmp_path / "emoset"
    generate_synthetic_set(root, images=24, size=16, seed=1, workers=1, progress=False)
    return root


def _rows(root: Path, split: str) -> list:
    return json.loads((root / f"{split}.json").read_text())


def _write_rows(root: Path, split: str, rows: list) -> None:
    (root / f"{split}.json").write_text(json.dumps(rows))


# --- EmoSet ------------------------------------------------------------------------------------------------


def test_reads_synthetic_set_completely(synth_root):
    log = SkipLog()
    records = list(read_emoset(synth_root, skiplog=log))
    assert log.total == 0
    assert len(records) == 400
    assert Counter(r.split for r in records) == {"train": 296, "val": 40, "test": 64}
    assert Counter(r.emotion for r in records) == {e: 50 for e in EMOTIONS}
    r = records[0]
    ann = json.loads((Path(synth_root) / "annotation" / r.emotion / f"{r.id}.json").read_text())
    assert (r.scene, r.objects, r.brightness, r.colorfulness) == (
        ann["scene"],
        ann["object"],
        ann["brightness"],
        ann["colorfulness"],
    )
    assert r.image_path == Path(synth_root) / "image" / r.emotion / f"{r.id}.jpg"
    assert r.label == EMOTIONS.index(r.emotion) and r.source == "real"
    assert [r.split for r in read_emoset(synth_root, splits=("val",))] == ["val"] * 40


def test_four_and_three_item_splits_give_identical_records(emoset):
    four = list(read_emoset(emoset, on_error="fail"))
    # UniEmo's form (METHOD.md §8.1): [emotion, image, annotation], the id taken from the file name
    for split in SPLITS:
        _write_rows(emoset, split, [[e, img, ann] for e, _, img, ann in _rows(emoset, split)])
    three = list(read_emoset(emoset, on_error="fail"))
    assert len(four) == 24
    assert three == four


def test_older_info_json_with_only_the_emotion_map_is_accepted(emoset):
    info = json.loads((emoset / "info.json").read_text())
    (emoset / "info.json").write_text(json.dumps({"emotion": info["emotion"]}))
    assert len(list(read_emoset(emoset))) == 24


def _append(split: str, row: list):
    def mutate(root: Path) -> None:
        _write_rows(root, split, _rows(root, split) + [row])

    return mutate


def _first_train(root: Path) -> list:
    return _rows(root, "train")[0]


def _set_annotation(root: Path, text: str) -> None:
    (root / _first_train(root)[3]).write_text(text)


# case -> (reason, mutation, a part of the path the message must name, records lost (-1) or a row added (0))
PROBLEMS = {
    "bad_split_row": ("bad_split_row", _append("train", ["amusement", 7]), "train.json", 0),
    "bad_split_row_length": (
        "bad_split_row",
        _append("val", ["amusement", "a", "b", "c", "d"]),
        "val.json",
        0,
    ),
    "unknown_emotion": (
        "unknown_emotion",
        _append("test", ["joy", "joy_00001", "image/joy/joy_00001.jpg", "annotation/joy/joy_00001.json"]),
        "test.json",
        0,
    ),
    "emotion_mismatch": (
        "emotion_mismatch",
        lambda root: _set_annotation(root, json.dumps({"emotion": "awe", "scene": "brick_wall"})),
        "annotation/amusement/amusement_",
        -1,
    ),
    "bad_annotation_missing": (
        "bad_annotation",
        lambda root: (root / _first_train(root)[3]).unlink(),
        "annotation/amusement/amusement_",
        -1,
    ),
    "bad_annotation_json": (
        "bad_annotation",
        lambda root: _set_annotation(root, "{not json"),
        "annotation/amusement/amusement_",
        -1,
    ),
    "bad_annotation_object": (
        "bad_annotation",
        lambda root: _set_annotation(root, json.dumps({"emotion": "amusement", "object": 3})),
        "annotation/amusement/amusement_",
        -1,
    ),
    "missing_image": (
        "missing_image",
        lambda root: (root / _first_train(root)[2]).unlink(),
        "image/amusement/amusement_",
        -1,
    ),
    "duplicate_id": ("duplicate_id", lambda root: _append("test", _first_train(root))(root), "test.json", 0),
}


@pytest.mark.parametrize("case", sorted(PROBLEMS))
def test_record_problems_skip_and_count(emoset, case):
    reason, mutate, path_part, lost = PROBLEMS[case]
    mutate(emoset)
    log = SkipLog()
    records = list(read_emoset(emoset, on_error="skip", skiplog=log))
    assert len(records) == 24 + lost
    assert log.counts == {reason: 1}
    assert path_part in log.examples[reason][0]
    # without a skip log the problem is still skipped
    assert len(list(read_emoset(emoset))) == 24 + lost


@pytest.mark.parametrize("case", sorted(PROBLEMS))
def test_record_problems_fail(emoset, case):
    reason, mutate, path_part, _ = PROBLEMS[case]
    mutate(emoset)
    with pytest.raises(RecordProblem) as info:
        list(read_emoset(emoset, on_error="fail"))
    assert info.value.reason == reason
    assert path_part in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_or_foreign_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_emoset(tmp_path / "nowhere")
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "cat.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="not an EmoSet folder"):
        read_emoset(tmp_path / "cats")


def test_missing_split_file_names_it(emoset):
    (emoset / "val.json").unlink()
    with pytest.raises(DataError, match="val.json is missing"):
        read_emoset(emoset)
    records = list(read_emoset(emoset, splits=("train", "test")))
    assert len(records) == len(_rows(emoset, "train")) + len(_rows(emoset, "test")) == 16
    assert {r.split for r in records} == {"train", "test"}


def test_malformed_split_file_is_a_data_error(emoset):
    (emoset / "train.json").write_text('{"amusement": []}')
    with pytest.raises(DataError, match="train.json: expected a JSON list"):
        read_emoset(emoset)
    (emoset / "train.json").write_text("[[")
    with pytest.raises(DataError, match="train.json: not valid JSON"):
        read_emoset(emoset)


def test_info_json_with_another_emotion_order_is_rejected(emoset):
    info = json.loads((emoset / "info.json").read_text())
    swapped = list(EMOTIONS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    info["emotion"]["label2idx"] = {e: i for i, e in enumerate(swapped)}
    (emoset / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"info\.json: emotion label2idx"):
        read_emoset(emoset)


def test_bad_on_error_value(emoset):
    with pytest.raises(ConfigError):
        read_emoset(emoset, on_error="ignore")


# --- image folders -----------------------------------------------------------------------------------------


def _save(path: Path, fmt: str, color=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "folders"
    sizes = {"amusement": 20, "Awe": 10, "fear": 7}
    for emotion, n in sizes.items():
        for i in range(n):
            ext, fmt = [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".png", "PNG")][i % 3]
            _save(root / emotion / f"img{i:03d}{ext}", fmt)
        (root / emotion / "notes.txt").write_text("not an image")
    return root


def _split_map(records) -> dict[str, str]:
    return {r.id: r.split for r in records}


def test_folder_split_is_deterministic_stratified_disjoint_and_complete(folder):
    records = list(read_folder(folder, ratios=(0.6, 0.2, 0.2), seed=0, on_error="fail"))
    assert _split_map(records) == _split_map(read_folder(folder, ratios=(0.6, 0.2, 0.2), seed=0))
    assert len(records) == len({r.id for r in records}) == 37  # disjoint: each file in one split only
    on_disk = {p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    assert {r.image_path for r in records} == on_disk  # complete
    for emotion, n in {"amusement": 20, "awe": 10, "fear": 7}.items():
        got = Counter(r.split for r in records if r.emotion == emotion)
        assert tuple(got.get(s, 0) for s in SPLITS) == split_counts(n, (0.6, 0.2, 0.2))
    r = next(r for r in records if r.image_path == folder / "amusement" / "img001.JPEG")
    assert r.id == "amusement_img001" and r.scene is None and r.objects == []
    assert [r.split for r in records] == sorted((r.split for r in records), key=SPLITS.index)
    other_seed = _split_map(read_folder(folder, ratios=(0.6, 0.2, 0.2), seed=1))
    assert other_seed != _split_map(records) and set(other_seed) == set(_split_map(records))


def test_folder_unknown_emotion_skip_and_fail(folder):
    _save(folder / "joy" / "a.jpg", "JPEG")
    _save(folder / "joy" / "b.png", "PNG")
    log = SkipLog()
    assert len(list(read_folder(folder, skiplog=log))) == 37
    assert log.counts == {"unknown_emotion": 2}
    assert "joy" in log.examples["unknown_emotion"][0]
    with pytest.raises(RecordProblem, match="joy") as info:
        list(read_folder(folder, on_error="fail"))
    assert info.value.reason == "unknown_emotion"


def test_folder_duplicate_stem_is_a_problem(folder):
    _save(folder / "fear" / "img000.png", "PNG")  # img000.jpg exists already
    log = SkipLog()
    assert len(list(read_folder(folder, skiplog=log))) == 37
    assert log.counts == {"duplicate_id": 1}
    assert "img000.png" in log.examples["duplicate_id"][0]
    with pytest.raises(RecordProblem, match="img000") as info:
        list(read_folder(folder, on_error="fail"))
    assert info.value.reason == "duplicate_id"


def test_folder_errors(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        read_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "amusement").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        read_folder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="summing to 1"):
        read_folder(folder, ratios=(0.5, 0.1, 0.1))


# --- image bytes -------------------------------------------------------------------------------------------


def test_jpeg_and_png_bytes_are_kept(tmp_path):
    _save(tmp_path / "a.jpg", "JPEG")
    _save(tmp_path / "b.png", "PNG")
    _save(tmp_path / "c.jpg", "PNG")  # the content decides the extension, not the file name
    assert load_image_bytes(tmp_path / "a.jpg") == ((tmp_path / "a.jpg").read_bytes(), "jpg")
    assert load_image_bytes(tmp_path / "b.png") == ((tmp_path / "b.png").read_bytes(), "png")
    assert load_image_bytes(tmp_path / "c.jpg")[1] == "png"


@pytest.mark.parametrize("fmt", ["WEBP", "BMP"])
def test_other_formats_are_reencoded_to_png(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (9, 7), (10, 200, 30)).save(
        path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    data, ext = load_image_bytes(path)
    assert ext == "png"
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.size == (9, 7)
        assert img.convert("RGB").getpixel((4, 3)) == (10, 200, 30)


def test_broken_images_raise_record_problems(tmp_path):
    _save(tmp_path / "full.jpg", "JPEG")
    big = tmp_path / "big.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(big, format="JPEG", quality=95)
    (tmp_path / "truncated.jpg").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    cases = {
        "truncated.jpg": "undecodable_image",
        "zero.jpg": "empty_image",
        "text.jpg": "undecodable_image",
        "missing.jpg": "missing_image",
    }
    for name, reason in cases.items():
        with pytest.raises(RecordProblem) as info:
            load_image_bytes(tmp_path / name)
        assert info.value.reason == reason
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


# --- memory-bounded reading (EmoSet scale) ------------------------------------------------------------------


def test_split_files_are_parsed_one_entry_at_a_time_across_chunk_boundaries(tmp_path, monkeypatch):
    from uniemo.data import emoset

    rows = [[EMOTIONS[i % 8], f"id_{i}", f"image/{i}.jpg", {"nested": [i, "x" * (i % 7)]}] for i in range(200)]
    monkeypatch.setattr(emoset, "_CHUNK", 37)  # every entry crosses a chunk boundary somewhere
    for text in (json.dumps(rows), json.dumps(rows, indent=2), "\n  " + json.dumps(rows) + "\n\n", "[]", " [ ] "):
        path = tmp_path / "split.json"
        path.write_text(text)
        assert list(emoset._json_list_items(path)) == json.loads(text)
    for bad in ('[[1, 2], [3', '[1 2]', '[1, 2] 3', '{"a": 1}', '', '[1,]'):
        path.write_text(bad)
        with pytest.raises((json.JSONDecodeError, ValueError)):
            list(emoset._json_list_items(path))


def test_compact_string_set_finds_repeats_with_their_tag():
    from uniemo.data.records import CompactStringSet

    seen = CompactStringSet()
    names = [f"amusement_{i:05d}" for i in range(5000)]  # several times its first capacity: it grows
    assert all(seen.add(name, i % 3) is None for i, name in enumerate(names))
    assert len(seen) == 5000
    assert [seen.add(name, 3) for name in names[::997]] == [i % 3 for i in range(0, 5000, 997)]
    assert seen.add("not seen yet") is None and len(seen) == 5001


def test_structural_check_accepts_whole_jpeg_and_png_and_nothing_broken_or_over_the_cap(tmp_path):
    """The shard writer's check without decoding (uniemo/data/images.py): whole files pass; a truncated file, a
    flipped byte in a PNG chunk, a JPEG without its end marker, and an image over the pixel cap do not (they go
    through the full decode, which names the reason)."""
    from uniemo.data.images import load_image_bytes, whole_jpeg_or_png
    from uniemo.data.records import RecordProblem

    files = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format=fmt)
        files[fmt] = buf.getvalue()
    jpg, png = files["JPEG"], files["PNG"]
    assert whole_jpeg_or_png(jpg, 10_000) == "jpg" and whole_jpeg_or_png(png, 10_000) == "png"
    flipped = bytearray(png)
    flipped[40] ^= 0xFF  # inside IDAT: its CRC no longer matches
    broken = [jpg[: len(jpg) // 2], png[: len(png) // 2], jpg[:-2], bytes(flipped), b"GIF89a" + jpg[6:]]
    assert [whole_jpeg_or_png(b, 10_000) for b in broken] == [None] * len(broken)
    assert whole_jpeg_or_png(jpg, 40 * 30 - 1) is None and whole_jpeg_or_png(png, 40 * 30 - 1) is None

    (tmp_path / "a.png").write_bytes(png)
    assert load_image_bytes(tmp_path / "a.png", decode=False) == (png, "png")
    with pytest.raises(RecordProblem) as info:
        load_image_bytes(tmp_path / "a.png", 40 * 30 - 1, decode=False)
    assert info.value.reason == "image_too_large"
    (tmp_path / "b.jpg").write_bytes(jpg[: len(jpg) // 2])
    with pytest.raises(RecordProblem) as info:
        load_image_bytes(tmp_path / "b.jpg", decode=False)
    assert info.value.reason == "undecodable_image"
