"""``uniemo evaluate``: understanding and generation metrics of a trained run (METHOD §6, D12) -> metrics.json.

:func:`evaluate_run` has two parts:

1. **The run's model, on the run's workers** (:func:`evaluate_rank`, one per rank). With
   ``distributed.num_workers`` > 1 the ranks are Ray Train workers (``TorchTrainer``, as ``uniemo train`` starts
   them, gloo on CPU / NCCL on GPU); with 1 the rank runs in this process. Each rank loads the run
   (:func:`uniemo.inference.runs.load_run`) and

   - classifies its part of the **test** split: the loader's evaluation stream deals the split's shards out
     ``[rank::world_size]`` so every test sample is seen exactly once; the confusion matrices and loss sums are
     summed over ranks with ``all_reduce``, and rank 0 writes ``<run>/eval/understanding.json``;
   - stage 2: generates ``evaluation.images_per_emotion`` images for each emotion ``k`` with
     ``k % world_size == rank`` into ``<run>/eval/generated/<emotion>/`` (seeds ``evaluation.seed + k*M + i``,
     recorded in each PNG and in ``generations.jsonl``).

2. **Judging, in this process**: the generated images and the real test images go through the judge
   (:mod:`uniemo.evaluation.judge`, trained apart from the run) for Emo-A, FID on the judge's features and
   diversity, all named ``judge:<name>``; EmoGen's protocol (Inception FID, CLIP Emo-A, LPIPS, Sem-C, Sem-D:
   :mod:`uniemo.evaluation.paper_metrics`, the numbers of ``uniemo metrics``) runs on the same images for each
   metric whose ``evaluation.weights`` are configured, against ``evaluation.real_images`` or the run's real test
   split (``generation.paper``); the feedback rounds' filter funnel is read from ``<run>/rounds/round-*.json``.
   Everything lands in ``<run>/metrics.json`` (and ``eval/confusion.json``), and in the run's wandb run (its
   summary).

Every metric names the model that judged it: ``understanding`` is the run's own model (step N), Emo-A, FID and
the diversity are ``judge:<name>``, each metric of ``generation.paper`` names its network and weight files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uniemo.config import load_config
from uniemo.config.loader import from_dict
from uniemo.config.paths import absolute_paths
from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS, Config
from uniemo.console import quiet_console
from uniemo.data.attributes import write_json_atomic
from uniemo.data.images import read_rgb
from uniemo.data.loader import build_loader, build_loader_from_config, load_attribute_table
from uniemo.data.source import data_source
from uniemo.distributed.env import apply_worker_env, backend_for, device_for, ensure_process_group, read_env
from uniemo.distributed.ray_session import ray_session
from uniemo.distributed.ray_trainer import fit, torch_trainer
from uniemo.errors import UserError
from uniemo.evaluation import metrics, paper_metrics, paper_nets
from uniemo.evaluation.image_sets import ImageSet, read_image_folder, read_shard_split
from uniemo.evaluation.judge import describe, load_judge, same_data
from uniemo.inference.runs import default_device, generate_images, load_run
from uniemo.logging import RunLogger, check_wandb_credentials, read_metrics, say
from uniemo.models.generation import SamplingSettings, sampling_settings
from uniemo.run_files import (
    EVALUATION_VERSION,
    EmotionFunnel,
    Evaluation,
    RoundFunnel,
    Understanding,
    read_round_reports,
)
from uniemo.run_layout import (
    CONFIG_FILE,
    CONFUSION_FILE,
    EVAL_DIR,
    EVALUATION_FILE,
    GENERATED_DIR,
    GENERATIONS_FILE,
    JUDGE_DIR,
    JUDGE_FILE,
    UNDERSTANDING_FILE,
    WANDB_ID_FILE,
    is_export,
    path_for_run_file,
)
from uniemo.seeds import evaluation_seeds
from uniemo.training.checkpoint import checkpoint_step, require_checkpoint
from uniemo.training.preflight import check_evaluation_data

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from uniemo.config.schema import Config
    from uniemo.evaluation.judge import Judge
    from uniemo.inference.runs import LoadedRun



def _say(message: str) -> None:
    say(message, topic="evaluate")


# ---------------------------------------------------------------------------------------------------------
# Part 1: one rank
# ---------------------------------------------------------------------------------------------------------
def evaluation_sampling(cfg: Config) -> SamplingSettings:
    """How the evaluation samples: ``evaluation.sampling_steps``, else ``model.generator``'s settings, of the
    evaluation's config (the run's ``config.yaml`` plus the overrides given)."""
    return sampling_settings(cfg.model.generator, steps=cfg.evaluation.sampling_steps)


def evaluate_rank(cfg: Config, run_dir: Path, device: torch.device | None = None) -> None:
    """One rank's share of the evaluation (module docstring, part 1). Every rank must call it."""
    import torch


    env = read_env()
    if device is None:
        device = device_for(env, cfg.distributed)
    created = ensure_process_group(env, backend_for(cfg.distributed)) if env.world_size > 1 else False
    try:
        stage = int(cfg.training.stage)
        mine = [k for k in range(NUM_EMOTIONS) if k % env.world_size == env.rank] if stage == 2 else []
        run = load_run(run_dir, device=device, compute_missing_emotion_space=bool(mine))
        start = time.perf_counter()
        vector = _test_sums(run, cfg, env.rank, env.world_size)
        if env.world_size > 1:
            reduce_device = device if backend_for(cfg.distributed) == "nccl" else torch.device("cpu")
            buffer = vector.to(reduce_device)
            torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
            vector = buffer.cpu()
        if env.is_main:
            confusion = vector[: NUM_EMOTIONS * NUM_EMOTIONS].round().long().view(NUM_EMOTIONS, NUM_EMOTIONS)
            samples = int(confusion.sum())

            write_json_atomic(run_dir / EVAL_DIR / UNDERSTANDING_FILE, {
                "step": run.step,
                "checkpoint": path_for_run_file(run.source, run_dir),
                "confusion": confusion.tolist(),
                "loss": float(vector[-1]) / samples if samples else None,
                "workers": env.world_size,
                "seconds": round(time.perf_counter() - start, 3),
            })
            _say(f"test split: {samples} samples classified over {env.world_size} rank(s)")
        for k in mine:
            emotion = EMOTIONS[k]
            t0 = time.perf_counter()

            # The evaluation's config (the run's plus its overrides), not the run's own: an override such as
            # model.generator.guidance_scale is what the images are generated with, and what metrics.json reports.
            steps, guidance, sampler = evaluation_sampling(cfg)
            generate_images(
                run, emotion, cfg.evaluation.images_per_emotion, run_dir / EVAL_DIR / GENERATED_DIR / emotion,
                seed=evaluation_seeds(cfg.evaluation.seed, k, cfg.evaluation.images_per_emotion)[0], steps=steps,
                guidance_scale=guidance, sampler=sampler, batch_size=cfg.model.generator.generation_batch_size,
                image_format=cfg.evaluation.image_format,
            )
            _say(f"rank {env.rank}: {cfg.evaluation.images_per_emotion} {emotion} images generated "
                 f"({time.perf_counter() - t0:.1f} s)")
        if env.world_size > 1:
            torch.distributed.barrier()  # rank 0's files and every image exist before anyone returns
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _test_sums(run: LoadedRun, cfg: Config, rank: int, world_size: int) -> torch.Tensor:
    """float64 ``[K*K + 1]``: this rank's confusion counts (row-major, rows = true) and summed CE loss."""
    import torch


    loader = build_loader_from_config(cfg.data, "test", rank=rank, world_size=world_size, stage=1, training=False)
    model = run.understanding.eval()
    confusion = torch.zeros(NUM_EMOTIONS * NUM_EMOTIONS, dtype=torch.float64)
    loss = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["image"].to(run.device)).emotion_logits.float().cpu()
            labels = batch["label"]
            index = labels * NUM_EMOTIONS + logits.argmax(dim=-1)
            confusion += torch.bincount(index, minlength=NUM_EMOTIONS * NUM_EMOTIONS).double()
            loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
    return torch.cat([confusion, loss])


