"""The filter's control: METHOD §5's filter run on REAL images, so that its funnel on generated ones has a reference.

The near-duplicate step and the attribute cap judge candidates on the understanding model's own features (f_cls,
and the attribute each expert query retrieves). When those features do not tell images of one emotion apart, the
filter rejects distinct images as "duplicates" or as one attribute too many, whatever the generator does. The
control shows which case a run is in: real images of each emotion, never trained on (the test split by default),
cut into pools of ``feedback.candidates_per_emotion`` like a round's candidates, scored by the same
:class:`~uniemo.feedback.actors.FilterWorker` and filtered by the same :func:`~uniemo.feedback.filtering.filter_pool`
with the same tau, delta, K and r. A rule that keeps a small share of real images measures the features, not the
generated images.

The other side of the filter is what it lets through: :func:`judge_kept_images` asks the independent judge
(``uniemo train-judge``) how many of the images a feedback run fed the trainers carry the emotion they were kept
for, to set beside the same figure for real images (a ``real_extra`` control run's, say).

    python launchers/filter_control.py runs/<stage-2 run> [--split test] [--deltas 0.95,0.99,1.0] [--caps 0.25,1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniemo.config.schema import EMOTIONS
from uniemo.feedback.actors import BatchScores, FilterWorker, ModelBundle, _encode_png, load_bundle
from uniemo.feedback.filtering import REJECTIONS, filter_pool


@dataclass
class RealPool:
    """One pool of real images of one emotion, scored like a round's candidates."""

    emotion: int
    scores: BatchScores


def score_real_pools(bundle: ModelBundle, split: str = "test", seed: int = 0, pool_size: int | None = None,
                     threads: int = 1) -> list[RealPool]:
    """The ``split``'s real images of each emotion, shuffled (``seed``) and cut into pools of ``pool_size``
    (None: ``feedback.candidates_per_emotion``; the remainder is left out), each scored by a :class:`FilterWorker`."""
    from uniemo.data.loader import build_loader_from_config
    from uniemo.models.generation import _to_uint8

    cfg = bundle.config
    loader = build_loader_from_config(cfg.data, split, stage=2, training=False, batch_size=32, num_workers=0)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for batch in loader:
        images.append(_to_uint8(batch["pixel_values"]))
        labels.extend(int(x) for x in batch["label"].tolist())
    if not labels:
        return []
    images_NHW3, labels_N = np.concatenate(images), np.asarray(labels)
    size = pool_size or cfg.feedback.candidates_per_emotion
    worker = FilterWorker(bundle, threads=threads)
    rng = np.random.default_rng(seed)
    pools: list[RealPool] = []
    for k in range(len(EMOTIONS)):
        mine = rng.permutation(np.flatnonzero(labels_N == k))
        for start in range(0, len(mine) - size + 1, size):
            chosen = mine[start:start + size]
            pools.append(RealPool(k, worker.score(len(pools), [_encode_png(images_NHW3[i]) for i in chosen])))
    return pools


def real_funnel(pools: list[RealPool], *, tau: float, delta: float, keep: int, cap_fraction: float,
                seed: int = 0) -> dict[str, Any]:
    """Steps 1-4 of METHOD §5 on every pool: candidates, kept and each rejection, per emotion and in all."""
    per_emotion: dict[str, dict[str, int]] = {}
    for index, pool in enumerate(pools):
        s = pool.scores
        result = filter_pool(pool.emotion, s.probs, s.features, s.similarity, tau=tau, delta=delta, keep=keep,
                             cap_fraction=cap_fraction, seed=seed * 1_000 + index)
        counts = per_emotion.setdefault(EMOTIONS[pool.emotion],
                                        {"pools": 0, "candidates": 0, "kept": 0, **dict.fromkeys(REJECTIONS, 0)})
        counts["pools"] += 1
        counts["candidates"] += len(result.outcome)
        counts["kept"] += len(result.kept)
        for reason, n in result.rejections.items():
            counts[reason] += n
    total = {key: sum(c[key] for c in per_emotion.values())
             for key in ("pools", "candidates", "kept", *REJECTIONS)}
    passed = total["candidates"] - total["fidelity_argmax"] - total["fidelity_threshold"]
    return {
        "settings": {"tau": tau, "delta": delta, "keep": keep, "attribute_cap": cap_fraction},
        "total": total,
        "passed_fidelity": passed,
        "kept_share": total["kept"] / total["candidates"] if total["candidates"] else None,
        "duplicate_share_of_passed": total["duplicate"] / passed if passed else None,
        "per_emotion": per_emotion,
    }


