"""Mappers, the correlation coefficient alpha and the fusion c (METHOD §3.4-§3.6, D6, D13)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uniemo.config.schema import ConditionerConfig
from uniemo.models.conditioner import Conditioner, Mapper, correlation_coefficient


def test_mapper_layout():
    two = Mapper(16, 8)
    kinds = [type(m) for m in two.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert (two.layers[0].in_features, two.layers[0].out_features) == (16, 16)  # Linear(in->in), METHOD §3.1
    assert (two.layers[2].in_features, two.layers[2].out_features) == (16, 8)

    three = Mapper(16, 8, num_layers=3, hidden=12, layer_norm=True, dropout=0.1)
    kinds = [type(m) for m in three.layers]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert three.layers[-1].in_features == 12

    one = Mapper(16, 8, num_layers=1)
    assert [type(m) for m in one.layers] == [nn.Linear]
    assert Mapper(16, 8, relu=False).layers[1].__class__ is nn.Linear


def _crafted_base():
    # Four attributes along the axes; attribute 3 has a huge norm so a dot product (not a cosine) would pick it.
    base = torch.zeros(4, 6)
    base[0, 0], base[1, 1], base[2, 2], base[3, 3] = 1.0, 2.0, 0.5, 100.0
    phi = torch.arange(32, dtype=torch.float32).reshape(4, 8) / 100.0
    return base, phi


def test_correlation_coefficient_on_crafted_tensors():
    base, phi = _crafted_base()
    mapped = torch.tensor(
        [
            [0.1, 0.0, 3.0, 0.2, 0.0, 0.0],  # nearest in angle: attribute 2
            [5.0, 0.1, 0.0, 0.9, 0.0, 0.0],  # attribute 0 despite attribute 3's norm
            [0.0, -1.0, 0.0, 0.0, 0.0, 0.5],  # ties at cosine 0 (attributes 0, 2, 3): the first wins
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # attribute 3
        ],
        requires_grad=True,
    )
    labels = torch.tensor([5, 1, 7, 0])
    alpha, index = correlation_coefficient(mapped, base, phi, labels)
    assert index.tolist() == [2, 0, 0, 3]
    assert alpha.shape == (4,)
    for i in range(4):
        assert alpha[i].item() == pytest.approx(phi[index[i], labels[i]].item())
    assert alpha[0].item() == pytest.approx(0.21) and alpha[1].item() == pytest.approx(0.01)
    assert not alpha.requires_grad and not index.requires_grad


def test_correlation_coefficient_empty_base():
    alpha, index = correlation_coefficient(
        torch.randn(3, 6), torch.zeros(0, 6), torch.zeros(0, 8), torch.tensor([0, 1, 2])
    )
    assert alpha.tolist() == [0.0, 0.0, 0.0] and index.tolist() == [-1, -1, -1]


def _conditioner(fixed_alpha=False):
    torch.manual_seed(0)
    return Conditioner(ConditionerConfig(fixed_alpha=fixed_alpha), in_dim=10, out_dim=6)


def test_fusion_is_cls_plus_alpha_weighted_branches():
    cond = _conditioner()
    base, phi = _crafted_base()
    f_cls, f_s, f_o = (torch.randn(5, 10, requires_grad=True) for _ in range(3))
    labels = torch.tensor([0, 1, 2, 3, 4])
    out = cond(f_cls, f_s, f_o, labels, base, phi)
    alpha_s, idx_s = correlation_coefficient(out.mapped_scene, base, phi, labels)
    alpha_o, idx_o = correlation_coefficient(out.mapped_object, base, phi, labels)
    assert torch.equal(out.alpha_scene, alpha_s) and torch.equal(out.scene_attribute, idx_s)
    assert torch.equal(out.alpha_object, alpha_o) and torch.equal(out.object_attribute, idx_o)
    expected = (
        cond.mapper_emotion(f_cls)
        + alpha_s[:, None] * cond.mapper_scene(f_s)
        + alpha_o[:, None] * cond.mapper_object(f_o)
    )
    assert torch.allclose(out.condition, expected, atol=1e-6)
    assert out.condition.shape == (5, 6)

    # the gradient reaches each branch scaled by its alpha (METHOD §3.8)
    out.mapped_scene.retain_grad()
    out.condition.sum().backward()
    assert torch.allclose(out.mapped_scene.grad, alpha_s[:, None].expand(5, 6))
    assert f_cls.grad.abs().sum() > 0


def test_fixed_alpha_ablation():
    cond = _conditioner(fixed_alpha=True)
    base, phi = _crafted_base()
    f = [torch.randn(3, 10) for _ in range(3)]
    out = cond(*f, torch.tensor([0, 4, 7]), base, phi)
    assert out.alpha_scene.tolist() == [1.0, 1.0, 1.0] and out.alpha_object.tolist() == [1.0, 1.0, 1.0]
    assert (out.scene_attribute >= 0).all()
    expected = cond.mapper_emotion(f[0]) + cond.mapper_scene(f[1]) + cond.mapper_object(f[2])
    assert torch.allclose(out.condition, expected, atol=1e-6)


def test_missing_branch_contributes_nothing():
    cond = _conditioner()
    base, phi = _crafted_base()
    f_cls, f_o = torch.randn(2, 10), torch.randn(2, 10)
    out = cond(f_cls, None, f_o, torch.tensor([1, 2]), base, phi)
    assert out.mapped_scene is None
    assert out.alpha_scene.tolist() == [0.0, 0.0] and out.scene_attribute.tolist() == [-1, -1]
    expected = cond.mapper_emotion(f_cls) + out.alpha_object[:, None] * cond.mapper_object(f_o)
    assert torch.allclose(out.condition, expected, atol=1e-6)
    only_cls = cond(f_cls, None, None, torch.tensor([1, 2]), base, phi)
    assert torch.allclose(only_cls.condition, cond.mapper_emotion(f_cls))


def test_alpha_with_generator_name_embeddings():
    """D6: attribute names live in the generator's token space; a mapped vector equal to a name's embedding
    retrieves that name."""
    from uniemo.models.generator import Generator

    gen = Generator.build_random("tiny", image_size=64, seed=0)
    names = ["beach", "dog", "cemetery", "lion"]
    base = gen.embed_names(names)
    phi = torch.softmax(torch.randn(4, 8), dim=-1)
    alpha, index = correlation_coefficient(base[[2, 0]], base, phi, torch.tensor([7, 3]))
    assert index.tolist() == [2, 0]
    assert torch.allclose(alpha, torch.stack([phi[2, 7], phi[0, 3]]))
