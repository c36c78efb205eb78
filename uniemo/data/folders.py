"""Image-folder reader: ``<root>/<emotion>/<image files>``, split train/val/test here.

The split is stratified per emotion and reproducible: each emotion's file names are sorted, shuffled with a
generator seeded by ``(seed, emotion)``, and cut by ``ratios``. Adding files to one emotion folder therefore
never moves the files of another. Records carry no scene or objects (a folder has no annotations).

Image files are recognised by their extension, in any case (:data:`IMAGE_SUFFIXES`: JPEG, PNG, WebP, AVIF, GIF,
BMP, TIFF, ...; those this PIL build cannot decode are left out of it). Everything else is ignored and counted
by reason (:data:`IGNORED_REASONS`), with the first few names, so that ``uniemo data shards`` can say what it
left out: system files (``.DS_Store``, ``Thumbs.db``, hidden files), files that are not images, image formats
PIL does not read (HEIC, camera RAW, SVG, ...), folders inside an emotion folder and files beside the emotion
folders.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from uniemo.config.schema import EMOTIONS
from uniemo.data.records import SPLITS, Record, RecordProblem, SkipLog, check_emotion
from uniemo.errors import ConfigError, DataError

_COMMON_IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".mpo", ".pbm", ".pgm", ".ppm", ".pnm", ".tga", ".qoi",
)
IMAGE_SUFFIXES = tuple(s for s in _COMMON_IMAGE_SUFFIXES if s in Image.registered_extensions())
"""File name endings the folder reader takes (compared case-insensitively): the common image formats that this
PIL build decodes. Other files are ignored and counted."""

_UNSUPPORTED_IMAGE_SUFFIXES = frozenset({
    ".heic", ".heif", ".svg", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".psd",
    ".xcf", ".jxl", *(s for s in _COMMON_IMAGE_SUFFIXES if s not in IMAGE_SUFFIXES),
})
_SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})

IGNORED_REASONS = {
    "system_file": "system or hidden",
    "not_an_image": "not an image",
    "unsupported_format": "image format PIL does not read, convert to JPEG or PNG",
    "subfolder": "folder inside an emotion folder, not read",
    "outside_emotion_folder": "beside the emotion folders",
}
"""Reason tag of an ignored entry -> what it means, for the message of ``uniemo data shards``."""

_EXPECTED = (
    f"expected one sub-folder per emotion ({', '.join(EMOTIONS)}) holding image files "
    "(.jpg, .png, .webp, .bmp, .tif, .gif, ...)"
)


def read_folder(
    root: str | Path,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    on_error: str = "skip",
    skiplog: SkipLog | None = None,
    *,
    source: str = "real",
    ignored: SkipLog | None = None,
) -> Iterator[Record]:
    """Yield a :class:`Record` per image under ``root/<emotion>/``, split by ``ratios`` (train, val, test).

    Folder names are matched to :data:`EMOTIONS` case-insensitively. Images in a folder that is not an emotion
    are ``unknown_emotion`` problems (one per image): skipped and counted in ``skiplog`` with
    ``on_error="skip"``, raised with ``"fail"``. Two files with the same stem in one folder (``a.jpg``,
    ``a.png``) would share the id ``<emotion>_a``: the second is a ``duplicate_id`` problem. Entries that are not
    images (module docstring) are counted in ``ignored`` by reason, with paths relative to ``root``. A missing
    root or a root with no images raises :class:`DataError` (naming what was ignored). Records come out by
    split, then emotion, then file name.
    """
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    ratios = _check_ratios(ratios)
    ignored = SkipLog() if ignored is None else ignored
    by_emotion, problems = list_emotion_folders(root, ignored)
    if problems and on_error == "fail":
        raise problems[0]
    if skiplog is not None:
        for found in problems:
            skiplog.add(found.reason, str(found))
    return _iter_records(by_emotion, ratios, seed, on_error, skiplog, source)


def list_emotion_folders(root: str | Path, ignored: SkipLog) -> tuple[dict[str, list[Path]], list[RecordProblem]]:
    """The image files of each emotion folder under ``root`` (sorted by name) and one ``unknown_emotion`` problem
    per image in a folder that is not an emotion; the rest is counted in ``ignored`` (module docstring).

    Raises:
        DataError: ``root`` is missing, or holds no image at all (naming what was ignored).
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"image folder {root} {what}; {_EXPECTED}")
    by_emotion: dict[str, list[Path]] = {}
    problems: list[RecordProblem] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if _is_system(entry):
            ignored.add("system_file", _relative(entry, root))
            continue
        if not entry.is_dir():
            ignored.add("outside_emotion_folder", _relative(entry, root))
            continue
        files = _image_files(entry, root, ignored)
        try:
            emotion = check_emotion(entry.name.lower(), str(entry))
        except RecordProblem as problem:
            problems.extend(RecordProblem(problem.reason, f"{f}: {problem}") for f in files)
            continue
        by_emotion.setdefault(emotion, []).extend(files)
    if not any(by_emotion.values()) and not problems:
        left_out = f" ({describe_ignored(ignored.as_dict())})" if ignored.total else ""
        raise DataError(f"no images found under {root}{left_out}; {_EXPECTED}")
    return by_emotion, problems


