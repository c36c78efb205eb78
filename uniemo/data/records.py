"""The record every reader yields and the shard writer consumes.

A record is one labelled image before sharding. Readers (EmoSet, image folders, the synthetic set) produce
records; :mod:`uniemo.data.shards` turns them into WebDataset samples (see ``data/FORMAT.md``).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from uniemo.config.schema import EMOTIONS
from uniemo.errors import DataError

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
EMOTION_INDEX = {name: i for i, name in enumerate(EMOTIONS)}


@dataclass
class Record:
    """One labelled image on disk."""

    id: str
    """Original id, unique within a dataset (EmoSet: ``amusement_00001``)."""
    split: str
    """``train``, ``val`` or ``test``."""
    emotion: str
    """One of :data:`uniemo.config.schema.EMOTIONS`."""
    image_path: Path
    scene: str | None = None
    """Scene name (EmoSet: lowercase with underscores), None when absent."""
    objects: list[str] = field(default_factory=list)
    """Object names (EmoSet: capitalised with spaces), possibly empty."""
    brightness: float | None = None
    colorfulness: float | None = None
    source: str = "real"

    @property
    def label(self) -> int:
        return EMOTION_INDEX[self.emotion]


@dataclass
class SkipLog:
    """Counts of records skipped by reason, with a few examples each (``--on-error skip``)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


class RecordProblem(DataError):
    """A record failed validation. ``reason`` is a short stable tag used for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_emotion(name: str, where: str) -> str:
    if name not in EMOTION_INDEX:
        raise RecordProblem(
            "unknown_emotion",
            f"{where}: unknown emotion {name!r}; expected one of {', '.join(EMOTIONS)}",
        )
    return name


_KEY_MASK = (1 << 61) - 1


class CompactStringSet:
    """A set of strings for hundreds of thousands of records: each kept as a 61-bit hash with a 2-bit tag in an
    open-addressing table, about 11 bytes per string (a Python ``set`` or ``dict`` of the strings costs about
    100). Readers and the shard writer use it to find repeated ids and keys without holding every record.

    Two different strings whose hashes agree (a chance of about ``n**2 / 2**62``: 3e-9 for 118K strings) count
    as one. Python's ``hash`` differs between processes, so a set is only meaningful in the process that built
    it (never pickle one)."""

    def __init__(self) -> None:
        self._slots = array("Q", bytes(8 * 1024))
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, text: str, tag: int = 0) -> int | None:
        """Add ``text`` with ``tag`` (0-3) and return None; when it is there already, change nothing and return
        the tag it was added with."""
        key = hash(text) & _KEY_MASK
        entry = (1 << 63) | (key << 2) | (tag & 3)  # the top bit marks a used slot (an empty one holds 0)
        slots = self._slots
        size = len(slots)
        i = key % size
        while True:
            found = slots[i]
            if found == 0:
                break
            if found >> 2 == entry >> 2:
                return found & 3
            i = i + 1 if i + 1 < size else 0
        slots[i] = entry
        self._count += 1
        if self._count * 4 > size * 3:
            self._grow()
        return None

    def _grow(self) -> None:
        old = self._slots
        slots = self._slots = array("Q", bytes(8 * (len(old) * 3 // 2 + 1)))
        size = len(slots)
        for entry in old:
            if entry:
                i = ((entry >> 2) & _KEY_MASK) % size
                while slots[i]:
                    i = i + 1 if i + 1 < size else 0
                slots[i] = entry
