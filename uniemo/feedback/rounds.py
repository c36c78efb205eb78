"""One feedback round (METHOD §5): generate N candidates per emotion, filter them, write the kept ones as shards.

:func:`run_round` is the whole round against one checkpoint (a :class:`uniemo.feedback.actors.ModelBundle`):

1. Jobs: for each emotion k, N candidates with seeds :func:`uniemo.seeds.candidate_seeds`, cut into
   batches of ``feedback.batch_size`` (the per-emotion quota; emotions are queued one after the other, so an
   emotion's pool completes early and its candidates leave the object store).
2. The pool (:class:`uniemo.feedback.actors.FeedbackPool`) generates and scores them. When every batch of
   emotion k has ended (scored, or lost with a dead actor), steps 1-4 run on its scored candidates
   (:func:`uniemo.feedback.filtering.filter_pool`, seeded by ``(run.seed, r, k)``) and a writer task cuts the kept
   images out of their batches.
3. The kept samples of all emotions are shuffled (seeded) and cut into shards of ``feedback.shard_size``
   (a one-emotion shard would fill a training shuffle buffer with one class), written by writer tasks into a
   staging folder ``<run_dir>/shards/.staging/round-<r>/`` outside the synthetic source, which gets its
   ``manifest.json`` (:func:`uniemo.data.shards.update_manifest`) once every shard is complete and is then
   renamed to ``<run_dir>/shards/synthetic/round-<r>/`` in one atomic step. Readers list the synthetic source's
   round folders by their manifests (``manifest_folders``), so they see the whole round or nothing; a crash at
   any point leaves no partial or unlisted shard in the source, only a staging folder that the next attempt of
   the round removes. A full disk ends the round with one :class:`~uniemo.errors.DiskFullError` line naming the
   shards folder and the space the round's shards need (writer tasks report it instead of raising inside Ray);
   the staging folder is removed, earlier rounds stay, and ``--resume`` runs the round again.
4. ``<run_dir>/rounds/round-<r>.json`` (also stored in the round's manifest under ``report``;
   :class:`uniemo.run_files.RoundReport`) records per emotion: candidates, how many passed each filter step,
   rejections per step, lost in flight, kept and the kept share, mean p_k, attribute spread; and checks
   ``candidates = kept + every rejection + lost in flight``.

:func:`_run_round_locked` runs the round in three phases: :func:`_generate_and_filter` (steps 1-2),
:func:`_write_shards` (step 3) and :func:`_round_report` (step 4), then publishes it (:func:`publish_round`).

A round whose folder is complete is not run again: :func:`run_round` returns its report. A file lock
(``<run_dir>/rounds/.round-<r>.lock``) keeps two processes from running the same round.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from uniemo.config.schema import EMOTIONS, Config, SourceConfig
from uniemo.data.attributes import write_json_atomic
from uniemo.data.shards import MANIFEST_FILE, read_manifest, sample_key, update_manifest
from uniemo.diskspace import space_report
from uniemo.distributed.ray_session import ray_session
from uniemo.errors import DISK_FULL_ERRNOS, DiskFullError
from uniemo.feedback.actors import (
    FeedbackError,
    FeedbackPool,
    GenerationJob,
    LostBatch,
    ModelBundle,
    Observer,
    PoolStats,
    ScoredBatch,
    gather_samples,
    write_shard,
)
from uniemo.feedback.filtering import REJECTIONS, filter_pool
from uniemo.logging import say
from uniemo.models.generation import sampling_settings
from uniemo.run_files import (
    ROUND_REPORT_VERSION,
    EmotionFunnel,
    EmotionRound,
    RoundReport,
    kept_share,
    passed_after_each_step,
    upgrade_round_report,
)
from uniemo.run_layout import STAGING_DIR, SYNTHETIC_DIR, round_dir, round_lock_path, round_report_path
from uniemo.seeds import candidate_seeds, round_shuffle_seed, selection_seed
from uniemo.training.feedback_schedule import SYNTHETIC_SOURCE, round_published

__all__ = ["plan_jobs", "pool_cpus", "publish_round", "run_round", "synthetic_source", "update_round_report"]

def synthetic_source(cfg: Config, run_dir: str | Path) -> SourceConfig:
    """The ``data.extra_sources`` entry that mixes the run's synthetic rounds into training (METHOD §5 step 6).

    The real source has weight 1, so a synthetic fraction rho of the samples needs weight rho / (1 - rho). The
    retention window (``feedback.keep_rounds``, ``keep_bytes``) limits which rounds the trainers read.
    """
    rho = cfg.feedback.synthetic_fraction
    if not 0.0 < rho < 1.0:
        raise FeedbackError(
            f"feedback.synthetic_fraction is {rho}: mixing synthetic shards needs 0 < rho < 1 (rho = 0 is "
            "explicit feedback off, METHOD D13)"
        )
    return SourceConfig(name=SYNTHETIC_SOURCE, path=str(Path(run_dir) / SYNTHETIC_DIR), weight=rho / (1.0 - rho),
                        keep_rounds=cfg.feedback.keep_rounds, keep_bytes=cfg.feedback.keep_bytes)


def pool_cpus(cfg: Config) -> float:
    """CPUs the pool reserves: its actors plus one writer task."""
    fb = cfg.feedback
    return fb.generator_actors * fb.generator_cpus + fb.filter_actors * fb.filter_cpus + fb.writer_cpus


# ---------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------
def plan_jobs(cfg: Config, round_index: int) -> list[GenerationJob]:
    """The round's generation jobs: N candidates per emotion in batches, emotion after emotion (deterministic)."""
    fb = cfg.feedback
    steps, guidance, sampler = sampling_settings(cfg.model.generator, fb.sampling_steps, fb.guidance_scale, fb.sampler)
    jobs: list[GenerationJob] = []
    for k in range(len(EMOTIONS)):
        seeds = candidate_seeds(cfg.run.seed, round_index, k, fb.candidates_per_emotion)
        for start in range(0, len(seeds), fb.batch_size):
            jobs.append(
                GenerationJob(
                    job_id=len(jobs),
                    emotion=k,
                    seeds=tuple(seeds[start : start + fb.batch_size]),
                    first_index=start,
                    steps=int(steps),
                    guidance_scale=float(guidance),
                    sampler=str(sampler),
                )
            )
    return jobs


