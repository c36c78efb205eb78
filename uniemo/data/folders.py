"""Image-folder reader: ``<root>/<emotion>/*.{jpg,jpeg,png}``, split train/val/test here.

The split is stratified per emotion and reproducible: each emotion's file names are sorted, shuffled with a
generator seeded by ``(seed, emotion)``, and cut by ``ratios``. Adding files to one emotion folder therefore
never moves the files of another. Records carry no scene or objects (a folder has no annotations).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from uniemo.config.schema import EMOTIONS
from uniemo.data.records import SPLITS, Record, RecordProblem, SkipLog, check_emotion
from uniemo.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""File name endings the folder reader takes (compared case-insensitively); other files are ignored."""

_EXPECTED = f"expected one sub-folder per emotion ({', '.join(EMOTIONS)}) holding .jpg/.jpeg/.png files"


def read_folder(
    root: str | Path,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    on_error: str = "skip",
    skiplog: SkipLog | None = None,
    *,
    source: str = "real",
) -> Iterator[Record]:
    """Yield a :class:`Record` per image under ``root/<emotion>/``, split by ``ratios`` (train, val, test).

    Folder names are matched to :data:`EMOTIONS` case-insensitively; hidden entries are ignored. Images in
    a folder that is not an emotion are ``unknown_emotion`` problems (one per image): skipped and counted in
    ``skiplog`` with ``on_error="skip"``, raised with ``"fail"``. Two files with the same stem in one folder
    (``a.jpg``, ``a.png``) would share the id ``<emotion>_a``: the second is a ``duplicate_id`` problem.
    A missing root or a root with no images raises :class:`DataError`. Records come out by split, then
    emotion, then file name.
    """
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    ratios = _check_ratios(ratios)
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"image folder {root} {what}; {_EXPECTED}")

    by_emotion: dict[str, list[Path]] = {}
    problems: list[RecordProblem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            (
                f
                for f in folder.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
            ),
            key=lambda f: f.name,
        )
        try:
            emotion = check_emotion(folder.name.lower(), str(folder))
        except RecordProblem as problem:
            problems.extend(RecordProblem(problem.reason, f"{f}: {problem}") for f in files)
            continue
        by_emotion.setdefault(emotion, []).extend(files)

    if not any(by_emotion.values()) and not problems:
        raise DataError(f"no images found under {root}; {_EXPECTED}")
    if problems and on_error == "fail":
        raise problems[0]
    if skiplog is not None:
        for problem in problems:
            skiplog.add(problem.reason, str(problem))
    return _iter_records(by_emotion, ratios, seed, on_error, skiplog, source)


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
    return values  # type: ignore[return-value]
