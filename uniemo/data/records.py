"""The record every reader yields and the shard writer consumes.

A record is one labelled image before sharding. Readers (EmoSet, image folders, the synthetic set) produce
records; :mod:`uniemo.data.shards` turns them into WebDataset samples (see ``data/FORMAT.md``).
"""

from __future__ import annotations

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
