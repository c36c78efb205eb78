"""The understanding model (METHOD §2, D2, D4, D13): shapes, token flow, ablations, roles, a training sanity check."""

from __future__ import annotations

import math

import pytest
import torch

from uniemo.config.schema import UnderstandingConfig
from uniemo.errors import ConfigError
from uniemo.models.understanding import ROLES, UnderstandingModel, resolve_dims

SCENES, OBJECTS = 5, 7


def _model(**overrides) -> UnderstandingModel:
    torch.manual_seed(0)
    return UnderstandingModel(UnderstandingConfig(**overrides), SCENES, OBJECTS).eval()


@pytest.mark.parametrize("preset,width,embed,queries", [("tiny", 64, 32, 8), ("small", 128, 64, 16)])
def test_output_shapes_per_preset(preset, width, embed, queries):
    model = _model(preset=preset)
    assert model.width == width and model.embed_dim == embed
    assert model.scene_queries.weight.shape == (queries, width)
    assert model.emotion_head.fc1.in_features == embed and model.emotion_head.fc1.out_features == 8
    out = model(torch.randn(3, 3, 64, 64), return_attention=True)
    assert out.cls_feature.shape == out.scene_feature.shape == out.object_feature.shape == (3, width)
    assert out.emotion_logits.shape == (3, 8)
    assert out.scene_embedding.shape == out.object_embedding.shape == (3, embed)
    assert torch.allclose(out.scene_embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.object_embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.scene_logits.shape == (3, SCENES) and out.object_logits.shape == (3, OBJECTS)
    assert out.logit_scale_scene.item() == pytest.approx(100.0, rel=1e-5)
    assert out.logit_scale_object.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.scene_attention.shape == out.object_attention.shape == (3, 8, 8)


def test_presets_follow_the_table_and_layer_defaults():
    large = resolve_dims(UnderstandingConfig(preset="vit-l14"))
    assert (large.width, large.depth, large.heads, large.patch_size, large.image_size) == (
        1024,
        24,
        16,
        14,
        224,
    )
    assert (large.scene_layer, large.object_layer, large.embed_dim, large.mlp_dim) == (8, 16, 768, 4096)
    assert large.num_positions == 257 and large.num_scene_queries == large.num_object_queries == 32
    base = resolve_dims(UnderstandingConfig(preset="vit-b16"))
    assert (base.scene_layer, base.object_layer, base.embed_dim) == (4, 8, 512)
    assert (
        resolve_dims(UnderstandingConfig(preset="small")).scene_layer,
        resolve_dims(UnderstandingConfig(preset="small")).object_layer,
    ) == (2, 5)
    custom = resolve_dims(UnderstandingConfig(preset="tiny", depth=9, width=96, heads=3, num_scene_queries=4))
    assert (custom.scene_layer, custom.object_layer, custom.mlp_dim, custom.num_scene_queries) == (
        3,
        6,
        384,
        4,
    )


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(preset="nope"), "unknown preset"),
        (dict(preset="tiny", scene_layer=4, object_layer=4), "scene_layer < object_layer"),
        (dict(preset="tiny", object_layer=7), "object_layer <= depth"),
        (dict(preset="tiny", heads=5), "divisible by heads"),
        (dict(preset="tiny", image_size=60), "multiple of patch_size"),
        (dict(preset="from_clip"), "clip_path"),
    ],
)
def test_bad_architecture_is_a_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        UnderstandingModel(UnderstandingConfig(**overrides), SCENES, OBJECTS)


def test_attention_path_matches_fused_path_and_maps_are_distributions():
    model = _model(preset="tiny")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast, slow = model(images), model(images, return_attention=True)
    for name in ("cls_feature", "scene_feature", "object_feature", "emotion_logits"):
        assert torch.allclose(getattr(fast, name), getattr(slow, name), atol=1e-5), name
    assert fast.scene_attention is None and fast.object_attention is None
    for attention in (slow.scene_attention, slow.object_attention):
        # Heads and queries averaged, CLS key dropped: non-negative and summing to 1 - mean CLS attention.
        assert (attention >= 0).all()
        assert ((attention.sum(dim=(1, 2)) > 0) & (attention.sum(dim=(1, 2)) < 1)).all()


def _perturbed(model: UnderstandingModel, param: torch.Tensor, images: torch.Tensor):
    """The model's output with ``param`` shifted at random, then ``param`` restored bit-exactly."""
    saved = param.detach().clone()
    with torch.no_grad():
        # Random shifts: a constant shift would vanish in the LayerNorms.
        param.add_(torch.randn_like(param))
        out = model(images)
        param.copy_(saved)
    return out


