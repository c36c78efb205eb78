"""The report of a run or of a whole pipeline: ``report/index.html`` and its PNGs (issue 6, METHOD §6, D12).

:func:`write_report` takes a pipeline folder (``runs/<name>`` with the sub-runs ``stage1/``, ``stage2/``,
``feedback/``, ``judge/``) or a single training run folder and writes a self-contained folder: ``index.html``,
the plots as PNG files and ``images/`` (real and generated examples, copied in). Every link is relative, nothing
is fetched from the network and the page needs no JavaScript, so the folder can be zipped, mailed or opened
from a file share.

Sections, each shown when its data exists and replaced by a one-line "not available: why" otherwise:

- **summary**: top-1, Emo-A (with the judge), FID (with its feature extractor), images kept per feedback round,
  the time of each pipeline stage (``pipeline.json``);
- **loss curves** of each run (``metrics.jsonl``: ``loss``, ``loss/<term>``, ``val/loss``);
- **validation accuracy** over steps (every run) and over feedback rounds (the feedback run's ``val/accuracy``
  at the checkpoint each round generated from, ``rounds/round-<r>.json``);
- **confusion matrix** of the test split (``metrics.json`` of ``uniemo evaluate`` in the evaluated run);
- **generated images per emotion** (``<run>/eval/generated/<emotion>/*.png``, else the run's ``samples/``
  grids) beside **real test images** read from the run's shards;
- **filter funnel** of each round (candidates, what each filter step rejected, kept);
- **attention maps** of the scene and object queries over the patches of a few test images (the run's latest
  checkpoint through :func:`uniemo.training.inference.load_run`, METHOD §2.2).

``report.json`` beside the page records each section's state (``ok`` or the reason it is missing) and the
summary numbers. :func:`summary_lines` gives the five lines the pipeline prints at its end.

The reader of ``metrics.json`` is one function, :func:`read_evaluation`, so a change of that file's schema
touches one place.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import random
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np

from uniemo.config import load_config
from uniemo.config.schema import EMOTIONS
from uniemo.data.images import to_rgb
from uniemo.data.loader import list_split_shards
from uniemo.data.shards import MANIFEST_FILE, synthetic_shards_folder
from uniemo.data.transforms import resize_center_crop
from uniemo.errors import UserError
from uniemo.feedback.filtering import REJECTIONS
from uniemo.logging import image_grid, read_metrics, say
from uniemo.run_files import (
    EVALUATION_VERSION,
    REPORT_STATE_VERSION,
    Evaluation,
    ReportState,
    RoundReport,
    read_round_reports,
    read_versioned,
)
from uniemo.run_layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    EVALUATION_FILE,
    GENERATED_DIR,
    JUDGE_DIR,
    JUDGE_FILE,
    LATEST_FILE,
    PIPELINE_FILE,
    REPORT_DIR,
    REPORT_INDEX_FILE,
    REPORT_STATE_FILE,
    ROUNDS_DIR,
    SAMPLES_DIR,
    STEP_METRICS_FILE,
    TRAINING_STAGES,
    generated_dir,
)
from uniemo.training.inference import load_run

__all__ = [
    "PIPELINE_RUNS",
    "REPORT_DIR",
    "ReportData",
    "accuracy_by_round",
    "check_links",
    "collect_report_data",
    "read_evaluation",
    "summary_lines",
    "write_report",
]

REPORT_FORMAT = "uniemo-report-1"
"""Marks a folder as written by :func:`write_report`, which is then allowed to replace it."""
PIPELINE_RUNS = (*TRAINING_STAGES, JUDGE_DIR)
"""Sub-runs of a pipeline folder, in pipeline order (``runs/<name>/<stage>``)."""
REPORT_FILE = REPORT_INDEX_FILE
PIPELINE_STATE_FILE = PIPELINE_FILE

EXAMPLES_PER_EMOTION = 6
"""Real and generated images shown per emotion."""
ATTENTION_IMAGES = 4
"""Test images whose query attention is shown."""
TILE = 96
"""Side in pixels of one example image in the grids."""
CHANCE = 1.0 / len(EMOTIONS)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------
# Finding the runs
# ---------------------------------------------------------------------------------------------------------
def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in (CONFIG_FILE, STEP_METRICS_FILE, CHECKPOINTS_DIR, EVALUATION_FILE)
    )


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINTS_DIR / LATEST_FILE).is_file()


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
    evaluation: dict[str, Any] = field(default_factory=dict)
    """:func:`read_evaluation` of ``evaluated``."""
    rounds: list[RoundReport] = field(default_factory=list)
    """Round reports of the feedback run, by round index."""
    rounds_run: Path | None = None
    pipeline_state: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    """``judge/judge.json`` of a pipeline (``uniemo train-judge``): name, val accuracy, ..."""

    @property
    def model_run(self) -> Path | None:
        """The newest run with a checkpoint: the model the report shows attention maps of."""
        for label in ("feedback", "stage2", "stage1", "run"):
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
    if subs or (target / PIPELINE_STATE_FILE).is_file():
        return True, subs
    if _is_run_dir(target):
        return False, {"run": target}
    raise UserError(
        f"{str(target)!r} is neither a pipeline folder (with {', '.join(PIPELINE_RUNS)} sub-runs) nor a training "
        "run folder (config.yaml, metrics.jsonl, checkpoints/); pass runs/<name>"
    )


def _read_json(path: Path) -> Any:
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
    for label, run in runs.items():
        data.metrics[label] = _read_metrics_lines(run)
    for label in ("feedback", "stage2", "stage1", "run"):
        run = runs.get(label)
        if run is not None and (run / EVALUATION_FILE).is_file():
            data.evaluated = run
            break
    else:
        if pipeline and (root / EVALUATION_FILE).is_file():
            data.evaluated = root
    if data.evaluated is not None:
        data.evaluation = read_evaluation(data.evaluated)
    for label in ("feedback", "run"):
        run = runs.get(label)
        if run is not None and (run / ROUNDS_DIR).is_dir():
            data.rounds = read_round_reports(run)
            data.rounds_run = run
            break
    state = _read_json(root / PIPELINE_STATE_FILE) if pipeline else None
    data.pipeline_state = state if isinstance(state, dict) else {}
    judge = _read_json(root / JUDGE_DIR / JUDGE_FILE) if pipeline else None
    data.judge = judge if isinstance(judge, dict) else {}
    return data


# ---------------------------------------------------------------------------------------------------------
# metrics.json of `uniemo evaluate`: the one reader of its schema
# ---------------------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A finite number, else None (a metric the evaluation could not compute is null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_evaluation(run_dir: str | Path) -> dict[str, Any]:
    """The numbers of ``<run_dir>/metrics.json`` (:class:`uniemo.run_files.Evaluation`, written by
    ``uniemo evaluate``) in the report's own terms; exactly the keys the evaluation writes.

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
        return {}
    raw = cast(Evaluation, read_versioned(
        path, EVALUATION_VERSION, "an evaluation", f"evaluate the run again (`uniemo evaluate --run {run_dir}`)"
    ))
    und, gen = raw["understanding"], raw["generation"]
    out: dict[str, Any] = {
        "raw": raw,
        "top1": _number(und["top1"]),
        "per_emotion": {e: v for e, v in und["per_emotion"].items() if _number(v) is not None},
        "test_samples": int(und["samples"]),
        "understanding_model": und["model"],
        "confusion": (np.asarray(und["confusion"], dtype=np.float64), list(raw["emotions"])),
        "judge": raw["judge"]["name"],
    }
    if gen is not None:
        out.update({
            "emo_a": _number(gen["emo_a"]["top1"]),
            "judge": gen["emo_a"]["judge"],
            "fid": _number(gen["fid"]["pooled"]),
            "fid_extractor": gen["fid"]["extractor"],
            "diversity": {k: gen["diversity"][k] for k in ("mean_pairwise_distance", "sem_d")
                          if _number(gen["diversity"][k]) is not None},
            "diversity_extractor": gen["diversity"]["extractor"],
            "generated_per_emotion": int(gen["images_per_emotion"]),
        })
    if raw["notes"]:
        out["notes"] = [str(n) for n in raw["notes"]]
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------
# Derived numbers
# ---------------------------------------------------------------------------------------------------------
def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = _number(record.get(key))
        if value is not None and "step" in record:
            steps.append(int(record["step"]))
            values.append(value)
    return steps, values


