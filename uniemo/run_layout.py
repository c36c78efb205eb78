"""Where a run keeps its things: every path and file name of a run folder, a pipeline folder, a judge folder and an
export folder, defined once (docs/ARCHITECTURE.md, "Where a run keeps its things").

Writers and readers import the names from here; no other module spells a run-folder file name. Two files that
are easily confused have distinct names here: :data:`STEP_METRICS_FILE` (``metrics.jsonl``, one line per logged
training step) and :data:`EVALUATION_FILE` (``metrics.json``, the result of ``uniemo evaluate``).

A training run folder ``runs/<name>/``::

    config.yaml                 resolved config + code version                  CONFIG_FILE
    checkpoints/latest          names the newest complete step folder           CHECKPOINTS_DIR, LATEST_FILE
    checkpoints/step-NNNNNN/    ds/, rng/, trainer_state.json, COMPLETE         DS_TAG, TRAINER_STATE_FILE, ...
                                (a converted run: model.safetensors in place of   CONSOLIDATED_FILE
                                ds/ and rng/; conversion.json beside config.yaml) CONVERSION_FILE
    metrics.jsonl               one JSON line per logged step                   STEP_METRICS_FILE
    metrics.json                ``uniemo evaluate``'s result                    EVALUATION_FILE
    eval/                       understanding.json, confusion.json, generated/  EVAL_DIR, ...
    samples/                    stage 2's sample grids                          SAMPLES_DIR
    emotion_space.safetensors   stage 2, at the end of training                 EMOTION_SPACE_FILE
    shards/synthetic/round-R/   feedback: round R's kept images                 SYNTHETIC_DIR, round_dir()
    rounds/round-R.json         feedback: round R's report                      ROUNDS_DIR, round_report_path()
    rounds/loop.json            feedback: the loop's record                     LOOP_FILE
    rounds/mix.jsonl            feedback: the rounds the trainers read, by step  MIX_FILE
    workers/rank-R.pid          the pid of each Ray Train worker                WORKERS_DIR
    workers/placement.jsonl     the Ray node of every trainer and pool actor    PLACEMENT_FILE
    wandb/, wandb_id            wandb's files and the run's id                  WANDB_ID_FILE

A pipeline folder ``runs/<name>/`` (``uniemo run``) holds ``config.yaml``, ``pipeline.json``, one training run
folder per training stage (``stage1/``, ``stage2/``, ``feedback/``), ``judge/`` and ``report/``: each stage's
folder is named after the stage (:data:`PIPELINE_STAGES`, the one list of stage names).

Paths inside run files (``config.yaml``, ``trainer_state.json``, ``pipeline.json``, ``metrics.json``, round
reports, ``loop.json``, ``report.json``) are written relative to the run (or pipeline) folder that holds the file
when they point into that folder's parent, so a pipeline folder (or a whole ``runs/``) copied or moved to another
place or machine still evaluates and reports: :func:`path_for_run_file` writes them, :func:`path_from_run_file`
reads them (absolute paths of older runs read as they are).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

# -- a training run folder ------------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
EXPORT_DIR = "export"
"""Where ``uniemo export`` writes by default (``<run>/export``)."""
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
"""``checkpoints/latest``: the name of the newest complete step folder."""
STEP_DIR_PREFIX = "step-"
COMPLETE_FILE = "COMPLETE"
"""Written last into a step folder, after every rank finished."""
TRAINER_STATE_FILE = "trainer_state.json"
DS_TAG = "ds"
"""The DeepSpeed tag every step folder is saved under (``engine.save_checkpoint(step_dir, tag="ds")``)."""
CONSOLIDATED_FILE = "model.safetensors"
"""A step folder of fp32 weights by task parameter name, in place of DeepSpeed's ``ds/``: what ``uniemo convert
official`` writes (a checkpoint to read, evaluate and continue from, not to resume)."""
CONVERSION_FILE = "conversion.json"
"""In a run folder written by ``uniemo convert official``: the source files (sha256) and what the conversion did."""
RNG_DIR = "rng"
STOP_REQUEST_FILE = ".stop-requested"
"""File in the run directory by which a driver asks its workers to checkpoint and stop (SIGTERM, preemption)."""
WORKERS_DIR = "workers"
"""``workers/rank-R.pid`` (:func:`worker_pid_path`) and ``workers/placement.jsonl``."""
PLACEMENT_FILE = Path(WORKERS_DIR) / "placement.jsonl"
"""One JSON line per started trainer (``role`` trainer, ``rank``) and feedback actor (``role`` generator or
filter, ``index``, ``round``): the Ray node it ran on (:func:`uniemo.distributed.env.ray_node_record`)."""
LOG_FILE = "uniemo.log"
"""Other packages' console output of the commands run on this folder (Ray's, warnings): :mod:`uniemo.console`."""
STEP_METRICS_FILE = "metrics.jsonl"
"""One JSON line per logged training step (:mod:`uniemo.logging`)."""
WANDB_ID_FILE = "wandb_id"
SAMPLES_DIR = "samples"
"""``samples/<emotion>.png`` and ``samples/grid.png`` (:data:`SAMPLE_GRID_FILE`): stage 2's sample grids."""
SAMPLE_GRID_FILE = "grid.png"
EMOTION_SPACE_FILE = "emotion_space.safetensors"
EMOTION_SPACE_COUNTS_FILE = "emotion_space_counts.json"
"""Train images per emotion the emotion space was computed over."""
INITIAL_WEIGHTS_FILE = "initial_weights.safetensors"
"""The parameters of the run's model that no checkpoint holds and no weights folder gives back (never trained,
e.g. frozen contrastive scales or a random preset generator), saved once at the run's start so that loading the
run needs no seed replay."""
GENERATOR_DIR = "generator"
"""``training.stage: generator``: the pretrained generator as a diffusers folder, with :data:`PROVENANCE_FILE`."""
PROVENANCE_FILE = "provenance.json"

