"""Image files as people have them (uniemo.data.images, uniemo.data.folders): each on files the test writes."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from _photos import IGNORED, rotated_jpeg, sixteen_bit_png, write_photo_folder  # tests/_photos.py
from PIL import Image

from uniemo.data.folders import IMAGE_SUFFIXES, describe_ignored, read_folder
from uniemo.data.images import BACKGROUND, load_image_bytes, to_rgb
from uniemo.data.records import SkipLog
from uniemo.data.transforms import SampleTransform
from uniemo.errors import DataError


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _halves(width: int = 60, height: int = 40) -> np.ndarray:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return pixels


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "portrait.jpg"
    path.write_bytes(rotated_jpeg(_halves(), orientation=6))  # stored 60 x 40, shown rotated 90 degrees clockwise
    data, ext = load_image_bytes(path)
    assert ext == "jpg" and data == path.read_bytes()  # the shard keeps the file's bytes, tag included
    upright = np.asarray(to_rgb(_open(data)))
    assert upright.shape == (60, 40, 3)  # portrait
    top, bottom = upright[5, 20].astype(int), upright[55, 20].astype(int)
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # What training sees: the loader's transform applies it too (a 32 x 32 centre crop of the upright picture).
    tensor = SampleTransform(image_size=32, normalization="symmetric")(_open(data), random.Random(0))["image"]
    assert tensor[0, 2, 16] > 0.5 and tensor[2, 2, 16] < -0.5  # red at the top
    assert tensor[2, 29, 16] > 0.5 and tensor[0, 29, 16] < -0.5  # blue at the bottom


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.tile(np.linspace(0, 65535, 64), (8, 1))
    path = tmp_path / "deep.png"
    path.write_bytes(sixteen_bit_png(values))
    data, ext = load_image_bytes(path)
    assert ext == "png" and _open(data).mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(_open(data))).astype(int)
    expected = np.round(values / 257.0).astype(int)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 32, 0] == pytest.approx(130, abs=2)  # mid-grey, not white
    # 32-bit integer ("I") and float ("F") images too
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 65535, np.int32))))[0, 0, 0] == 255
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32))))[0, 0, 0] == 128


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 30, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 0)  # transparent red: background
    rgba[:, 10:20] = (0, 0, 0, 128)  # half-transparent black: grey
    rgba[:, 20:] = (0, 0, 255, 255)  # opaque blue
    path = tmp_path / "logo.png"
    path.write_bytes(_encode(Image.fromarray(rgba), "PNG"))
    rgb = np.asarray(to_rgb(_open(load_image_bytes(path)[0]))).astype(int)
    assert BACKGROUND == (255, 255, 255)
    assert tuple(rgb[5, 5]) == BACKGROUND
    assert np.abs(rgb[5, 15] - 127).max() <= 2
    assert tuple(rgb[5, 25]) == (0, 0, 255)
    # grey + alpha, and a palette image with a transparent index
    la = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)]), mode="LA")
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == BACKGROUND
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 3
    assert tuple(np.asarray(to_rgb(_open(_encode(palette, "PNG"))))[0, 0]) == BACKGROUND


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("name, fmt", [("a.WEBP", "WEBP"), ("b.bmp", "BMP"), ("c.TIFF", "TIFF"), ("d.gif", "GIF")])
def test_other_formats_are_stored_as_rgb_png(tmp_path, name, fmt):
    pixels = _halves(24, 16)
    frames = [Image.fromarray(pixels), Image.fromarray(255 - pixels)]
    path = tmp_path / name
    kwargs = {"save_all": True, "append_images": frames[1:]} if fmt == "GIF" else {}
    path.write_bytes(_encode(frames[0], fmt, **({"lossless": True} if fmt == "WEBP" else {}), **kwargs))
    data, ext = load_image_bytes(path)
    image = _open(data)
    assert ext == "png" and image.format == "PNG" and image.mode == "RGB" and image.size == (24, 16)
    left, right = np.asarray(image)[8, 4].astype(int), np.asarray(image)[8, 20].astype(int)
    assert left[0] > 200 and left[2] < 60 and right[2] > 200 and right[0] < 60  # the first frame, colours kept


def test_image_extensions_match_in_any_case():
    for suffix in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"):
        assert suffix in IMAGE_SUFFIXES


def test_folder_reader_takes_every_image_and_counts_what_it_ignores(tmp_path):
    n = write_photo_folder(tmp_path, per_emotion=3)
    ignored = SkipLog()
    records = list(read_folder(tmp_path, ignored=ignored))
    assert len(records) == n == 24
    assert {r.image_path.suffix for r in records} >= {".JPG", ".PNG", ".webp", ".bmp", ".tif", ".gif", ".jpeg"}
    assert dict(ignored.counts) == {reason: len(names) for reason, names in IGNORED.items()}
    for reason, names in IGNORED.items():
        assert sorted(ignored.examples[reason]) == sorted(names)
    line = describe_ignored(ignored.as_dict())
    assert line.startswith("ignored 8 files: system or hidden: 4 (")
    assert "image format PIL does not read, convert to JPEG or PNG: 1 (excitement/IMG_2001.HEIC)" in line
    assert "; not an image: 1 (contentment/notes.txt)" in line and "\n" not in line


def test_folder_of_only_ignored_files_names_them(tmp_path):
    (tmp_path / "awe").mkdir()
    for name in ("awe/.DS_Store", "awe/notes.txt", "awe/IMG_0001.HEIC"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(DataError, match=r"no images found under \S+ \(ignored 3 files: .*awe/IMG_0001\.HEIC"):
        read_folder(tmp_path)


def test_data_shards_reports_ignored_files(tmp_path, capsys):
    from uniemo.cli import main

    root = tmp_path / "my_images"
    write_photo_folder(root, per_emotion=3)
    out = tmp_path / "shards"
    assert main(["data", "shards", "--source", "folder", "--root", str(root), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("skipped 0")
    assert printed[1].startswith(f"{root}: ignored 8 files: system or hidden: 4 (.DS_Store, ")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ignored"]["total"] == 8 and manifest["skipped"]["total"] == 0
    assert sum(t["samples"] for t in manifest["totals"].values()) == 24
    assert main(["data", "inspect", str(out)]) == 0
    assert "ignored files (not images): 8" in capsys.readouterr().out


def test_to_rgb_outlives_the_file_it_was_read_from(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(_halves(8, 4)).save(path)
    with Image.open(path) as image:
        rgb = to_rgb(image)
    assert rgb is not image and np.asarray(rgb)[0, 0].tolist() == [255, 0, 0]