def evaluate_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (module-level, so Ray pickles it by reference)."""

    cfg = from_dict(Config, loop_config["config"])
    apply_worker_env(cfg.distributed)
    evaluate_rank(cfg, Path(loop_config["run_dir"]))


def _run_ranks(cfg: Config, run_dir: Path) -> str:
    """Part 1 over ``distributed.num_workers`` ranks; returns how it ran (``in-process`` or ``ray-train``)."""
    dist = cfg.distributed
    if dist.num_workers == 1:

        device = default_device() if dist.gpus_per_worker > 0 else None
        evaluate_rank(cfg, run_dir, device=device)
        return "in-process"


    trainer = torch_trainer(
        evaluate_worker, {"config": dataclasses.asdict(cfg), "run_dir": str(run_dir)}, dist,
        name="ray-eval", storage_path=run_dir / EVAL_DIR,
        max_failures=0,  # evaluation is cheap to rerun; no partial restarts
    )
    with ray_session(dist):
        fit(trainer)
    return "ray-train"


# ---------------------------------------------------------------------------------------------------------
# Part 2: judging, in this process
# ---------------------------------------------------------------------------------------------------------
def _real_test_set(cfg: Config, judge: Judge) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(probs [N,K], features [N,F], labels [N])`` of the real test split through the judge's transform."""

    loader = build_loader(
        data_source(cfg.data), "test", rank=0, world_size=1, batch_size=64,
        num_workers=cfg.data.num_workers, transform=judge.transform, training=False,
        attributes=load_attribute_table(cfg.data),
    )
    probs, feats, labels = [], [], []
    for batch in loader:
        p, f = judge.predict(batch["image"])
        probs.append(p)
        feats.append(f)
        labels.append(batch["label"].numpy())
    return np.concatenate(probs), np.concatenate(feats), np.concatenate(labels)


