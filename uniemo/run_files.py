"""The run files one module writes and another reads, typed: the writer builds and the reader indexes the same
``TypedDict`` (so mypy checks both sides), and each file carries a ``version``.

| file (:mod:`uniemo.run_layout`) | type              | writer                             | readers                          |
|---------------------------------|-------------------|------------------------------------|----------------------------------|
| ``rounds/round-R.json``         | :class:`RoundReport` | :mod:`uniemo.feedback.rounds`   | feedback loop, evaluation, report |
| ``metrics.json``                | :class:`Evaluation`  | :mod:`uniemo.evaluation.evaluate` | pipeline, report, science checks |
| ``pipeline.json``               | :class:`PipelineState` | :mod:`uniemo.pipeline`         | pipeline (resume), report        |
| ``report/report.json``          | :class:`ReportState` | :mod:`uniemo.evaluation.report` | the report (may replace its folder) |

A reader goes through :func:`read_versioned`: a file of another version is one :class:`RunFileError` line that
says what to re-run. Round reports of older versions (1: no ``version`` key; 2) still read:
:func:`upgrade_round_report` derives the fields added since from the ones they have, or marks them unknown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict, cast

from uniemo.data.attributes import write_json_atomic
from uniemo.errors import UserError
from uniemo.feedback.filtering import REJECTIONS
from uniemo.run_layout import PIPELINE_FILE, ROUNDS_DIR

ROUND_REPORT_VERSION = 3
"""2: ``version``, and per emotion ``passed`` (survivors of each filter step) and ``kept_share``. 3: what depends
on the async loop's timing, ``generated_from_step`` and ``entered_step``; and ``retired`` (retention)."""
EVALUATION_VERSION = 1
PIPELINE_VERSION = 2
"""2: the feedback stage's ``result`` has ``rounds`` (:class:`RoundTiming` per round) and ``pinned``."""
REPORT_STATE_VERSION = 1


class RunFileError(UserError):
    """A run file of a version this uniemo does not read (one line: which file, what to re-run)."""


# -- rounds/round-R.json ----------------------------------------------------------------------------------------
class EmotionFunnel(TypedDict):
    """One emotion's way through a round's filter (METHOD §5), or the round's totals."""

    candidates: int
    """Generated (asked for): scored + lost in flight."""
    scored: int
    passed: dict[str, int]
    """Survivors after each filter step, in the filter's order (``uniemo.feedback.filtering.REJECTIONS``): the
    last one equals ``kept``."""
    rejections: dict[str, int]
    """Rejected at each filter step."""
    lost_in_flight: int
    kept: int
    kept_share: float | None
    """kept / candidates (None without candidates)."""
    mean_p_k: float | None


class EmotionRound(EmotionFunnel):
    mean_p_k_candidates: float | None
    mean_s: float | None
    attribute_spread: dict[str, Any]


class Retirement(TypedDict):
    """A round whose shards retention deleted (:mod:`uniemo.feedback.retention`)."""

    at: str
    bytes: int


class _ControlPart(TypedDict, total=False):
    control: dict[str, Any]
    """Only in a control run's round (``uniemo.feedback.controls``): what it did, from which round, labels written."""


class RoundReport(_ControlPart):
    version: int
    round: int
    checkpoint: str
    generated_from_step: int | None
    """The feedback run's step of the checkpoint the round generated from (0: the start run's checkpoint, the
    feedback run's weights before any step); None: unknown (a report of version < 3)."""
    entered_step: int | None
    """The trainer step after which the round's shards were first in the mix (first trained on in the next
    step; rank 0's listing, ``rounds/mix.jsonl``); None: never (yet), or unknown."""
    retired: Retirement | None
    """Set when retention deleted the round's shards (the report stays)."""
    filter: dict[str, Any]
    generation: dict[str, Any]
    emotions: dict[str, EmotionRound]
    totals: EmotionFunnel
    shards: list[str]
    samples: int
    pool: dict[str, Any]
    seconds: dict[str, float]


