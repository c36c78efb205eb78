"""``uniemo run``: the whole UniEmo loop in one command.

    data -> stage1 -> stage2 -> feedback -> judge -> evaluate -> report

Each stage is the ordinary job of its own command (``uniemo train``, ``uniemo feedback``, ``uniemo train-judge``,
``uniemo evaluate``, ``uniemo report``) run in this process on the pipeline's config plus the stage's overrides
(``pipeline.<stage>``), inside ONE Ray session shared by every stage (an embedded local cluster unless
``distributed.ray_address`` names one). The layout of ``runs/<run.name>/``::

    config.yaml       the resolved pipeline config (+ code version)
    pipeline.json     per stage: status (pending / running / done), start, end, seconds, what it produced
    stage1/ stage2/   training runs (``uniemo train`` layouts)
    feedback/         the continued training of the feedback loop, with shards/synthetic/round-R and rounds/
    judge/            the evaluation classifier (not trained on anything the run under test saw beyond the real train split)
    report/           index.html + PNGs

``--resume`` skips stages recorded as done and continues an interrupted one from what it left (training runs
from their ``latest`` checkpoint, the feedback loop from its last complete round; the data stage is idempotent;
the judge, evaluation and report are cheap and are redone when interrupted).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.atomic import atomic_write
from uniemo.config import Config, save_resolved, with_overrides
from uniemo.config.schema import PIPELINE_STAGES
from uniemo.errors import UserError
from uniemo.logging import say
from uniemo.run_layout import (
    CONFIG_FILE,
    EVALUATION_FILE,
    JUDGE_DIR,
    LAUNCH_DIR,
    PIPELINE_FILE,
    REPORT_DIR,
    REPORT_INDEX_FILE,
)

if TYPE_CHECKING:  # typing only: run_files pulls numpy, and this module is on the `uniemo --help` path
    from uniemo.run_files import Evaluation

FINAL_RUNS = ("feedback", "stage2", "stage1")
"""The run evaluated: the last trained run the pipeline has (in this order of preference)."""


@dataclass
class Pipeline:
    cfg: Config
    root: Path
    stages: list[str]

    def run_dir(self, stage: str) -> Path:
        return self.root / stage

    def stage_config(self, stage: str) -> Config:
        """The config of ``stage``'s job: the pipeline's, placed under the pipeline dir, plus its overrides."""
        root = str(self.root)
        base = [f"run.output_dir={root}", f"run.name={stage}", "training.resume=''"]
        if stage == "stage1":
            base += ["training.stage=1"]
        elif stage == "stage2":
            base += ["training.stage=2", f"training.init_from={self.run_dir('stage1')}"]
        elif stage == "feedback":
            base += ["training.stage=2", f"feedback.from_run={self.run_dir('stage2')}"]
        own = list(getattr(self.cfg.pipeline, stage, []) or [])
        return with_overrides(self.cfg, base + own)

    def final_run(self) -> Path:
        for stage in FINAL_RUNS:
            if stage in self.stages or (self.run_dir(stage) / CONFIG_FILE).is_file():
                return self.run_dir(stage)
        raise UserError(
            "pipeline.stages has no training stage (stage1, stage2 or feedback) and the pipeline dir holds none: "
            "nothing to evaluate"
        )


# -------------------------------------------------------------------------------------------------------------
# State (pipeline.json), written atomically
# -------------------------------------------------------------------------------------------------------------
def _read_state(root: Path) -> dict[str, Any]:
    path = root / PIPELINE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); move it away to start the pipeline again") from None


def _write_state(root: Path, state: dict[str, Any]) -> None:
    path = root / PIPELINE_FILE
    atomic_write(path, json.dumps(state, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------------------
# Stages
# -------------------------------------------------------------------------------------------------------------
def _stage_data(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.data.shards import ensure_synthetic_shards, read_manifest

    folder = ensure_synthetic_shards(p.cfg.data, progress=True)
    totals = read_manifest(folder).get("totals", {})  # per split, written with the manifest
    return {"shards": str(folder.resolve()), "samples": {split: t["samples"] for split, t in totals.items()}}


def _train_stage(stage: str) -> Callable[[Pipeline, bool], dict[str, Any]]:
    def run(p: Pipeline, resume: bool) -> dict[str, Any]:
        from uniemo.distributed.ray_train import run_training
        from uniemo.training.checkpoint import latest_checkpoint

        cfg = p.stage_config(stage)
        again = resume and latest_checkpoint(p.run_dir(stage)) is not None
        summary = run_training(cfg, resume=again)
        return {"run": str(p.run_dir(stage)), **_small(summary)}

    return run


def _stage_feedback(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.feedback.loop import run_feedback

    cfg = p.stage_config("feedback")
    summary = run_feedback(cfg, resume=resume)  # resume=True also starts a fresh loop
    # What depends on the async loop's timing, per round (run_files.RoundTiming): read these to tell two runs apart.
    return {"run": str(p.run_dir("feedback")), **_small(summary), "rounds": summary["timing"]}


def _stage_judge(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.evaluation.judge import train_judge

    cfg = with_overrides(p.cfg, list(p.cfg.pipeline.judge))
    out = train_judge(cfg, p.root / JUDGE_DIR)
    return {"judge": str(out)}


def _stage_evaluate(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.evaluation.evaluate import evaluate_run

    run = p.final_run()
    judge = p.root / JUDGE_DIR
    metrics = evaluate_run(run, judge if judge.is_dir() else None, list(p.cfg.pipeline.evaluate))
    return {"run": str(run), "metrics": str(run / EVALUATION_FILE), **_headline(metrics)}


def _stage_report(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.evaluation.report import write_report

    index = write_report(p.root)
    return {"report": str(index)}


STAGE_JOBS: dict[str, tuple[str, Callable[[Pipeline, bool], dict[str, Any]]]] = {
    "data": ("synthetic emotion set -> WebDataset shards", _stage_data),
    "stage1": ("stage 1: understanding with expert queries", _train_stage("stage1")),
    "stage2": ("stage 2: joint understanding + generation", _train_stage("stage2")),
    "feedback": ("feedback: generate, filter, train on real + synthetic", _stage_feedback),
    "judge": ("evaluation classifier (independent judge)", _stage_judge),
    "evaluate": ("evaluation: accuracy, Emo-A, FID, diversity", _stage_evaluate),
    "report": ("report: HTML + plots", _stage_report),
}


def _small(summary: Any) -> dict[str, Any]:
    """The scalar entries of a job's summary (what pipeline.json keeps)."""
    if not isinstance(summary, dict):
        return {}
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _headline(metrics: Evaluation) -> dict[str, Any]:
    """The headline numbers of an evaluation (test top-1, Emo-A, pooled FID) for pipeline.json."""
    from uniemo.evaluation.evaluate import flat_metrics

    flat = flat_metrics(metrics)
    return {k: flat[k] for k in ("eval/test/top1", "eval/emo_a", "eval/fid") if k in flat}