def _generated_set(run_dir: Path) -> tuple[list[Path], np.ndarray, dict[str, list[int]]]:
    """The evaluation images on disk: paths, target labels and seeds per emotion (from ``generations.jsonl``)."""
    paths, labels, seeds = [], [], {}
    for k, emotion in enumerate(EMOTIONS):
        folder = run_dir / EVAL_DIR / GENERATED_DIR / emotion
        records = [json.loads(line) for line in (folder / GENERATIONS_FILE).read_text().splitlines() if line]
        seeds[emotion] = [int(r["seed"]) for r in records]
        paths += [folder / r["file"] for r in records]
        labels += [k] * len(records)
    return paths, np.asarray(labels, dtype=np.int64), seeds


def real_image_set(cfg: Config) -> ImageSet:
    """The real set of the paper's FID: ``evaluation.real_images`` (EmoSet's ``image/``), else the run's real
    test split read from its local shards."""
    if cfg.evaluation.real_images:
        return read_image_folder(cfg.evaluation.real_images, "evaluation.real_images")
    return read_shard_split(data_source(cfg.data), "test")


def _check_paper_inputs(cfg: Config) -> None:
    """Before any model work: the configured metric weights and the real image folder exist (one-line errors)."""
    paper_nets.check_weights(cfg.evaluation.weights)
    paper_nets.resolve_device(cfg.evaluation)
    if cfg.evaluation.real_images and int(cfg.training.stage) == 2:
        read_image_folder(cfg.evaluation.real_images, "evaluation.real_images")


