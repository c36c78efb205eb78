"""The numbers of ``uniemo evaluate`` (METHOD §6), in numpy: no model, no file, no distributed code here.

- Understanding: the confusion matrix (rows = true emotion, columns = prediction) and what follows from it.
- Emo-A (§6.2): 8-class top-1 of a judge's prediction against the target emotion, the mean target probability
  and the 2-class (positive 0-3 / negative 4-7) accuracy of the summed probabilities, as EmoGen's script logs.
- FID (§6.2): Fréchet distance between Gaussians fitted to features. Statistics are kept as sufficient
  statistics (n, Σx, Σxxᵀ) so that the pooled 8-class FID is the distance of the *summed* statistics, as
  EmoGen aggregates it. The matrix square root is an eigen-decomposition of a symmetric PSD matrix
  (scipy's ``sqrtm`` is not available, and the symmetric form is the more stable one anyway):
  ``tr sqrt(C1 C2) = tr sqrt(S1 C2 S1)`` with ``S1 = C1^(1/2)``, because ``C1 C2`` and ``S1 C2 S1`` are similar.
- Diversity: mean pairwise L2 distance and Sem-D (mean pairwise MSE of features) over random pairs of images
  of the same emotion, with a fixed pair count and seed; unlike EmoGen's script (10 pairs, paths accumulated
  across emotions, METHOD §6.2), pairs never cross emotions.

Shapes: ``N`` images, ``D`` feature width, ``K`` = 8 emotions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS

POSITIVE = frozenset(range(4))
"""EmoSet indices of the positive emotions (METHOD §1); 4-7 are negative."""


# ---------------------------------------------------------------------------------------------------------
# Understanding
# ---------------------------------------------------------------------------------------------------------
def confusion_matrix(labels_N: np.ndarray, preds_N: np.ndarray, num_classes: int = NUM_EMOTIONS) -> np.ndarray:
    """int64 ``[K,K]``: entry (i, j) counts samples of true class i predicted as j."""
    labels_N = np.asarray(labels_N, dtype=np.int64).ravel()
    preds_N = np.asarray(preds_N, dtype=np.int64).ravel()
    if labels_N.shape != preds_N.shape:
        raise ValueError(f"{labels_N.size} labels but {preds_N.size} predictions")
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (labels_N, preds_N), 1)
    return out


def confusion_summary(confusion_KK: np.ndarray) -> dict:
    """Top-1, per-emotion accuracy (None for an emotion without samples) and per-emotion counts."""
    confusion_KK = np.asarray(confusion_KK, dtype=np.int64)
    counts_K = confusion_KK.sum(axis=1)
    total = int(counts_K.sum())
    correct_K = np.diag(confusion_KK)
    return {
        "samples": total,
        "top1": float(correct_K.sum() / total) if total else None,
        "per_emotion": {
            e: (float(correct_K[k] / counts_K[k]) if counts_K[k] else None) for k, e in enumerate(EMOTIONS)
        },
        "counts": {e: int(counts_K[k]) for k, e in enumerate(EMOTIONS)},
    }


# ---------------------------------------------------------------------------------------------------------
# Emo-A
# ---------------------------------------------------------------------------------------------------------
def emotion_accuracy(probs_NK: np.ndarray, targets_N: np.ndarray) -> dict:
    """Emo-A of images generated for ``targets_N``: top-1, mean target probability, polarity accuracy."""
    probs_NK = np.asarray(probs_NK, dtype=np.float64)
    targets_N = np.asarray(targets_N, dtype=np.int64)
    if len(targets_N) == 0:
        return {"images": 0, "top1": None, "mean_target_probability": None, "polarity_accuracy": None}
    positive_N = probs_NK[:, sorted(POSITIVE)].sum(axis=1)
    predicted_positive_N = positive_N >= 0.5
    target_positive_N = np.isin(targets_N, sorted(POSITIVE))
    return {
        "images": int(len(targets_N)),
        "top1": float((probs_NK.argmax(axis=1) == targets_N).mean()),
        "mean_target_probability": float(probs_NK[np.arange(len(targets_N)), targets_N].mean()),
        "polarity_accuracy": float((predicted_positive_N == target_positive_N).mean()),
    }


# ---------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """Sufficient statistics of a feature set: count, Σx ``[D]`` and Σxxᵀ ``[D,D]`` (float64)."""

    n: int
    sum_D: np.ndarray
    outer_DD: np.ndarray

    @classmethod
    def of(cls, features_ND: np.ndarray) -> FeatureStats:
        x = np.asarray(features_ND, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        return cls(int(x.shape[0]), x.sum(axis=0), x.T @ x)

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.n + other.n, self.sum_D + other.sum_D, self.outer_DD + other.outer_DD)

    @property
    def mean(self) -> np.ndarray:
        return self.sum_D / self.n

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance ``(Σxxᵀ - n μμᵀ) / (n - 1)`` (what torchmetrics' FID computes)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.mean
        return (self.outer_DD - self.n * np.outer(mu, mu)) / (self.n - 1)


def sqrtm_psd(matrix_DD: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-error eigenvalues -> 0)."""
    sym = (matrix_DD + matrix_DD.T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1_D: np.ndarray, cov1_DD: np.ndarray, mu2_D: np.ndarray, cov2_DD: np.ndarray) -> float:
    """``|mu1 - mu2|² + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))`` (the FID formula; module docstring)."""
    s1 = sqrtm_psd(cov1_DD)
    middle = s1 @ cov2_DD @ s1
    eigen = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)
    diff = mu1_D - mu2_D
    value = float(diff @ diff + np.trace(cov1_DD) + np.trace(cov2_DD) - 2.0 * np.sqrt(eigen).sum())
    return max(value, 0.0)  # rounding can make identical distributions a hair negative


