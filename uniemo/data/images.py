"""Image files as people have them: reading one for a shard, and turning any decoded image into 8-bit RGB.

JPEG and PNG files are stored as read from disk (``data/FORMAT.md``: no re-encoding), so a shard holds exactly
the source bytes. Other formats PIL can read (WebP, AVIF, BMP, GIF, TIFF, ...) are stored as the PNG of
:func:`to_rgb` of their (first) frame, because the training loader only promises to decode ``jpg`` and ``png``
members.

The shard writer checks JPEG and PNG files by their structure instead of decoding their pixels
(:func:`load_image_bytes` with ``decode=False``): decoding a 128 px JPEG took 0.25 ms of CPU, more than a bare
tar-writing loop's whole work per image (0.15-0.18 ms; BENCHMARKS.md, EmoSet scale), against 0.02 ms for the
structural check, and decoding grows with the pixels. PIL's decoding
rejects truncated files and broken markers but lets almost every corruption inside the compressed data pass
(libjpeg only warns), and the structural check rejects the same truncated files: a JPEG must hold its frame
header, a scan and the end-of-image marker after the scan; a PNG its chunks, whole and with matching CRCs, from
``IHDR`` to ``IEND``. A file that fails it goes through the full decode, which gives PIL's own reason (or accepts
it). An image that passes the check and still does not decode is skipped and counted by the loader
(``undecodable_image``), like any sample that breaks after sharding.

:func:`to_rgb` is what every reader of real images applies after decoding (the training loader's transforms,
the judge, the report, ``uniemo classify``), so a photo looks the same everywhere:

- the EXIF orientation is applied (a phone's portrait photo is stored sideways with an orientation tag);
- 16-bit and 32-bit integer images (PIL modes ``I;16``, ``I``) are scaled to 8 bits (``v * 255 / 65535``), not
  clipped; float images (``F``) in [0, 1] are scaled by 255, others clipped to [0, 255];
- transparent images (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparency colour) are
  composited on :data:`BACKGROUND`, white;
- every other mode (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...) is converted by PIL.

Images from outside are opened with :func:`open_image`, which refuses one of more than ``data.limits.
max_image_pixels`` from its header, before any pixel is decoded (a small PNG can decode to gigabytes). The same cap
is PIL's own ``Image.MAX_IMAGE_PIXELS`` in every uniemo process, so other readers fail at twice it at the latest.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from uniemo.config.schema import LimitsConfig
from uniemo.data.records import RecordProblem

Image.MAX_IMAGE_PIXELS = LimitsConfig().max_image_pixels  # PIL's own cap (warns above it, fails at twice it)

BACKGROUND = (255, 255, 255)
"""The colour transparent pixels are composited on (white)."""

_ORIENTATION_TAG = 0x0112  # EXIF Orientation; 1 = as stored, 2-8 = flipped and/or rotated
_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# PIL format names whose files are stored unchanged, with the WebDataset extension they get. MPO is the
# multi-picture JPEG some cameras write; its first frame is a plain JPEG stream that every decoder reads.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


class TooManyPixels(ValueError):
    """An image over ``data.limits.max_image_pixels``; its message names the size and the cap."""


def image_member(sample: dict) -> str | None:
    """The extension of a shard sample's image member, ``jpg`` or ``png`` (data/FORMAT.md); None without one."""
    return "jpg" if "jpg" in sample else "png" if "png" in sample else None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` of bytes from outside, refusing (:class:`TooManyPixels`) an image of more than ``max_pixels``
    pixels before its pixels are decoded. Other failures are PIL's (``UnidentifiedImageError``, ...)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # over twice the cap: PIL refuses before telling the size
        raise TooManyPixels(f"over twice data.limits.max_image_pixels = {max_pixels:,} pixels") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise TooManyPixels(
            f"{width}x{height} = {width * height:,} pixels, over data.limits.max_image_pixels = {max_pixels:,}"
        )
    return image


def load_image_bytes(
    path: str | Path, max_pixels: int = LimitsConfig().max_image_pixels, *, decode: bool = True
) -> tuple[bytes, str]:
    """Read an image file and return ``(bytes, ext)`` with ``ext`` in ``{"jpg", "png"}``.

    The file must decode completely (a truncated JPEG fails) and convert to RGB (:func:`to_rgb`). JPEG/PNG bytes
    come back unchanged; any other format PIL reads comes back as the PNG of :func:`to_rgb` of its first frame.
    With ``decode=False`` a JPEG or PNG whose structure is whole (and within ``max_pixels``) is accepted without
    decoding its pixels (module docstring; the shard writer's check).
    Raises :class:`RecordProblem` with reason ``missing_image``, ``empty_image``, ``image_too_large`` (over
    ``max_pixels``) or ``undecodable_image`` and a one-line message naming the path.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordProblem("missing_image", f"{path}: image file not found") from None
    except IsADirectoryError:
        raise RecordProblem("missing_image", f"{path}: expected an image file, found a folder") from None
    except OSError as e:
        raise RecordProblem("missing_image", f"{path}: cannot read image file ({_one_line(e)})") from None
    if not data:
        raise RecordProblem("empty_image", f"{path}: image file is empty (0 bytes)")
    if not decode:
        ext = whole_jpeg_or_png(data, max_pixels)
        if ext is not None:
            return data, ext

    try:
        with open_image(data, max_pixels) as img:
            fmt = img.format or ""
            img.load()  # decodes every byte: truncated or corrupt data raises here
            rgb = to_rgb(img)  # what training will see: a mode PIL cannot convert fails here, not there
            if fmt in _KEPT_FORMATS:
                return data, _KEPT_FORMATS[fmt]
            return _encode_png(rgb), "png"
    except TooManyPixels as e:
        raise RecordProblem("image_too_large", f"{path}: image is {e}; resize it") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        Image.DecompressionBombError,
    ) as e:
        reason = "not an image PIL can identify" if isinstance(e, UnidentifiedImageError) else _one_line(e)
        raise RecordProblem("undecodable_image", f"{path}: image does not decode ({reason})") from None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type: bit depths


def whole_jpeg_or_png(data: bytes, max_pixels: int) -> str | None:
    """``"jpg"`` or ``"png"`` when ``data`` is a JPEG or PNG file whose structure is whole (module docstring),
    else None (another format, or a damaged file). Reads the markers or chunks only, never the pixels."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg" if _whole_jpeg(data, max_pixels) else None
    if data[:8] == _PNG_SIGNATURE:
        return "png" if _whole_png(data, max_pixels) else None
    return None


def _whole_jpeg(data: bytes, max_pixels: int) -> bool:
    """Frame header (sane size and components), then a scan, then the end-of-image marker after it."""
    pos, size, frame = 2, len(data), False
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return False
        while pos < size and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 3 > size:
            return False
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > size:
            return False
        if marker in _SOF_MARKERS:
            if length < 8:
                return False
            height, width, components = struct.unpack_from(">HHB", data, pos + 3)
            frame = _decodable_size(width, height, max_pixels) and components in (1, 3, 4)
            if not frame:
                return False
        elif marker == 0xDA:  # start of scan: compressed data follows, up to the end-of-image marker
            return frame and data.rfind(b"\xff\xd9", pos + length) >= 0
        elif marker == 0xD9:
            return False  # the image ends before any scan
        pos += length
    return False


def _decodable_size(width: int, height: int, max_pixels: int) -> bool:
    """Not empty, and within ``data.limits.max_image_pixels`` (a larger image goes through the full path, which
    refuses it as ``image_too_large``)."""
    return width > 0 and height > 0 and width * height <= max_pixels


def _whole_png(data: bytes, max_pixels: int) -> bool:
    """Chunks from ``IHDR`` (a valid size, colour type and bit depth) to ``IEND``, each whole with its CRC."""
    pos, size, first = 8, len(data), True
    while pos + 12 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > size:
            return False
        body = data[pos + 4 : end - 4]
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(body) != crc:
            return False
        if first:
            if kind != b"IHDR" or length != 13:
                return False
            width, height, depth, colour = struct.unpack_from(">IIBB", data, pos + 8)
            if not _decodable_size(width, height, max_pixels) or depth not in _PNG_MODES.get(colour, ()):
                return False
            first = False
        elif kind == b"IEND":
            return True
        pos = end
    return False


def read_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path`` through :func:`to_rgb`: how every reader of an image file decodes it (the
    evaluation's generated images, the report's pictures)."""
    with Image.open(path) as image:
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as the 8-bit RGB picture a person sees (module docstring): a new, loaded image, so it outlives
    ``image`` (e.g. one opened in a ``with`` block).

    Raises:
        ValueError: a mode PIL cannot convert to RGB.
    """
    source = image
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image.copy() if image is source else image
    if image.mode in _INTEGER_MODES or image.mode == "F":
        image = _to_8_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: the pixels are still fine, show them as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_8_bit(image: Image.Image) -> Image.Image:
    """An ``I``/``I;16*`` (16-bit range) or ``F`` image as mode ``L``, scaled rather than clipped."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    pixels = np.clip(np.nan_to_num(values * scale) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)  # uint8 [H,W]: mode L


def _encode_png(img: Image.Image) -> bytes:
    """Lossless PNG encoding of an image."""
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
