"""The feedback loop (METHOD §5): rounds of generate -> filter -> continue training on real ∪ synthetic.

:func:`run_feedback` (``uniemo feedback --config FILE``) continues a finished stage-2 run (``feedback.from_run``;
empty: the newest stage-2 run under ``run.output_dir`` that is not a feedback run) in ONE new training run, the
feedback run ``<run.output_dir>/<run.name>/`` (:func:`uniemo.run_layout.run_dir_of`)::

    config.yaml, checkpoints/, metrics.jsonl, ...   an ordinary stage-2 training run (one continuous curve)
    shards/synthetic/round-<r>/*.tar + manifest     round r's kept images (:func:`uniemo.feedback.rounds.run_round`)
    rounds/round-<r>.json                           round r's report (per emotion: candidates, rejections, kept)
    rounds/loop.json                                the loop's record: mode, start checkpoint, per round the
                                                    checkpoint used and when the round was published

The feedback run trains ``feedback.rounds x feedback.steps_per_round`` steps in all, under one learning-rate
schedule (``training.steps`` of the config is replaced). Its first checkpoint continues every trained weight of
the start run (``training.init_from`` = that stage-2 checkpoint, :func:`uniemo.training.stages.split_init`; a new
optimiser state), and its data are ``data.extra_sources`` + the synthetic source
(:func:`uniemo.feedback.rounds.synthetic_source`: the round folders, mixed at rho). Validation stays real.

**Controls** (``feedback.control``, :mod:`uniemo.feedback.controls`): a sequential run whose round r is not
generated but mirrors round r of another feedback run (its kept images relabelled, or as many left-out real
images); everything else is the sequential loop below.

**Sequential** (``feedback.mode=sequential``, the paper). For round r: generate and filter with the checkpoint
trained on rounds < r (round 0: the start run's; round r > 0: the feedback run's checkpoint at step
``r x steps_per_round``), release the pool (its actors end, so training gets the cores), then train to step
``(r + 1) x steps_per_round`` (``training.stop_at_step``, resuming from ``checkpoints/latest``). The emotion space
of a mid-run checkpoint (the trainer writes one only at the end of the run) is computed on the driver over the
real train split.

**Async** (``feedback.mode=async``). Trainers and pool share one Ray session: the trainers train all steps in one
Ray Train job (workers of ``feedback.trainer_cpus`` CPUs) while a driver thread runs rounds: round r waits for a
checkpoint newer than the one the previous round used (the first round: the newest one there is, at the start
the start run's), builds its models and runs the round into the training run's synthetic source. The trainers
list new round folders at each epoch start, and every ``feedback.refresh_every`` steps when > 0. How often the
pool gets a new model is ``training.checkpoint_every``. When training ends, a round in progress is completed
(its shards stay for a later run) and no further round starts; when the pool fails, the trainers are asked to
checkpoint and stop, and the error is raised.

**Pinned async** (``feedback.pinned=true``): the async loop on the fixed schedule of
:mod:`uniemo.training.feedback_schedule`: round r waits for the feedback run's checkpoint of step ``r x steps_per_round``
(round 0 uses the start run's) and every round is made, also after training ended; the trainers wait for round r
after step ``r x steps_per_round + pinned_delay``. Two runs of one config and seed then train the same.

**Timing and retention.** Each round report, ``rounds/loop.json`` and the returned summary (``timing``, which
``pipeline.json`` keeps) record the step of the checkpoint a round generated from and the step after which its
shards entered the mix (:func:`record_timing`, from the trainers' ``rounds/mix.jsonl``). After each round and at
the end, :func:`uniemo.feedback.retention.prune_rounds` deletes the round folders retention lets go.

**Resume** (``resume=True``, ``--resume``): rounds whose folder is complete are not generated again, finished
training is not repeated, an interrupted training continues from ``checkpoints/latest``. The start checkpoint is
the one recorded in ``rounds/loop.json``. Without ``resume`` a run folder that already holds checkpoints or
complete rounds is refused; ``resume`` on a folder without them starts afresh.

Progress: one line per round step and per finished emotion (stderr), the trainers' progress bar, and a per
emotion table after each round.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from uniemo.config.paths import absolute_paths
from uniemo.config.schema import EMOTIONS, Config
from uniemo.console import quiet_console
from uniemo.data.attributes import write_json_atomic
from uniemo.data.shards import MANIFEST_FILE, manifest_folders
from uniemo.distributed.env import cpu_driver_env
from uniemo.distributed.placement import record_placement
from uniemo.distributed.ray_session import ray_session
from uniemo.errors import ConfigError, UserError
from uniemo.feedback.actors import FeedbackError, ModelBundle
from uniemo.feedback.controls import check_control, run_control_round
from uniemo.feedback.filtering import REJECTIONS
from uniemo.feedback.retention import prune_rounds
from uniemo.feedback.rounds import (
    _completed_report,
    pool_cpus,
    run_round,
    synthetic_source,
    update_round_report,
)
from uniemo.inference.runs import load_run
from uniemo.logging import read_metrics, say
from uniemo.run_files import EmotionFunnel, RoundReport, RoundTiming
from uniemo.run_layout import (
    COMPLETE_FILE,
    EMOTION_SPACE_FILE,
    LOOP_FILE,
    ROUNDS_DIR,
    SYNTHETIC_DIR,
    checkpoints_dir,
    path_for_run_file,
    path_from_run_file,
    round_dir,
    round_report_path,
    run_dir_of,
    run_of_checkpoint,
    step_dir_name,
    stop_request_path,
)
from uniemo.training.checkpoint import (
    CheckpointError,
    is_complete,
    latest_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    step_of,
)
from uniemo.training.driver import run_training
from uniemo.training.emotion_space import compute_emotion_space, emotion_space_loader
from uniemo.training.feedback_schedule import entered_steps, generation_step, round_published
from uniemo.training.stages import find_latest_run

__all__ = ["format_round_summary", "run_feedback", "training_config"]
_POLL_S = 0.5
"""Async mode: how often the pool thread looks for a new checkpoint."""


_log = partial(say, topic="feedback")


# ---------------------------------------------------------------------------------------------------------
# Start checkpoint, training config, record
# ---------------------------------------------------------------------------------------------------------
def is_feedback_run(run_dir: Path) -> bool:
    """A run folder the loop wrote (it has ``rounds/``)."""
    return (Path(run_dir) / ROUNDS_DIR).is_dir()


def resolve_from_run(cfg: Config, run_dir: Path) -> Path:
    """The stage-2 checkpoint folder the loop starts from: ``feedback.from_run`` (a run or a step folder), else the
    newest stage-2 run under ``run.output_dir`` that is neither ``run_dir`` nor another feedback run."""

    if cfg.feedback.from_run:
        try:
            step_dir = resolve_checkpoint(cfg.feedback.from_run)
        except CheckpointError as e:
            raise ConfigError(f"feedback.from_run: {e}") from None
        if int(read_trainer_state(step_dir).get("stage", 1)) != 2:
            raise ConfigError(
                f"feedback.from_run {cfg.feedback.from_run} is not a stage-2 run: the loop continues joint "
                "training; give a finished stage-2 run (e.g. runs/tiny-stage2)"
            )
        return step_dir.resolve()
    found = find_latest_run(cfg.run.output_dir, 2, exclude=run_dir, skip=is_feedback_run)
    if found is None:
        raise ConfigError(
            f"the feedback loop starts from a finished stage-2 run, but none is under {cfg.run.output_dir}/; run "
            "stage 2 first (e.g. `uniemo train --config configs/tiny_stage2.yaml`) or set feedback.from_run"
        )
    return found.resolve()


def training_config(cfg: Config, from_ckpt: Path, run_dir: Path, stop_at_step: int = 0) -> Config:
    """The config of the feedback run's training (module docstring): stage 2 continued from ``from_ckpt`` for
    ``rounds x steps_per_round`` steps, with the run's synthetic source; async trainers get ``trainer_cpus``."""
    fb = cfg.feedback
    train = copy.deepcopy(cfg)
    train.training.stage = 2
    train.training.init_from = str(from_ckpt)
    train.training.steps = fb.rounds * fb.steps_per_round
    train.training.epochs = 0
    train.training.resume = ""
    train.training.stop_at_step = stop_at_step
    source = synthetic_source(cfg, run_dir)
    train.data.extra_sources = [s for s in train.data.extra_sources if s.name != source.name] + [source]
    if fb.mode == "async" and fb.trainer_cpus is not None:
        train.distributed.cpus_per_worker = fb.trainer_cpus
    train.validate()
    return train


