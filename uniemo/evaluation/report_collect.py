"""What the report reads from a pipeline or run folder, and the numbers it derives (no model, no image, no plot).

:func:`collect_report_data` finds the runs of a folder and reads each one's ``metrics.jsonl``, the feedback
run's round reports, the evaluation's ``metrics.json``, ``pipeline.json`` and ``judge/judge.json`` into a
:class:`ReportData`. Each file is read in the keys its writer in this package writes (the typed run files of
:mod:`uniemo.run_files`), no other spelling. :func:`read_evaluation` is the one reader of ``metrics.json``, so a
change of that file's schema touches one place. :func:`summarize` gives the five lines the pipeline prints at
its end and the report shows at the top.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np

from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError
from uniemo.logging import read_metrics
from uniemo.run_files import (
    EVALUATION_VERSION,
    Evaluation,
    PipelineState,
    RoundReport,
    read_pipeline_state,
    read_round_reports,
    read_versioned,
)
from uniemo.run_layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVALUATED_STAGES,
    EVALUATION_FILE,
    FEEDBACK_STAGE,
    JUDGE_DIR,
    JUDGE_FILE,
    LATEST_FILE,
    PIPELINE_FILE,
    ROUNDS_DIR,
    STEP_METRICS_FILE,
    TRAINING_STAGES,
    path_from_run_file,
    run_of_checkpoint,
)

__all__ = [
    "CHANCE",
    "PIPELINE_RUNS",
    "EvaluationNumbers",
    "NotAvailable",
    "ReportData",
    "accuracy_by_round",
    "collect_report_data",
    "duration",
    "last_val_accuracy",
    "number",
    "read_evaluation",
    "read_json",
    "series",
    "stage_times",
    "summarize",
    "summary_lines",
    "total_seconds",
]

PIPELINE_RUNS = (*TRAINING_STAGES, JUDGE_DIR)
"""Sub-runs of a pipeline folder, in pipeline order (``runs/<name>/<stage>``)."""
SINGLE_RUN = "run"
"""The label of the one run of a report on a single training run folder."""
MODEL_RUNS = (*EVALUATED_STAGES, SINGLE_RUN)
"""The runs whose model the report shows, by preference: the last trained one."""
CHANCE = 1.0 / len(EMOTIONS)


class NotAvailable(Exception):
    """A section of the report has no data; the message says why (shown on the page)."""


# ---------------------------------------------------------------------------------------------------------
# Finding the runs
# ---------------------------------------------------------------------------------------------------------
def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in (CONFIG_FILE, STEP_METRICS_FILE, CHECKPOINTS_DIR, EVALUATION_FILE)
    )


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINTS_DIR / LATEST_FILE).is_file()


class EvaluationNumbers(TypedDict, total=False):
    """:func:`read_evaluation`'s view of ``metrics.json``: a key is present when its number is."""

    raw: Evaluation
    """The whole file."""
    top1: float
    per_emotion: dict[str, float]
    confusion: tuple[np.ndarray, list[str]]
    """(matrix, emotion labels), rows true."""
    test_samples: int
    understanding_model: str
    """``run:<name>@step-N``."""
    judge: str
    emo_a: float
    fid: float
    fid_extractor: str
    diversity: dict[str, float]
    """``mean_pairwise_distance``, ``sem_d``."""
    diversity_extractor: str
    generated_per_emotion: int
    notes: list[str]


@dataclass
class ReportData:
    """Everything the report reads that is cheap to read (no model, no images)."""

    target: Path
    pipeline: bool
    runs: dict[str, Path]
    """Label -> run folder, in pipeline order (a single run: one entry)."""
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Label -> records of the run's ``metrics.jsonl``."""
    evaluated: Path | None = None
    """The run folder holding ``metrics.json``."""
    evaluation: EvaluationNumbers = field(default_factory=lambda: EvaluationNumbers())
    """:func:`read_evaluation` of ``evaluated``."""
    rounds: list[RoundReport] = field(default_factory=list)
    """Round reports of the feedback run, by round index."""
    rounds_run: Path | None = None
    pipeline_state: PipelineState = field(default_factory=lambda: PipelineState())
    """``pipeline.json`` of a pipeline (:mod:`uniemo.pipeline`)."""
    judge: dict[str, Any] = field(default_factory=dict)
    """``judge/judge.json`` of a pipeline (``uniemo train-judge``): name, val accuracy, ..."""

    @property
    def model_run(self) -> Path | None:
        """The newest run with a checkpoint: the model the report shows attention maps of."""
        for label in MODEL_RUNS:
            run = self.runs.get(label)
            if run is not None and _has_checkpoint(run):
                return run
        return None

    def run_label(self, run_dir: Path | None) -> str:
        for label, path in self.runs.items():
            if path == run_dir:
                return label
        return str(run_dir)