def _checkpoint_of(data: ReportData, checkpoint: Any) -> tuple[str, int] | None:
    """(run label, step) of a round's checkpoint id (``<run>/checkpoints/step-000012``): the first round of a
    feedback run generates from the stage-2 run's checkpoint, later ones from the feedback run's own."""
    match = re.search(r"step-(\d+)", str(checkpoint or ""))
    if not match:
        return None
    folder = Path(str(checkpoint)).parent.parent  # <run>/checkpoints/step-N -> <run>
    for label, run in data.runs.items():
        if folder.name == run.name and (folder == run or folder.resolve() == run.resolve()):
            return label, int(match.group(1))
    return data.run_label(data.rounds_run), int(match.group(1))


def accuracy_by_round(data: ReportData) -> list[dict[str, Any]]:
    """Validation accuracy over feedback rounds: per round, the newest ``val/accuracy`` of the checkpoint the
    round generated from (at or before its step, in the run that wrote it); then the feedback run's last one."""
    points = []
    for report in data.rounds:
        where = _checkpoint_of(data, report.get("checkpoint"))
        if where is None:
            continue
        label, step = where
        steps, values = _series(data.metrics.get(label, []), "val/accuracy")
        before = [(s, v) for s, v in zip(steps, values, strict=True) if s <= step]
        if before:
            points.append({"label": f"round {report['round']}", "run": label, "step": before[-1][0],
                           "accuracy": before[-1][1]})
    label = data.run_label(data.rounds_run)
    steps, values = _series(data.metrics.get(label, []), "val/accuracy")
    if steps and not (points and points[-1]["run"] == label and points[-1]["step"] >= steps[-1]):
        points.append({"label": "final", "run": label, "step": steps[-1], "accuracy": values[-1]})
    return points