def fid_from_stats(real: FeatureStats, fake: FeatureStats) -> float | None:
    """FID of two statistics; None when either side has fewer than 2 samples (no covariance)."""
    if real.n < 2 or fake.n < 2:
        return None
    return frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance)


def fid_per_emotion(
    real_ND: np.ndarray, real_labels_N: np.ndarray, fake_ND: np.ndarray, fake_labels_N: np.ndarray
) -> dict:
    """FID of each emotion and the pooled FID of the summed statistics of all emotions (METHOD §6.2)."""
    dim = np.asarray(real_ND).shape[1]
    real_total, fake_total = FeatureStats.empty(dim), FeatureStats.empty(dim)
    per_emotion: dict[str, float | None] = {}
    for k, emotion in enumerate(EMOTIONS):
        real_k = FeatureStats.of(np.asarray(real_ND)[np.asarray(real_labels_N) == k])
        fake_k = FeatureStats.of(np.asarray(fake_ND)[np.asarray(fake_labels_N) == k])
        per_emotion[emotion] = fid_from_stats(real_k, fake_k)
        real_total, fake_total = real_total + real_k, fake_total + fake_k
    return {
        "pooled": fid_from_stats(real_total, fake_total),
        "per_emotion": per_emotion,
        "real_images": real_total.n,
        "generated_images": fake_total.n,
        "feature_dim": int(dim),
    }


# ---------------------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------------------
def sample_pairs(n: int, pairs: int, seed: int) -> np.ndarray:
    """int64 ``[P,2]`` index pairs i != j: every unordered pair when there are at most ``pairs`` of them,
    else ``pairs`` pairs drawn uniformly (with replacement) by ``numpy.random.default_rng(seed)``."""
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if n * (n - 1) // 2 <= pairs:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1).astype(np.int64)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, size=pairs)
    second = (first + rng.integers(1, n, size=pairs)) % n  # uniform over the n - 1 others
    return np.stack([first, second], axis=1).astype(np.int64)


def pairwise_diversity(features_ND: np.ndarray, pairs: int, seed: int) -> dict:
    """Mean L2 distance and Sem-D (mean per-dimension squared difference) over pairs of ``features_ND``."""
    x = np.asarray(features_ND, dtype=np.float64)
    idx = sample_pairs(len(x), pairs, seed)
    if len(idx) == 0:
        return {"pairs": 0, "mean_pairwise_distance": None, "sem_d": None}
    diff = x[idx[:, 0]] - x[idx[:, 1]]
    return {
        "pairs": int(len(idx)),
        "mean_pairwise_distance": float(np.linalg.norm(diff, axis=1).mean()),
        "sem_d": float((diff**2).mean()),
    }


def diversity_per_emotion(features_ND: np.ndarray, labels_N: np.ndarray, pairs: int, seed: int) -> dict:
    """:func:`pairwise_diversity` within each emotion (seed ``seed + k``), and the mean over emotions with images."""
    features_ND, labels_N = np.asarray(features_ND), np.asarray(labels_N)
    per_emotion = {
        e: pairwise_diversity(features_ND[labels_N == k], pairs, seed + k) for k, e in enumerate(EMOTIONS)
    }
    scored = [v for v in per_emotion.values() if v["pairs"]]
    return {
        "mean_pairwise_distance": float(np.mean([v["mean_pairwise_distance"] for v in scored])) if scored else None,
        "sem_d": float(np.mean([v["sem_d"] for v in scored])) if scored else None,
        "per_emotion": per_emotion,
    }


def diversity_against_real(generated: dict, real: dict) -> dict:
    """Generated diversity as a fraction of the real images' diversity, per emotion and averaged over emotions
    with both (each a :func:`diversity_per_emotion` result on the same features): ``{"sem_d", "mean_pairwise_distance",
    "per_emotion": {emotion: {"sem_d", "mean_pairwise_distance"}}}``, None where the real side is 0 or missing."""

    def ratio(g: float | None, r: float | None) -> float | None:
        return float(g / r) if g is not None and r else None

    per_emotion = {
        e: {key: ratio(generated["per_emotion"][e][key], real["per_emotion"][e][key])
            for key in ("sem_d", "mean_pairwise_distance")}
        for e in EMOTIONS
    }
    out: dict = {}
    for key in ("sem_d", "mean_pairwise_distance"):
        values = [x for x in (v[key] for v in per_emotion.values()) if x is not None]
        out[key] = float(np.mean(values)) if values else None
    out["per_emotion"] = per_emotion
    return out
