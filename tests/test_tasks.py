"""Task modules (stage 1 and 2), parameter groups, implicit feedback, ablation switches, and few-step training.

Real tiny models (understanding ``tiny`` preset, generator ``tiny`` preset) and the real shard loader over the
session's synthetic shards; images at 32 px to keep every step fast on one CPU core.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uniemo.config.schema import Config
from uniemo.data.attributes import AttributeTable
from uniemo.data.loader import build_loader
from uniemo.data.transforms import build_sample_transform
from uniemo.errors import ConfigError
from uniemo.losses import condition_loss, hard_negatives, symmetric_info_nce
from uniemo.training.task import (
    Stage1Task,
    Stage2Task,
    build_param_groups,
    build_stage1_task,
    build_stage2_task,
)

QUERY_PREFIXES = ("scene_queries.", "object_queries.", "scene_interaction.", "object_interaction.")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**losses) -> Config:
    cfg = Config()
    cfg.data.image_size = 32
    cfg.data.generator_image_size = 32
    cfg.model.understanding.image_size = 32
    for key, value in losses.items():
        setattr(cfg.training.losses, key, value)
    return cfg


@pytest.fixture(scope="module")
def attributes(synth_shards) -> AttributeTable:
    return AttributeTable.load(synth_shards / "attributes.json")


@pytest.fixture(scope="module")
def batches(synth_shards) -> list[dict]:
    """Five stage-2 training batches of 8 (``image`` + ``pixel_values``) from the real loader."""
    cfg = _cfg()
    loader = build_loader(
        synth_shards,
        "train",
        rank=0,
        world_size=1,
        batch_size=8,
        num_workers=0,
        transform=build_sample_transform(cfg.data, stage=2, training=True),
        training=True,
        seed=0,
    )
    it = iter(loader)
    return [next(it) for _ in range(5)]


def _stage1(cfg, attributes, tmp_path) -> Stage1Task:
    torch.manual_seed(0)
    return build_stage1_task(cfg, attributes, cache_dir=tmp_path)


def _stage2(cfg, attributes, **kwargs) -> Stage2Task:
    torch.manual_seed(0)
    return build_stage2_task(cfg, attributes, **kwargs)


def _grad_abs(param: torch.Tensor) -> float:
    return 0.0 if param.grad is None else float(param.grad.abs().sum())


# -- stage 1 ----------------------------------------------------------------------------------------------


def test_stage1_forward_terms_and_text_rows(attributes, batches, tmp_path):
    task = _stage1(_cfg(), attributes, tmp_path).eval()
    batch = dict(batches[0])
    batch["scene_idx"] = batch["scene_idx"].clone()
    batch["scene_idx"][:3] = -1  # rows without a scene take no part in the scene InfoNCE
    terms = task(batch)
    assert {"total", "understanding/emotion", "understanding/scene", "understanding/object"} <= set(terms)
    assert not terms["metrics/accuracy"].requires_grad
    # The text side of each row is the vocabulary row of its scene index.
    out = task.understanding(batch["image"])
    valid = batch["scene_idx"] >= 0
    text = task.scene_text_features[batch["scene_idx"].clamp(min=0)]
    expected = symmetric_info_nce(out.scene_embedding, text, out.logit_scale_scene, valid)
    assert terms["understanding/scene"].item() == pytest.approx(expected.item(), rel=1e-5)
    # Text tables are buffers: not trained, not saved with the weights.
    assert all(not n.endswith("text_features") for n, _ in task.named_parameters())
    assert not any(k.endswith("text_features") for k in task.state_dict())
    assert task.scene_text_features.shape == (len(attributes.scenes), task.understanding.embed_dim)


def test_param_groups_stage1(attributes, tmp_path):
    cfg = _cfg()
    task = _stage1(cfg, attributes, tmp_path)
    groups = build_param_groups(task, cfg.training)
    by_name = {g["name"]: g for g in groups}
    expected_lr = {
        "backbone": 8e-6,
        "queries": 5e-4,
        "head": 1e-4,
        "attribute_classifiers": 1e-4,
        "projections": 5e-4,
    }
    for name, group in by_name.items():
        role, _, no_decay = name.partition("/")
        assert group["lr"] == expected_lr[role]
        wd = 1e-3 if role == "backbone" else 1e-2
        assert group["weight_decay"] == (0.0 if no_decay else wd)
    # Exactly once, and only trainable parameters.
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in task.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)
    # No decay on 1-D parameters and biases, decay on the rest.
    names = {id(p): n for n, p in task.named_parameters()}
    for group in groups:
        for p in group["params"]:
            decays = p.ndim > 1 and not names[id(p)].endswith(".bias")
            assert group["name"].endswith("/no_decay") != decays, names[id(p)]
    # D4: projections trainable by default; the official setting freezes them.
    cfg.model.understanding.freeze_query_projections = True
    frozen = build_param_groups(_stage1(cfg, attributes, tmp_path), cfg.training)
    assert "projections" in by_name and all(not g["name"].startswith("projections") for g in frozen)


def test_param_groups_reject_a_parameter_without_role(attributes, tmp_path):
    cfg = _cfg()
    task = _stage1(cfg, attributes, tmp_path)
    task.stray = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="stray"):
        build_param_groups(task, cfg.training)


# -- stage 2 ----------------------------------------------------------------------------------------------


def test_param_groups_and_frozen_parts_stage2(attributes):
    cfg = _cfg()
    cfg.training.lr_mappers = 2e-3
    task = _stage2(cfg, attributes)
    groups = build_param_groups(task, cfg.training)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    # METHOD §3.1: backbone and head are not in the optimiser; queries, classifiers and mappers are.
    assert lrs == {"queries": 5e-4, "attribute_classifiers": 1e-4, "mappers": 2e-3}
    roles = task.understanding.parameter_roles()
    for name, p in task.understanding.named_parameters():
        assert p.requires_grad == (roles[name] in ("queries", "attribute_classifiers")), name
    assert not any(p.requires_grad for p in task.generator.parameters())
    frozen = task.frozen_modules()
    assert "understanding.emotion_head" in frozen and "understanding.encoder" in frozen
    assert "generator" in frozen
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in task.parameters() if p.requires_grad}

    # D8: a fine-tuned UNet gets its own group and leaves the frozen list.
    cfg.model.generator.train_unet = True
    task = _stage2(cfg, attributes)
    groups = build_param_groups(task, cfg.training)
    assert {g["lr"] for g in groups if g["name"].startswith("unet")} == {cfg.training.lr_unet}
    frozen = task.frozen_modules()
    assert "generator.unet" not in frozen and "generator.vae" in frozen and "generator.text_encoder" in frozen


def test_stage2_whole_understanding_trains_backbone_and_head(attributes, batches):
    """``training.stage2_whole_understanding`` (a difference from METHOD §3.1): the backbone and the emotion head
    join the optimiser with their own learning rates, run in train mode and get the understanding loss's gradient;
    everything that METHOD freezes in the generator stays frozen."""
    cfg = _cfg()
    cfg.training.stage2_whole_understanding = True
    cfg.training.lr_backbone, cfg.training.lr_head = 3e-5, 7e-4
    task = _stage2(cfg, attributes).train()
    groups = build_param_groups(task, cfg.training)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs == {"backbone": 3e-5, "queries": 5e-4, "head": 7e-4, "attribute_classifiers": 7e-4,
                   "mappers": cfg.training.lr_mappers}
    roles = task.understanding.parameter_roles()
    for name, p in task.understanding.named_parameters():
        assert p.requires_grad == (roles[name] in ("backbone", "queries", "head", "attribute_classifiers")), name
    assert not any(p.requires_grad for p in task.generator.parameters())
    frozen = task.frozen_modules()
    assert "understanding.encoder" not in frozen and "understanding.emotion_head" not in frozen
    assert task.understanding.encoder.training and task.understanding.emotion_head.training
    torch.manual_seed(1)
    task(batches[0])["total"].backward()
    assert sum(_grad_abs(p) for p in task.understanding.encoder.parameters()) > 0
    assert sum(_grad_abs(p) for p in task.understanding.emotion_head.parameters()) > 0
    assert all(p.grad is None for p in task.generator.parameters())


@pytest.mark.parametrize("head_dropout", [True, False])
def test_train_mode_keeps_frozen_modules_in_eval(attributes, head_dropout):
    cfg = _cfg()
    cfg.training.stage2_head_dropout = head_dropout
    task = _stage2(cfg, attributes).train()
    assert task.understanding.training and task.understanding.scene_interaction.training
    assert task.conditioner.training
    for module in (task.generator.vae, task.generator.unet, task.generator.text_encoder):
        assert not module.training
    assert not task.understanding.encoder.training
    # METHOD §3.1: the official code runs the frozen head in train mode (dropout active).
    assert task.understanding.emotion_head.training == head_dropout
    assert not task.eval().understanding.emotion_head.training


@pytest.mark.parametrize("switch", ["full", "implicit_feedback", "diffusion_to_condition"])
def test_diffusion_gradient_and_the_two_ablation_switches(attributes, batches, switch):
    """Only the diffusion loss on: dL(θ)/dc flows through the mappers into the expert queries (METHOD §3.8).
    The paper's implicit-feedback ablation (D13) stops it at the mappers' inputs: no gradient reaches the
    understanding model, the mappers still get one. diffusion_to_condition stops it at c: neither gets any."""
    cfg = _cfg(understanding_weight=0.0, condition_loss=False,
               **({switch: False} if switch != "full" else {}))
    task = _stage2(cfg, attributes).train()
    torch.manual_seed(1)
    terms = task(batches[0])
    assert terms["diffusion"].item() > 0
    terms["total"].backward()
    queries = [(n, p) for n, p in task.understanding.named_parameters() if n.startswith(QUERY_PREFIXES)]
    assert {n.split(".")[0] for n, _ in queries} == {p.rstrip(".") for p in QUERY_PREFIXES}
    mappers = list(task.conditioner.named_parameters())
    mapper_grads = {m: sum(_grad_abs(p) for n, p in mappers if n.startswith(m))
                    for m in ("mapper_emotion", "mapper_scene", "mapper_object")}
    if switch == "full":
        for name in ("scene_queries.weight", "object_queries.weight"):
            assert _grad_abs(task.understanding.get_parameter(name)) > 0, name
        assert sum(_grad_abs(p) for _, p in queries) > 0
    else:
        assert all(p.grad is None or _grad_abs(p) == 0.0 for p in task.understanding.parameters())
    if switch == "diffusion_to_condition":
        assert all(_grad_abs(p) == 0.0 for _, p in mappers)
    else:
        assert all(g > 0 for g in mapper_grads.values()), mapper_grads
    # The frozen backbone passes the gradient on but has none itself.
    assert all(p.grad is None for p in task.understanding.encoder.parameters())
    assert all(p.grad is None for p in task.generator.parameters())


@pytest.mark.parametrize("switch", ["diffusion_to_condition", "implicit_feedback"])
def test_condition_loss_trains_mappers_under_both_switches(attributes, batches, switch):
    """The condition loss trains the mappers under both switches; it reaches the queries only when the gradient
    is stopped at c, not under the paper's implicit-feedback ablation."""
    cfg = _cfg(understanding_weight=0.0, diffusion_weight=0.0, condition_ce_weight=1.0, **{switch: False})
    task = _stage2(cfg, attributes).train()
    task(batches[0])["total"].backward()
    assert all(_grad_abs(p) > 0 for n, p in task.conditioner.named_parameters() if n.endswith("weight"))
    reached = _grad_abs(task.understanding.get_parameter("scene_queries.weight")) > 0
    assert reached == (switch == "diffusion_to_condition")
    assert all(p.grad is None for p in task.understanding.emotion_head.parameters())