def _paper_generation(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """``generation.paper``: EmoGen's metrics of the evaluation images (each left out without its weights)."""
    generated = read_image_folder(run_dir / EVAL_DIR / GENERATED_DIR, "the evaluation images")
    real = real_image_set(cfg) if cfg.evaluation.weights.inception else None
    result = paper_metrics.compute_paper_metrics(
        cfg.evaluation, generated, real, workers=cfg.data.num_workers, progress=cfg.logging.progress
    )
    # The evaluation images lie in the run folder: named relative to it, so a copied run reads its own.
    described = {**generated.describe(), "source": path_for_run_file(run_dir / EVAL_DIR / GENERATED_DIR, run_dir)}
    return {"generated": described, "real": real.describe() if real is not None else None, **result}


def _judge_generation(cfg: Config, run_dir: Path, judge: Judge) -> tuple[dict, dict]:
    """Generation metrics (the judge's Emo-A, FID and diversity, and EmoGen's protocol where its weights are
    configured) and the judge's accuracy on the real test split."""


    real_probs, real_feats, real_labels = _real_test_set(cfg, judge)
    judge_test = metrics.confusion_summary(
        metrics.confusion_matrix(real_labels, real_probs.argmax(axis=1)) if len(real_labels) else np.zeros((8, 8))
    )
    judge_on_run = {"samples": judge_test["samples"], "top1": judge_test["top1"]}
    if cfg.training.stage != 2:
        return {}, judge_on_run

    paths, fake_labels, seeds = _generated_set(run_dir)
    chunks = []
    for start in range(0, len(paths), 256):  # a thousand 512-px images per emotion do not fit in memory at once
        images = [np.asarray(read_rgb(p)) for p in paths[start : start + 256]]
        chunks.append(judge.predict(judge.preprocess(images)))
    fake_probs = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros((0, NUM_EMOTIONS), np.float32)
    fake_feats = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, judge.feature_dim), np.float32)
    judge_name = f"judge:{judge.name}"

    emo_a = {"judge": judge_name, **metrics.emotion_accuracy(fake_probs, fake_labels)}
    emo_a["per_emotion"] = {
        e: metrics.emotion_accuracy(fake_probs[fake_labels == k], fake_labels[fake_labels == k])
        for k, e in enumerate(EMOTIONS)
    }
    fid = {"extractor": judge_name, **metrics.fid_per_emotion(real_feats, real_labels, fake_feats, fake_labels)}
    fid["note"] = (
        "pooled = Fréchet distance of the summed per-emotion statistics (METHOD §6.2) of the judge's features; "
        f"per-emotion FIDs from {cfg.evaluation.images_per_emotion} generated images are noisy, compare them only "
        "at equal M; the Inception FID of the paper is generation.paper.metrics.fid"
    )
    ev = cfg.evaluation
    generated_diversity = metrics.diversity_per_emotion(fake_feats, fake_labels, ev.diversity_pairs, ev.seed)
    # The real test images of each emotion on the same features: how diverse the generated ones should be.
    real_diversity = metrics.diversity_per_emotion(real_feats, real_labels, ev.diversity_pairs, ev.seed)
    diversity = {
        "extractor": judge_name,
        **generated_diversity,
        "real": real_diversity,
        "generated_vs_real": metrics.diversity_against_real(generated_diversity, real_diversity),
        "pairs_per_emotion": ev.diversity_pairs,
        "seed": ev.seed,
        "note": (
            "Sem-D = mean per-dimension squared difference (MSE) of judge features over random same-emotion pairs; "
            "EmoGen's script uses CLIP ViT-L/14 embeddings, 10 pairs and pools paths across emotions (METHOD §6.2 "
            "quirks); here pairs never cross emotions, all pairs are used when there are at most "
            "pairs_per_emotion of them, values are not comparable to EmoGen's table; real: the same measures "
            "over the real test images of each emotion, generated_vs_real: generated / real per emotion, averaged"
        ),
    }
    sampling = evaluation_sampling(cfg)
    generation = {
        "images_per_emotion": ev.images_per_emotion,
        "sampling_steps": sampling.steps,
        "guidance_scale": sampling.guidance_scale,
        "sampler": sampling.sampler,
        "images_dir": f"{EVAL_DIR}/{GENERATED_DIR}",
        "seeds": seeds,
        "emo_a": emo_a,
        "fid": fid,
        "diversity": diversity,
        "paper": _paper_generation(cfg, run_dir),
    }
    return generation, judge_on_run


