"""``uniemo run``: the whole UniEmo loop in one command.

    data -> stage1 -> stage2 -> feedback -> judge -> evaluate -> report

Each stage is the ordinary job of its own command (``uniemo train``, ``uniemo feedback``, ``uniemo train-judge``,
``uniemo evaluate``, ``uniemo report``) run in this process on the pipeline's config plus the stage's overrides
(``pipeline.<stage>``), inside ONE Ray session shared by every stage (an embedded local cluster unless
``distributed.ray_address`` names one). The layout of ``runs/<run.name>/``::

    config.yaml       the resolved pipeline config (+ code version)
    pipeline.json     per stage: status (pending / running / done / failed), start, end, seconds, what it
                      produced (paths relative to the pipeline folder); :class:`uniemo.run_files.PipelineState`
    stage1/ stage2/   training runs (``uniemo train`` layouts)
    feedback/         the continued training of the feedback loop, with shards/synthetic/round-R and rounds/
    judge/            the evaluation classifier (not trained on anything the run under test saw beyond the real train split)
    report/           index.html + PNGs

``--resume`` skips stages recorded as done and continues an interrupted one from what it left (training runs
from their ``latest`` checkpoint, the feedback loop from its last complete round; the data stage is idempotent;
the judge, evaluation and report are cheap and are redone when interrupted).

:func:`plan` checks every stage's config (its ``pipeline.<stage>`` overrides included) before the first stage
runs. :meth:`Pipeline.run_stage` runs one stage's job on its own (inside the caller's Ray session), for a driver
that composes stages differently (``launchers/science_checks.py``). The stage names are
:data:`uniemo.run_layout.PIPELINE_STAGES`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from uniemo.config import Config, save_resolved, with_overrides
from uniemo.console import quiet_console
from uniemo.errors import UserError
from uniemo.logging import say
from uniemo.run_layout import (
    CONFIG_FILE,
    DATA_STAGE,
    EVALUATE_STAGE,
    EVALUATED_STAGES,
    EVALUATION_FILE,
    FEEDBACK_STAGE,
    JUDGE_DIR,
    LAUNCH_DIR,
    PIPELINE_FILE,
    PIPELINE_STAGES,
    REPORT_DIR,
    REPORT_INDEX_FILE,
    STAGE1,
    STAGE2,
    TRAINING_STAGES,
    path_for_run_file,
    path_from_run_file,
    run_dir_of,
)

if TYPE_CHECKING:  # typing only: run_files pulls numpy, and this module is on the `uniemo --help` path
    from uniemo.run_files import Evaluation, PipelineState


@dataclass
class Pipeline:
    """A planned pipeline (:func:`plan`): its config, folder and stages. :meth:`run_stage` runs one stage's job."""

    cfg: Config
    root: Path
    stages: list[str]

    def run_dir(self, stage: str) -> Path:
        """A stage's folder, named after the stage."""
        return self.root / stage

    def stage_config(self, stage: str) -> Config:
        """The config of a training stage's job: the pipeline's, placed under the pipeline dir, plus its overrides."""
        root = str(self.root)
        base = [f"run.output_dir={root}", f"run.name={stage}", "training.resume=''"]
        if stage == STAGE1:
            base += ["training.stage=1"]
        elif stage == STAGE2:
            base += ["training.stage=2", f"training.init_from={self.run_dir(STAGE1)}"]
        elif stage == FEEDBACK_STAGE:
            base += ["training.stage=2", f"feedback.from_run={self.run_dir(STAGE2)}"]
        own = list(getattr(self.cfg.pipeline, stage, []) or [])
        return with_overrides(self.cfg, base + own)

    def judge_config(self) -> Config:
        """The config of the judge's training: the pipeline's plus ``pipeline.judge``."""
        return with_overrides(self.cfg, list(self.cfg.pipeline.judge))

    def evaluation_config(self) -> Config:
        """What the evaluation will run on, as far as it is known before any work: the evaluated stage's config
        (its run's ``config.yaml`` once trained) plus ``pipeline.evaluate``."""
        final = next((s for s in EVALUATED_STAGES if s in self.stages), None)
        base = self.stage_config(final) if final is not None else self.cfg
        return with_overrides(base, list(self.cfg.pipeline.evaluate))

    def final_run(self) -> Path:
        for stage in EVALUATED_STAGES:
            if stage in self.stages or (self.run_dir(stage) / CONFIG_FILE).is_file():
                return self.run_dir(stage)
        raise UserError(
            f"pipeline.stages has no training stage ({', '.join(TRAINING_STAGES)}) and the pipeline dir holds none: "
            "nothing to evaluate"
        )

    def stored(self, path: str | Path) -> str:
        """``path`` as ``pipeline.json`` stores it (relative to the pipeline folder when it lies beside it)."""
        return path_for_run_file(path, self.root)

    def run_stage(self, stage: str, resume: bool = False) -> dict[str, Any]:
        """Run one stage's job (the ordinary job of its command) inside the caller's Ray session, without
        recording it in ``pipeline.json``; returns what it produced. ``resume`` continues what an earlier attempt
        left (a training run from its ``latest``, the feedback loop from its last complete round)."""
        if stage not in STAGE_JOBS:
            raise UserError(f"unknown pipeline stage {stage!r}; choose one of {', '.join(PIPELINE_STAGES)}")
        return STAGE_JOBS[stage].job(self, resume)