# ---------------------------------------------------------------------------------------------------------
# Per-emotion bookkeeping
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _EmotionPool:
    emotion: int
    jobs_left: int
    scored: list[ScoredBatch] = field(default_factory=list)
    lost: int = 0
    report: EmotionRound | None = None
    samples: Any = None
    """ObjectRef of the kept samples (list of shard-sample dicts), once filtered."""
    kept: int = 0


def _attribute_spread(names: list[str | None]) -> dict[str, Any]:
    """How the kept images spread over retrieved attributes: distinct, largest share, normalised entropy, counts."""
    counts: dict[str, int] = {}
    for name in names:
        key = name if name is not None else "(none)"
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    if total == 0:
        return {"distinct": 0, "max_share": None, "entropy": None, "counts": {}}
    shares = np.asarray(list(counts.values()), dtype=np.float64) / total
    entropy = float(-(shares * np.log(shares)).sum())
    return {
        "distinct": len(counts),
        "max_share": float(shares.max()),
        # 1: every kept image has its own attribute; 0: all share one.
        "entropy": entropy / math.log(total) if total > 1 else 0.0,
        "counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _finish_emotion(
    pool: _EmotionPool, cfg: Config, bundle: ModelBundle, round_index: int, submit_gather: Callable
) -> None:
    """Steps 1-4 on the emotion's scored candidates, its report, and a writer task for the kept ones."""
    fb = cfg.feedback
    k = pool.emotion
    batches = sorted(pool.scored, key=lambda b: b.job.first_index)
    if batches:
        probs = np.concatenate([b.scores.probs for b in batches])
        features = np.concatenate([b.scores.features for b in batches])
        similarity = np.concatenate([b.scores.similarity for b in batches])
    else:
        probs = np.zeros((0, len(EMOTIONS)), np.float32)
        features = np.zeros((0, 1), np.float32)
        similarity = np.zeros((0, len(bundle.attributes.base_names)), np.float32)
    keep = fb.keep_per_emotion
    result = filter_pool(
        k,
        probs,
        features,
        similarity,
        tau=fb.tau,
        delta=fb.delta,
        keep=keep,
        cap_fraction=fb.attribute_cap,
        seed=selection_seed(cfg.run.seed, round_index, k),
    )
    # Pool position -> (batch position, index in batch).
    where = [(b, i) for b, batch in enumerate(batches) for i in range(len(batch.meta.seeds))]
    names = list(bundle.attributes.base_names)
    kinds = list(bundle.attributes.base_kinds)
    picks = []
    kept_names: list[str | None] = []
    for position in result.kept:
        b, i = where[int(position)]
        batch = batches[b]
        attr = int(result.attribute[position])
        name = names[attr] if 0 <= attr < len(names) else None
        kept_names.append(name)
        pool_index = batch.job.first_index + i
        seed = int(batch.meta.seeds[i])
        record_id = f"round-{round_index}/{EMOTIONS[k]}/{pool_index:06d}"
        meta: dict[str, Any] = {
            "emotion": EMOTIONS[k],
            # The retrieved attribute is a score, not an annotation: no scene/object label (the attribute
            # classifiers mask samples without one, so synthetic images teach the emotion only).
            "scene": None,
            "objects": [],
            "brightness": None,
            "colorfulness": None,
            "source": "synthetic",
            "id": record_id,
            "round": round_index,
            "checkpoint": batch.meta.checkpoint_id,
            "seed": seed,
            "p_k": float(result.p_k[position]),
            "s": float(result.s[position]),
            "attribute": name,
            "attribute_kind": kinds[attr] if 0 <= attr < len(kinds) else None,
            "sampler": batch.job.sampler,
            "steps": batch.job.steps,
            "guidance_scale": batch.job.guidance_scale,
        }
        fields = {"__key__": sample_key("synthetic", record_id), "cls": k, "json": meta}
        picks.append((b, i, fields))
    pool.kept = len(picks)
    if picks:
        pool.samples = submit_gather(picks, [b.images for b in batches])
    scored = len(where)
    pool.report = {
        "candidates": scored + pool.lost,
        "scored": scored,
        "passed": passed_after_each_step(scored, result.rejections, REJECTIONS),
        "rejections": dict(result.rejections),
        "lost_in_flight": pool.lost,
        "kept": len(picks),
        "kept_share": kept_share(len(picks), scored + pool.lost),
        "mean_p_k": _mean(result.p_k[result.kept]) if len(result.kept) else None,
        "mean_p_k_candidates": _mean(np.nan_to_num(result.p_k)),
        "mean_s": _mean(result.s[result.kept]) if len(result.kept) else None,
        "attribute_spread": _attribute_spread(kept_names),
    }
    pool.scored = []  # drop the image references: the writer task holds what it needs


