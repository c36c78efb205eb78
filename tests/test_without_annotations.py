"""Data without scene or object annotations (an image folder, an EmoSet folder lacking one kind): the parts of the
method with nothing to learn from are left out (not built), the rest is the method, and every ZeRO stage trains.

Tiny real models at 32 px; the DeepSpeed engines run in a child process (tests/_child.py).
"""

from __future__ import annotations

import pytest
import torch
from _child import run_gloo_child  # tests/_child.py

from uniemo.config import load_config
from uniemo.data.attributes import AttributeTable
from uniemo.training.task import build_param_groups, build_stage1_task, build_stage2_task, left_out_note

NONE = AttributeTable.from_counts({}, {})
"""The attribute table of an image folder: no scenes, no objects, an empty base."""
OBJECTS_ONLY = AttributeTable.from_counts({}, {"Tree": [3, 1, 0, 0, 0, 0, 0, 2], "Dog": [0, 0, 5, 1, 0, 0, 0, 0]})


def _cfg(*overrides: str):
    return load_config(None, ["data.image_size=32", "data.generator_image_size=32",
                              "model.understanding.image_size=32", *overrides])


def _batch(n: int = 4, objects: int = 0) -> dict:
    g = torch.Generator().manual_seed(0)
    object_idx = torch.tensor([0, 1, -1, 0][:n]) if objects else torch.full((n,), -1)
    multi_hot = torch.zeros(n, objects)
    for b, i in enumerate(object_idx.tolist()):
        if i >= 0:
            multi_hot[b, i] = 1.0
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "pixel_values": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
        "label": torch.tensor([0, 3, 5, 7][:n]),
        "scene_idx": torch.full((n,), -1),
        "object_idx": object_idx,
        "objects_multi_hot": multi_hot,
    }


def _no_empty_parameters(task: torch.nn.Module, cfg) -> None:
    assert all(p.numel() > 0 for p in task.parameters())
    assert all(group["params"] for group in build_param_groups(task, cfg.training))


def test_stage1_without_annotations_leaves_out_both_infonce_terms(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    task = build_stage1_task(cfg, NONE, cache_dir=tmp_path)
    und = task.understanding
    assert und.scene_queries is not None and und.object_interaction is not None  # the queries still train
    assert und.scene_classifier is None and und.scene_projection is None and und.logit_scale_object is None
    _no_empty_parameters(task, cfg)
    terms = task.train()(_batch())
    assert set(terms) == {"understanding/emotion", "understanding/total", "total", "metrics/accuracy"}
    assert terms["total"].item() == pytest.approx(0.9 * terms["understanding/emotion"].item())
    terms["total"].backward()
    assert und.scene_queries.weight.grad.abs().sum() > 0  # they shape f_cls through attention
    note = left_out_note(cfg, NONE)
    assert note == ("the data has no scene or object annotations, so stage 1 leaves out the scene InfoNCE term "
                    "and the object InfoNCE term; the other losses are the method's")


def test_stage2_without_annotations_leaves_out_classifiers_and_alpha():
    cfg = _cfg("training.stage=2")
    torch.manual_seed(0)
    task = build_stage2_task(cfg, NONE)
    assert task.understanding.scene_classifier is None and task.understanding.object_classifier is None
    assert task.conditioner.mapper_scene is None and task.conditioner.mapper_object is None
    assert task.attribute_embeddings.shape[0] == 0
    _no_empty_parameters(task, cfg)
    batch = _batch()
    terms = task.train()(batch)
    assert "understanding/scene" not in terms and "understanding/object" not in terms
    assert {"diffusion", "condition/ce", "condition/triplet", "understanding/emotion"} <= set(terms)
    assert terms["metrics/alpha_scene"].item() == 0.0 and terms["metrics/alpha_object"].item() == 0.0
    with torch.no_grad():  # c = M_emo(f_cls)
        out = task.understanding.eval()(batch["image"])
        cond = task.conditioner(out.cls_feature, out.scene_feature, out.object_feature, batch["label"],
                                task.attribute_embeddings, task.phi)
        assert torch.equal(cond.condition, task.conditioner.mapper_emotion(out.cls_feature))
    assert "alpha with the scene and object mappers (no attribute base: c = M_emo(f_cls))" in left_out_note(cfg, NONE)
    # alpha fixed to 1 (D13) needs no base: the branches stay
    fixed = _cfg("training.stage=2", "model.conditioner.fixed_alpha=true")
    assert build_stage2_task(fixed, NONE).conditioner.mapper_scene is not None
    assert "alpha" not in left_out_note(fixed, NONE)


def test_objects_without_scenes_keep_the_object_parts():
    cfg = _cfg("training.stage=2", "data.min_attribute_count=1")
    table = OBJECTS_ONLY.rebased(1, 1.0)
    torch.manual_seed(0)
    task = build_stage2_task(cfg, table)
    und = task.understanding
    assert und.scene_classifier is None and und.object_classifier.out_features == 2
    assert task.conditioner.mapper_scene is not None  # the base (objects) gives alpha to both branches
    terms = task.train()(_batch(objects=2))
    assert "understanding/scene" not in terms and terms["understanding/object"].item() > 0
    assert left_out_note(cfg, table) == ("the data has no scene annotations, so stage 2 leaves out the scene "
                                         "classifier; the other losses are the method's")
    assert left_out_note(_cfg(), AttributeTable.from_counts({"park": [5] * 8}, {"Tree": [5] * 8})) is None


# A real DeepSpeed engine per ZeRO stage and per training stage, one step each, on the folder's attribute table
# (ZeRO-1/2 raised IndexError in Stage1And2ZeroOptimizer.__init__ on the empty group of zero-class classifiers).
_ENGINES_CHILD = r"""
from uniemo.config import load_config
from uniemo.data.attributes import AttributeTable
from uniemo.training.engine import build_engine
from uniemo.training.task import build_stage1_task, build_stage2_task

table = AttributeTable.from_counts({}, {})
g = torch.Generator().manual_seed(0)
batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "pixel_values": torch.rand(4, 3, 32, 32, generator=g),
         "label": torch.tensor([0, 1, 2, 3]), "scene_idx": torch.full((4,), -1),
         "object_idx": torch.full((4,), -1), "objects_multi_hot": torch.zeros(4, 0)}
for zero in (0, 1, 2, 3):
    for stage in (1, 2):
        cfg = load_config(None, ["data.image_size=32", "data.generator_image_size=32",
                                 "model.understanding.image_size=32", "data.batch_size=4",
                                 f"training.stage={stage}", f"distributed.zero_stage={zero}",
                                 "distributed.num_workers=1", f"data.cache_dir={sys.argv[1]}"])
        torch.manual_seed(0)
        task = build_stage1_task(cfg, table) if stage == 1 else build_stage2_task(cfg, table)
        engine = build_engine(task, cfg, world_size=1, device=torch.device("cpu"), total_steps=2)
        engine.set_train(True)
        out = engine.ds_engine(engine.prepare_batch(batch))
        engine.ds_engine.backward(out["total"])
        engine.ds_engine.step()
        assert math.isfinite(float(out["total"])), (zero, stage)
        print(f"OK zero={zero} stage={stage}", flush=True)
"""


def test_every_zero_stage_builds_and_steps_without_annotations(tmp_path):
    proc = run_gloo_child(_ENGINES_CHILD, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK zero=") == 8
