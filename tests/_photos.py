"""A folder of image files as people have them, written by the tests: ``<root>/<emotion>/<files>``.

Every kind of file a newcomer's ``my_images/`` holds: RGB and grayscale JPEGs (upper- and lower-case extensions),
a JPEG stored sideways with an EXIF orientation tag, RGBA and palette PNGs with transparency, 16-bit PNGs, WebP,
BMP, TIFF and an animated GIF, in non-square sizes; plus what must be ignored: ``.DS_Store``, ``Thumbs.db``, an
AppleDouble ``._`` file, a text file, a HEIC file, a sub-folder and a file beside the emotion folders. Each
emotion's pictures lean towards their own colour, so a model can learn something from them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from uniemo.config.schema import EMOTIONS

ORIENTATION = 0x0112


def _picture(rng: np.random.Generator, k: int, width: int, height: int) -> np.ndarray:
    """uint8 [H,W,3]: the emotion's colour, a gradient and noise."""
    hue = np.array([(k * 97) % 256, (k * 53 + 80) % 256, (k * 181 + 40) % 256], dtype=np.float64)
    ramp = np.linspace(0.6, 1.0, width)[None, :, None]
    noise = rng.normal(0, 18, size=(height, width, 3))
    return np.clip(hue * ramp + noise, 0, 255).astype(np.uint8)


def rotated_jpeg(pixels: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG of ``pixels`` as stored, with an EXIF orientation tag (6: the viewer rotates it 90 degrees
    clockwise, as phones store portrait photos)."""
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[ORIENTATION] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def sixteen_bit_png(values: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG (PIL mode ``I;16``) of uint16 ``values``."""
    out = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(out, format="PNG")
    return out.getvalue()


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _kinds() -> list[tuple[str, Callable[[np.ndarray], bytes]]]:
    """(file suffix, encoder of an RGB uint8 array) for each kind of image file, in the order they are used."""

    def rgba(p: np.ndarray) -> bytes:
        alpha = np.full(p.shape[:2], 255, np.uint8)
        alpha[:, : p.shape[1] // 3] = 0  # a transparent band
        return _save(Image.fromarray(np.dstack([p, alpha])), "PNG")

    def palette(p: np.ndarray) -> bytes:
        image = Image.fromarray(p).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        return _save(image, "PNG", transparency=0)

    def deep(p: np.ndarray) -> bytes:
        return sixteen_bit_png(p.mean(axis=2) * 257.0)

    def gif(p: np.ndarray) -> bytes:
        frames = [Image.fromarray(p).convert("P"), Image.fromarray(255 - p).convert("P")]
        return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)

    return [
        (".JPG", lambda p: _save(Image.fromarray(p), "JPEG", quality=90)),
        (".jpeg", lambda p: _save(Image.fromarray(p).convert("L"), "JPEG", quality=90)),
        (".png", rgba),
        (".png", deep),
        (".webp", lambda p: _save(Image.fromarray(p), "WEBP", quality=90)),
        (".jpg", lambda p: rotated_jpeg(np.ascontiguousarray(p.transpose(1, 0, 2)))),
        (".PNG", palette),
        (".bmp", lambda p: _save(Image.fromarray(p), "BMP")),
        (".tif", lambda p: _save(Image.fromarray(p), "TIFF")),
        (".gif", gif),
    ]


IGNORED = {
    "system_file": [".DS_Store", "amusement/Thumbs.db", "awe/._IMG_0001.JPG", "awe/.DS_Store"],
    "not_an_image": ["contentment/notes.txt"],
    "unsupported_format": ["excitement/IMG_2001.HEIC"],
    "subfolder": ["fear/edits/"],
    "outside_emotion_folder": ["README.txt"],
}
"""What :func:`write_photo_folder` adds that the reader must ignore, by reason (paths relative to the root)."""


def write_photo_folder(root: Path, per_emotion: int = 4, seed: int = 0, size: tuple[int, int] = (40, 120)) -> int:
    """Write ``per_emotion`` images of mixed kinds into each emotion folder under ``root`` (sides drawn in
    ``size``, non-square) plus the :data:`IGNORED` entries; returns the number of images."""
    rng = np.random.default_rng(seed)
    kinds = _kinds()
    n = 0
    for k, emotion in enumerate(EMOTIONS):
        folder = root / emotion
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_emotion):
            suffix, encode = kinds[(k * per_emotion + i) % len(kinds)]
            width, height = (int(v) for v in rng.integers(size[0], size[1], size=2))
            if width == height:
                width += 7
            (folder / f"IMG_{k}{i:03d}{suffix}").write_bytes(encode(_picture(rng, k, width, height)))
            n += 1
    for names in IGNORED.values():
        for name in names:
            path = root / name
            if name.endswith("/"):
                path.mkdir(parents=True, exist_ok=True)
                (path / "edited.jpg").write_bytes(_save(Image.fromarray(_picture(rng, 0, 50, 40)), "JPEG"))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\x00\x05\x16\x07 not a picture\n")
    return n