def passed_after_each_step(scored: int, rejections: dict[str, int], steps: tuple[str, ...]) -> dict[str, int]:
    """Survivors after each filter step: ``scored`` minus the rejections of that step and the ones before it."""
    passed, left = {}, scored
    for step in steps:
        left -= int(rejections.get(step, 0))
        passed[step] = left
    return passed


def kept_share(kept: int, candidates: int) -> float | None:
    return kept / candidates if candidates else None


def upgrade_round_report(report: dict[str, Any], steps: tuple[str, ...] = REJECTIONS) -> RoundReport:
    """A round report of an older version as the current one. Version 1 (written before ``version`` existed):
    ``passed`` and ``kept_share`` are derived from ``scored``, ``rejections``, ``kept`` and ``candidates``, which
    it has. Versions 1 and 2: the timing fields of version 3 are unknown (None), and the round not retired."""
    if report.get("version") == ROUND_REPORT_VERSION:
        return report  # type: ignore[return-value]
    if report.get("version", 1) == 1:
        for row in [*report.get("emotions", {}).values(), report.get("totals", {})]:
            row["passed"] = passed_after_each_step(int(row["scored"]), row["rejections"], steps)
            row["kept_share"] = kept_share(int(row["kept"]), int(row["candidates"]))
    for key in ("generated_from_step", "entered_step", "retired"):
        report.setdefault(key, None)
    report["version"] = ROUND_REPORT_VERSION
    return report  # type: ignore[return-value]