# ---------------------------------------------------------------------------------------------------------
# Feedback rounds
# ---------------------------------------------------------------------------------------------------------
def summarize_rounds(run_dir: str | Path) -> list[RoundFunnel]:
    """The filter funnel of each round report ``<run>/rounds/round-*.json`` (METHOD §5), in round order.

    Per round: candidates -> scored -> passed fidelity (argmax and tau) -> passed near-duplicates -> kept, the
    rejections per step, lost batches' candidates, mean p_k of the kept, and per emotion the whole funnel
    (candidates, passed after each step, kept, kept share).
    """
    out: list[RoundFunnel] = []
    for report in read_round_reports(run_dir):
        totals = report["totals"]
        passed = totals["passed"]
        per_emotion: dict[str, EmotionFunnel] = {
            emotion: {
                "candidates": row["candidates"], "scored": row["scored"], "passed": row["passed"],
                "rejections": row["rejections"], "lost_in_flight": row["lost_in_flight"], "kept": row["kept"],
                "kept_share": row["kept_share"], "mean_p_k": row["mean_p_k"],
            }
            for emotion, row in report["emotions"].items()
        }
        out.append({
            "round": report["round"],
            "checkpoint": report["checkpoint"],
            "funnel": {
                "candidates": totals["candidates"],
                "scored": totals["scored"],
                "passed_fidelity": passed["fidelity_threshold"],
                "passed_duplicates": passed["duplicate"],
                "kept": totals["kept"],
            },
            "rejections": totals["rejections"],
            "lost_in_flight": totals["lost_in_flight"],
            "mean_p_k": totals["mean_p_k"],
            "per_emotion": per_emotion,
            "filter": report["filter"],
        })
    return out


def funnel_totals(run_dir: str | Path) -> dict[str, int]:
    """The funnel (candidates, scored, passed_fidelity, passed_duplicates, kept) and every rejection of a feedback
    (or control) run, each summed over its rounds (:func:`summarize_rounds`)."""
    total: dict[str, int] = {}
    for r in summarize_rounds(run_dir):
        for key, n in {**r["funnel"], **r["rejections"]}.items():
            total[key] = total.get(key, 0) + int(n)
    return total


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------
def resolve_judge_dir(run_dir: Path, judge_dir: str | Path | None, cfg: Config) -> Path:
    """``--judge``, else ``evaluation.judge``, else ``<run>/../judge`` or ``<run>/judge`` when one exists."""
    if judge_dir:
        return Path(judge_dir).expanduser()
    if cfg.evaluation.judge:
        return Path(cfg.evaluation.judge).expanduser()

    for candidate in (run_dir.parent / JUDGE_DIR, run_dir / JUDGE_DIR):
        if (candidate / JUDGE_FILE).is_file():
            return candidate
    raise UserError(
        f"no judge for {str(run_dir)!r}: train one with `uniemo train-judge --config FILE --out DIR`, then pass "
        "--judge DIR (or set evaluation.judge)"
    )


def _check_run(run_dir: Path) -> Path:
    """The run's latest checkpoint; one-line UserErrors for a missing folder, config or checkpoint."""

    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; pass a training run folder (runs/<name>)")
    if is_export(run_dir):
        raise UserError(f"{str(run_dir)!r} is an export; evaluate the training run folder it was exported from")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{str(run_dir)!r} is not a run folder (no config.yaml); pass runs/<name>")
    return require_checkpoint(run_dir)  # raises "has no checkpoint yet; train it first"


def evaluate_run(run_dir: str | Path, judge_dir: str | Path | None = None, cfg_overrides: Any = ()) -> Evaluation:
    """Evaluate a trained run; writes ``<run_dir>/metrics.json`` and returns its content (module docstring).

    ``cfg_overrides`` are dotted ``key=value`` overrides of the run's ``config.yaml`` (``evaluation.*``,
    ``distributed.num_workers``, ``data.num_workers``, ...).
    """

    run_dir = Path(run_dir).expanduser().resolve()
    step_dir = _check_run(run_dir)
    with quiet_console(run_dir):  # other packages' console output to <run>/uniemo.log (uniemo.console)
        return _evaluate_run(run_dir, step_dir, judge_dir, cfg_overrides)