def _check_counts(report: RoundReport) -> None:
    """candidates = kept + every rejection + lost in flight, per emotion and in total."""
    rows: list[tuple[str, EmotionFunnel]] = [*report["emotions"].items(), ("total", report["totals"])]
    for name, row in rows:
        accounted = row["kept"] + sum(row["rejections"].values()) + row["lost_in_flight"]
        if accounted != row["candidates"]:
            raise RuntimeError(
                f"round {report['round']} {name}: {row['candidates']} candidates but {accounted} accounted for"
            )


def _totals(emotions: dict[str, EmotionRound]) -> EmotionFunnel:
    rows = list(emotions.values())
    kept_p = [(r["mean_p_k"] or 0.0) * r["kept"] for r in rows if r["kept"]]
    kept = sum(r["kept"] for r in rows)
    candidates = sum(r["candidates"] for r in rows)
    return {
        "candidates": candidates,
        "scored": sum(r["scored"] for r in rows),
        "passed": {step: sum(r["passed"][step] for r in rows) for step in REJECTIONS},
        "rejections": {reason: sum(r["rejections"][reason] for r in rows) for reason in REJECTIONS},
        "lost_in_flight": sum(r["lost_in_flight"] for r in rows),
        "kept": kept,
        "kept_share": kept_share(kept, candidates),
        "mean_p_k": sum(kept_p) / kept if kept else None,
    }