# -------------------------------------------------------------------------------------------------------------
# Stages
# -------------------------------------------------------------------------------------------------------------
def _stage_data(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.data.shards import read_manifest
    from uniemo.data.source import data_source

    folder = data_source(p.cfg.data, progress=True)
    totals = read_manifest(folder).get("totals", {})  # per split, written with the manifest
    return {"shards": p.stored(folder.resolve()), "samples": {split: t["samples"] for split, t in totals.items()}}


def _train_stage(stage: str) -> Callable[[Pipeline, bool], dict[str, Any]]:
    def run(p: Pipeline, resume: bool) -> dict[str, Any]:
        from uniemo.training.checkpoint import latest_checkpoint
        from uniemo.training.driver import run_training

        cfg = p.stage_config(stage)
        again = resume and latest_checkpoint(p.run_dir(stage)) is not None
        summary = run_training(cfg, resume=again)
        return {"run": p.stored(p.run_dir(stage)), **_small(p, summary)}

    return run


def _stage_feedback(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.feedback.loop import run_feedback

    cfg = p.stage_config(FEEDBACK_STAGE)
    summary = run_feedback(cfg, resume=resume)  # resume=True also starts a fresh loop
    run_dir = p.run_dir(FEEDBACK_STAGE)
    # What depends on the async loop's timing, per round (run_files.RoundTiming): read these to tell two runs apart.
    rounds = [{**t, "checkpoint": p.stored(path_from_run_file(t["checkpoint"], run_dir))} for t in summary["timing"]]
    return {"run": p.stored(run_dir), **_small(p, summary), "rounds": rounds}


def _stage_judge(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.evaluation.judge import train_judge

    out = train_judge(p.judge_config(), p.root / JUDGE_DIR)
    return {"judge": p.stored(out)}


def _stage_evaluate(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.evaluation.evaluate import evaluate_run

    run = p.final_run()
    judge = p.root / JUDGE_DIR
    metrics = evaluate_run(run, judge if judge.is_dir() else None, list(p.cfg.pipeline.evaluate))
    return {"run": p.stored(run), "metrics": p.stored(run / EVALUATION_FILE), **_headline(metrics)}


def _stage_report(p: Pipeline, resume: bool) -> dict[str, Any]:
    from uniemo.evaluation.report import write_report

    index = write_report(p.root)
    return {"report": p.stored(index)}


class StageJob(NamedTuple):
    title: str
    """What the stage does, for its progress line."""
    job: Callable[[Pipeline, bool], dict[str, Any]]
    """Runs the stage (``resume``: continue an interrupted attempt); returns what it produced."""
    config: Callable[[Pipeline], Config] | None = None
    """The stage's config, checked by :func:`plan` before any work (None: the pipeline's own)."""


STAGE_JOBS: dict[str, StageJob] = {
    DATA_STAGE: StageJob("synthetic emotion set -> WebDataset shards", _stage_data),
    STAGE1: StageJob("stage 1: understanding with expert queries", _train_stage(STAGE1),
                     partial(Pipeline.stage_config, stage=STAGE1)),
    STAGE2: StageJob("stage 2: joint understanding + generation", _train_stage(STAGE2),
                     partial(Pipeline.stage_config, stage=STAGE2)),
    FEEDBACK_STAGE: StageJob("feedback: generate, filter, train on real + synthetic", _stage_feedback,
                             partial(Pipeline.stage_config, stage=FEEDBACK_STAGE)),
    JUDGE_DIR: StageJob("evaluation classifier (independent judge)", _stage_judge, Pipeline.judge_config),
    EVALUATE_STAGE: StageJob("evaluation: accuracy, Emo-A, FID, diversity", _stage_evaluate,
                             Pipeline.evaluation_config),
    REPORT_DIR: StageJob("report: HTML + plots", _stage_report),
}
assert tuple(STAGE_JOBS) == PIPELINE_STAGES  # one job per stage, in order

_SUMMARY_PATHS = ("run_dir", "checkpoint", "resumed_from", "init_from", "from_run")
"""The entries of a job's summary that name a path (stored relative to the pipeline folder)."""


def _small(p: Pipeline, summary: Any) -> dict[str, Any]:
    """The scalar entries of a job's summary (what pipeline.json keeps), paths relative to the pipeline folder."""
    if not isinstance(summary, dict):
        return {}
    small = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for key in _SUMMARY_PATHS:
        value = small.get(key)
        if isinstance(value, str):
            small[key] = p.stored(value)
    return small


def _headline(metrics: Evaluation) -> dict[str, Any]:
    """The headline numbers of an evaluation (test top-1, Emo-A, pooled FID) for pipeline.json."""
    from uniemo.evaluation.evaluate import flat_metrics

    flat = flat_metrics(metrics)
    return {k: flat[k] for k in ("eval/test/top1", "eval/emo_a", "eval/fid") if k in flat}


# -------------------------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------------------------
_say = partial(say, topic="run")


def _progress_view(stages: list[str], state: PipelineState) -> str:
    marks = {"done": "x", "running": ">", "failed": "!"}
    parts = []
    for stage in stages:
        status = state.get("stages", {}).get(stage, {}).get("status", "pending")
        parts.append(f"[{marks.get(status, ' ')}] {stage}")
    return "  ".join(parts)


def plan(cfg: Config) -> Pipeline:
    """Resolve the pipeline dir and the stage list, and check every stage's config (``pipeline.<stage>``
    overrides included) before any work: a typo in the last stage's overrides fails before the first trains."""
    stages = [s for s in PIPELINE_STAGES if s in cfg.pipeline.stages]
    p = Pipeline(cfg=cfg, root=run_dir_of(cfg), stages=stages)
    for stage in stages:
        make_config = STAGE_JOBS[stage].config
        if make_config is None:
            continue
        try:
            make_config(p)
        except UserError as exc:
            raise type(exc)(f"pipeline.{stage}: {exc}") from None
    return p


def run_pipeline(cfg: Config, resume: bool = False) -> PipelineState:
    """Run (or with ``resume`` continue) the pipeline; returns its state (``pipeline.json``)."""
    from uniemo.run_files import read_pipeline_state

    p = plan(cfg)
    found = read_pipeline_state(p.root)
    if found is not None and not resume:
        raise UserError(
            f"{p.root} already holds a pipeline ({PIPELINE_FILE}); pass --resume to continue it, or choose another "
            "run.name"
        )
    # launch/ is the launchers' (the job's own config when a sweep or a scheduler started this pipeline)
    if found is None and p.root.exists() and any(e.name != LAUNCH_DIR for e in p.root.iterdir()) and not resume:
        raise UserError(f"{p.root} exists and is not empty; choose another run.name or move it away")
    if resume and found is None:
        _say(f"--resume: {p.root} holds no pipeline yet; starting it")
    with quiet_console(p.root):  # other packages' console output to <pipeline>/uniemo.log (uniemo.console)
        return _run(p, found, resume)


def _run(p: Pipeline, found: PipelineState | None, resume: bool) -> PipelineState:
    from uniemo.run_files import new_pipeline_state, write_pipeline_state

    cfg = p.cfg
    p.root.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, p.root)
    state = found if found is not None else new_pipeline_state()
    state["order"] = p.stages
    write_pipeline_state(p.root, state)

    from uniemo.distributed.ray_session import ray_session
    from uniemo.feedback.rounds import pool_cpus

    extra = pool_cpus(cfg) if FEEDBACK_STAGE in p.stages else 0.0
    started = time.monotonic()
    stages = state["stages"]
    pending = [s for s in p.stages if stages.get(s, {}).get("status") != "done"]
    with ray_session(cfg.distributed, extra_cpus=extra) if pending else contextlib.nullcontext():
        for index, stage in enumerate(p.stages, 1):
            entry = stages.setdefault(stage, {"status": "pending"})
            if entry.get("status") == "done":
                _say(f"[{index}/{len(p.stages)}] {stage}: done before, skipped")
                continue
            again = entry.get("status") in ("running", "failed")
            entry["status"], entry["started"] = "running", time.strftime("%Y-%m-%dT%H:%M:%S")
            write_pipeline_state(p.root, state)
            _say(_progress_view(p.stages, state))
            _say(f"[{index}/{len(p.stages)}] {stage}: {STAGE_JOBS[stage].title}" + (" (continuing)" if again else ""))
            t0 = time.monotonic()
            try:
                result = p.run_stage(stage, resume or again)
            except BaseException:
                entry["status"], entry["seconds"] = "failed", round(time.monotonic() - t0, 1)
                write_pipeline_state(p.root, state)
                raise
            entry["status"], entry["finished"] = "done", time.strftime("%Y-%m-%dT%H:%M:%S")
            entry["seconds"], entry["result"] = round(time.monotonic() - t0, 1), result
            write_pipeline_state(p.root, state)
            _say(f"[{index}/{len(p.stages)}] {stage}: done in {entry['seconds']:.0f} s")
    state["seconds"] = round(time.monotonic() - started, 1)
    write_pipeline_state(p.root, state)
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
    root = run_dir_of(cfg)
    report = root / REPORT_DIR / REPORT_INDEX_FILE
    print(f"pipeline finished in {state.get('seconds', 0):.0f} s: {root}")
    if report.is_file():
        print(f"report: {report}")
        for line in summary(root):
            print(f"  {line}")
    return 0