def test_joint_total_and_condition_switch(attributes, batches):
    cfg = _cfg(understanding_weight=0.5, diffusion_weight=2.0)
    task = _stage2(cfg, attributes).eval()
    torch.manual_seed(3)
    on = task(batches[1])
    assert on["total"].item() == pytest.approx(
        2.0 * on["diffusion"].item() + 0.5 * on["understanding/total"].item() + on["condition/total"].item(),
        rel=1e-6,
    )
    task.losses.condition_loss = False
    torch.manual_seed(3)
    off = task(batches[1])
    assert off["diffusion"].item() == pytest.approx(on["diffusion"].item(), rel=1e-6)
    assert off["total"].item() == pytest.approx(
        2.0 * off["diffusion"].item() + 0.5 * off["understanding/total"].item(), rel=1e-6
    )
    assert not off["condition/total"].requires_grad


@pytest.mark.parametrize("negative", ["condition", "understanding"])
def test_condition_negative_source(attributes, batches, negative):
    cfg = _cfg(condition_negative=negative)
    task = _stage2(cfg, attributes).eval()
    batch = batches[2]
    terms = task(batch)
    with torch.no_grad():
        out = task.understanding(batch["image"])
        cond = task.conditioner(
            out.cls_feature,
            out.scene_feature,
            out.object_feature,
            batch["label"],
            task.attribute_embeddings,
            task.phi,
        )
        z = task.understanding.emotion_head.fc1(cond.condition)
    source = z if negative == "condition" else out.emotion_logits
    expected = condition_loss(z, batch["label"], negatives=hard_negatives(source, batch["label"]))
    assert terms["condition/triplet"].item() == pytest.approx(expected["triplet"].item(), rel=1e-5)
    assert terms["condition/ce"].item() == pytest.approx(expected["ce"].item(), rel=1e-5)