# -------------------------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------------------------
_say = partial(say, topic="run")


def _progress_view(stages: list[str], state: dict[str, Any]) -> str:
    marks = {"done": "x", "running": ">", "failed": "!"}
    parts = []
    for stage in stages:
        status = state.get("stages", {}).get(stage, {}).get("status", "pending")
        parts.append(f"[{marks.get(status, ' ')}] {stage}")
    return "  ".join(parts)


def plan(cfg: Config) -> Pipeline:
    """Resolve the pipeline dir and the stage list, and check every stage's config before any work."""
    root = (Path(cfg.run.output_dir).expanduser() / cfg.run.name).resolve()
    stages = [s for s in PIPELINE_STAGES if s in cfg.pipeline.stages]
    p = Pipeline(cfg=cfg, root=root, stages=stages)
    for stage in ("stage1", "stage2", "feedback"):
        if stage in stages:
            try:
                p.stage_config(stage)
            except UserError as exc:
                raise type(exc)(f"pipeline.{stage}: {exc}") from None
    return p


def run_pipeline(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the pipeline; returns its state (``pipeline.json``)."""
    p = plan(cfg)
    state = _read_state(p.root)
    if state and not resume:
        raise UserError(
            f"{p.root} already holds a pipeline ({PIPELINE_FILE}); pass --resume to continue it, or choose another "
            "run.name"
        )
    # launch/ is the launchers' (the job's own config when a sweep or a scheduler started this pipeline)
    if not state and p.root.exists() and any(e.name != LAUNCH_DIR for e in p.root.iterdir()) and not resume:
        raise UserError(f"{p.root} exists and is not empty; choose another run.name or move it away")
    if resume and not state:
        _say(f"--resume: {p.root} holds no pipeline yet; starting it")
    p.root.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, p.root)
    from uniemo.run_files import PIPELINE_VERSION

    state.setdefault("stages", {})
    state["version"] = PIPELINE_VERSION
    state["root"] = str(p.root)
    state["order"] = p.stages
    _write_state(p.root, state)

    from uniemo.distributed.ray_train import ray_session
    from uniemo.feedback.rounds import pool_cpus

    extra = pool_cpus(cfg) if "feedback" in p.stages else 0.0
    started = time.monotonic()
    pending = [s for s in p.stages if state["stages"].get(s, {}).get("status") != "done"]
    with ray_session(cfg.distributed, extra_cpus=extra) if pending else contextlib.nullcontext():
        for index, stage in enumerate(p.stages, 1):
            entry = state["stages"].setdefault(stage, {"status": "pending"})
            title, job = STAGE_JOBS[stage]
            if entry.get("status") == "done":
                _say(f"[{index}/{len(p.stages)}] {stage}: done before, skipped")
                continue
            again = entry.get("status") in ("running", "failed")
            entry.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
            _write_state(p.root, state)
            _say(_progress_view(p.stages, state))
            _say(f"[{index}/{len(p.stages)}] {stage}: {title}" + (" (continuing)" if again else ""))
            t0 = time.monotonic()
            try:
                result = job(p, resume or again)
            except BaseException:
                entry.update(status="failed", seconds=round(time.monotonic() - t0, 1))
                _write_state(p.root, state)
                raise
            entry.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                         seconds=round(time.monotonic() - t0, 1), result=result)
            _write_state(p.root, state)
            _say(f"[{index}/{len(p.stages)}] {stage}: done in {entry['seconds']:.0f} s")
    state["seconds"] = round(time.monotonic() - started, 1)
    _write_state(p.root, state)
    _say(_progress_view(p.stages, state))
    return state


def summary(root: Path) -> list[str]:
    """Five lines for the end of ``uniemo run``."""
    try:
        from uniemo.evaluation.report import summary_lines

        lines = list(summary_lines(root))
    except Exception as exc:  # noqa: BLE001 - the summary must never hide the run's result
        lines = [f"(summary unavailable: {exc})"]
    return lines[:5]


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="the whole loop: data, stage 1, stage 2, feedback, judge, evaluation, report")
    p.add_argument("--config", required=True, help="YAML config file (e.g. configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pipeline.stages=[data,stage1]")
    p.add_argument("--resume", action="store_true",
                   help="skip completed stages and continue an interrupted one (starts the pipeline if none exists)")
    p.set_defaults(func=_main)


def _main(args: Any) -> int:
    from uniemo.config import load_config

    cfg = load_config(args.config, args.overrides)
    state = run_pipeline(cfg, resume=args.resume)
    root = Path(state["root"])
    report = root / REPORT_DIR / REPORT_INDEX_FILE
    print(f"pipeline finished in {state.get('seconds', 0):.0f} s: {root}")
    if report.is_file():
        print(f"report: {report}")
        for line in summary(root):
            print(f"  {line}")
    return 0