def read_round_reports(run_dir: str | Path) -> list[RoundReport]:
    """The round reports ``<run>/rounds/round-*.json`` of a feedback run, in round order (none: ``[]``).

    Raises:
        RunFileError: a report is unreadable or of a version this uniemo does not read.
    """
    reports = []
    for path in Path(run_dir, ROUNDS_DIR).glob("round-*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # the pool writes them atomically: this is damage
            raise RunFileError(f"cannot read the round report {path} ({exc}); remove its round and resume") from None
        if data.get("version", 1) not in range(1, ROUND_REPORT_VERSION + 1):
            raise RunFileError(
                f"{path} is a round report of version {data.get('version')!r}; this uniemo reads versions 1 to "
                f"{ROUND_REPORT_VERSION}"
            )
        reports.append(upgrade_round_report(data))
    return sorted(reports, key=lambda r: r["round"])


# -- metrics.json ---------------------------------------------------------------------------------------------
class RoundFunnel(TypedDict):
    """A round in ``metrics.json``'s ``feedback_rounds`` (from its round report)."""

    round: int
    checkpoint: str
    funnel: dict[str, int]
    """candidates, scored, passed_fidelity, passed_duplicates, kept."""
    rejections: dict[str, int]
    lost_in_flight: int
    mean_p_k: float | None
    per_emotion: dict[str, EmotionFunnel]
    filter: dict[str, Any]


class Understanding(TypedDict):
    model: str
    split: str
    top1: float
    per_emotion: dict[str, float | None]
    counts: dict[str, int]
    samples: int
    loss: float | None
    confusion: list[list[int]]
    confusion_axes: str


class Evaluation(TypedDict):
    version: int
    run: dict[str, Any]
    """dir, name, id, stage, step, checkpoint."""
    evaluated_at: str
    evaluation: dict[str, Any]
    emotions: list[str]
    understanding: Understanding
    generation: dict[str, Any] | None
    """Stage 2: ``emo_a`` (``top1``, ``judge``, ...), ``fid`` (``pooled``, ``extractor``, ...), ``diversity``
    (``mean_pairwise_distance``, ``sem_d``, ``extractor``), ``images_per_emotion``, sampler settings, and
    ``paper``: EmoGen's protocol (``metrics``: ``fid``, ``emo_a``, ``lpips``, ``sem_c``, ``sem_d`` as
    ``uniemo metrics`` writes them; ``left_out``; ``generated``; ``real``; ``settings``; ``seconds``)."""
    judge: dict[str, Any]
    feedback_rounds: list[RoundFunnel]
    left_out: list[str]
    notes: list[str]


# -- pipeline.json ----------------------------------------------------------------------------------------------
class StageState(TypedDict, total=False):
    status: str
    """pending, running, done or failed."""
    started: str
    finished: str
    seconds: float
    result: dict[str, Any]
    """What the stage produced (README, "The whole loop"); the feedback stage's also holds ``pinned`` and
    ``rounds``, a :class:`RoundTiming` per round."""
    error: str


class RoundTiming(TypedDict):
    """What of a feedback round depends on the async loop's timing (``pipeline.json``: the feedback stage's
    ``result.rounds``; also in the round report and ``rounds/loop.json``)."""

    round: int
    checkpoint: str
    generated_from_step: int | None
    entered_step: int | None


class PipelineState(TypedDict, total=False):
    version: int
    order: list[str]
    """The stages this invocation runs, in order."""
    stages: dict[str, StageState]
    seconds: float
    """The whole invocation's time."""


def new_pipeline_state() -> PipelineState:
    """The record of a pipeline that has not run a stage yet."""
    return {"version": PIPELINE_VERSION, "order": [], "stages": {}}


def read_pipeline_state(root: str | Path) -> PipelineState | None:
    """``<root>/pipeline.json`` (None: there is none). A record written before versions existed reads as
    version 1 (it has the same fields, and an absolute ``root`` no reader uses).

    Raises:
        RunFileError: the file is unreadable or of another version (one line: move it away to start again).
    """
    path = Path(root) / PIPELINE_FILE
    if not path.is_file():
        return None
    redo = "move it away to start the pipeline again"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFileError(f"cannot read the pipeline record {path} ({exc}); {redo}") from None
    if isinstance(data, dict) and data.get("version", 1) == 1:
        data["version"] = PIPELINE_VERSION  # version 1 has the same fields; the feedback stage's rounds are new
    if not isinstance(data, dict) or data.get("version") != PIPELINE_VERSION:
        return cast(PipelineState, read_versioned(path, PIPELINE_VERSION, "a pipeline record", redo))  # raises
    data.setdefault("stages", {})
    return cast(PipelineState, data)


def write_pipeline_state(root: str | Path, state: PipelineState) -> None:
    """Write ``<root>/pipeline.json`` atomically (paths in it are relative to ``root``: :mod:`uniemo.pipeline`)."""
    state["version"] = PIPELINE_VERSION
    write_json_atomic(Path(root) / PIPELINE_FILE, state)


# -- report/report.json ---------------------------------------------------------------------------------------
class ReportState(TypedDict):
    version: int
    format: str
    target: str
    """The folder reported on; this and the run paths below are relative to it (``.`` for itself)."""
    pipeline: bool
    runs: dict[str, str]
    evaluated: str | None
    sections: dict[str, str]
    """Each section's state: ``ok`` or why it is not available."""
    validation_by_round: list[dict[str, Any]]
    summary: list[str]
    notes: list[str]


def read_versioned(path: str | Path, version: int, what: str, redo: str) -> dict[str, Any]:
    """The JSON object of ``path`` when its ``version`` is ``version``.

    Raises:
        RunFileError: the file is unreadable, not an object, or of another version: one line naming the file,
            ``what`` it is and ``redo`` (the command that writes it again).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFileError(f"cannot read {what} {path} ({exc}); {redo}") from None
    if not isinstance(data, dict) or data.get("version") != version:
        found = data.get("version") if isinstance(data, dict) else None
        raise RunFileError(
            f"{path} is {what} of version {found!r}, this uniemo reads version {version} (it was written by another "
            f"uniemo); {redo}"
        )
    return data