# -- evaluation, inside the evaluated run folder --------------------------------------------------------------
EVALUATION_FILE = "metrics.json"
"""What ``uniemo evaluate`` writes into the evaluated run folder (:class:`uniemo.run_files.Evaluation`)."""
EVAL_DIR = "eval"
UNDERSTANDING_FILE = "understanding.json"
CONFUSION_FILE = "confusion.json"
GENERATED_DIR = "generated"
"""``eval/generated/<emotion>/*.png`` (``*.jpg`` with ``evaluation.image_format=jpg``)."""
GENERATIONS_FILE = "generations.jsonl"
"""Beside generated images: one line per image (emotion, seed, file)."""

# -- the feedback loop, inside the feedback run folder --------------------------------------------------------
SYNTHETIC_DIR = Path("shards") / "synthetic"
"""The synthetic source of a run, relative to the run folder: one ``round-<r>/`` sub-folder per round."""
STAGING_DIR = Path("shards") / ".staging"
"""Where a round's shards are written before the round becomes visible (outside the synthetic source)."""
ROUNDS_DIR = Path("rounds")
"""Round reports, relative to the run folder."""
LOOP_FILE = ROUNDS_DIR / "loop.json"
"""The feedback loop's own record (mode, start checkpoint, per round the checkpoint used)."""
MIX_FILE = ROUNDS_DIR / "mix.jsonl"
"""One JSON line per change of the round folders the trainers' mix lists (rank 0): step, epoch, rounds."""
RETIRED_DIR = Path("shards") / ".retired"
"""Where a round folder is moved (out of the synthetic source, in one rename) before retention deletes it."""
ROUND_PREFIX = "round-"

# -- what a launcher writes into a run folder ----------------------------------------------------------------
LAUNCH_DIR = "launch"
"""Sub-folder of a run directory with what the launcher wrote: job config, batch script, job logs."""
JOB_CONFIG_FILE = "job.yaml"

# -- a pipeline folder (``uniemo run``) -----------------------------------------------------------------------
PIPELINE_FILE = "pipeline.json"
DATA_STAGE = "data"
STAGE1 = "stage1"
STAGE2 = "stage2"
FEEDBACK_STAGE = "feedback"
JUDGE_DIR = "judge"
"""The judge stage and its folder (``<pipeline>/judge/``)."""
EVALUATE_STAGE = "evaluate"
REPORT_DIR = "report"
"""The report stage and its folder (``<pipeline>/report/``, or ``<run>/report/``)."""
PIPELINE_STAGES: tuple[str, ...] = (DATA_STAGE, STAGE1, STAGE2, FEEDBACK_STAGE, JUDGE_DIR, EVALUATE_STAGE, REPORT_DIR)
"""The stages of ``uniemo run``, in order: the one list of their names (``pipeline.stages``, ``pipeline.json``,
the report). A stage that makes a folder names it after itself."""
TRAINING_STAGES = (STAGE1, STAGE2, FEEDBACK_STAGE)
"""The pipeline's training stages, each a training run folder ``<pipeline>/<stage>/``."""
EVALUATED_STAGES = (FEEDBACK_STAGE, STAGE2, STAGE1)
"""The run a pipeline evaluates: the last trained one it has, in this order of preference."""