class _Record:
    """``rounds/loop.json``, written atomically; shared by the main and the pool thread."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOOP_FILE
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        self.data.setdefault("rounds", {})

    def update(self, **fields: Any) -> None:
        with self.lock:
            self.data.update(fields)
            write_json_atomic(self.path, self.data)

    def set_round(self, index: int, **fields: Any) -> None:
        with self.lock:
            self.data["rounds"].setdefault(str(index), {}).update(fields)
            write_json_atomic(self.path, self.data)


def _check_start(run_dir: Path, resume: bool) -> bool:
    """Refuse to start over a feedback run without ``resume``; returns whether there is anything to resume (a
    checkpoint or a complete round; ``resume`` on a folder without either starts afresh)."""

    started = latest_checkpoint(run_dir) is not None or bool(manifest_folders(run_dir / SYNTHETIC_DIR))
    if started and not resume:
        raise UserError(
            f"{run_dir} already holds a feedback run (checkpoints or rounds); pass --resume to continue it, or "
            "choose another run.name"
        )
    return started


# ---------------------------------------------------------------------------------------------------------
# Models of a checkpoint
# ---------------------------------------------------------------------------------------------------------
def bundle_of_run(
    run_dir: Path, log: Callable[[str], None] = _log, feedback_run: Path | None = None,
    checkpoint: Path | None = None,
) -> ModelBundle:
    """The pool's models of ``run_dir``'s latest checkpoint (or of its step folder ``checkpoint``), with an emotion
    space that belongs to it: the run's ``emotion_space.safetensors`` when it was written after that checkpoint
    and the checkpoint is the latest, else computed here over the real train split (a mid-run checkpoint of the
    feedback run). The checkpoint is named relative to ``feedback_run`` (the run whose round reports and shards
    record it; default ``run_dir``)."""

    run = load_run(run_dir, device="cpu", compute_missing_emotion_space=False, checkpoint=checkpoint)
    space_file = run_dir / EMOTION_SPACE_FILE
    complete = run.source / COMPLETE_FILE
    latest = latest_checkpoint(run_dir)
    fresh = (
        space_file.is_file() and complete.is_file() and space_file.stat().st_mtime >= complete.stat().st_mtime
        and latest is not None and latest.resolve() == run.source.resolve()
    )
    if not fresh:
        log(f"computing the emotion space of {run.source.name} over the real train split")
        run.emotion_space = compute_emotion_space(run.understanding, emotion_space_loader(run.config), run.device)
    checkpoint_id = path_for_run_file(run.source, feedback_run if feedback_run is not None else run_dir)
    return ModelBundle.from_loaded_run(run, checkpoint_id=checkpoint_id)


def _bundle_of_checkpoint(step_dir: Path, log: Callable[[str], None], feedback_run: Path) -> ModelBundle:
    """:func:`bundle_of_run` of the step folder ``step_dir`` of the run holding it (pinned rounds read a step
    the trainers have since moved on from; the step folder is read as it is, so that is no race)."""

    return bundle_of_run(run_of_checkpoint(step_dir), log, feedback_run, checkpoint=step_dir)


# ---------------------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------------------
def round_complete(run_dir: Path, index: int) -> bool:
    """Whether round ``index`` was published (its shards may since have been deleted by retention)."""
    return round_published(run_dir, index)


def _completed(run_dir: Path, index: int, log: Callable[[str], None]) -> RoundReport:
    return _completed_report(round_dir(run_dir, index), round_report_path(run_dir, index), log)


def format_round_summary(report: RoundReport) -> str:
    """A table per emotion: candidates, rejections per filter step, lost, kept, mean p_k of the kept."""
    short = {"fidelity_argmax": "argmax", "fidelity_threshold": "tau", "duplicate": "dup",
             "attribute_cap": "cap", "not_selected": "unsel"}
    head = ["emotion", "cand", *[short.get(r, r) for r in REJECTIONS], "lost", "kept", "mean_p_k"]
    rows: list[list[Any]] = []
    for name in [*EMOTIONS, "total"]:
        row: EmotionFunnel = report["totals"]
        if name != "total":
            row = report["emotions"][name]
        p = row.get("mean_p_k")
        rows.append([name, row["candidates"], *[row["rejections"][r] for r in REJECTIONS], row["lost_in_flight"],
                     row["kept"], f"{p:.3f}" if isinstance(p, (int, float)) else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [f"round {report['round']}: kept {report['totals']['kept']} of {report['totals']['candidates']} "
             f"candidates in {len(report['shards'])} shard(s); checkpoint {report['checkpoint']}"]
    for cells in [head, *rows]:
        lines.append("  " + "  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                                      for i, (x, w) in enumerate(zip(cells, widths, strict=True))))
    return "\n".join(lines)


def _round_entry(report: RoundReport, skipped: bool) -> dict[str, Any]:
    return {
        "round": report["round"],
        "checkpoint": report["checkpoint"],
        "candidates": report["totals"]["candidates"],
        "kept": report["totals"]["kept"],
        "shards": len(report["shards"]),
        "skipped": skipped,
    }


def _publish_time(run_dir: Path, index: int) -> float:
    """When the round's manifest was written (the round became visible just after)."""

    return (round_dir(run_dir, index) / MANIFEST_FILE).stat().st_mtime


