"""The filter of explicit feedback (METHOD §5, steps 1-4), as pure functions of arrays: no Ray, no models.

For one target emotion k and its pool X_k of N scored candidates:

1. **Fidelity.** ``p_k = probs[:, k]``; a candidate survives when ``argmax probs = k`` (else it is counted as
   ``fidelity_argmax``) and ``p_k >= tau`` (else ``fidelity_threshold``).
2. **Semantic clarity.** ``a(x) = argmax_a sim(x, a)`` over the attribute base and ``s(x) = (1 + max_a sim) / 2``,
   the cosine similarity rescaled from [-1, 1] to [0, 1]. The similarity matrix comes from the filter actor
   (expert-query features mapped into the attribute space, :mod:`uniemo.feedback.actors`); entries that cannot be
   compared are NaN. A candidate with no comparable attribute gets ``a = -1`` and ``s = 1`` (clarity cannot be
   judged, so it is not penalised). No candidate is dropped here.
3. **Near-duplicates.** Survivors are visited in decreasing ``p_k * s`` (ties: lower index first); one is dropped
   (``duplicate``) when the cosine of its f_cls to any image already kept in this step exceeds ``delta``.
4. **Diverse selection.** K images are drawn one at a time with probability proportional to ``p_k * s`` among the
   remaining ones, without replacement (uniform when every remaining score is 0). Once an attribute holds
   ``ceil(r * K)`` drawn images and more draws follow, its remaining candidates leave the urn (``attribute_cap``);
   what is left after K draws is ``not_selected``. ``a = -1`` is no attribute and is never capped. The draws use
   ``numpy.random.default_rng(seed)`` only: the same inputs and seed give the same selection.

Every candidate ends in exactly one outcome, so ``N = kept + sum(rejections)`` always holds.

Shape legend: N candidates, K = 8 emotions (``probs``), D f_cls width, A attribute-base size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KEPT = "kept"
REJECTIONS: tuple[str, ...] = (
    "fidelity_argmax",
    "fidelity_threshold",
    "duplicate",
    "attribute_cap",
    "not_selected",
)
"""Rejection reasons, in the order of the filter steps that give them (step 2 rejects nothing)."""


@dataclass
class FilterResult:
    """What the filter did to one emotion's pool."""

    emotion: int
    kept: np.ndarray
    """Pool indices of the kept candidates, int64, in draw order (step 4)."""
    p_k: np.ndarray
    """p_k(x) of every candidate, float64 [N] (step 1)."""
    s: np.ndarray
    """s(x) in [0, 1] of every candidate, float64 [N] (step 2)."""
    attribute: np.ndarray
    """a(x), the attribute-base index of every candidate, int64 [N]; -1 when none (step 2)."""
    outcome: list[str]
    """Per candidate: ``kept`` or the rejection reason (one of :data:`REJECTIONS`)."""
    rejections: dict[str, int] = field(default_factory=dict)
    """Candidates per rejection reason (every reason present, zeros included)."""

    @property
    def candidates(self) -> int:
        return len(self.outcome)

    @property
    def score(self) -> np.ndarray:
        """p_k(x) * s(x), float64 [N] (steps 3-4)."""
        return self.p_k * self.s


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------
def fidelity(probs_NK: np.ndarray, emotion: int, tau: float) -> tuple[np.ndarray, list[str | None]]:
    """Step 1: ``(p_k [N], reasons)``; ``reasons[i]`` is None for a survivor, else the rejection reason.

    The argmax rule comes first: a candidate whose most probable emotion is not k is ``fidelity_argmax`` even
    when ``p_k >= tau`` would hold (possible only for tau < 0.5). A NaN probability never passes.
    """
    probs_NK = np.asarray(probs_NK, dtype=np.float64)
    if probs_NK.ndim != 2 or not 0 <= emotion < probs_NK.shape[1]:
        raise ValueError(f"probs must be [N, K] with 0 <= emotion < K, got {probs_NK.shape} and {emotion}")
    p_k = probs_NK[:, emotion].copy()
    # NaN rows must not win the argmax by accident: treat them as -inf.
    safe = np.where(np.isnan(probs_NK), -np.inf, probs_NK)
    top = safe.argmax(axis=1) if len(safe) else np.zeros(0, dtype=np.int64)
    reasons: list[str | None] = []
    for i in range(len(p_k)):
        if top[i] != emotion or np.isnan(p_k[i]):
            reasons.append("fidelity_argmax")
        elif not p_k[i] >= tau:
            reasons.append("fidelity_threshold")
        else:
            reasons.append(None)
    return p_k, reasons


