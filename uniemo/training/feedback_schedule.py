"""When the feedback loop does what, in trainer steps: the pinned async schedule, and the record of the rounds the
trainers read (which the round reports and ``pipeline.json`` carry). No Ray and no torch here: the trainer, the
driver and the retention all read it.

**Pinned async mode** (``feedback.mode=async``, ``feedback.pinned=true``). With P = ``feedback.steps_per_round``
and d = ``feedback.pinned_delay`` (default P // 2):

- round r generates from the feedback run's checkpoint at step ``g(r) = r x P`` (round 0 from the start run's
  checkpoint, which holds the feedback run's weights at step 0); the trainers save a checkpoint at every g(r) and
  keep it until round r is published;
- its shards enter the trainers' mix after step ``e(r) = r x P + d``: at that step the trainers wait until round r
  is published, then start a new epoch whose listing holds the rounds <= r (never a round listed early because
  the pool was fast).

So what the trainers read at every step, and from which weights each round was generated, depends on the step
only: two runs of one config and seed train the same. The pool still runs beside the trainers: round r has the d
steps from g(r) to e(r) (and round 0 the steps before e(0)) to be made before anyone waits.

**The mix record** ``rounds/mix.jsonl`` (:data:`uniemo.run_layout.MIX_FILE`, written by rank 0 of the trainers in
both modes): one line each time the round folders of rank 0's listing change, ``{"step": s, "epoch": e,
"rounds": [r, ...], "waited_s": w, "time": t}``. ``s`` is the optimizer steps done when the listing was made: the
rounds are first trained on in step s + 1. A resumed run drops the lines at and after its checkpoint's step.
:func:`entered_steps` reads from it when each round entered the mix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from uniemo.config.schema import FeedbackConfig
from uniemo.data.shards import MANIFEST_FILE
from uniemo.run_layout import MIX_FILE, round_dir, round_of, round_report_path

SYNTHETIC_SOURCE = "synthetic"
"""The name of the feedback run's synthetic source in the trainers' mix (``data/samples/synthetic``)."""

__all__ = [
    "SYNTHETIC_SOURCE",
    "append_mix",
    "entered_steps",
    "listed_rounds",
    "generation_step",
    "generation_steps",
    "pickup_step",
    "read_mix",
    "round_published",
    "rounds_due",
]


def generation_step(fb: FeedbackConfig, r: int) -> int:
    """g(r): the feedback run's step whose checkpoint round r generates from (pinned; 0: the start checkpoint)."""
    return r * fb.steps_per_round


def pickup_step(fb: FeedbackConfig, r: int) -> int:
    """e(r): the step after which round r's shards enter the trainers' mix (pinned)."""
    return r * fb.steps_per_round + fb.delay


def rounds_due(fb: FeedbackConfig, step: int) -> int:
    """The newest round whose shards are in the mix once ``step`` steps are done (pinned); -1: none yet."""
    due = -1
    for r in range(fb.rounds):
        if pickup_step(fb, r) <= step:
            due = r
    return due


def generation_steps(fb: FeedbackConfig) -> list[int]:
    """The steps of the checkpoints the pinned pool reads (rounds 1 and later; round 0 reads the start run's)."""
    return [generation_step(fb, r) for r in range(1, fb.rounds)]


def round_published(run_dir: str | Path, r: int) -> bool:
    """Whether round ``r`` was published: its report is written after its folder appeared, and stays when
    retention deletes the folder."""
    return round_report_path(run_dir, r).is_file() or (round_dir(run_dir, r) / MANIFEST_FILE).is_file()


# -- the mix record ---------------------------------------------------------------------------------------------
def listed_rounds(listed: dict[str, list[str]], source: str = SYNTHETIC_SOURCE) -> list[int]:
    """The round indices among the folder names a loader listed for ``source`` (``ShardLoader.listed``)."""
    return sorted(r for name in listed.get(source, []) if (r := round_of(name)) is not None)


def append_mix(run_dir: str | Path, step: int, epoch: int, rounds: list[int], waited_s: float = 0.0) -> None:
    """Add a line to ``rounds/mix.jsonl`` (rank 0 of the trainers)."""
    path = Path(run_dir) / MIX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"step": step, "epoch": epoch, "rounds": rounds, "waited_s": round(waited_s, 3),
            "time": round(time.time(), 3)}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def read_mix(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``rounds/mix.jsonl`` (none: ``[]``; a line cut by a crash is skipped)."""
    path = Path(run_dir) / MIX_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("rounds"), list):
            lines.append(line)
    return lines


def entered_steps(run_dir: str | Path) -> dict[int, int]:
    """Per round, the step after which it first was in the trainers' mix (:func:`read_mix`)."""
    entered: dict[int, int] = {}
    for line in read_mix(run_dir):
        for r in line["rounds"]:
            entered.setdefault(int(r), int(line["step"]))
    return entered