def _record_actors(run_dir: Path, index: int, event: str, info: dict[str, Any]) -> None:
    """Pool observer: where round ``index``'s actors started, into the run's placement record."""
    if event == "started":
        record_placement(run_dir, [{**actor, "round": index} for actor in info["actors"]])


def _run_one_round(
    cfg: Config, run_dir: Path, index: int, step_dir: Path, record: _Record, log: Callable[[str], None]
) -> RoundReport:
    """Build the models of ``step_dir``, run round ``index``, print its summary, record it. Returns the report."""

    started = time.perf_counter()
    log(f"round {index}: loading the models of {step_dir}")
    bundle = _bundle_of_checkpoint(step_dir, log, run_dir)
    # The feedback run's step of the weights (a checkpoint of another run is the start: step 0).
    from_step = (step_of(step_dir) or 0) if run_of_checkpoint(step_dir).resolve() == run_dir.resolve() else 0
    log(f"round {index}: generating {cfg.feedback.candidates_per_emotion} candidates per emotion "
        f"({cfg.feedback.generator_actors} generator, {cfg.feedback.filter_actors} filter actor(s))")
    report = run_round(bundle, cfg, run_dir, index, log=log, observer=partial(_record_actors, run_dir, index),
                       generated_from_step=from_step)
    del bundle
    say(format_round_summary(report), topic="feedback")
    record.set_round(
        index,
        checkpoint=report["checkpoint"],
        checkpoint_step=step_of(report["checkpoint"]),
        generated_from_step=from_step,
        kept=report["totals"]["kept"],
        published_at=_publish_time(run_dir, index),
        seconds=round(time.perf_counter() - started, 3),
    )
    prune_rounds(cfg, run_dir, log)
    return report


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------
def run_feedback(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """``uniemo feedback``: the loop of the module docstring. Returns a summary (run folder, start checkpoint,
    per round what was generated or skipped, the training's final step, loss and checkpoint).

    Raises:
        UserError: no stage-2 run to start from, the run folder holds a feedback run and ``resume`` is off, a
            round cannot run (see :func:`uniemo.feedback.rounds.run_round`), training fails with a user error.
    """

    cfg = absolute_paths(cfg)
    cfg.validate()
    cpu_driver_env(cfg.distributed)  # loading the start run imports DeepSpeed
    run_dir = run_dir_of(cfg)
    with quiet_console(run_dir):  # other packages' console output to <run_dir>/uniemo.log
        return _run_feedback(cfg, run_dir, resume)


def _run_feedback(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Any]:
    fb = cfg.feedback
    started = _check_start(run_dir, resume)
    record = _Record(run_dir)
    recorded = record.data.get("from_run") if started else None  # nothing made yet: resolve it again
    if recorded:
        from_ckpt = path_from_run_file(recorded, run_dir).resolve()
        if not from_ckpt.is_dir():
            raise UserError(f"cannot resume {run_dir}: its start checkpoint {from_ckpt} is gone; restore it")
        if fb.from_run:
            _log(f"resuming: the loop continues from its recorded start {from_ckpt} (feedback.from_run ignored)")
    else:
        from_ckpt = resolve_from_run(cfg, run_dir)
    training_config(cfg, from_ckpt, run_dir)  # checks the derived config before any work
    check_control(cfg)
    record.update(mode=fb.mode, from_run=path_for_run_file(from_ckpt, run_dir), rounds_planned=fb.rounds,
                  steps_per_round=fb.steps_per_round)
    _log(f"{fb.mode} loop of {fb.rounds} round(s) x {fb.steps_per_round} steps from {from_ckpt} -> {run_dir}"
         + (" (resuming)" if started else ""))
    if fb.mode == "async":
        result = _run_async(cfg, run_dir, from_ckpt, record)
    else:
        result = _run_sequential(cfg, run_dir, from_ckpt, record)
    prune_rounds(cfg, run_dir, _log)  # with the final checkpoint's listing
    result.update(run_dir=str(run_dir), mode=fb.mode, from_run=str(from_ckpt), pinned=fb.pinned,
                  timing=record_timing(run_dir, record))
    record.update(finished=result.get("step"), stopped=result.get("stopped", False))
    return result


def record_timing(run_dir: Path, record: _Record) -> list[RoundTiming]:
    """What depends on the loop's timing, per published round: the step of the checkpoint it generated from and
    the step after which its shards entered the trainers' mix (``rounds/mix.jsonl``), written into the round
    reports and ``rounds/loop.json``; returned for ``pipeline.json``."""
    entered = entered_steps(run_dir)
    timing: list[RoundTiming] = []
    for r in sorted(int(k) for k in record.data.get("rounds", {})):
        if not round_report_path(run_dir, r).is_file():
            continue
        update_round_report(run_dir, r, entered_step=entered.get(r))
        report = _completed_report(round_dir(run_dir, r), round_report_path(run_dir, r), lambda _: None)
        timing.append({"round": r, "checkpoint": report["checkpoint"],
                       "generated_from_step": report["generated_from_step"], "entered_step": entered.get(r)})
        record.set_round(r, generated_from_step=report["generated_from_step"], entered_step=entered.get(r))
    return timing


def _training_summary(run_dir: Path) -> dict[str, Any]:

    latest = latest_checkpoint(run_dir)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    return {
        "step": records[-1]["step"] if records else 0,
        "loss": records[-1]["loss"] if records else None,
        "checkpoint": str(latest) if latest else None,
    }


def _latest_step(run_dir: Path) -> int:

    latest = latest_checkpoint(run_dir)
    return (step_of(latest) if latest is not None else None) or 0


def _run_sequential(cfg: Config, run_dir: Path, from_ckpt: Path, record: _Record) -> dict[str, Any]:

    fb = cfg.feedback
    trainers = cfg.distributed.num_workers * cfg.distributed.cpus_per_worker
    rounds: list[dict[str, Any]] = []
    stopped = False
    # One Ray session for all rounds and trainings (the pool and the trainers take turns on the cores).
    with ray_session(cfg.distributed, extra_cpus=max(0.0, pool_cpus(cfg) - trainers)):
        for r in range(fb.rounds):
            if round_complete(run_dir, r):
                rounds.append(_round_entry(_completed(run_dir, r, _log), skipped=True))
            elif fb.control:  # a control run: round r mirrors the feedback run it controls (controls.py)
                report = run_control_round(cfg, run_dir, r, _log)
                record.set_round(r, checkpoint=report["checkpoint"], kept=report["totals"]["kept"],
                                 published_at=_publish_time(run_dir, r), control=fb.control)
                rounds.append(_round_entry(report, skipped=False))
            else:
                step_dir = from_ckpt if r == 0 else latest_checkpoint(run_dir)
                if step_dir is None:
                    raise FeedbackError(f"round {r} needs the feedback run's checkpoint, but {run_dir} has none")
                rounds.append(_round_entry(_run_one_round(cfg, run_dir, r, step_dir, record, _log), skipped=False))
            target = (r + 1) * fb.steps_per_round
            done = _latest_step(run_dir)
            if done >= target:
                _log(f"round {r}: training to step {target} is done already (latest checkpoint at step {done})")
                continue
            _log(f"round {r}: training on real + synthetic from step {done} to step {target}")
            summary = run_training(training_config(cfg, from_ckpt, run_dir, stop_at_step=target),
                                   resume=latest_checkpoint(run_dir) is not None)
            prune_rounds(cfg, run_dir, _log)
            if summary.get("stopped"):
                stopped = True  # SIGTERM: checkpointed; --resume continues
                break
    return {"rounds": rounds, "stopped": stopped, **_training_summary(run_dir)}


# -- async ----------------------------------------------------------------------------------------------------
class _PoolThread(threading.Thread):
    """The driver-side pool of the async mode (module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, from_ckpt: Path, record: _Record) -> None:
        super().__init__(name="uniemo-feedback-pool", daemon=True)
        self.cfg, self.run_dir, self.from_ckpt, self.record = cfg, run_dir, from_ckpt, record
        self.stop = threading.Event()
        """Set by the driver: start no further round (training ended, failed or was stopped)."""
        self.training_over = threading.Event()
        """Set by the driver when the training job returned or failed: nobody reads a stop request any more."""
        self.error: BaseException | None = None
        self.rounds: list[dict[str, Any]] = []

    def run(self) -> None:

        try:
            self._rounds()
        except BaseException as exc:  # reported by the main thread once training stopped
            self.error = exc
            _log(f"the pool failed ({type(exc).__name__}: {exc}); asking the trainers to checkpoint and stop")
            while True:  # again and again: a driver that starts training after this would clear one request
                stop_request_path(self.run_dir).touch()
                if self.stop.wait(_POLL_S) or self.training_over.is_set():
                    break

    def _candidate(self) -> Path:

        latest = latest_checkpoint(self.run_dir)
        return latest.resolve() if latest is not None else self.from_ckpt

    def _rounds(self) -> None:
        if self.cfg.feedback.pinned:
            self._pinned_rounds()
            return
        last_used: str | None = None
        for r in range(self.cfg.feedback.rounds):
            if self.stop.is_set():
                return
            if round_complete(self.run_dir, r):
                report = _completed(self.run_dir, r, _log)
                last_used = self._used(report)
                self.rounds.append(_round_entry(report, skipped=True))
                continue
            step_dir = self._candidate()
            if last_used is not None and str(step_dir) == last_used:
                _log(f"round {r}: waiting for a checkpoint newer than {Path(last_used).name}")
                while str(step_dir) == last_used:
                    if self.stop.wait(_POLL_S):
                        return
                    step_dir = self._candidate()
            report = self._round_with_retry(r, step_dir)
            last_used = self._used(report)
            self.rounds.append(_round_entry(report, skipped=False))

    def _used(self, report: RoundReport) -> str:
        """The checkpoint a round report records, as :meth:`_candidate` names it (round reports store it relative
        to the run folder)."""
        return str(path_from_run_file(report["checkpoint"], self.run_dir).resolve())

    def _pinned_rounds(self) -> None:
        """Pinned (:mod:`uniemo.training.feedback_schedule`): round r from the checkpoint of step r x steps_per_round, in
        order, all of them unless the run is stopped (the trainers wait for each at its pickup step)."""
        for r in range(self.cfg.feedback.rounds):
            if self.stop.is_set():
                return
            if round_complete(self.run_dir, r):
                self.rounds.append(_round_entry(_completed(self.run_dir, r, _log), skipped=True))
                continue
            step = generation_step(self.cfg.feedback, r)
            step_dir = self.from_ckpt if r == 0 else checkpoints_dir(self.run_dir) / step_dir_name(step)
            if not is_complete(step_dir):
                _log(f"round {r}: waiting for the checkpoint of step {step} (pinned)")
            while not is_complete(step_dir):
                if self.stop.wait(_POLL_S):
                    return
            report = _run_one_round(self.cfg, self.run_dir, r, step_dir, self.record, _log)
            self.rounds.append(_round_entry(report, skipped=False))

    def _round_with_retry(self, r: int, step_dir: Path) -> RoundReport:
        """The round; when the checkpoint is rotated away while its models load, again with the newest one."""
        for attempt in range(3):
            try:
                return _run_one_round(self.cfg, self.run_dir, r, step_dir, self.record, _log)
            except Exception as exc:  # e.g. the step folder rotated away while DeepSpeed read it
                newest = self._candidate()
                if attempt == 2 or newest == step_dir or round_complete(self.run_dir, r):
                    raise
                _log(f"round {r}: {step_dir.name} went away while loading ({exc}); using {newest.name}")
                step_dir = newest
        raise AssertionError("unreachable")


def _run_async(cfg: Config, run_dir: Path, from_ckpt: Path, record: _Record) -> dict[str, Any]:

    fb = cfg.feedback
    train_cfg = training_config(cfg, from_ckpt, run_dir)
    total = train_cfg.training.steps
    done = _latest_step(run_dir)
    pool = _PoolThread(cfg, run_dir, from_ckpt, record)
    if done >= total and fb.pinned and not all(round_complete(run_dir, r) for r in range(fb.rounds)):
        _log(f"training is complete already (step {done} of {total}); making the rounds left (pinned)")
        pool.training_over.set()
        with ray_session(train_cfg.distributed, extra_cpus=pool_cpus(cfg)):
            pool.start()
            pool.join()
        if pool.error is not None:
            raise pool.error
        return {"rounds": pool.rounds, "stopped": False, **_training_summary(run_dir)}
    if done >= total:
        _log(f"training is complete already (step {done} of {total}); async rounds run only beside training")
        rounds = [_round_entry(_completed(run_dir, r, _log), skipped=True)
                  for r in range(fb.rounds) if round_complete(run_dir, r)]
        return {"rounds": rounds, "stopped": False, **_training_summary(run_dir)}
    failed = True
    summary: dict[str, Any] = {}
    with ray_session(train_cfg.distributed, extra_cpus=pool_cpus(cfg)):
        pool.start()
        try:
            summary = run_training(train_cfg, resume=done > 0)
            failed = False
        finally:
            # Pinned: the rounds left are still made (the same rounds on every run), unless the run was stopped.
            finish = fb.pinned and not failed and not summary.get("stopped")
            pool.training_over.set()
            if not finish:
                pool.stop.set()
            if not failed:
                if pool.is_alive():
                    _log("training finished; waiting for the " + ("rounds left" if finish else "round in progress"))
                pool.join()
    if failed:
        pool.join(timeout=60)  # Ray is down: the pool's calls fail and the thread ends

    stop_request_path(run_dir).unlink(missing_ok=True)  # the pool's request, if it failed, is answered
    if pool.error is not None:
        raise pool.error
    stopped = bool(summary.get("stopped")) and pool.error is None
    return {"rounds": pool.rounds, "stopped": stopped, **_training_summary(run_dir)}