# ---------------------------------------------------------------------------------------------------------
# The round
# ---------------------------------------------------------------------------------------------------------
def run_round(
    bundle: ModelBundle,
    cfg: Config,
    run_dir: str | Path,
    round_index: int,
    *,
    extra_gpus: float | None = None,
    observer: Observer | None = None,
    log: Callable[[str], None] | None = None,
    generated_from_step: int | None = None,
) -> RoundReport:
    """Run feedback round ``round_index`` with ``bundle``'s checkpoint; returns the round report (module doc).
    ``generated_from_step`` (the feedback run's step of that checkpoint) goes into the report.

    Ray comes from :func:`uniemo.distributed.ray_session.ray_session`: the Ray this process is connected to, the
    cluster at ``distributed.ray_address``, or an embedded local one for the round with the pool's CPUs (and the
    visible GPUs when the pool's actors ask for GPUs; ``extra_gpus`` overrides how many it asks for). ``observer`` sees pool events (``submitted`` with the generator
    actor's pid, ``lost``, ...). ``log`` gets one line per finished emotion (default: stderr).

    Raises:
        FeedbackError: the bundle cannot generate some emotion, every actor of a kind died, another process runs
            the same round, or the round folder exists without a manifest (not written by uniemo).
    """
    cfg.feedback.validate()
    if round_index < 0:
        raise FeedbackError(f"round index must be >= 0, got {round_index}")
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    lock_path = round_lock_path(run_dir, round_index)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeedbackError(
            f"another process is running feedback round {round_index} of {run_dir}; wait for it to finish"
        ) from None
    try:
        return _run_round_locked(bundle, cfg, run_dir, round_index, extra_gpus, observer, log, generated_from_step)
    finally:
        lock.release()  # the lock file stays: unlinking it could let two later rounds lock different inodes


def _run_round_locked(
    bundle: ModelBundle,
    cfg: Config,
    run_dir: Path,
    round_index: int,
    extra_gpus: float | None,
    observer: Observer | None,
    log: Callable[[str], None] | None,
    generated_from_step: int | None,
) -> RoundReport:
    """The round, in three phases: :func:`_generate_and_filter`, :func:`_write_shards`, :func:`_round_report`;
    then the round is published (:func:`publish_round`)."""
    log = log if log is not None else partial(say, topic="feedback")
    final = round_dir(run_dir, round_index)
    report_path = round_report_path(run_dir, round_index)
    if (final / MANIFEST_FILE).is_file() or round_published(run_dir, round_index):  # (its shards may be retired)
        return _completed_report(final, report_path, log)
    if final.exists():
        raise FeedbackError(
            f"{final} exists but has no {MANIFEST_FILE}: it was not written by a finished round; remove it "
            "and run the round again"
        )
    counts = bundle.emotion_space.counts("cls")
    missing = [EMOTIONS[k] for k in range(len(EMOTIONS)) if int(counts[k]) < 1]
    if missing:
        raise FeedbackError(
            f"the emotion space of {bundle.checkpoint_id} has no sample of {', '.join(missing)}: the pool cannot "
            "generate these emotions; compute the emotion space over training data holding every emotion"
        )

    staging = run_dir / STAGING_DIR / f"round-{round_index}"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted attempt never become a round
    fb = cfg.feedback
    jobs = plan_jobs(cfg, round_index)
    times = {"started": time.perf_counter()}
    succeeded = False
    try:
        gpus = fb.generator_gpus + fb.filter_gpus if extra_gpus is None else extra_gpus
        with ray_session(cfg.distributed, extra_cpus=pool_cpus(cfg), extra_gpus=gpus):
            # Ray is imported only inside the session: ray_session sets what Ray reads at its first import.
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # Writer tasks run on this (the driver's) node: the staging folder they write is renamed from here.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            writer = {"num_cpus": fb.writer_cpus, "max_retries": 3, "scheduling_strategy": here}
            pools, pool_stats = _generate_and_filter(
                bundle, cfg, round_index, jobs, ray.remote(gather_samples).options(**writer), observer, log, times
            )
            entries = _write_shards(pools, cfg, round_index, staging, ray.remote(write_shard).options(**writer))
        times["written"] = time.perf_counter()
        report = _round_report(bundle, cfg, round_index, jobs, pools, entries, pool_stats, times)
        report["generated_from_step"] = generated_from_step
        try:
            publish_round(staging, final, entries, report, bundle.checkpoint_id, round_index)
        except OSError as exc:  # the manifest of a round whose shards just fitted
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            needed = sum(e["bytes"] for e in entries) + 64 * 1024
            raise DiskFullError(
                f"cannot write feedback round {round_index}'s manifest into {staging}: no space left on device, about "
                f"{space_report(staging.parent.parent, needed)} for the round; free some space and run again with "
                "--resume (earlier rounds and checkpoints are kept)"
            ) from None
        write_json_atomic(report_path, report)
        succeeded = True
        log(
            f"round {round_index} done: {report['totals']['kept']} kept of {report['totals']['candidates']} "
            f"candidates in {len(entries)} shard(s) -> {final}"
        )
        return report
    finally:
        if not succeeded:
            shutil.rmtree(staging, ignore_errors=True)