# -- a judge folder (``uniemo train-judge``) ------------------------------------------------------------------
JUDGE_FILE = "judge.json"
"""Written last into the judge folder."""
WEIGHTS_FILE = "model.safetensors"

# -- a report folder (``uniemo report``) ----------------------------------------------------------------------
REPORT_INDEX_FILE = "index.html"
REPORT_STATE_FILE = "report.json"

# -- an export folder (``uniemo export``) ---------------------------------------------------------------------
EXPORT_MANIFEST = "uniemo_export.json"
ATTRIBUTES_FILE = "attributes.json"
"""The attribute table: in a shard folder (data/FORMAT.md) and in an export."""
ATTRIBUTE_BASE_FILE = "attribute_base.safetensors"
PIPELINE_DIR = "pipeline"


class _RunSection(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def output_dir(self) -> str: ...


class _HasRunSection(Protocol):
    """A config (this module imports none: it is a leaf every module may import)."""

    @property
    def run(self) -> _RunSection: ...


def run_dir_of(cfg: _HasRunSection) -> Path:
    """The run folder of a config: ``<run.output_dir>/<run.name>``, absolute (workers may start in another
    folder). The one place a run folder is computed from a config (training, the feedback loop, the pipeline and
    the launchers)."""
    return (Path(cfg.run.output_dir).expanduser() / cfg.run.name).resolve()


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:06d}"


def sample_grid_path(run_dir: str | Path, emotion: str | None = None) -> Path:
    """``<run_dir>/samples/<emotion>.png``, or with no emotion the overview ``samples/grid.png``."""
    return Path(run_dir) / SAMPLES_DIR / (f"{emotion}.png" if emotion else SAMPLE_GRID_FILE)


def worker_pid_path(run_dir: str | Path, rank: int) -> Path:
    """``<run_dir>/workers/rank-<r>.pid``: the pid of a Ray Train worker (tests kill one by it)."""
    return Path(run_dir) / WORKERS_DIR / f"rank-{rank}.pid"


def run_of_checkpoint(step_dir: str | Path) -> Path:
    """The run folder of a checkpoint step folder (``<run>/checkpoints/step-N``)."""
    return Path(step_dir).parent.parent


def stop_request_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STOP_REQUEST_FILE


def round_dir(run_dir: str | Path, round_index: int) -> Path:
    """``<run_dir>/shards/synthetic/round-<r>``."""
    return Path(run_dir) / SYNTHETIC_DIR / f"{ROUND_PREFIX}{round_index}"


def round_of(folder: str | Path) -> int | None:
    """The round index of a round folder's name (``round-<r>``), else None."""
    name = Path(folder).name
    digits = name[len(ROUND_PREFIX):]
    return int(digits) if name.startswith(ROUND_PREFIX) and digits.isdigit() else None


def round_report_path(run_dir: str | Path, round_index: int) -> Path:
    """``<run_dir>/rounds/round-<r>.json``."""
    return Path(run_dir) / ROUNDS_DIR / f"round-{round_index}.json"


def round_lock_path(run_dir: str | Path, round_index: int) -> Path:
    """``<run_dir>/rounds/.round-<r>.lock``: one process per round."""
    return Path(run_dir) / ROUNDS_DIR / f".round-{round_index}.lock"


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVAL_DIR


def generated_dir(run_dir: str | Path) -> Path:
    """``<run>/eval/generated``: the images ``uniemo evaluate`` generated, one folder per emotion."""
    return Path(run_dir) / EVAL_DIR / GENERATED_DIR


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an export written by ``uniemo export`` (it holds :data:`EXPORT_MANIFEST`)."""
    return (Path(folder) / EXPORT_MANIFEST).is_file()


def path_for_run_file(target: str | Path, folder: str | Path) -> str:
    """How a run file of ``folder`` (a run or pipeline folder) stores the path ``target``: relative to ``folder``
    when ``target`` lies under ``folder``'s parent (the pipeline or ``runs/`` folder the run belongs to: what is
    copied together), else absolute."""
    target, folder = Path(target).absolute(), Path(folder).absolute()
    if target == folder or folder.parent in target.parents or target == folder.parent:
        return os.path.relpath(target, folder)
    return str(target)


def path_from_run_file(value: str | Path, folder: str | Path) -> Path:
    """The path a run file of ``folder`` names (:func:`path_for_run_file`): a relative one is relative to
    ``folder``; an absolute one (as older runs wrote) is taken as it is."""
    path = Path(value)
    return path if path.is_absolute() else Path(os.path.normpath(Path(folder).absolute() / path))