def test_token_flow_scene_before_block_1_objects_after_l1():
    model = _model(preset="tiny")  # depth 6, L1 = 2, L2 = 4
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(images)
    # Object queries enter after L1: they cannot change the scene read-out, but do change the CLS stream.
    moved = _perturbed(model, model.object_queries.weight, images)
    assert torch.equal(moved.scene_feature, ref.scene_feature)
    assert not torch.allclose(moved.object_feature, ref.object_feature)
    assert not torch.allclose(moved.cls_feature, ref.cls_feature)
    # Scene queries enter before block 1 and take part in self-attention (deep prompt tuning).
    moved = _perturbed(model, model.scene_queries.weight, images)
    assert not torch.allclose(moved.cls_feature, ref.cls_feature)
    assert not torch.allclose(moved.scene_feature, ref.scene_feature)
    # A block after L1 cannot change the scene read-out; a block after L2 cannot change the object one.
    moved = _perturbed(model, model.encoder.layers[2].mlp.fc2.bias, images)  # block 3 > L1 = 2
    assert torch.equal(moved.scene_feature, ref.scene_feature)
    assert not torch.allclose(moved.object_feature, ref.object_feature)
    moved = _perturbed(model, model.encoder.layers[4].mlp.fc2.bias, images)  # block 5 > L2 = 4
    assert torch.equal(moved.object_feature, ref.object_feature)
    assert not torch.allclose(moved.cls_feature, ref.cls_feature)
    # The scene interactive block acts on the scene read-out only through the scene queries.
    moved = _perturbed(model, model.scene_interaction.cross_attn.v_proj.weight, images)
    assert not torch.allclose(moved.scene_feature, ref.scene_feature)


def test_ablation_switches_remove_the_queries_entirely():
    images = torch.randn(2, 3, 64, 64)
    full = set(dict(_model(preset="tiny").named_parameters()))
    for scene, obj in ((False, True), (True, False), (False, False)):
        model = _model(preset="tiny", use_scene_queries=scene, use_object_queries=obj)
        names = set(dict(model.named_parameters()))
        out = model(images, return_attention=True)
        for kind, on in (("scene", scene), ("object", obj)):
            fields = [getattr(out, f"{kind}_{f}") for f in ("feature", "embedding", "logits", "attention")]
            assert all(f is not None for f in fields) if on else all(f is None for f in fields)
            assert (getattr(out, f"logit_scale_{kind}") is not None) == on
            assert any(n.startswith(kind) for n in names) == on
            assert any(n.startswith(f"logit_scale_{kind}") for n in names) == on
        assert names < full
    # Both off: exactly the CLIP vision tower (+ emotion head); every parameter gets a gradient.
    model = _model(preset="tiny", use_scene_queries=False, use_object_queries=False).train()
    assert set(model.parameter_roles().values()) == {"backbone", "head"}
    model(images).emotion_logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_roles_cover_every_parameter_and_freezing_flags():
    model = _model(preset="tiny")
    roles = model.parameter_roles()
    assert set(roles) == {n for n, _ in model.named_parameters()}
    assert set(roles.values()) == set(ROLES)
    assert roles["scene_queries.weight"] == roles["object_interaction.cross_attn.q_proj.weight"] == "queries"
    assert roles["encoder.layers.0.self_attn.q_proj.weight"] == roles["pre_layrnorm.weight"] == "backbone"
    assert (
        roles["emotion_head.fc1.weight"] == "head"
        and roles["scene_classifier.bias"] == "attribute_classifiers"
    )
    assert roles["object_projection.weight"] == "projections" and roles["logit_scale_scene"] == "logit_scales"
    # Interactive blocks: q/k/v without bias, out projection with bias (METHOD §2.2).
    assert "scene_interaction.cross_attn.q_proj.bias" not in roles
    assert "scene_interaction.cross_attn.out_proj.bias" in roles
    # D4: projections trainable by default, frozen on request; logit scales frozen (METHOD §2.5).
    assert model.scene_projection.weight.requires_grad and not model.logit_scale_scene.requires_grad
    frozen = _model(preset="tiny", freeze_query_projections=True, train_logit_scales=True)
    assert (
        not frozen.scene_projection.weight.requires_grad and not frozen.object_projection.weight.requires_grad
    )
    assert frozen.logit_scale_object.requires_grad
    assert frozen.logit_scale_scene.item() == pytest.approx(math.log(100), rel=1e-6)


def test_other_input_sizes_interpolate_positions_and_checkpointing_matches():
    model = _model(preset="tiny")
    out = model(torch.randn(2, 3, 48, 80), return_attention=True)
    assert out.cls_feature.shape == (2, 64) and out.scene_attention.shape == (2, 6, 10)
    images = torch.randn(2, 3, 64, 64)
    model.train()
    model.emotion_head.dropout.p = 0.0
    torch.manual_seed(1)
    plain = model(images).emotion_logits
    plain.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing = True
    again = model(images).emotion_logits
    again.sum().backward()
    assert torch.allclose(plain, again, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name


def test_tiny_model_loss_decreases_on_a_fixed_batch():
    model = _model(preset="tiny", head_dropout=0.0).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=g)
    labels = torch.randint(0, 8, (8,), generator=g)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(images)
        loss = torch.nn.functional.cross_entropy(out.emotion_logits, labels)
        sim = out.logit_scale_scene * out.scene_embedding @ out.object_embedding.T
        loss = loss + 0.05 * torch.nn.functional.cross_entropy(sim, torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0]


def test_position_init_std_sets_the_positions_only_and_is_checked():
    from uniemo.config import Config, with_overrides

    default = UnderstandingModel(UnderstandingConfig(preset="tiny"), 4, 4)
    wide = UnderstandingModel(UnderstandingConfig(preset="tiny", position_init_std=1.0), 4, 4)
    assert default.embeddings.position_embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert wide.embeddings.position_embedding.weight.std().item() == pytest.approx(1.0, rel=0.2)
    # Everything else is initialised as before (same draw order, same stds).
    assert wide.embeddings.patch_embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ConfigError, match="position_init_std"):
        with_overrides(Config(), ["model.understanding.position_init_std=0"]).validate()
