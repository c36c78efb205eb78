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
  checkpoint through :func:`uniemo.inference.runs.load_run`, METHOD §2.2).

``report.json`` beside the page records each section's state (``ok`` or the reason it is missing) and the
summary numbers. :func:`summary_lines` gives the five lines the pipeline prints at its end.

The work is split along its seams; this module is the entry point and owns the report folder:

- :mod:`~uniemo.evaluation.report_collect` reads the run folders (``metrics.jsonl``, round reports,
  ``metrics.json`` through :func:`read_evaluation`, its one reader, ``pipeline.json``) into a
  :class:`ReportData` and derives the numbers;
- :mod:`~uniemo.evaluation.report_images` reads real test images from the shards and the generated ones;
- :mod:`~uniemo.evaluation.report_plots` draws the PNGs;
- :mod:`~uniemo.evaluation.report_html` writes each section and the page.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

from uniemo.errors import UserError
from uniemo.evaluation.report_collect import (
    PIPELINE_RUNS,
    ReportData,
    accuracy_by_round,
    collect_report_data,
    read_evaluation,
    read_json,
    summarize,
    summary_lines,
)
from uniemo.evaluation.report_html import Log, build_sections, check_links, render_page
from uniemo.logging import say
from uniemo.run_files import REPORT_STATE_VERSION, ReportState
from uniemo.run_layout import REPORT_DIR, REPORT_INDEX_FILE, REPORT_STATE_FILE, path_for_run_file

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


def _check_out(out: Path) -> None:
    """The report folder must be new, empty, or an earlier report (which is replaced); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the report")
    state = read_json(out / REPORT_STATE_FILE)
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
        sections = build_sections(data, staging, log)
        index = staging / REPORT_INDEX_FILE
        index.write_text(render_page(data, sections), encoding="utf-8")
        problems = check_links(index)
        if problems:
            raise RuntimeError(f"the report links outside its folder: {problems[:3]}")
        state: ReportState = {
            "version": REPORT_STATE_VERSION,
            "format": REPORT_FORMAT,
            "target": path_for_run_file(data.target, data.target),
            "pipeline": data.pipeline,
            "runs": {label: path_for_run_file(path, data.target) for label, path in data.runs.items()},
            "evaluated": path_for_run_file(data.evaluated, data.target) if data.evaluated else None,
            "sections": {s.key: s.state for s in sections},
            "validation_by_round": accuracy_by_round(data),
            "summary": summarize(data),
            "notes": data.evaluation.get("notes", []),
        }
        (staging / REPORT_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / REPORT_INDEX_FILE