def _generate_and_filter(
    bundle: ModelBundle,
    cfg: Config,
    round_index: int,
    jobs: list[GenerationJob],
    gather_task: Any,
    observer: Observer | None,
    log: Callable[[str], None],
    times: dict[str, float],
) -> tuple[dict[int, _EmotionPool], PoolStats]:
    """Phase 1: the pool generates and scores every job; each emotion is filtered as soon as its last batch
    ends, and a writer task gathers its kept images. Returns the per-emotion state and the pool's statistics."""
    pools = {k: _EmotionPool(k, sum(1 for j in jobs if j.emotion == k)) for k in range(len(EMOTIONS))}

    def submit_gather(picks: list, image_refs: list) -> Any:
        return gather_task.remote(picks, *image_refs)

    with FeedbackPool(bundle, cfg.feedback, observer) as pool:
        times["ready"] = time.perf_counter()
        for outcome in pool.process(jobs):
            state = pools[outcome.job.emotion]
            if isinstance(outcome, LostBatch):
                state.lost += len(outcome.job.seeds)
            else:
                state.scored.append(outcome)
            state.jobs_left -= 1
            if state.jobs_left == 0:
                _finish_emotion(state, cfg, bundle, round_index, submit_gather)
                r = state.report
                assert r is not None
                log(
                    f"round {round_index} {EMOTIONS[state.emotion]}: {r['candidates']} candidates, "
                    f"{r['kept']} kept, {r['lost_in_flight']} lost, rejections {r['rejections']}"
                )
        times["generated"] = time.perf_counter()
        pool_stats = pool.stats
    for state in pools.values():
        if state.report is None:  # every job ends in process(); a gap is a bug
            raise RuntimeError(f"emotion {EMOTIONS[state.emotion]} was never finished")
    return pools, pool_stats


def _write_shards(
    pools: dict[int, _EmotionPool], cfg: Config, round_index: int, staging: Path, write_task: Any
) -> list[dict[str, Any]]:
    """Phase 2: the kept samples of all emotions, shuffled (seeded), cut into shards of ``feedback.shard_size``
    and written into ``staging`` in parallel by writer tasks. Returns the shards' manifest entries."""
    import ray  # inside the round's ray_session (see _run_round_locked)

    fb = cfg.feedback
    groups = [pools[k].samples for k in range(len(EMOTIONS)) if pools[k].kept]
    order = [
        (g, i)
        for g, k in enumerate(k for k in range(len(EMOTIONS)) if pools[k].kept)
        for i in range(pools[k].kept)
    ]
    random.Random(round_shuffle_seed(cfg.run.seed, round_index)).shuffle(order)
    shard_refs = []
    for start in range(0, len(order), fb.shard_size):
        name = f"train-{start // fb.shard_size:06d}.tar"
        shard_refs.append(write_task.remote(str(staging / name), order[start : start + fb.shard_size], *groups))
    try:
        results = ray.get(shard_refs)
    except BaseException:
        for ref in shard_refs:  # no writer may recreate the staging folder after it is removed
            ray.cancel(ref, force=True)
        raise
    if any("disk_full" in r for r in results):
        # The round is written again as a whole on --resume: it needs the space of all its shards.
        needed = sum(r["needed"] if "disk_full" in r else r["bytes"] for r in results)
        shutil.rmtree(staging, ignore_errors=True)  # before measuring what is free
        raise DiskFullError(
            f"cannot write feedback round {round_index}'s shards into {staging.parent.parent}: no space left on "
            f"device, about {space_report(staging.parent.parent, needed)} for the round; free some space and run "
            "again with --resume (earlier rounds and checkpoints are kept)"
        )
    return results