def describe_ignored(ignored: dict, examples: int = 3) -> str:
    """One line about the ignored entries of a :meth:`SkipLog.as_dict`: ``ignored 3 files: system or hidden: 2
    (.DS_Store, awe/Thumbs.db); not an image: 1 (awe/notes.txt)``; empty when nothing was ignored."""
    total = int(ignored.get("total", 0))
    if not total:
        return ""
    parts = []
    for reason, count in sorted(ignored.get("by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])):
        names = list(ignored.get("examples", {}).get(reason, []))[:examples]
        more = ", ..." if count > len(names) else ""
        parts.append(f"{IGNORED_REASONS.get(reason, reason)}: {count} ({', '.join(names)}{more})")
    return f"ignored {total} file{'' if total == 1 else 's'}: " + "; ".join(parts)


def _is_system(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES


def _relative(path: Path, root: Path) -> str:
    text = path.relative_to(root).as_posix()
    return text + "/" if path.is_dir() else text


def _image_files(folder: Path, root: Path, ignored: SkipLog) -> list[Path]:
    """The image files of one emotion folder, sorted by name; the rest is counted in ``ignored``."""
    images = []
    for f in sorted(folder.iterdir(), key=lambda f: f.name):
        suffix = f.suffix.lower()
        if _is_system(f):
            ignored.add("system_file", _relative(f, root))
        elif f.is_dir():
            ignored.add("subfolder", _relative(f, root))
        elif suffix in IMAGE_SUFFIXES:
            images.append(f)
        elif suffix in _UNSUPPORTED_IMAGE_SUFFIXES:
            ignored.add("unsupported_format", _relative(f, root))
        else:
            ignored.add("not_an_image", _relative(f, root))
    return images


def split_counts(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """Train/val/test sizes for ``n`` items: val and test rounded half up, train takes the rest.

    A split with a positive ratio gets at least one item once ``n >= 3``, so tiny sets still evaluate; train
    keeps at least one item whenever its ratio is positive.
    """
    n_val = int(n * ratios[1] + 0.5)
    n_test = int(n * ratios[2] + 0.5)
    if n >= 3:
        n_val = max(n_val, 1 if ratios[1] > 0 else 0)
        n_test = max(n_test, 1 if ratios[2] > 0 else 0)
    keep_train = 1 if ratios[0] > 0 and n > 0 else 0
    n_val = min(n_val, n - keep_train)
    n_test = min(n_test, n - keep_train - n_val)
    return n - n_val - n_test, n_val, n_test


def _iter_records(
    by_emotion: dict[str, list[Path]],
    ratios: tuple[float, float, float],
    seed: int,
    on_error: str,
    skiplog: SkipLog | None,
    source: str,
) -> Iterator[Record]:
    assigned: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for emotion in EMOTIONS:
        files = by_emotion.get(emotion, [])
        order = list(range(len(files)))
        random.Random(f"uniemo-folder-split:{seed}:{emotion}").shuffle(order)
        n_train, n_val, _ = split_counts(len(files), ratios)
        split_of = {}
        for rank, j in enumerate(order):
            split_of[j] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        seen: dict[str, Path] = {}
        for j, f in enumerate(files):  # files are sorted by name: records come out in name order
            record_id = f"{emotion}_{f.stem}"
            if record_id in seen:
                problem = RecordProblem(
                    "duplicate_id",
                    f"{f}: id {record_id!r} already used by {seen[record_id].name}; rename one",
                )
                if on_error == "fail":
                    raise problem
                if skiplog is not None:
                    skiplog.add(problem.reason, str(problem))
                continue
            seen[record_id] = f
            assigned[split_of[j]].append(
                Record(id=record_id, split=split_of[j], emotion=emotion, image_path=f, source=source)
            )
    for split in SPLITS:
        yield from assigned[split]


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(r) for r in ratios)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(r < 0 for r in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(
            f"split ratios must be three non-negative numbers (train, val, test) summing to 1, got {ratios!r}"
        )
    return values[0], values[1], values[2]
