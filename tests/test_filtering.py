"""The feedback filter (METHOD §5 steps 1-4) on crafted inputs: every step, determinism, counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uniemo.config.schema import FeedbackConfig
from uniemo.errors import ConfigError
from uniemo.feedback.filtering import (
    REJECTIONS,
    attribute_quota,
    diverse_selection,
    fidelity,
    filter_pool,
    remove_near_duplicates,
    semantic_clarity,
    visiting_order,
)


def _probs(rows: list[dict[int, float]]) -> np.ndarray:
    """Rows of 8 probabilities: the given entries, the rest of the mass spread evenly."""
    out = np.zeros((len(rows), 8))
    for i, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (8 - len(row))
        out[i] = rest
        for k, p in row.items():
            out[i, k] = p
    return out


def test_fidelity_threshold_and_argmax_rule():
    k = 2
    probs = _probs(
        [
            {2: 0.70},  # passes
            {2: 0.60},  # exactly tau: passes (p_k >= tau)
            {2: 0.59},  # top class, below tau
            {5: 0.50, 2: 0.45},  # p_k >= tau = 0.4 but argmax is 5: the argmax rule rejects it
            {2: 0.10, 0: 0.80},  # neither
        ]
    )
    p_k, reasons = fidelity(probs, k, tau=0.6)
    assert p_k == pytest.approx([0.70, 0.60, 0.59, 0.45, 0.10])
    assert reasons == [None, None, "fidelity_threshold", "fidelity_argmax", "fidelity_argmax"]
    # a lower tau lets row 2 through, but never row 3 (argmax first)
    _, low = fidelity(probs, k, tau=0.4)
    assert low == [None, None, None, "fidelity_argmax", "fidelity_argmax"]
    # NaN never passes
    nan = probs[:1].copy()
    nan[0, 2] = np.nan
    assert fidelity(nan, k, tau=0.0)[1] == ["fidelity_argmax"]


def test_semantic_clarity_rescales_cosine_to_unit_interval():
    sim = np.array(
        [
            [0.2, 0.8, -1.0],
            [-1.0, -1.0, -1.0],
            [np.nan, 0.0, np.nan],  # only one comparable attribute (a branch of one kind)
            [np.nan, np.nan, np.nan],  # nothing comparable: no attribute, not penalised
        ]
    )
    attribute, s = semantic_clarity(sim)
    assert attribute.tolist() == [1, 0, 1, -1]
    assert s == pytest.approx([0.9, 0.0, 0.5, 1.0])
    empty_attr, empty_s = semantic_clarity(np.zeros((2, 0)))
    assert empty_attr.tolist() == [-1, -1] and empty_s.tolist() == [1.0, 1.0]


def test_near_duplicates_keep_the_better_scored_one():
    base = np.array([1.0, 0.0, 0.0])
    near = np.array([1.0, 0.05, 0.0])  # cos(base, near) ~ 0.9988
    other = np.array([0.0, 1.0, 0.0])
    features = np.stack([base, near, other, 3 * base])  # 3 is a scaled copy of 0: cos 1
    score = np.array([0.5, 0.9, 0.1, 0.2])
    order = visiting_order(np.arange(4), score)
    assert order.tolist() == [1, 0, 3, 2]  # decreasing p_k * s
    kept, dropped = remove_near_duplicates(features, order, delta=0.95)
    assert kept.tolist() == [1, 2] and sorted(dropped.tolist()) == [0, 3]
    # cos(base, near) = 0.99875 does not exceed delta = 0.999: both stay; the exact copy still goes
    kept, dropped = remove_near_duplicates(features, order, delta=0.999)
    assert kept.tolist() == [1, 0, 2] and dropped.tolist() == [3]
    # ties in score: lower index first
    assert visiting_order(np.array([3, 1, 2]), np.array([0.0, 0.5, 0.5, 0.5])).tolist() == [1, 2, 3]


def test_attribute_quota():
    assert attribute_quota(8, 0.25) == 2
    assert attribute_quota(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 must not round up
    assert attribute_quota(10, 0.25) == 3
    assert attribute_quota(2, 0.1) == 1


def test_per_attribute_cap():
    # 8 candidates of attribute 0, 2 of attribute 1, 2 without attribute; K = 4, r = 0.25 -> at most 1 each
    attribute = np.array([0] * 8 + [1, 1, -1, -1])
    score = np.ones(12)
    for seed in range(20):
        selected, capped, rest = diverse_selection(np.arange(12), score, attribute, 4, 0.25, seed)
        drawn = attribute[selected]
        assert (drawn == 0).sum() <= 1 and (drawn == 1).sum() <= 1
        assert len(selected) == 4  # the two without attribute are never capped, so K is reached
        assert len(set(selected.tolist()) | set(capped.tolist()) | set(rest.tolist())) == 12
        assert len(selected) + len(capped) + len(rest) == 12
        # everything capped carries an attribute that reached its quota
        assert all(attribute[i] in set(drawn[drawn >= 0].tolist()) for i in capped)
    # without unattributed candidates, the cap ends the selection early
    selected, capped, rest = diverse_selection(np.arange(10), score[:10], attribute[:10], 4, 0.25, 0)
    assert len(selected) == 2 and len(capped) == 8 and len(rest) == 0


def test_score_proportional_sampling_without_replacement_is_deterministic():
    score = np.array([1.0, 2.0, 7.0, 0.0, 5.0])
    attribute = np.full(5, -1)
    first = diverse_selection(np.arange(5), score, attribute, 3, 1.0, seed=7)[0]
    assert np.array_equal(first, diverse_selection(np.arange(5), score, attribute, 3, 1.0, seed=7)[0])
    assert len(set(first.tolist())) == 3  # no index twice
    assert 3 not in first.tolist()  # zero score is never drawn while positive scores remain
    draws = {tuple(diverse_selection(np.arange(5), score, attribute, 3, 1.0, seed=s)[0]) for s in range(30)}
    assert len(draws) > 3  # the seed matters
    # K >= pool: everything is selected, zero-score ones last (uniform among them)
    everything = diverse_selection(np.arange(5), score, attribute, 10, 1.0, seed=1)[0]
    assert sorted(everything.tolist()) == [0, 1, 2, 3, 4] and everything[-1] == 3

    # the first draw follows the scores: P(i) = score_i / sum
    counts = np.zeros(5)
    trials = 3000
    for s in range(trials):
        counts[diverse_selection(np.arange(5), score, attribute, 1, 1.0, seed=s)[0][0]] += 1
    assert counts / trials == pytest.approx(score / score.sum(), abs=0.03)
    # the second draw is from the rest, renormalised: P(second = 0 | first = 2) = 1 / 8
    seconds = [diverse_selection(np.arange(5), score, attribute, 2, 1.0, seed=s)[0] for s in range(trials)]
    after_two = [sel[1] for sel in seconds if sel[0] == 2]
    assert np.mean(np.asarray(after_two) == 0) == pytest.approx(1 / 8, abs=0.04)


def _random_pool(seed: int, n: int = 40, dim: int = 6, attributes: int = 5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 8)) * 2
    logits[: n // 2, 3] += 3  # half of them lean to the target emotion 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    centres = rng.normal(size=(4, dim))
    features = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, dim)) * 0.05  # clusters: duplicates
    similarity = rng.uniform(-1, 1, size=(n, attributes))
    similarity[rng.random((n, attributes)) < 0.3] = np.nan
    return probs, features, similarity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_pool_counts_add_up_and_every_rule_holds(seed):
    probs, features, similarity = _random_pool(seed)
    params = dict(tau=0.3, delta=0.95, keep=6, cap_fraction=0.34)
    result = filter_pool(3, probs, features, similarity, seed=11, **params)
    n = len(probs)
    assert result.candidates == n
    assert set(result.rejections) == set(REJECTIONS)
    assert len(result.kept) + sum(result.rejections.values()) == n
    assert [result.outcome.count(r) for r in REJECTIONS] == [result.rejections[r] for r in REJECTIONS]
    assert result.outcome.count("kept") == len(result.kept) <= params["keep"]
    kept = result.kept
    assert (probs[kept].argmax(axis=1) == 3).all() and (probs[kept, 3] >= 0.3).all()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cos = unit[kept] @ unit[kept].T
    assert (cos[~np.eye(len(kept), dtype=bool)] <= 0.95).all()
    cap = math.ceil(0.34 * 6)
    attrs = result.attribute[kept]
    assert all((attrs == a).sum() <= cap for a in set(attrs.tolist()) if a >= 0)
    assert ((result.s >= 0) & (result.s <= 1)).all()
    assert result.rejections["fidelity_argmax"] + result.rejections["fidelity_threshold"] > 0
    assert result.rejections["duplicate"] > 0  # the features come in 4 tight clusters
    # deterministic for a seed
    again = filter_pool(3, probs, features, similarity, seed=11, **params)
    assert np.array_equal(again.kept, result.kept) and again.outcome == result.outcome


def test_filter_pool_on_an_empty_pool():
    result = filter_pool(
        0,
        np.zeros((0, 8)),
        np.zeros((0, 4)),
        np.zeros((0, 3)),
        tau=0.6,
        delta=0.95,
        keep=2,
        cap_fraction=0.25,
        seed=0,
    )
    assert result.candidates == 0 and len(result.kept) == 0 and sum(result.rejections.values()) == 0


def test_derive_seed_is_stable():
    from uniemo.seeds import derive_seed

    assert derive_seed(0, "feedback", 1, 2, 3) == derive_seed(0, "feedback", 1, 2, 3)
    assert derive_seed(0, "feedback", 1, 2, 3) != derive_seed(0, "feedback", 1, 2, 4)
    assert 0 <= derive_seed("x") < 2**31 - 1


def test_feedback_config_validation():
    FeedbackConfig().validate()
    assert FeedbackConfig(candidates_per_emotion=16).keep_per_emotion == 4
    assert FeedbackConfig(keep=3).keep_per_emotion == 3
    for bad in (
        FeedbackConfig(tau=1.5),
        FeedbackConfig(attribute_cap=0.0),
        FeedbackConfig(synthetic_fraction=1.0),
        FeedbackConfig(candidates_per_emotion=3),  # K would default to 0
        FeedbackConfig(generator_actors=0),
        FeedbackConfig(filter_cpus=0.0),
        FeedbackConfig(max_restarts=-1),
    ):
        with pytest.raises(ConfigError, match="feedback\\."):
            bad.validate()