def _round_report(
    bundle: ModelBundle,
    cfg: Config,
    round_index: int,
    jobs: list[GenerationJob],
    pools: dict[int, _EmotionPool],
    entries: list[dict[str, Any]],
    pool_stats: PoolStats,
    times: dict[str, float],
) -> RoundReport:
    """Phase 3: the round report (module docstring, step 4), checked: every candidate accounted for, every kept
    sample written."""
    fb = cfg.feedback
    emotions: dict[str, EmotionRound] = {}
    for k in range(len(EMOTIONS)):
        row = pools[k].report
        assert row is not None
        emotions[EMOTIONS[k]] = row
    report: RoundReport = {
        "version": ROUND_REPORT_VERSION,
        "round": round_index,
        "checkpoint": bundle.checkpoint_id,
        "generated_from_step": None,
        "entered_step": None,
        "retired": None,
        "filter": {
            "candidates_per_emotion": fb.candidates_per_emotion,
            "tau": fb.tau,
            "delta": fb.delta,
            "keep": fb.keep_per_emotion,
            "attribute_cap": fb.attribute_cap,
            "seed": cfg.run.seed,
        },
        "generation": {
            "steps": jobs[0].steps if jobs else None,
            "guidance_scale": jobs[0].guidance_scale if jobs else None,
            "sampler": jobs[0].sampler if jobs else None,
            "batch_size": fb.batch_size,
            "generator_actors": fb.generator_actors,
            "filter_actors": fb.filter_actors,
        },
        "emotions": emotions,
        "totals": _totals(emotions),
        "shards": [e["name"] for e in entries],
        "samples": sum(e["samples"] for e in entries),
        "pool": {
            "lost_batches": pool_stats.lost_batches,
            "lost_jobs": list(pool_stats.lost_jobs),
            "actor_restarts": pool_stats.restarts,
            "dead_actors": pool_stats.dead_actors,
            "generation_seconds": round(pool_stats.generation_seconds, 3),
            "scoring_seconds": round(pool_stats.scoring_seconds, 3),
        },
        "seconds": {
            "start": round(times["ready"] - times["started"], 3),
            "generate_and_filter": round(times["generated"] - times["ready"], 3),
            "write": round(times["written"] - times["generated"], 3),
            "total": round(times["written"] - times["started"], 3),
        },
    }
    _check_counts(report)
    if report["samples"] != report["totals"]["kept"]:
        raise RuntimeError(f"{report['totals']['kept']} samples kept but {report['samples']} written")
    return report


def publish_round(
    staging: Path, final: Path, entries: list[dict[str, Any]], report: RoundReport, checkpoint_id: str,
    round_index: int,
) -> None:
    """The round becomes visible in one step: its manifest (after every shard), then the folder rename."""
    update_manifest(staging, entries, round=round_index, checkpoint=checkpoint_id, report=report)
    # A writer task killed mid-shard (and retried) leaves its hidden temporary file behind: never publish it.
    for leftover in staging.iterdir():
        if leftover.name.endswith(".tmp"):
            leftover.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, final)
    try:
        staging.parent.rmdir()  # the staging root, when no other round is being written
    except OSError:
        pass


def _completed_report(final: Path, report_path: Path, log: Callable[[str], None]) -> RoundReport:
    """The report of a round that already finished (rewritten from its manifest when the file is missing); a
    report of an older uniemo is read as the current version (:func:`uniemo.run_files.upgrade_round_report`)."""
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
    else:
        report = read_manifest(final).get("report")
        if not isinstance(report, dict):
            raise FeedbackError(
                f"{final} holds a round without its report; remove the folder and run the round again"
            )
        write_json_atomic(report_path, report)
    log(f"round {report.get('round')} is complete already ({final}); not generating it again")
    return upgrade_round_report(report, REJECTIONS)


def update_round_report(run_dir: str | Path, round_index: int, **fields: Any) -> None:
    """Set ``fields`` in round ``round_index``'s report file (after the round: when it entered the mix)."""
    path = round_report_path(run_dir, round_index)
    report = json.loads(path.read_text(encoding="utf-8"))
    if any(report.get(k) != v for k, v in fields.items()):
        write_json_atomic(path, {**upgrade_round_report(report, REJECTIONS), **fields})