def _find_runs(target: Path) -> tuple[bool, dict[str, Path]]:
    subs = {name: target / name for name in PIPELINE_RUNS if _is_run_dir(target / name)}
    if subs or (target / PIPELINE_FILE).is_file():
        return True, subs
    if _is_run_dir(target):
        return False, {SINGLE_RUN: target}
    raise UserError(
        f"{str(target)!r} is neither a pipeline folder (with {', '.join(PIPELINE_RUNS)} sub-runs) nor a training "
        "run folder (config.yaml, metrics.jsonl, checkpoints/); pass runs/<name>"
    )


def read_json(path: Path) -> Any:
    """The JSON value of ``path``; None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records; a line cut by a crash is skipped rather than failing the report."""
    try:
        return read_metrics(run_dir)
    except ValueError:
        records = []
        for line in (run_dir / STEP_METRICS_FILE).read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def collect_report_data(target: str | Path) -> ReportData:
    """Find the runs of ``target`` and read their metrics, round reports, evaluation and ``pipeline.json``.

    Raises:
        UserError: ``target`` is missing or is neither a pipeline nor a run folder.
    """
    root = Path(target)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} does not exist; pass a pipeline folder (runs/<name>) or a run folder")
    pipeline, runs = _find_runs(root)
    data = ReportData(target=root, pipeline=pipeline, runs=runs)
    for label, run_dir in runs.items():
        data.metrics[label] = _read_metrics_lines(run_dir)
    for label in MODEL_RUNS:
        run = runs.get(label)
        if run is not None and (run / EVALUATION_FILE).is_file():
            data.evaluated = run
            break
    else:
        if pipeline and (root / EVALUATION_FILE).is_file():
            data.evaluated = root
    if data.evaluated is not None:
        data.evaluation = read_evaluation(data.evaluated)
    for label in (FEEDBACK_STAGE, SINGLE_RUN):
        run = runs.get(label)
        if run is not None and (run / ROUNDS_DIR).is_dir():
            data.rounds = read_round_reports(run)
            data.rounds_run = run
            break
    state = read_pipeline_state(root) if pipeline else None
    data.pipeline_state = state if state is not None else PipelineState()
    judge = read_json(root / JUDGE_DIR / JUDGE_FILE) if pipeline else None
    data.judge = judge if isinstance(judge, dict) else {}
    return data


# ---------------------------------------------------------------------------------------------------------
# metrics.json of `uniemo evaluate`: the one reader of its schema
# ---------------------------------------------------------------------------------------------------------
def number(value: Any) -> float | None:
    """A finite number, else None (a metric the evaluation could not compute is null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_evaluation(run_dir: str | Path) -> EvaluationNumbers:
    """The numbers of ``<run_dir>/metrics.json`` (:class:`uniemo.run_files.Evaluation`, written by
    ``uniemo evaluate``) in the report's own terms (:class:`EvaluationNumbers`); exactly the keys the evaluation
    writes.

    Returns ``top1``, ``per_emotion`` ({emotion: accuracy}), ``confusion`` ((matrix, labels), rows true),
    ``test_samples``, ``understanding_model`` (``run:<name>@step-N``), ``judge``, and for stage 2 ``emo_a``,
    ``fid``, ``fid_extractor``, ``diversity`` ({mean_pairwise_distance, sem_d}), ``diversity_extractor``,
    ``generated_per_emotion``; ``notes`` when there are any; ``raw`` (the whole file). A number the evaluation
    could not compute (null) is left out. No file: ``{}``.

    Raises:
        RunFileError: the file is of another version (an older uniemo): one line saying to evaluate again.
    """
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return EvaluationNumbers()
    raw = cast(Evaluation, read_versioned(
        path, EVALUATION_VERSION, "an evaluation", f"evaluate the run again (`uniemo evaluate --run {run_dir}`)"
    ))
    und, gen = raw["understanding"], raw["generation"]
    out = EvaluationNumbers(
        raw=raw,
        per_emotion={e: v for e, v in und["per_emotion"].items() if v is not None and number(v) is not None},
        test_samples=int(und["samples"]),
        understanding_model=und["model"],
        confusion=(np.asarray(und["confusion"], dtype=np.float64), list(raw["emotions"])),
    )
    top1 = number(und["top1"])
    if top1 is not None:
        out["top1"] = top1
    judge = raw["judge"]["name"]
    if gen is not None:
        judge = gen["emo_a"]["judge"]
        emo_a, fid = number(gen["emo_a"]["top1"]), number(gen["fid"]["pooled"])
        if emo_a is not None:
            out["emo_a"] = emo_a
        if fid is not None:
            out["fid"] = fid
        if gen["fid"]["extractor"] is not None:
            out["fid_extractor"] = gen["fid"]["extractor"]
        out["diversity"] = {k: gen["diversity"][k] for k in ("mean_pairwise_distance", "sem_d")
                            if number(gen["diversity"][k]) is not None}
        if gen["diversity"]["extractor"] is not None:
            out["diversity_extractor"] = gen["diversity"]["extractor"]
        out["generated_per_emotion"] = int(gen["images_per_emotion"])
    if judge is not None:
        out["judge"] = judge
    if raw["notes"]:
        out["notes"] = [str(n) for n in raw["notes"]]
    return out


# ---------------------------------------------------------------------------------------------------------
# Derived numbers
# ---------------------------------------------------------------------------------------------------------
def series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over metrics records, skipping records without it or without a number."""
    steps, values = [], []
    for record in records:
        value = number(record.get(key))
        if value is not None and "step" in record:
            steps.append(int(record["step"]))
            values.append(value)
    return steps, values