def test_ablations_queries_off_and_fixed_alpha(attributes, batches):
    cfg = _cfg()
    cfg.model.understanding.use_scene_queries = False
    cfg.model.conditioner.fixed_alpha = True
    task = _stage2(cfg, attributes).train()
    terms = task(batches[0])
    assert "understanding/scene" not in terms  # no scene branch, no scene term
    assert terms["understanding/object"].item() > 0
    assert terms["metrics/alpha_scene"].item() == 0.0  # the switched-off branch contributes nothing
    assert terms["metrics/alpha_object"].item() == 1.0  # D13: alpha fixed to 1
    assert not any(n.startswith("understanding.scene_") for n, _ in task.named_parameters())
    terms["total"].backward()
    assert _grad_abs(task.understanding.get_parameter("object_queries.weight")) > 0
    build_param_groups(task, cfg.training)  # still every trainable parameter exactly once


def test_build_stage2_rejects_mismatched_widths(attributes):
    cfg = _cfg()
    cfg.model.understanding.preset = "small"  # head width 64 vs the tiny generator's 32-wide tokens
    with pytest.raises(ConfigError, match=r"model\.understanding\.preset.*model\.generator\.preset"):
        _stage2(cfg, attributes)


def test_build_stage2_loads_stage1_weights(attributes, tmp_path):
    cfg = _cfg()
    stage1 = _stage1(cfg, attributes, tmp_path)
    with torch.no_grad():
        stage1.understanding.scene_queries.weight.add_(1.0)
    task = _stage2(cfg, attributes, understanding_state=stage1.state_dict())
    assert torch.equal(task.understanding.scene_queries.weight, stage1.understanding.scene_queries.weight)
    task = _stage2(cfg, attributes, understanding_state=stage1.understanding.state_dict())
    assert torch.equal(
        task.understanding.emotion_head.fc1.weight, stage1.understanding.emotion_head.fc1.weight
    )
    state = stage1.understanding.state_dict()
    state.pop("scene_queries.weight")
    with pytest.raises(ConfigError, match="model.understanding"):
        _stage2(cfg, attributes, understanding_state=state)


# -- a few training steps ---------------------------------------------------------------------------------


def _train(task, groups, batches, steps: int, reseed: bool) -> list[float]:
    """Plain AdamW over the task's groups, cycling the fixed batches; ``reseed`` fixes the diffusion noise per
    batch, so the first and the last cycle see identical inputs and only the weights differ."""
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    task.train()
    losses = []
    for step in range(steps):
        if reseed:
            torch.manual_seed(1000 + step % len(batches))
        terms = task(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    return losses


def test_stage1_training_lowers_the_loss(attributes, batches, tmp_path):
    cfg = _cfg()
    task = _stage1(cfg, attributes, tmp_path)
    cfg.training.lr_backbone = 1e-4
    losses = _train(task, build_param_groups(task, cfg.training), batches, steps=30, reseed=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)


def test_stage2_training_lowers_the_loss(attributes, batches):
    cfg = _cfg()
    task = _stage2(cfg, attributes)
    cfg.training.lr_queries, cfg.training.lr_head, cfg.training.lr_mappers = 2e-3, 2e-3, 2e-3
    losses = _train(task, build_param_groups(task, cfg.training), batches, steps=30, reseed=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)