def within_pool_cosines(pools: list[RealPool]) -> dict[str, float]:
    """Quantiles of the f_cls cosine between two different images of one pool (what the near-duplicate step
    compares with delta): where delta must lie for the step to keep distinct real images."""
    values = []
    for pool in pools:
        feats = np.asarray(pool.scores.features, dtype=np.float64)
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        cos = unit @ unit.T
        values.append(cos[np.triu_indices(len(cos), k=1)])
    if not values or not sum(len(v) for v in values):
        return {}
    every = np.concatenate(values)
    return {f"q{q:02d}": float(np.quantile(every, q / 100)) for q in (5, 25, 50, 75, 95)}


def filter_settings(fb: Any) -> dict[str, float]:
    """tau, delta, K and r of a ``feedback`` config section, as :func:`filter_control` takes them."""
    return {"tau": fb.tau, "delta": fb.delta, "keep": fb.keep_per_emotion, "attribute_cap": fb.attribute_cap}


def filter_control(run_dir: str | Path, split: str = "test", settings: list[dict[str, float]] | None = None,
                   seed: int = 0, pool_size: int | None = None) -> dict[str, Any]:
    """The control for a stage-2 run (or an export): its real-image funnel for each of ``settings`` (dicts of any
    of tau, delta, keep, attribute_cap over the run's own ``feedback`` section; None: the run's settings only),
    on pools of ``pool_size`` images (None: ``feedback.candidates_per_emotion``)."""
    bundle = load_bundle(run_dir)
    fb = bundle.config.feedback
    pool_size = pool_size or fb.candidates_per_emotion
    pools = score_real_pools(bundle, split, seed, pool_size)
    results = []
    for override in settings or [{}]:
        s = {**filter_settings(fb), **override}
        results.append(real_funnel(pools, tau=float(s["tau"]), delta=float(s["delta"]), keep=int(s["keep"]),
                                   cap_fraction=float(s["attribute_cap"]), seed=seed))
    return {"run": str(run_dir), "split": split, "pool_size": pool_size,
            "within_pool_cosine": within_pool_cosines(pools), "funnels": results}


def judge_kept_images(run_dir: str | Path, judge_dir: str | Path) -> dict[str, Any]:
    """The share of the images a feedback (or control) run fed the trainers, over all its rounds' shards
    (``<run>/shards/synthetic/round-*``), that the judge classifies as the emotion they are labelled with."""
    from uniemo.config.schema import LimitsConfig
    from uniemo.data.images import image_member, open_image, to_rgb
    from uniemo.data.shards import manifest_folders, read_manifest, read_shard_samples
    from uniemo.evaluation.judge import load_judge
    from uniemo.run_layout import SYNTHETIC_DIR

    judge = load_judge(judge_dir)
    max_pixels = LimitsConfig().max_image_pixels
    images: list[np.ndarray] = []
    labels: list[int] = []
    for folder in manifest_folders(Path(run_dir) / SYNTHETIC_DIR):
        for entry in read_manifest(folder)["shards"]:
            for sample in read_shard_samples(folder / entry["name"]):
                ext = image_member(sample)
                if ext is None:
                    raise ValueError(f"{folder / entry['name']}: sample {sample.get('__key__')} has no image")
                images.append(np.asarray(to_rgb(open_image(sample[ext], max_pixels))))
                labels.append(int(sample["cls"]))
    if not labels:
        return {"images": 0, "judge_agrees": None, "per_emotion": {}}
    labels_N = np.asarray(labels)
    agrees_N = judge.classify(images).argmax(1) == labels_N
    per_emotion = {e: float(agrees_N[labels_N == k].mean()) for k, e in enumerate(EMOTIONS) if (labels_N == k).any()}
    return {"images": len(labels), "judge_agrees": float(agrees_N.mean()), "per_emotion": per_emotion}
