"""EmoSet-118K reader (METHOD.md §8.1).

Reads ``<root>/{train,val,test}.json`` in both entry forms that exist in the wild:

- the official release: ``[emotion, id, "image/<emo>/<id>.jpg", "annotation/<emo>/<id>.json"]``;
- UniEmo's loaders (and EmoSym's ``generate_train_json``): ``[emotion, "image/...", "annotation/..."]``,
  the id being the image file's stem.

Both forms yield identical records. Every record is validated here except the image's content, which the shard
writer checks per record (:func:`uniemo.data.images.load_image_bytes`) because it needs the bytes anyway.

Memory stays small for EmoSet-118K and beyond: the split files are parsed one entry at a time, never whole, and
ids are checked for repeats in a :class:`~uniemo.data.records.CompactStringSet` (about 11 bytes per id), so the
reader holds no per-record state beyond that (BENCHMARKS.md, EmoSet scale).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from uniemo.config.schema import EMOTIONS
from uniemo.data.records import SPLITS, CompactStringSet, Record, RecordProblem, SkipLog, check_emotion
from uniemo.errors import ConfigError, DataError

_EXPECTED = "expected an EmoSet folder with info.json, train.json/val.json/test.json, image/ and annotation/"


def read_emoset(
    root: str | Path,
    splits: Iterable[str] = SPLITS,
    on_error: str = "skip",
    skiplog: SkipLog | None = None,
    *,
    source: str = "real",
) -> Iterator[Record]:
    """Yield one :class:`Record` per valid entry of the EmoSet split files under ``root``.

    ``on_error="skip"`` drops an invalid entry and counts it in ``skiplog`` by reason (``bad_split_row``,
    ``unknown_emotion``, ``emotion_mismatch``, ``bad_annotation``, ``missing_image``, ``duplicate_id``);
    ``on_error="fail"`` raises the :class:`RecordProblem` at once. A missing root, a folder that is not
    EmoSet-like, a missing or unreadable split file, or an ``info.json`` whose emotion order differs from
    :data:`EMOTIONS` raise :class:`DataError` before any record is yielded. ``source`` is stored in every record.
    """
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    splits = tuple(splits)
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected some of {', '.join(SPLITS)}")
    root = Path(root)
    _check_root(root)
    for split in splits:  # every split file is read through once first: a broken one fails before any record
        for _ in _split_rows(root, split):
            pass
    return _iter_records(root, splits, on_error, skiplog, source)


def read_info(root: str | Path) -> dict[str, Any] | None:
    """Return the parsed ``info.json`` of an EmoSet folder (None when absent), checking its emotion order.

    Older EmoSet downloads hold only the emotion map; newer ones add brightness, colorfulness, scene, object,
    facial_expression and human_action maps, each ``{label2idx, idx2label}``.
    """
    path = Path(root) / "info.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: not valid JSON ({_one_line(e)}); restore the file from the EmoSet release"
        ) from None
    if not isinstance(info, dict):
        raise DataError(
            f"{path}: expected a JSON object of label maps; restore the file from the EmoSet release"
        )
    emo = info.get("emotion")
    if emo is not None:
        label2idx = emo.get("label2idx") if isinstance(emo, dict) else None
        expected = {name: i for i, name in enumerate(EMOTIONS)}
        if not isinstance(label2idx, dict) or {k: _as_int(v) for k, v in label2idx.items()} != expected:
            raise DataError(
                f"{path}: emotion label2idx {label2idx!r} differs from the EmoSet order "
                f"{', '.join(EMOTIONS)}; uniemo needs that order (METHOD.md D1), fix info.json"
            )
    return info


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"EmoSet root {root} does not exist; {_EXPECTED}")
    if not root.is_dir():
        raise DataError(f"EmoSet root {root} is not a folder; {_EXPECTED}")
    markers = ["info.json"] + [f"{s}.json" for s in SPLITS]
    if not any((root / m).is_file() for m in markers):
        raise DataError(f"{root} is not an EmoSet folder (no info.json or split files); {_EXPECTED}")
    read_info(root)


def _split_rows(root: Path, split: str) -> Iterator[Any]:
    """The entries of ``<root>/<split>.json``, parsed one at a time (the module docstring's memory bound)."""
    path = root / f"{split}.json"
    if not path.is_file():
        raise DataError(
            f"split file {path} is missing; add it (a JSON list of [emotion, id, image, annotation] entries) "
            f"or read only the splits that exist"
        )
    try:
        yield from _json_list_items(path)
    except (UnicodeDecodeError, json.JSONDecodeError, _NotAList):
        _explain_bad_split_file(path)
        raise
    except OSError as e:
        raise DataError(f"{path}: not valid JSON ({_one_line(e)}); restore the split file") from None


class _NotAList(ValueError):
    pass


_CHUNK = 1 << 20


def _json_list_items(path: Path) -> Iterator[Any]:
    """The items of the JSON list in ``path``, decoded one by one from a buffer of about a megabyte.

    The buffer keeps at least :data:`_CHUNK` characters past the item being decoded until the end of the file,
    so a value is never cut at a chunk boundary (an item longer than that is decoded once more data is in)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> None:
            nonlocal buf, pos, eof
            more = f.read(_CHUNK)
            eof = not more
            buf, pos = buf[pos:] + more, 0

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        fill()
        skip_space()
        if pos >= len(buf) or buf[pos] != "[":
            raise _NotAList
        pos += 1
        skip_space()
        if pos < len(buf) and buf[pos] == "]":
            pos += 1
        else:
            while True:
                if not eof and len(buf) - pos < _CHUNK:
                    fill()
                try:
                    item, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        raise
                    fill()
                    continue
                yield item
                skip_space()
                if pos < len(buf) and buf[pos] == ",":
                    pos += 1
                    skip_space()
                    continue
                if pos < len(buf) and buf[pos] == "]":
                    pos += 1
                    break
                raise json.JSONDecodeError("Expecting ',' delimiter", buf, pos)
        skip_space()
        if pos < len(buf):
            raise json.JSONDecodeError("Extra data", buf, pos)


def _explain_bad_split_file(path: Path) -> None:
    """A split file that is not a JSON list: the :class:`DataError` of the whole file's parse (its message
    names the position in the file, or the type of what the file holds). Reads the whole file: only on error."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({_one_line(e)}); restore the split file") from None
    if not isinstance(rows, list):
        raise DataError(
            f"{path}: expected a JSON list of entries, got {type(rows).__name__}; restore the split file"
        )


