"""The run files one module writes and another reads, typed: the writer builds and the reader indexes the same
``TypedDict`` (so mypy checks both sides), and each file carries a ``version``.

| file (:mod:`uniemo.run_layout`) | type              | writer                             | readers                          |
|---------------------------------|-------------------|------------------------------------|----------------------------------|
| ``rounds/round-R.json``         | :class:`RoundReport` | :mod:`uniemo.feedback.rounds`   | feedback loop, evaluation, report |
| ``metrics.json``                | :class:`Evaluation`  | :mod:`uniemo.evaluation.evaluate` | pipeline, report, science checks |
| ``pipeline.json``               | :class:`PipelineState` | :mod:`uniemo.pipeline`         | pipeline (resume), report        |
| ``report/report.json``          | :class:`ReportState` | :mod:`uniemo.evaluation.report` | the report (may replace its folder) |

A reader goes through :func:`read_versioned`: a file of another version is one :class:`RunFileError` line that
says what to re-run. Round reports written before versions existed (version 1, no ``version`` key) still read:
:func:`upgrade_round_report` derives the fields added since from the ones they have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict, cast

from uniemo.data.attributes import write_json_atomic
from uniemo.errors import UserError
from uniemo.feedback.filtering import REJECTIONS
from uniemo.run_layout import PIPELINE_FILE, ROUNDS_DIR

ROUND_REPORT_VERSION = 2
"""2: ``version``, and per emotion ``passed`` (survivors of each filter step) and ``kept_share``."""
EVALUATION_VERSION = 1
PIPELINE_VERSION = 1
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


class _ControlPart(TypedDict, total=False):
    control: dict[str, Any]
    """Only in a control run's round (``uniemo.feedback.controls``): what it did, from which round, labels written."""


class RoundReport(_ControlPart):
    version: int
    round: int
    checkpoint: str
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
    """A round report of version 1 (written before ``version`` existed) as version 2: ``passed`` and
    ``kept_share`` are derived from ``scored``, ``rejections``, ``kept`` and ``candidates``, which it has."""
    if report.get("version") == ROUND_REPORT_VERSION:
        return report  # type: ignore[return-value]
    for row in [*report.get("emotions", {}).values(), report.get("totals", {})]:
        row["passed"] = passed_after_each_step(int(row["scored"]), row["rejections"], steps)
        row["kept_share"] = kept_share(int(row["kept"]), int(row["candidates"]))
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
        if data.get("version", 1) not in (1, ROUND_REPORT_VERSION):
            raise RunFileError(
                f"{path} is a round report of version {data.get('version')!r}; this uniemo reads versions 1 and "
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
    error: str


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
    if isinstance(data, dict) and "version" not in data:
        data["version"] = PIPELINE_VERSION
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
