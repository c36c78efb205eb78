"""Formula tests for uniemo.losses: each loss against a direct recomputation with loops and plain math."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from uniemo.config.schema import LossConfig
from uniemo.losses import (
    condition_loss,
    diffusion_loss,
    hard_negatives,
    joint_loss,
    symmetric_info_nce,
    understanding_loss,
)


def _normalized(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def _info_nce_by_loops(f, t, scale, valid) -> float:
    """½·(mean_i CE_row(i) + mean_i CE_col(i)) over valid indices, by explicit sums."""
    idx = [i for i in range(len(valid)) if valid[i]]
    sim = {
        (i, j): scale * sum(float(f[i, d]) * float(t[j, d]) for d in range(f.shape[1]))
        for i in idx
        for j in idx
    }
    row = col = 0.0
    for i in idx:
        row += -sim[(i, i)] + math.log(sum(math.exp(sim[(i, j)]) for j in idx))
        col += -sim[(i, i)] + math.log(sum(math.exp(sim[(j, i)]) for j in idx))
    return 0.5 * (row / len(idx) + col / len(idx))


def test_symmetric_info_nce_matches_loops_and_excludes_invalid_rows_and_columns():
    f, t = _normalized(6, 5, 0), _normalized(6, 5, 1)
    valid = torch.tensor([True, False, True, True, False, True])
    got = symmetric_info_nce(f, t, torch.tensor(14.3, dtype=torch.float64), valid)
    assert got.item() == pytest.approx(_info_nce_by_loops(f, t, 14.3, valid.tolist()), rel=1e-9)
    # Changing an invalid row's features (image or text side) must not change the loss.
    f2, t2 = f.clone(), t.clone()
    f2[1], t2[4] = -f2[1], -t2[4]
    assert symmetric_info_nce(f2, t2, 14.3, valid).item() == pytest.approx(got.item(), rel=1e-12)
    # All valid: the plain formula.
    all_valid = torch.ones(6, dtype=torch.bool)
    assert symmetric_info_nce(f, t, 100.0, all_valid).item() == pytest.approx(
        _info_nce_by_loops(f, t, 100.0, [True] * 6), rel=1e-9
    )


def test_symmetric_info_nce_all_invalid_is_zero_with_grad():
    f = _normalized(4, 3, 2).requires_grad_(True)
    scale = torch.tensor(2.0, requires_grad=True)
    loss = symmetric_info_nce(f, _normalized(4, 3, 3), scale, torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f)) and scale.grad.item() == 0.0


def _outputs(batch_size=5, scenes=4, objects=6, embed=3, seed=0, with_scene=True, with_object=True):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        emotion_logits=torch.randn(batch_size, 8, generator=g, dtype=torch.float64),
        scene_embedding=_normalized(batch_size, embed, seed + 10) if with_scene else None,
        object_embedding=_normalized(batch_size, embed, seed + 11) if with_object else None,
        scene_logits=torch.randn(batch_size, scenes, generator=g, dtype=torch.float64)
        if with_scene
        else None,
        object_logits=torch.randn(batch_size, objects, generator=g, dtype=torch.float64)
        if with_object
        else None,
        logit_scale_scene=torch.tensor(100.0, dtype=torch.float64),
        logit_scale_object=torch.tensor(1 / 0.07, dtype=torch.float64),
    )


def _batch(batch_size=5, objects=6, embed=3):
    multi_hot = torch.zeros(batch_size, objects)
    multi_hot[0, [1, 3]] = 1
    multi_hot[2, 5] = 1
    multi_hot[4, [0, 2, 4]] = 1
    return {
        "label": torch.tensor([0, 3, 7, 4, 1]),
        "scene_idx": torch.tensor([2, -1, 0, 3, -1]),
        "object_idx": torch.tensor([3, -1, 5, -1, 4]),
        "objects_multi_hot": multi_hot,
        "scene_text_features": _normalized(batch_size, embed, 20),
        "object_text_features": _normalized(batch_size, embed, 21),
    }


def _ce_by_hand(logits_row, label) -> float:
    row = [float(v) for v in logits_row]
    return -row[label] + math.log(sum(math.exp(v) for v in row))


def test_understanding_loss_stage1_formula():
    out, batch, w = (
        _outputs(),
        _batch(),
        LossConfig(scene_weight=0.05, object_weight=0.07, emotion_weight=0.9),
    )
    terms = understanding_loss(out, batch, w, stage=1)
    emotion = sum(_ce_by_hand(out.emotion_logits[i], int(batch["label"][i])) for i in range(5)) / 5
    scene = _info_nce_by_loops(out.scene_embedding, batch["scene_text_features"], 100.0, [1, 0, 1, 1, 0])
    obj = _info_nce_by_loops(out.object_embedding, batch["object_text_features"], 1 / 0.07, [1, 0, 1, 0, 1])
    assert terms["emotion"].item() == pytest.approx(emotion, rel=1e-6)
    assert terms["scene"].item() == pytest.approx(scene, rel=1e-9)
    assert terms["object"].item() == pytest.approx(obj, rel=1e-9)
    assert terms["total"].item() == pytest.approx(0.9 * emotion + 0.05 * scene + 0.07 * obj, rel=1e-6)


def test_understanding_loss_stage2_formula():
    out, batch, w = (
        _outputs(),
        _batch(),
        LossConfig(scene_weight=0.05, object_weight=0.05, emotion_weight=0.9),
    )
    terms = understanding_loss(out, batch, w, stage=2)
    scene_rows = [0, 2, 3]
    scene = sum(_ce_by_hand(out.scene_logits[i], int(batch["scene_idx"][i])) for i in scene_rows) / 3
    object_rows = [0, 2, 4]  # rows with at least one object
    bce = 0.0
    for i in object_rows:
        for j in range(6):
            x, y = float(out.object_logits[i, j]), float(batch["objects_multi_hot"][i, j])
            p = 1 / (1 + math.exp(-x))
            bce += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    bce /= len(object_rows) * 6
    assert terms["scene"].item() == pytest.approx(scene, rel=1e-6)
    assert terms["object"].item() == pytest.approx(bce, rel=1e-5)
    assert terms["total"].item() == pytest.approx(
        0.9 * terms["emotion"].item() + 0.05 * scene + 0.05 * bce, rel=1e-6
    )


def test_understanding_loss_branches_without_heads_have_no_term_and_empty_labels_are_attached_zeros():
    out = _outputs(with_scene=False, with_object=False)
    out.emotion_logits.requires_grad_(True)
    batch = _batch()
    for stage in (1, 2):
        terms = understanding_loss(out, batch, LossConfig(), stage=stage)
        assert set(terms) == {"emotion", "total"}  # ablated, or no annotations of that kind: left out
        assert terms["total"].item() == pytest.approx(0.9 * terms["emotion"].item())
        assert terms["total"].requires_grad
    # No scene and no objects in the batch: stage-2 terms are 0, not NaN.
    out = _outputs()
    out.scene_logits.requires_grad_(True)
    batch["scene_idx"][:] = -1
    batch["objects_multi_hot"][:] = 0
    terms = understanding_loss(out, batch, LossConfig(), stage=2)
    assert terms["scene"].item() == 0.0 and terms["object"].item() == 0.0
    terms["total"].backward()
    assert torch.equal(out.scene_logits.grad, torch.zeros_like(out.scene_logits))
    with pytest.raises(ValueError):
        understanding_loss(out, batch, LossConfig(), stage=3)


def _triplet_by_hand(z_row, y, neg, margin) -> float:
    z = [float(v) for v in z_row]
    onehot = lambda k: [1.0 if i == k else 0.0 for i in range(len(z))]  # noqa: E731

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(x * x for x in b))
        )

    return max(0.0, margin + cos(z, onehot(neg)) - cos(z, onehot(y)))


def test_condition_loss_with_given_negatives():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 7])
    neg = torch.tensor([5, 5, 0, 1, 2, 6])
    terms = condition_loss(z, y, margin=0.5, ce_weight=0.3, triplet_weight=0.2, negatives=neg)
    ce = sum(_ce_by_hand(z[i], int(y[i])) for i in range(6)) / 6
    tri = sum(_triplet_by_hand(z[i], int(y[i]), int(neg[i]), 0.5) for i in range(6)) / 6
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["triplet"].item() == pytest.approx(tri, rel=1e-6)
    assert terms["total"].item() == pytest.approx(0.3 * ce + 0.2 * tri, rel=1e-6)


def test_condition_loss_hard_negative_is_top_wrong_class():
    z = torch.tensor(
        [[5.0, 4.0, 1.0, 0.0, 0, 0, 0, 0], [5.0, 4.0, 1.0, 0.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 2.0, 3.0]]
    )
    y = torch.tensor([0, 1, 6])
    assert hard_negatives(z, y).tolist() == [1, 0, 7]
    terms = condition_loss(z, y, margin=0.5, ce_weight=1e-3, triplet_weight=1e-6)
    tri = sum(_triplet_by_hand(z[i], int(y[i]), n, 0.5) for i, n in enumerate([1, 0, 7])) / 3
    assert terms["triplet"].item() == pytest.approx(tri, rel=1e-6)
    # Negatives from other logits (the official choice: the understanding prediction) change the term.
    other = torch.tensor([[0, 0, 9.0, 0, 0, 0, 0, 0]] * 3)
    official = condition_loss(z, y, margin=0.5, negatives=hard_negatives(other, y))
    tri2 = sum(_triplet_by_hand(z[i], int(y[i]), 2, 0.5) for i in range(3)) / 3
    assert official["triplet"].item() == pytest.approx(tri2, rel=1e-6)
    assert official["triplet"].item() != pytest.approx(terms["triplet"].item())
    # Gradient flows into z but not through the argmax of the negative.
    zz = z.clone().requires_grad_(True)
    condition_loss(zz, y)["total"].backward()
    assert zz.grad.abs().sum() > 0


def test_diffusion_loss_epsilon_and_v_prediction():
    g = torch.Generator().manual_seed(5)
    latents, noise, out = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    eps = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    assert diffusion_loss(out, noise, latents, t, eps).item() == pytest.approx(
        ((out - noise) ** 2).mean().item(), rel=1e-6
    )
    vpred = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    total = 0.0
    for b in range(3):
        abar = float(vpred.alphas_cumprod[int(t[b])])
        v = math.sqrt(abar) * noise[b] - math.sqrt(1 - abar) * latents[b]
        total += float(((out[b] - v) ** 2).sum())
    assert diffusion_loss(out, noise, latents, t, vpred).item() == pytest.approx(
        total / out.numel(), rel=1e-5
    )
    sample = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(out, noise, latents, t, sample)


def test_joint_loss_weights_and_condition_switch():
    u = {
        "emotion": torch.tensor(2.0),
        "scene": torch.tensor(3.0),
        "object": torch.tensor(4.0),
        "total": torch.tensor(1.5),
    }
    c = {"ce": torch.tensor(2.0), "triplet": torch.tensor(0.4), "total": torch.tensor(0.25)}
    d = torch.tensor(0.8)
    w = LossConfig(understanding_weight=0.5, diffusion_weight=2.0)
    terms = joint_loss(u, c, d, w)
    assert terms["total"].item() == pytest.approx(2.0 * 0.8 + 0.5 * 1.5 + 0.25)
    assert set(terms) == {
        "diffusion", "understanding/emotion", "understanding/scene", "understanding/object",
        "understanding/total", "condition/ce", "condition/triplet", "condition/total", "total",
    }  # fmt: skip
    off = joint_loss(
        u, c, d, LossConfig(understanding_weight=0.5, diffusion_weight=2.0, condition_loss=False)
    )
    assert off["total"].item() == pytest.approx(2.0 * 0.8 + 0.5 * 1.5)
    assert off["condition/ce"].item() == 2.0