def _kept(report: RoundReport) -> int:
    return report["totals"]["kept"]


def _stage_times(state: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """(stage, seconds, status) from ``pipeline.json`` (``{"stages": {name: {...}}}`` or ``{name: {...}}``)."""
    stages = state.get("stages", state)
    rows = []
    if isinstance(stages, dict):
        items = stages.items()
    elif isinstance(stages, list):
        items = ((s.get("name", str(i)), s) for i, s in enumerate(stages) if isinstance(s, dict))
    else:
        return rows
    for name, info in items:
        if not isinstance(info, dict):
            continue
        seconds = _number(info.get("seconds"))
        rows.append((str(name), seconds, str(info.get("status", ""))))
    return rows


def _total_seconds(state: dict[str, Any], times: list[tuple[str, float | None, str]]) -> float:
    """The pipeline's wall time (``seconds`` of ``pipeline.json``), else the sum of its stages' times."""
    total = _number(state.get("seconds"))
    return total if total is not None else sum(s for _, s, _ in times if s is not None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _last_val_accuracy(data: ReportData, label: str) -> float | None:
    _, values = _series(data.metrics.get(label, []), "val/accuracy")
    return values[-1] if values else None


def summary_lines(target: str | Path) -> list[str]:
    """The five summary lines the pipeline prints at its end (understanding, Emo-A, FID, feedback, time)."""
    return _summary_lines(collect_report_data(target))


def _summary_lines(data: ReportData) -> list[str]:
    ev = data.evaluation
    where = data.run_label(data.evaluated)
    if "top1" in ev:
        n = f" on {ev['test_samples']} test images" if "test_samples" in ev else " on the test split"
        first = f"understanding: top-1 {ev['top1']:.1%}{n} ({where})"
    else:
        last = next(
            ((label, acc) for label in reversed(list(data.runs)) if (acc := _last_val_accuracy(data, label)) is not None),
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
    kept = [(r.get("round"), _kept(r)) for r in data.rounds]
    if kept:
        parts = ", ".join(f"round {r}: {k if k is not None else '?'}" for r, k in kept)
        fourth = f"feedback: {len(kept)} round(s), images kept {parts}"
    else:
        fourth = "feedback: no rounds"
    times = _stage_times(data.pipeline_state)
    if times:
        total = _total_seconds(data.pipeline_state, times)
        fifth = f"time: {_duration(total)} (" + ", ".join(f"{n} {_duration(s)}" for n, s, _ in times) + ")"
    else:
        fifth = "time: not recorded (no pipeline.json)"
    return [first, second, third, fourth, fifth]


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure, no pyplot state)
# ---------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, format="png")
    return path.name


def _plot_losses(label: str, records: list[dict[str, Any]], path: Path) -> str | None:
    terms = sorted({k for r in records for k in r if k == "loss" or (k.startswith("loss/"))})
    val_terms = sorted({k for r in records for k in r if k == "val/loss"})
    if not terms and not val_terms:
        return None
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    positive = True
    for key in terms + val_terms:
        steps, values = _series(records, key)
        if not steps:
            continue
        positive &= min(values) > 0
        style = dict(linewidth=2.2, color="black") if key == "loss" else dict(linewidth=1.2)
        if key == "val/loss":
            style = dict(linewidth=1.6, color="tab:red", linestyle="--", marker="o", markersize=3)
        ax.plot(steps, values, label=key, **style)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{label}: training loss by term")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _plot_val_steps(data: ReportData, path: Path) -> str | None:
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    drawn = False
    for label, records in data.metrics.items():
        steps, values = _series(records, "val/accuracy")
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        return None
    ax.axhline(CHANCE, color="grey", linestyle=":", label="chance (1/8)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step (of each run)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy over steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_val_rounds(points: list[dict[str, Any]], path: Path) -> str:
    labels = [f"{p['label']}\n{p['run']} step {p['step']}" for p in points]
    values = [p["accuracy"] for p in points]
    fig = _figure(6.5, 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(values))
    ax.plot(x, values, marker="o", color="tab:green")
    for xi, v in zip(x, values, strict=True):
        ax.annotate(f"{v:.1%}", (xi, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.axhline(CHANCE, color="grey", linestyle=":")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy over feedback rounds")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> str:
    rows = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig = _figure(6.2, 5.4)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    k = len(labels)
    for i in range(k):
        for j in range(k):
            count = matrix[i, j]
            text = f"{int(count)}" if float(count).is_integer() else f"{count:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split; colour: share of the row)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


FUNNEL_STEPS = (
    ("lost_in_flight", "scored"),
    ("fidelity_argmax", "argmax = k"),
    ("fidelity_threshold", "p_k >= tau"),
    ("duplicate", "not a duplicate"),
    ("attribute_cap", "under attribute cap"),
    ("not_selected", "selected (kept)"),
)
"""(rejection counted, what remains after it), in the order of the filter steps (METHOD §5)."""


def _funnel(report: RoundReport) -> list[tuple[str, int]]:
    """(stage, candidates remaining) from candidates down to kept."""
    totals = report["totals"]
    remaining = totals["candidates"]
    rows = [("candidates", remaining)]
    for reason, after in FUNNEL_STEPS:
        remaining -= totals["lost_in_flight"] if reason == "lost_in_flight" else totals["rejections"][reason]
        rows.append((after, remaining))
    return rows


def _plot_kept_share(rounds: list[RoundReport], path: Path) -> str:
    """The kept share (kept / candidates) of each emotion, one bar per round: how unevenly the filter keeps."""
    fig = _figure(8.0, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / len(rounds)
    x = np.arange(len(EMOTIONS))
    for i, report in enumerate(rounds):
        shares = [report["emotions"][e]["kept_share"] or 0.0 for e in EMOTIONS]
        ax.bar(x + (i - (len(rounds) - 1) / 2) * width, shares, width, label=f"round {report['round']}")
    ax.set_xticks(x, EMOTIONS, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("kept / candidates")
    ax.set_ylim(0, 1)
    ax.set_title("Kept share per emotion")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_funnel(rounds: list[RoundReport], path: Path) -> str:
    funnels = [_funnel(r) for r in rounds]
    names = [name for name, _ in funnels[0]]
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(funnels)
    x = np.arange(len(names))
    for i, (report, funnel) in enumerate(zip(rounds, funnels, strict=True)):
        values = [v for _, v in funnel]
        bars = ax.bar(x + (i - (len(funnels) - 1) / 2) * width, values, width, label=f"round {report['round']}")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("images remaining")
    ax.set_title("Filter funnel per round: candidates -> each filter step -> kept")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Images: real test examples from the shards, generated ones from the run
# ---------------------------------------------------------------------------------------------------------
def _run_config(run_dir: Path):

    return load_config(run_dir / CONFIG_FILE)


def _shard_folder(data: ReportData) -> tuple[Path | None, str]:
    """The real shard folder of the runs (``data.shards``, else the synthetic set's cache), or why not."""

    candidates = [data.evaluated, data.model_run, *data.runs.values()]
    if data.pipeline:
        candidates.append(data.target)
    seen = set()
    why = "no run folder has a readable config.yaml"
    for run in candidates:
        if run is None or run in seen or not (run / CONFIG_FILE).is_file():
            continue
        seen.add(run)
        try:
            cfg = _run_config(run)
        except UserError as e:
            why = f"{run / CONFIG_FILE}: {e}"
            continue
        folder = Path(cfg.data.shards).expanduser() if cfg.data.shards else synthetic_shards_folder(cfg.data)
        if (folder / MANIFEST_FILE).is_file():
            return folder, ""
        why = f"the shard folder of {run.name} ({folder}) has no manifest.json"
    return None, why


def read_examples(shards: Path, per_emotion: int) -> tuple[str | None, dict[str, list[Any]]]:
    """Up to ``per_emotion`` images of each emotion from the test split of ``shards`` (val when there is no
    test split), in shard order: (split, {emotion: [PIL image]})."""
    from PIL import Image


    found: dict[str, list[Any]] = {e: [] for e in EMOTIONS}
    for split in ("test", "val"):
        refs = list_split_shards([shards], split, required=False)
        if refs:
            break
    else:
        return None, found

    def add(sample: dict[str, bytes]) -> None:
        try:
            emotion = EMOTIONS[int(sample["cls"])]
        except (KeyError, ValueError, IndexError):
            return
        data = sample.get("jpg") or sample.get("png")
        if data is None or len(found[emotion]) >= per_emotion:
            return
        try:
            with Image.open(io.BytesIO(data)) as image:
                found[emotion].append(to_rgb(image))
        except Exception:  # a corrupt image is skipped, as the loader skips it
            return

    for ref in refs:
        # Members of a sample are consecutive, named <key>.<ext>; keys hold no dot (uniemo.data.shards).
        with tarfile.open(ref.url, mode="r|") as tar:
            key, sample = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.rpartition("/")[2].partition(".")
                if stem != key:
                    if sample:
                        add(sample)
                    key, sample = stem, {}
                sample[ext] = tar.extractfile(member).read()
            if sample:
                add(sample)
        if all(len(v) >= per_emotion for v in found.values()):
            break
    return split, found


def _tiles(images: list[Any], size: int = TILE) -> np.ndarray:

    return np.stack([np.asarray(resize_center_crop(image.convert("RGB"), size)) for image in images])


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _generated_images(data: ReportData) -> tuple[str, dict[str, Any]]:
    """(where they come from, {emotion: list of PIL images | a grid file})."""
    runs = [data.evaluated, *(data.runs.get(k) for k in ("feedback", "stage2", "run"))]
    runs = [r for i, r in enumerate(runs) if r is not None and r not in runs[:i]]
    for run in runs:
        folder = generated_dir(run)
        if folder.is_dir():
            found = {}
            for emotion in EMOTIONS:
                files = sorted((folder / emotion).glob("*.png"))[:EXAMPLES_PER_EMOTION]
                if files:
                    found[emotion] = [_open_rgb(f) for f in files]
            if found:
                return f"{data.run_label(run)}/{EVAL_DIR}/{GENERATED_DIR} (uniemo evaluate)", found
    for run in runs:
        folder = run / SAMPLES_DIR
        found = {e: folder / f"{e}.png" for e in EMOTIONS if (folder / f"{e}.png").is_file()}
        if found:
            return f"{data.run_label(run)}/{SAMPLES_DIR} (sample grids logged in training)", found
    return "", {}


# ---------------------------------------------------------------------------------------------------------
# Attention maps of the expert queries (METHOD §2.2)
# ---------------------------------------------------------------------------------------------------------
def _plot_attention(run_dir: Path, examples: list[tuple[str, Any]], path: Path) -> str:
    import torch


    loaded = load_run(run_dir, device="cpu", compute_missing_emotion_space=False)
    model = loaded.understanding
    if model.scene_queries is None and model.object_queries is None:
        raise _NotAvailable(f"the model of {run_dir.name} has both query types switched off (D13)")
    rng = random.Random(0)
    batch = torch.stack([loaded.transform(image, rng)["image"] for _, image in examples])
    with torch.no_grad():
        out = model(batch.to(next(model.parameters()).dtype), return_attention=True)
    probs = out.emotion_logits.float().softmax(dim=-1)
    size = loaded.config.data.image_size
    columns = [("image", None), ("scene queries", out.scene_attention), ("object queries", out.object_attention)]
    fig = _figure(2.3 * len(columns), 2.4 * len(examples))
    axes = fig.subplots(len(examples), len(columns), squeeze=False)
    for row, (emotion, image) in enumerate(examples):
        shown = np.asarray(resize_center_crop(image.convert("RGB"), size))
        top = int(probs[row].argmax())
        for col, (name, maps) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(shown, extent=(0, size, size, 0))
            if col == 0:
                ax.set_title(f"true {emotion}\npredicted {EMOTIONS[top]} ({float(probs[row, top]):.0%})", fontsize=8)
            elif maps is None:
                ax.set_title(f"{name}: off", fontsize=8)
            else:
                heat = maps[row].float().numpy()
                ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, size, size, 0), interpolation="bilinear")
                ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"Query attention over the patches ({run_dir.name}, step {loaded.step})", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------
class _NotAvailable(Exception):
    """A section has no data; the message says why (shown on the page)."""


@dataclass
class _Section:
    key: str
    title: str
    body: str = ""
    state: str = "ok"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .na { color: #777; font-style: italic; } .meta { color: #666; font-size: 0.9em; }
.pair td { vertical-align: top; } .pair img { image-rendering: pixelated; }
nav a { margin-right: 1em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


class _Builder:
    def __init__(self, data: ReportData, out: Path, log: Log):
        self.data = data
        self.out = out
        self.log = log
        self.images_dir = out / "images"
        self.examples: dict[str, list[Any]] = {}
        self.examples_split: str | None = None
        self.examples_why = ""

    # -- sections ---------------------------------------------------------------------------------------------
    def summary(self) -> str:
        data, ev = self.data, self.data.evaluation
        rows = [["runs", ", ".join(f"{label} ({path.name})" for label, path in data.runs.items())]]
        if data.evaluated is not None:
            rows.append(["evaluated run", data.run_label(data.evaluated)])
        top1 = "not evaluated"
        if "top1" in ev:
            top1 = _pct(ev["top1"]) + (f" ({ev['understanding_model']})" if "understanding_model" in ev else "")
        rows.append(["top-1 accuracy (test)", top1])
        for label in data.runs:
            acc = _last_val_accuracy(data, label)
            if acc is not None:
                rows.append([f"last validation accuracy, {label}", _pct(acc)])
        if data.judge:
            accuracy = _number(data.judge.get("val_accuracy"))
            rows.append(["judge (uniemo train-judge)",
                         f"{data.judge.get('name', '?')}, validation accuracy {_pct(accuracy)}"])
        emo_a = f"{ev['emo_a']:.1%} (judged by {ev.get('judge', 'an unnamed model')}; chance {CHANCE:.1%})" if "emo_a" in ev else "not evaluated"
        rows.append(["Emo-A", emo_a])
        fid = f"{ev['fid']:.2f} (features: {ev.get('fid_extractor', 'unnamed extractor')})" if "fid" in ev else "not evaluated"
        rows.append(["FID", fid])
        features = f" (features: {ev['diversity_extractor']})" if "diversity_extractor" in ev else ""
        for name, value in (ev.get("diversity") or {}).items():
            rows.append([f"diversity: {name}", f"{value:.4g}{features}"])
        if "generated_per_emotion" in ev:
            rows.append(["generated images per emotion (evaluation)", str(ev["generated_per_emotion"])])
        for report in data.rounds:
            kept = _kept(report)
            candidates = _number((report.get("totals") or {}).get("candidates"))
            rows.append([f"kept images, round {report['round']}",
                         f"{kept if kept is not None else '?'} of {int(candidates) if candidates else '?'} candidates"])
        times = _stage_times(data.pipeline_state)
        for name, seconds, status in times:
            rows.append([f"time, {name}", f"{_duration(seconds)}{'' if status in ('', 'done') else f' ({status})'}"])
        if times:
            rows.append(["time, total", _duration(_total_seconds(data.pipeline_state, times))])
        elif data.pipeline:
            rows.append(["time", f"not recorded (no {PIPELINE_STATE_FILE})"])
        rows += [["note (evaluation)", note] for note in ev.get("notes", [])]
        lines = "".join(f"<li>{_e(line)}</li>" for line in _summary_lines(data))
        return _table(["", "value"], rows, numeric_from=9) + f"<ul class='meta'>{lines}</ul>"

    def losses(self) -> str:
        parts, missing = [], []
        for label, records in self.data.metrics.items():
            name = _plot_losses(label, records, self.out / f"loss_{label}.png")
            if name:
                parts.append(_img(name, f"loss curves of {label}"))
            elif not (self.data.runs[label] / STEP_METRICS_FILE).is_file():
                missing.append(f"{label}: no {STEP_METRICS_FILE}")
            else:
                missing.append(f"{label}: no loss lines in {STEP_METRICS_FILE}")
        if not parts:
            raise _NotAvailable(f"no run logged a loss ({'; '.join(missing)})")
        if missing:
            parts.append(f"<p class='na'>not available: {_e('; '.join(missing))}</p>")
        return "\n".join(parts)

    def validation(self) -> str:
        parts = []
        over_steps = _plot_val_steps(self.data, self.out / "val_accuracy_steps.png")
        if over_steps:
            parts.append(_img(over_steps, "validation accuracy over steps"))
        else:
            parts.append("<p class='na'>over steps, not available: no run logged val/accuracy</p>")
        if not self.data.rounds:
            if not over_steps:
                raise _NotAvailable("no run logged val/accuracy and there are no feedback rounds")
            parts.append("<p class='na'>over rounds, not available: no feedback rounds (rounds/round-*.json)</p>")
            return "\n".join(parts)
        points = accuracy_by_round(self.data)
        if points:
            name = _plot_val_rounds(points, self.out / "val_accuracy_rounds.png")
            parts.append(_img(name, "validation accuracy over rounds"))
            parts.append(
                "<p class='meta'>Round r: the validation accuracy of the checkpoint round r generated from (the "
                "newest validation at or before its step, in the run that wrote it); final: the feedback run's "
                "last validation.</p>"
            )
        else:
            parts.append("<p class='na'>over rounds, not available: no val/accuracy at or before the rounds' "
                         "checkpoints</p>")
        return "\n".join(parts)

    def confusion(self) -> str:
        ev = self.data.evaluation
        if self.data.evaluated is None:
            raise _NotAvailable(f"no run holds {EVALUATION_FILE}; run `uniemo evaluate --run <run>` first")
        if "confusion" not in ev:
            raise _NotAvailable(f"{self.data.run_label(self.data.evaluated)}/{EVALUATION_FILE} holds no confusion matrix")
        matrix, labels = ev["confusion"]
        name = _plot_confusion(matrix, labels, self.out / "confusion.png")
        parts = [_img(name, "confusion matrix")]
        per = ev.get("per_emotion") or {}
        if per:
            parts.append(_table(["emotion", "accuracy"], [[k, _pct(v)] for k, v in per.items()]))
        return "\n".join(parts)

    def _load_examples(self) -> None:
        folder, why = _shard_folder(self.data)
        if folder is None:
            self.examples_why = why
            return
        self.examples_split, self.examples = read_examples(folder, EXAMPLES_PER_EMOTION)
        if self.examples_split is None:
            self.examples_why = f"{folder} has no test or val shards"

    def images(self) -> str:
        from PIL import Image

        self.images_dir.mkdir(exist_ok=True)
        source, generated = _generated_images(self.data)
        real = {e: v for e, v in self.examples.items() if v}
        if not generated and not real:
            raise _NotAvailable(
                "no generated images (eval/generated/ or samples/ of a stage-2 run) and no real test images ("
                f"{self.examples_why or 'none found'})"
            )
        rows = []
        for emotion in EMOTIONS:
            cells = [f"<th>{_e(emotion)}</th>"]
            if real.get(emotion):
                name = f"images/real_{emotion}.png"
                Image.fromarray(image_grid(_tiles(real[emotion]))).save(self.out / name)
                cells.append(f"<td>{_img(name, f'real {emotion} images')}</td>")
            else:
                cells.append("<td class='na'>no real image</td>")
            item = generated.get(emotion)
            if isinstance(item, Path):
                name = f"images/generated_{emotion}.png"
                shutil.copyfile(item, self.out / name)
                cells.append(f"<td>{_img(name, f'generated {emotion} images')}</td>")
            elif item:
                name = f"images/generated_{emotion}.png"
                Image.fromarray(image_grid(_tiles(item))).save(self.out / name)
                cells.append(f"<td>{_img(name, f'generated {emotion} images')}</td>")
            else:
                cells.append("<td class='na'>no generated image</td>")
            rows.append(f"<tr>{''.join(cells)}</tr>")
        real_note = (f"real: the {self.examples_split} split of the run's shards" if real
                     else f"real images not available: {self.examples_why}")
        gen_note = f"generated: {source}" if generated else "generated images not available: none found"
        head = "<tr><th>emotion</th><th>real</th><th>generated</th></tr>"
        return (f"<p class='meta'>{_e(real_note)}; {_e(gen_note)}.</p>"
                f"<table class='pair'>{head}{''.join(rows)}</table>")

    def funnel(self) -> str:
        rounds = self.data.rounds
        if not rounds:
            raise _NotAvailable("no feedback rounds (rounds/round-*.json in the feedback run)")
        name = _plot_funnel(rounds, self.out / "funnel.png")
        reasons = ["lost_in_flight", *REJECTIONS]
        rows = []
        for report in rounds:
            totals = report["totals"]
            rows.append([f"round {report['round']}", totals["candidates"],
                         *[totals["lost_in_flight"] if r == "lost_in_flight" else totals["rejections"][r]
                           for r in reasons],
                         totals["kept"]])
        table = _table(["round", "candidates", *reasons, "kept"], rows)
        parts = [_img(name, "filter funnel per round"), table,
                 _img(_plot_kept_share(rounds, self.out / "kept_share.png"), "kept share per emotion")]
        for report in rounds:  # how the kept share differs by emotion, and at which filter step it is lost
            emotion_rows = []
            for e in EMOTIONS:
                row = report["emotions"][e]
                emotion_rows.append([e, row["candidates"], *[row["passed"][step] for step in REJECTIONS],
                                     row["kept"], _pct(row["kept_share"])])
            parts.append(_table([f"round {report['round']}: emotion", "candidates",
                                 *[f"passed {step}" for step in REJECTIONS], "kept", "kept share"], emotion_rows))
        return "\n".join(parts)

    def attention(self) -> str:
        run = self.data.model_run
        if run is None:
            raise _NotAvailable("no run has a checkpoint (checkpoints/latest)")
        picks = [(e, images[0]) for e, images in self.examples.items() if images][:ATTENTION_IMAGES]
        if not picks:
            raise _NotAvailable(f"no test images to look at ({self.examples_why or 'the shards hold none'})")
        try:
            name = _plot_attention(run, picks, self.out / "attention.png")
        except UserError as e:
            raise _NotAvailable(f"the model of {run.name} cannot be loaded: {e}") from None
        return (_img(name, "query attention maps") +
                "<p class='meta'>Cross-attention of the interactive blocks (METHOD §2.2), averaged over heads and "
                "queries, over the patch grid; brighter is more attention.</p>")

    # -- assembly ---------------------------------------------------------------------------------------------
    def build(self) -> list[_Section]:
        plan = [
            ("summary", "Summary", self.summary),
            ("losses", "Loss curves", self.losses),
            ("validation", "Validation accuracy", self.validation),
            ("confusion", "Confusion matrix", self.confusion),
            ("images", "Generated and real images per emotion", self.images),
            ("funnel", "Filter funnel per round", self.funnel),
            ("attention", "Attention maps of the expert queries", self.attention),
        ]
        self._load_examples()
        sections = []
        for key, title, make in plan:
            self.log(f"{title.lower()} ...")
            section = _Section(key, title)
            try:
                section.body = make()
            except _NotAvailable as e:
                section.state = f"not available: {e}"
                section.body = f"<p class='na'>{_e(section.state)}</p>"
            sections.append(section)
        return sections


def _page(data: ReportData, sections: list[_Section]) -> str:
    kind = "pipeline" if data.pipeline else "run"
    title = f"uniemo report: {data.target.resolve().name}"
    nav = "".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.key}"><h2>{_e(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<p class='meta'>{kind} folder, report written {when}</p>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def check_links(index: Path) -> list[str]:
    """Problems with the links of a report page: absolute, remote, or missing files ([] when all is well)."""
    problems = []
    for link in _LINK.findall(index.read_text(encoding="utf-8")):
        if link.startswith("#"):
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE) or link.startswith(("/", "\\")):
            problems.append(f"not a relative link: {link}")
        elif ".." in Path(link).parts or not (index.parent / link).is_file():
            problems.append(f"missing file: {link}")
    return problems


def _check_out(out: Path) -> None:
    """The report folder must be new, empty, or an earlier report (which is replaced); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the report")
    state = _read_json(out / REPORT_STATE_FILE)
    if any(out.iterdir()) and not (isinstance(state, dict) and state.get("format") == REPORT_FORMAT):
        raise UserError(f"{str(out)!r} is not empty and holds no earlier report; give a new or empty folder with --out")


def write_report(target: str | Path, out_dir: str | Path | None = None, *, log: Log | None = None) -> Path:
    """Write the report of a pipeline or run folder; returns the path of ``index.html``.

    ``out_dir`` defaults to ``<target>/report``; an earlier report there is replaced. ``log`` gets a line per
    section (default: stderr).

    Raises:
        UserError: ``target`` is neither a pipeline nor a run folder, or ``out_dir`` holds something else.
    """
    log = log or partial(say, topic="report")
    data = collect_report_data(target)
    out = Path(out_dir) if out_dir is not None else data.target / REPORT_DIR
    _check_out(out)
    # Build beside the final folder, then swap: a failed build leaves the earlier report as it was.
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        sections = _Builder(data, staging, log).build()
        index = staging / REPORT_FILE
        index.write_text(_page(data, sections), encoding="utf-8")
        problems = check_links(index)
        if problems:
            raise RuntimeError(f"the report links outside its folder: {problems[:3]}")
        state: ReportState = {
            "version": REPORT_STATE_VERSION,
            "format": REPORT_FORMAT,
            "target": str(data.target),
            "pipeline": data.pipeline,
            "runs": {label: str(path) for label, path in data.runs.items()},
            "evaluated": str(data.evaluated) if data.evaluated else None,
            "sections": {s.key: s.state for s in sections},
            "validation_by_round": accuracy_by_round(data),
            "summary": _summary_lines(data),
            "notes": data.evaluation.get("notes", []),
        }
        (staging / REPORT_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / REPORT_FILE