def _checkpoint_of(data: ReportData, checkpoint: str) -> tuple[str, int] | None:
    """(run label, step) of a round's checkpoint id (``<run>/checkpoints/step-000012``, relative to the feedback
    run): the first round of a feedback run generates from the stage-2 run's checkpoint, later ones from the
    feedback run's own."""
    match = re.search(r"step-(\d+)", checkpoint)
    if not match:
        return None
    base = data.rounds_run if data.rounds_run is not None else data.target
    folder = run_of_checkpoint(path_from_run_file(checkpoint, base))
    for label, run in data.runs.items():
        if folder.name == run.name and (folder == run or folder.resolve() == run.resolve()):
            return label, int(match.group(1))
    return data.run_label(data.rounds_run), int(match.group(1))


def accuracy_by_round(data: ReportData) -> list[dict[str, Any]]:
    """Validation accuracy over feedback rounds: per round, the newest ``val/accuracy`` of the checkpoint the
    round generated from (at or before its step, in the run that wrote it); then the feedback run's last one."""
    points: list[dict[str, Any]] = []
    for report in data.rounds:
        where = _checkpoint_of(data, report["checkpoint"])
        if where is None:
            continue
        label, step = where
        steps, values = series(data.metrics.get(label, []), "val/accuracy")
        before = [(s, v) for s, v in zip(steps, values, strict=True) if s <= step]
        if before:
            points.append({"label": f"round {report['round']}", "run": label, "step": before[-1][0],
                           "accuracy": before[-1][1]})
    label = data.run_label(data.rounds_run)
    steps, values = series(data.metrics.get(label, []), "val/accuracy")
    if steps and not (points and points[-1]["run"] == label and points[-1]["step"] >= steps[-1]):
        points.append({"label": "final", "run": label, "step": steps[-1], "accuracy": values[-1]})
    return points


def stage_times(state: PipelineState) -> list[tuple[str, float | None, str]]:
    """(stage, seconds, status) of each stage of ``pipeline.json``; seconds is None while a stage has none."""
    return [(name, number(info.get("seconds")), info.get("status", ""))
            for name, info in state.get("stages", {}).items()]


def total_seconds(state: PipelineState, times: list[tuple[str, float | None, str]]) -> float:
    """The pipeline's wall time (``seconds`` of ``pipeline.json``), else the sum of its stages' times."""
    total = number(state.get("seconds"))
    return total if total is not None else sum(s for _, s, _ in times if s is not None)


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 07 s`` or ``2 h 05 min``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def last_val_accuracy(data: ReportData, label: str) -> float | None:
    _, values = series(data.metrics.get(label, []), "val/accuracy")
    return values[-1] if values else None


def summary_lines(target: str | Path) -> list[str]:
    """The five summary lines the pipeline prints at its end (understanding, Emo-A, FID, feedback, time)."""
    return summarize(collect_report_data(target))


def summarize(data: ReportData) -> list[str]:
    """:func:`summary_lines` of data read already."""
    ev = data.evaluation
    where = data.run_label(data.evaluated)
    if "top1" in ev:
        n = f" on {ev['test_samples']} test images" if "test_samples" in ev else " on the test split"
        first = f"understanding: top-1 {ev['top1']:.1%}{n} ({where})"
    else:
        last = next(
            ((label, acc) for label in reversed(list(data.runs)) if (acc := last_val_accuracy(data, label)) is not None),
            None,
        )
        first = "understanding: not evaluated"
        if last is not None:
            first += f"; last validation accuracy {last[1]:.1%} ({last[0]})"
    if "emo_a" in ev:
        second = f"generation: Emo-A {ev['emo_a']:.1%} (judged by {ev.get('judge', 'an unnamed model')}; chance {CHANCE:.1%})"
    else:
        second = "generation: Emo-A not evaluated"
    if "fid" in ev:
        third = f"FID {ev['fid']:.2f} (features: {ev.get('fid_extractor', 'unnamed extractor')})"
    else:
        third = "FID not evaluated"
    if data.rounds:
        parts = ", ".join(f"round {r['round']}: {r['totals']['kept']}" for r in data.rounds)
        fourth = f"feedback: {len(data.rounds)} round(s), images kept {parts}"
    else:
        fourth = "feedback: no rounds"
    times = stage_times(data.pipeline_state)
    if times:
        total = total_seconds(data.pipeline_state, times)
        fifth = f"time: {duration(total)} (" + ", ".join(f"{n} {duration(s)}" for n, s, _ in times) + ")"
    else:
        fifth = f"time: not recorded (no {PIPELINE_FILE})"
    return [first, second, third, fourth, fifth]
