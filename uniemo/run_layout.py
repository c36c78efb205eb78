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
folder per training stage (``stage1/``, ``stage2/``, ``feedback/``), ``judge/`` and ``report/``.
"""

from __future__ import annotations

from pathlib import Path

# -- a training run folder ------------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
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
PLACEMENT_FILE = Path(WORKERS_DIR) / "placement.jsonl"
"""One JSON line per started trainer (``role`` trainer, ``rank``) and feedback actor (``role`` generator or
filter, ``index``, ``round``): the Ray node it ran on (:func:`uniemo.distributed.env.ray_node_record`)."""
STEP_METRICS_FILE = "metrics.jsonl"
"""One JSON line per logged training step (:mod:`uniemo.logging`)."""
WANDB_ID_FILE = "wandb_id"
SAMPLES_DIR = "samples"
EMOTION_SPACE_FILE = "emotion_space.safetensors"

# -- evaluation, inside the evaluated run folder --------------------------------------------------------------
EVALUATION_FILE = "metrics.json"
"""What ``uniemo evaluate`` writes into the evaluated run folder (:mod:`uniemo.evaluation.run_files`)."""
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
TRAINING_STAGES = ("stage1", "stage2", "feedback")
"""The pipeline's training stages, each a training run folder ``<pipeline>/<stage>/``."""
JUDGE_DIR = "judge"
REPORT_DIR = "report"

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
ATTRIBUTE_BASE_FILE = "attribute_base.safetensors"
PIPELINE_DIR = "pipeline"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:06d}"


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