def _evaluate_run(run_dir: Path, step_dir: Path, judge_dir: str | Path | None, cfg_overrides: Any) -> Evaluation:
    started = time.perf_counter()
    cfg = absolute_paths(load_config(run_dir / CONFIG_FILE, list(cfg_overrides)))
    if cfg.logging.wandb.mode == "online":

        check_wandb_credentials(cfg)  # before the work, not after it
    judge_path = resolve_judge_dir(run_dir, judge_dir, cfg)
    judge = load_judge(judge_path)
    left_out, notes = check_evaluation_data(cfg)  # the test split exists; what data without annotations left out
    for note in notes:
        _say(note)
    _check_paper_inputs(cfg)
    _say(describe(judge))
    if not same_data(judge, cfg):
        notes.append(f"the judge was trained on {judge.info.get('data', {}).get('shards')}, not on this run's shards")
        _say(f"warning: {notes[-1]}")

    eval_dir = run_dir / EVAL_DIR
    shutil.rmtree(eval_dir / GENERATED_DIR, ignore_errors=True)  # an earlier evaluation's images
    (eval_dir / UNDERSTANDING_FILE).unlink(missing_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    stage = int(cfg.training.stage)
    _say(f"stage-{stage} run {run_dir} at {step_dir.name}: {cfg.distributed.num_workers} worker(s)"
         + (f", {cfg.evaluation.images_per_emotion} images per emotion" if stage == 2 else ""))
    t0 = time.perf_counter()
    how = _run_ranks(cfg, run_dir)
    model_seconds = time.perf_counter() - t0
    done = json.loads((eval_dir / UNDERSTANDING_FILE).read_text(encoding="utf-8"))
    confusion = np.asarray(done["confusion"], dtype=np.int64)
    step = done["step"] if done["step"] is not None else checkpoint_step(step_dir)

    t0 = time.perf_counter()
    _say("judging generated and real test images" if stage == 2 else "judging real test images")
    generation, judge_on_run = _judge_generation(cfg, run_dir, judge)
    judge_seconds = time.perf_counter() - t0

    understanding: Understanding = {  # type: ignore[typeddict-item]  # the summary spreads its own keys
        "model": f"run:{cfg.run.name}@step-{step}",
        "split": "test",
        **metrics.confusion_summary(confusion),
        "loss": done["loss"],
        "confusion": confusion.tolist(),
        "confusion_axes": "rows = true emotion, columns = predicted emotion (EmoSet order)",
    }
    wandb_id = run_dir / WANDB_ID_FILE
    result: Evaluation = {
        "version": EVALUATION_VERSION,
        "run": {
            "dir": ".",  # where metrics.json is: paths in run files are relative to their run folder
            "name": cfg.run.name,
            "id": wandb_id.read_text().strip() if wandb_id.is_file() else cfg.run.name,
            "stage": stage,
            "step": step,
            "checkpoint": done["checkpoint"],
        },
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "evaluation": {
            **dataclasses.asdict(cfg.evaluation),
            "judge": path_for_run_file(judge_path.resolve(), run_dir),
            "workers": cfg.distributed.num_workers,
            "distributed": how,
            "seconds": {
                "model": round(model_seconds, 2),
                "judging": round(judge_seconds, 2),
                "total": round(time.perf_counter() - started, 2),
            },
        },
        "emotions": list(EMOTIONS),
        "understanding": understanding,
        "generation": generation or None,
        "judge": {
            "name": f"judge:{judge.name}",
            "dir": path_for_run_file(judge_path.resolve(), run_dir),
            "architecture": judge.info.get("architecture"),
            "val_accuracy": judge.info.get("val_accuracy"),
            "test_accuracy": judge_on_run["top1"],
            "trained_on": judge.info.get("data", {}).get("shards"),
            "same_data_as_run": same_data(judge, cfg),
        },
        "feedback_rounds": summarize_rounds(run_dir),
        "left_out": left_out,
        "notes": notes,
    }
    write_json_atomic(eval_dir / CONFUSION_FILE, {
        "emotions": list(EMOTIONS), "matrix": confusion.tolist(), "rows": "true", "columns": "predicted",
        "model": understanding["model"],
    })
    write_json_atomic(run_dir / EVALUATION_FILE, result)
    _log_wandb(cfg, run_dir, result)
    _say(summary_line(result, run_dir))
    return result


def flat_metrics(result: Evaluation) -> dict[str, float | None]:
    """The scalar metrics of a ``metrics.json`` under ``eval/...`` names (for wandb); None where the evaluation
    could not compute one."""
    flat: dict[str, float | None] = {}
    u = result["understanding"]
    flat["eval/test/top1"] = u["top1"]
    flat["eval/test/loss"] = u["loss"]
    for e, acc in u["per_emotion"].items():
        flat[f"eval/test/accuracy/{e}"] = acc
    flat["eval/judge/test_top1"] = result["judge"]["test_accuracy"]
    g = result.get("generation")
    if g:
        flat["eval/emo_a"] = g["emo_a"]["top1"]
        flat["eval/emo_a/mean_target_probability"] = g["emo_a"]["mean_target_probability"]
        flat["eval/emo_a/polarity"] = g["emo_a"]["polarity_accuracy"]
        flat["eval/fid"] = g["fid"]["pooled"]
        for e, value in g["fid"]["per_emotion"].items():
            flat[f"eval/fid/{e}"] = value
        flat["eval/diversity/mean_pairwise_distance"] = g["diversity"]["mean_pairwise_distance"]
        flat["eval/diversity/sem_d"] = g["diversity"]["sem_d"]
        if "real" in g["diversity"]:  # metrics.json written before real diversity was measured has none
            flat["eval/diversity/real_sem_d"] = g["diversity"]["real"]["sem_d"]
            flat["eval/diversity/generated_vs_real"] = g["diversity"]["generated_vs_real"]["sem_d"]
        for name, block in g.get("paper", {}).get("metrics", {}).items():
            flat[f"eval/paper/{name}"] = block.get(paper_metrics.HEADLINES[name])
            if name == "fid":
                for e, value in block["per_emotion"].items():
                    flat[f"eval/paper/fid/{e}"] = value
    for r in result.get("feedback_rounds", []):
        flat[f"eval/round-{r['round']}/kept"] = r["funnel"]["kept"]
        flat[f"eval/round-{r['round']}/candidates"] = r["funnel"]["candidates"]
    return {k: v for k, v in flat.items() if isinstance(v, (int, float))}


def _log_wandb(cfg: Config, run_dir: Path, result: Evaluation) -> None:
    """Put the metrics into the summary of the run's wandb run, respecting ``logging.wandb.mode``.

    The run's own :class:`uniemo.logging.RunLogger` opens it (same wandb id, from ``<run>/wandb_id``; nothing
    of ``metrics.jsonl`` is dropped: it keeps every step up to the last one logged). The summary, not a logged
    step: training already logged the evaluated step, and wandb refuses steps that go back.
    """
    if cfg.logging.wandb.mode == "disabled":
        return

    last = max([int(r.get("step", 0)) for r in read_metrics(run_dir)] + [int(result["run"]["step"] or 0)])
    logger = RunLogger(cfg, run_dir, resume_step=last)
    try:
        wandb_run = logger._wandb
        wandb_run.summary.update(flat_metrics(result))
        generation = result.get("generation") or {}
        wandb_run.summary["eval/extractors"] = {
            "understanding": result["understanding"]["model"],
            "emo_a": generation.get("emo_a", {}).get("judge"),
            "fid": generation.get("fid", {}).get("extractor"),
        }
    finally:
        logger.close()


def summary_line(result: Evaluation, run_dir: str | Path) -> str:
    """One line of the headline numbers, naming ``<run_dir>/metrics.json``."""
    u = result["understanding"]
    parts = [f"test top-1 {u['top1']:.3f} ({u['samples']} images)"]
    g = result.get("generation")
    if g:
        fid = g["fid"]["pooled"]
        parts.append(f"Emo-A {g['emo_a']['top1']:.3f} by {g['emo_a']['judge']}")
        parts.append(f"FID {fid:.2f} ({g['fid']['extractor']})" if fid is not None else "FID n/a")
        sem_d = g["diversity"]["sem_d"]
        ratio = (g["diversity"].get("generated_vs_real") or {}).get("sem_d")
        parts.append((f"Sem-D {sem_d:.4g}" + (f" ({ratio:.2f}x real)" if ratio is not None else ""))
                     if sem_d is not None else "Sem-D n/a")
        if g.get("paper", {}).get("metrics"):
            parts.append(f"EmoGen protocol: {paper_metrics.summary(g['paper'])}")
    return f"{Path(run_dir) / EVALUATION_FILE}: " + ", ".join(parts)
