"""The emotion space (METHOD §4.1, D9): exact shard merging, flat-tensor round trip, files, sampling."""

from __future__ import annotations

import pytest
import torch

from uniemo.errors import UserError
from uniemo.models.emotion_space import EmotionSpace

DIMS = {"cls": 6, "scene": 4, "object": 5}


def _batch(n, seed, dyadic=False):
    g = torch.Generator().manual_seed(seed)
    feats = {s: torch.randn(n, d, generator=g) * 3 + 1 for s, d in DIMS.items()}
    if dyadic:  # multiples of 1/8: every sum is exact in float64, whatever the order
        feats = {s: (x * 8).round() / 8 for s, x in feats.items()}
    labels = torch.randint(0, 8, (n,), generator=g)
    labels[:16] = torch.arange(16) % 8  # every emotion at least twice
    return feats, labels


def _filled(feats, labels, chunks=1):
    space = EmotionSpace(DIMS)
    for idx in torch.arange(labels.shape[0]).chunk(chunks):
        space.update({s: x[idx] for s, x in feats.items()}, labels[idx])
    return space


def test_statistics_match_torch_mean_and_unbiased_std():
    feats, labels = _batch(200, 0)
    space = _filled(feats, labels, chunks=3)
    for stream in DIMS:
        for k in range(8):
            rows = feats[stream][labels == k].double()
            assert space.counts(stream)[k] == rows.shape[0]
            assert torch.allclose(space.mean(stream)[k], rows.mean(0), atol=1e-12)
            assert torch.allclose(space.std(stream)[k], rows.std(0, unbiased=True), atol=1e-10)


def test_merging_two_halves_equals_one_pass():
    feats, labels = _batch(300, 1)
    whole = _filled(feats, labels)
    first = _filled({s: x[:150] for s, x in feats.items()}, labels[:150])
    second = _filled({s: x[150:] for s, x in feats.items()}, labels[150:])
    merged = first.merge(second)
    assert torch.allclose(merged.statistics_tensor(), whole.statistics_tensor(), rtol=1e-13, atol=1e-10)
    for stream in DIMS:
        assert torch.allclose(merged.mean(stream), whole.mean(stream), rtol=1e-12)
        assert torch.allclose(merged.std(stream), whole.std(stream), rtol=1e-10)

    # with exactly representable values the merge is bit-exact, as an all-reduce SUM of two ranks
    feats, labels = _batch(300, 2, dyadic=True)
    whole = _filled(feats, labels)
    halves = [
        _filled({s: x[sl] for s, x in feats.items()}, labels[sl]) for sl in (slice(0, 120), slice(120, None))
    ]
    reduced = EmotionSpace(DIMS)
    reduced.load_statistics_tensor(halves[0].statistics_tensor() + halves[1].statistics_tensor())
    assert torch.equal(reduced.statistics_tensor(), whole.statistics_tensor())
    assert torch.equal(halves[0].merge(halves[1]).statistics_tensor(), whole.statistics_tensor())


def test_flat_tensor_round_trip():
    feats, labels = _batch(100, 3)
    space = _filled(feats, labels)
    flat = space.statistics_tensor()
    assert flat.dtype == torch.float64 and flat.dim() == 1
    assert flat.numel() == sum(8 * (1 + 2 * d) for d in DIMS.values())
    copy = EmotionSpace(DIMS)
    copy.load_statistics_tensor(flat.clone())
    assert torch.equal(copy.statistics_tensor(), flat)
    for stream in DIMS:
        assert torch.equal(copy.mean(stream), space.mean(stream))
    with pytest.raises(ValueError, match="values"):
        copy.load_statistics_tensor(flat[:-1])


def test_save_and_load(tmp_path):
    feats, labels = _batch(100, 4)
    space = _filled(feats, labels)
    path = tmp_path / "space" / "emotion_space.safetensors"
    space.save(path)
    loaded = EmotionSpace.load(path)
    assert loaded.dims == space.dims
    assert torch.equal(loaded.statistics_tensor(), space.statistics_tensor())
    with pytest.raises(UserError, match="does not exist"):
        EmotionSpace.load(tmp_path / "missing.safetensors")


def test_sample_is_deterministic_and_follows_the_gaussians():
    feats, labels = _batch(400, 5)
    space = _filled(feats, labels)
    a = space.sample(3, 4, torch.Generator().manual_seed(11))
    b = space.sample(3, 4, torch.Generator().manual_seed(11))
    c = space.sample(3, 4, torch.Generator().manual_seed(12))
    assert set(a) == set(DIMS)
    assert all(torch.equal(a[s], b[s]) for s in DIMS)
    assert not torch.equal(a["cls"], c["cls"])
    assert a["scene"].shape == (4, 4) and a["cls"].dtype == torch.float32

    many = space.sample(6, 20000, torch.Generator().manual_seed(0))
    for stream in DIMS:
        mean, std = space.mean(stream)[6].float(), space.std(stream)[6].float()
        assert torch.allclose(many[stream].mean(0), mean, atol=0.1 * float(std.max()))
        assert torch.allclose(many[stream].std(0), std, rtol=0.05)


def test_subset_of_streams_and_unseen_emotion():
    space = EmotionSpace({"cls": 3})
    space.update({"cls": torch.ones(2, 3), "scene": None}, torch.tensor([0, 0]))
    assert space.streams == ("cls",)
    assert torch.equal(space.std("cls")[0], torch.zeros(3, dtype=torch.float64))
    assert space.sample(0, 2, torch.Generator().manual_seed(0))["cls"].tolist() == [[1.0] * 3] * 2
    with pytest.raises(UserError, match="no sample of emotion 'awe'"):
        space.sample(1, 1)
    with pytest.raises(ValueError, match="lacks"):
        EmotionSpace(DIMS).update({"cls": torch.ones(1, 6)}, torch.tensor([0]))