def semantic_clarity(similarity_NA: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: ``(a [N] int64, s [N] float64)`` from cosine similarities to the attribute base (NaN: no match).

    ``s = (1 + max cosine) / 2`` clipped to [0, 1]; a row without any comparable attribute gives ``a = -1``,
    ``s = 1``.
    """
    sim = np.asarray(similarity_NA, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [N, A], got shape {sim.shape}")
    n = sim.shape[0]
    attribute = np.full(n, -1, dtype=np.int64)
    s = np.ones(n, dtype=np.float64)
    if sim.shape[1] == 0:
        return attribute, s
    comparable = ~np.isnan(sim)
    has_any = comparable.any(axis=1)
    filled = np.where(comparable, sim, -np.inf)
    best = filled.argmax(axis=1)
    rows = np.flatnonzero(has_any)
    attribute[rows] = best[rows]
    s[rows] = np.clip((1.0 + filled[rows, best[rows]]) / 2.0, 0.0, 1.0)
    return attribute, s


def visiting_order(indices: np.ndarray, score_N: np.ndarray) -> np.ndarray:
    """``indices`` sorted by decreasing ``score`` (ties: lower index first), as step 3 visits them."""
    indices = np.asarray(indices, dtype=np.int64)
    # lexsort sorts by the last key first: score descending, then index ascending.
    order = np.lexsort((indices, -score_N[indices]))
    return indices[order]


def remove_near_duplicates(
    features_ND: np.ndarray, order: np.ndarray, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: visit ``order``; drop an index whose feature cosine to an already kept one exceeds ``delta``.

    Returns ``(kept, dropped)`` index arrays (kept in visiting order).
    """
    feats = np.asarray(features_ND, dtype=np.float64)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = feats / np.maximum(norms, 1e-12)
    kept: list[int] = []
    dropped: list[int] = []
    for i in np.asarray(order, dtype=np.int64):
        if kept and float((unit[kept] @ unit[i]).max()) > delta:
            dropped.append(int(i))
        else:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64), np.asarray(dropped, dtype=np.int64)


def attribute_quota(keep: int, cap_fraction: float) -> int:
    """ceil(r * K): the most kept images per retrieved attribute (step 4); at least 1."""
    # The small tolerance keeps e.g. 0.3 * 10 = 3.0000000000000004 from rounding up to 4.
    return max(1, math.ceil(cap_fraction * keep - 1e-9))


def diverse_selection(
    candidates: np.ndarray,
    score_N: np.ndarray,
    attribute_N: np.ndarray,
    keep: int,
    cap_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 4: score-proportional sampling without replacement of ``keep`` among ``candidates``.

    Returns ``(selected in draw order, removed by the attribute cap, not selected)`` index arrays.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    rng = np.random.default_rng(seed)
    urn = [int(i) for i in np.sort(np.asarray(candidates, dtype=np.int64))]
    quota = attribute_quota(keep, cap_fraction)
    taken: dict[int, int] = {}
    selected: list[int] = []
    capped: list[int] = []
    while urn and len(selected) < keep:
        weights = np.maximum(np.asarray([score_N[i] for i in urn], dtype=np.float64), 0.0)
        weights = np.nan_to_num(weights, nan=0.0)
        cumulative = np.cumsum(weights)
        total = float(cumulative[-1])
        if total > 0:
            # Inverse-CDF draw: slot i is hit with probability weights[i] / total; zero-weight slots never.
            pick = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
        else:
            pick = int(rng.integers(len(urn)))
        chosen = urn.pop(pick)
        selected.append(chosen)
        attr = int(attribute_N[chosen])
        if attr < 0 or len(selected) >= keep:
            continue
        taken[attr] = taken.get(attr, 0) + 1
        if taken[attr] >= quota:
            capped += [i for i in urn if int(attribute_N[i]) == attr]
            urn = [i for i in urn if int(attribute_N[i]) != attr]
    as_array = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return as_array(selected), as_array(capped), as_array(urn)


# ---------------------------------------------------------------------------------------------------------
# The whole filter
# ---------------------------------------------------------------------------------------------------------
def filter_pool(
    emotion: int,
    probs_NK: np.ndarray,
    features_ND: np.ndarray,
    similarity_NA: np.ndarray,
    *,
    tau: float,
    delta: float,
    keep: int,
    cap_fraction: float,
    seed: int,
) -> FilterResult:
    """Run steps 1-4 of METHOD §5 on one emotion's pool (module docstring); deterministic for ``seed``.

    Args:
        emotion: the target emotion k of every candidate.
        probs_NK: softmax of the understanding model, [N, 8].
        features_ND: f_cls of each candidate, [N, D] (near-duplicates, step 3).
        similarity_NA: cosine similarity of each candidate to each attribute of the base, NaN where not
            comparable, [N, A] (step 2).
        tau, delta, keep, cap_fraction: tau, delta, K and r of METHOD §5.
        seed: seed of the draws of step 4.
    """
    probs_NK = np.asarray(probs_NK, dtype=np.float64)
    n = probs_NK.shape[0]
    features_ND = np.asarray(features_ND)
    similarity_NA = np.asarray(similarity_NA)
    if features_ND.shape[0] != n or similarity_NA.shape[0] != n:
        raise ValueError(
            f"probs, features and similarity must have the same N, got {n}, {features_ND.shape[0]}, "
            f"{similarity_NA.shape[0]}"
        )
    p_k, reasons = fidelity(probs_NK, emotion, tau)
    attribute, s = semantic_clarity(similarity_NA)
    score = np.nan_to_num(p_k, nan=0.0) * s
    outcome: list[str] = [r if r is not None else "" for r in reasons]

    survivors = np.asarray([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
    distinct, duplicates = remove_near_duplicates(features_ND, visiting_order(survivors, score), delta)
    for i in duplicates:
        outcome[i] = "duplicate"
    selected, capped, unselected = diverse_selection(distinct, score, attribute, keep, cap_fraction, seed)
    for reason, indices in (("attribute_cap", capped), ("not_selected", unselected), (KEPT, selected)):
        for i in indices:
            outcome[i] = reason
    if "" in outcome:  # every candidate must end somewhere; a gap would break the round's accounting
        raise RuntimeError("filter left a candidate without an outcome")
    rejections = {reason: outcome.count(reason) for reason in REJECTIONS}
    return FilterResult(
        emotion=emotion,
        kept=selected,
        p_k=p_k,
        s=s,
        attribute=attribute,
        outcome=outcome,
        rejections=rejections,
    )