def _iter_records(
    root: Path,
    splits: tuple[str, ...],
    on_error: str,
    skiplog: SkipLog | None,
    source: str,
) -> Iterator[Record]:
    seen = CompactStringSet()  # ids so far, each tagged with its split's index in SPLITS
    for split in splits:
        split_file = root / f"{split}.json"
        for i, row in enumerate(_split_rows(root, split)):
            try:
                record = _parse_row(root, split, split_file, i, row, source)
                first = seen.add(record.id, SPLITS.index(split))
                if first is not None:
                    raise RecordProblem(
                        "duplicate_id",
                        f"{split_file} entry {i}: id {record.id!r} already used by an entry of {SPLITS[first]}.json",
                    )
            except RecordProblem as problem:
                if on_error == "fail":
                    raise
                if skiplog is not None:
                    skiplog.add(problem.reason, str(problem))
                continue
            yield record


def _parse_row(root: Path, split: str, split_file: Path, i: int, row: Any, source: str) -> Record:
    where = f"{split_file} entry {i}"
    if not isinstance(row, list) or len(row) not in (3, 4) or not all(isinstance(x, str) and x for x in row):
        raise RecordProblem(
            "bad_split_row",
            f"{where}: expected [emotion, id, image, annotation] or [emotion, image, annotation] strings, "
            f"got {_short(row)}",
        )
    if len(row) == 4:
        emotion, record_id, image_rel, ann_rel = row
    else:
        emotion, image_rel, ann_rel = row
        record_id = Path(image_rel).stem  # UniEmo's 3-item form: the id is the file name (METHOD.md §8.1)
    check_emotion(emotion, where)

    ann_path = root / ann_rel
    ann = _read_annotation(ann_path, where)
    ann_emotion = ann.get("emotion")
    if ann_emotion != emotion:
        raise RecordProblem(
            "emotion_mismatch", f"{where}: split says {emotion!r} but {ann_path} says {ann_emotion!r}"
        )
    scene, objects, brightness, colorfulness = _annotation_fields(ann, ann_path)

    image_path = root / image_rel
    if not image_path.is_file():
        raise RecordProblem("missing_image", f"{where}: image file {image_path} not found")
    return Record(
        id=record_id,
        split=split,
        emotion=emotion,
        image_path=image_path,
        scene=scene,
        objects=objects,
        brightness=brightness,
        colorfulness=colorfulness,
        source=source,
    )


def _read_annotation(path: Path, where: str) -> dict[str, Any]:
    try:
        ann = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordProblem("bad_annotation", f"{where}: annotation file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordProblem(
            "bad_annotation", f"{where}: annotation {path} is not valid JSON ({_one_line(e)})"
        ) from None
    if not isinstance(ann, dict):
        raise RecordProblem("bad_annotation", f"{where}: annotation {path} is not a JSON object")
    return ann


def _annotation_fields(
    ann: dict[str, Any], path: Path
) -> tuple[str | None, list[str], float | None, float | None]:
    """Scene, object list, brightness and colorfulness of one annotation; all optional in EmoSet."""
    scene = ann.get("scene")
    if scene is not None and not isinstance(scene, str):
        raise RecordProblem("bad_annotation", f"{path}: 'scene' must be a string, got {_short(scene)}")
    objects = ann.get("object", [])
    if objects is None:
        objects = []
    if isinstance(objects, str):
        objects = [objects]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise RecordProblem(
            "bad_annotation", f"{path}: 'object' must be a list of strings, got {_short(objects)}"
        )
    values = []
    for key in ("brightness", "colorfulness"):
        v = ann.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RecordProblem("bad_annotation", f"{path}: {key!r} must be a number, got {_short(v)}")
        values.append(None if v is None else float(v))
    return scene or None, list(objects), values[0], values[1]


def _as_int(v: Any) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        return v


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
