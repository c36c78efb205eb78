"""Reading one image file for a shard: check that it decodes, keep its bytes.

JPEG and PNG files are stored as read from disk (``data/FORMAT.md``: no re-encoding), so a shard holds exactly
the source pixels. Other formats PIL can read (WebP, BMP, GIF, TIFF, ...) are re-encoded to PNG, losslessly,
because the training loader only promises to decode ``jpg`` and ``png`` members.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from uniemo.data.records import RecordProblem

# PIL format names whose files are stored unchanged, with the WebDataset extension they get. MPO is the
# multi-picture JPEG some cameras write; its first frame is a plain JPEG stream that every decoder reads.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


def load_image_bytes(path: str | Path) -> tuple[bytes, str]:
    """Read an image file and return ``(bytes, ext)`` with ``ext`` in ``{"jpg", "png"}``.

    The file must decode completely (a truncated JPEG fails). JPEG/PNG bytes come back unchanged; any other
    format PIL reads is re-encoded to PNG. Raises :class:`RecordProblem` with reason ``missing_image``,
    ``empty_image`` or ``undecodable_image`` and a one-line message naming the path.
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

    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not a decoding failure; only the error form is.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                img.load()  # decodes every byte: truncated or corrupt data raises here
                if fmt in _KEPT_FORMATS:
                    return data, _KEPT_FORMATS[fmt]
                return _encode_png(img), "png"
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


def _encode_png(img: Image.Image) -> bytes:
    """Lossless PNG encoding of the (first frame of the) image, in a mode PNG can hold."""
    if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
