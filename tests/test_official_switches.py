"""The switches that let a recipe reproduce the official optimisation (issue 15, docs/RECIPES.md): the LR cycle
counted in samples, unannotated images kept as InfoNCE negatives, the Resize(256) + CenterCrop(224) view.

Each is checked against an independent reference: torch's own ``CosineAnnealingLR`` stepped as the official code
steps it, the official loss written out with ``ignore_index``, and a crop computed by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uniemo.config.schema import TrainingConfig
from uniemo.data.transforms import SampleTransform, resize_center_crop
from uniemo.losses import symmetric_info_nce
from uniemo.training.engine import lr_factor


@pytest.mark.parametrize(
    ("scheduler_steps_per_update", "samples", "global_batch"),
    [(4, 2048, 256), (1, 32, 1)],  # official stage 1 (4 accelerate processes x 64) and stage 2 (batch 1)
)
def test_cycle_in_samples_follows_the_official_scheduler(scheduler_steps_per_update, samples, global_batch):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    official = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=32)
    factor = lr_factor(TrainingConfig(lr_schedule="cyclic_cosine", cyclic_period_samples=samples), 200, global_batch)
    for update in range(200):
        assert factor(update) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-9), update
        optimizer.step()
        for _ in range(scheduler_steps_per_update):  # accelerate steps the wrapped scheduler once per process
            official.step()


def test_cycle_in_samples_keeps_the_curve_over_samples_at_another_batch():
    cfg = TrainingConfig(lr_schedule="cyclic_cosine", cyclic_period_samples=32)
    per_sample = lr_factor(cfg, 1000, global_batch=1)
    per_four = lr_factor(cfg, 250, global_batch=4)
    assert [per_four(s) for s in range(40)] == pytest.approx([per_sample(4 * s) for s in range(40)])


def _official_info_nce(features, texts, scale, valid):
    """METHOD §2.4 as the official code computes it: the whole B x B matrix, label -1 on unannotated rows."""
    logits = scale * features @ texts.T
    labels = torch.arange(len(valid))
    labels[~valid] = -1
    return (F.cross_entropy(logits, labels, ignore_index=-1) + F.cross_entropy(logits.T, labels, ignore_index=-1)) / 2


def test_unannotated_images_stay_as_negatives():
    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    texts = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    valid = torch.tensor([True, False, True, True, False, True])
    kept = symmetric_info_nce(features, texts, 14.3, valid, invalid_as_negatives=True)
    assert kept.item() == pytest.approx(_official_info_nce(features, texts, 14.3, valid).item(), rel=1e-6)
    dropped = symmetric_info_nce(features, texts, 14.3, valid)
    assert dropped.item() == pytest.approx(_official_info_nce(features[valid], texts[valid], 14.3,
                                                              valid[valid]).item(), rel=1e-6)
    assert kept.item() != pytest.approx(dropped.item(), rel=1e-3)  # the extra negatives change the loss


def test_crop_resize_takes_the_centre_of_the_resized_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8))  # 300 wide, 400 high
    view = resize_center_crop(image, 224, 256)
    resized = image.resize((256, int(256 * 400 / 300)), Image.Resampling.BILINEAR)  # 256 x 341
    top, left = int(round((341 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    assert view.size == (224, 224)
    assert np.array_equal(np.asarray(view), np.asarray(resized.crop((left, top, left + 224, top + 224))))
    assert np.array_equal(np.asarray(resize_center_crop(image, 224)), np.asarray(resize_center_crop(image, 224, 224)))
    square = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    out = SampleTransform(image_size=224, crop_resize=256)(square, random.Random(0))["image"]
    assert out.shape == (3, 224, 224)
    assert not np.array_equal(np.asarray(resize_center_crop(square, 224, 256)), np.asarray(square))


def test_stage1_task_gives_unannotated_images_the_placeholder_text(tmp_path):
    from uniemo.config.schema import Config
    from uniemo.data.attributes import AttributeTable
    from uniemo.models.text_features import attribute_text_features
    from uniemo.training.task import _gather_rows, build_stage1_task

    cfg = Config()
    cfg.training.losses.unannotated_negatives = True
    table = AttributeTable.from_counts({"beach": [1] * 8, "cave": [2] * 8}, {"Tree": [1] * 8})
    task = build_stage1_task(cfg, table, cache_dir=str(tmp_path))
    placeholder = attribute_text_features(cfg.model.understanding, ["scene"], str(tmp_path))[0]
    assert task.scene_text_features.shape[0] == 3 and torch.allclose(task.scene_text_features[-1], placeholder, atol=1e-5)
    batch = {"image": torch.zeros(3, 3, 64, 64), "label": torch.tensor([0, 1, 2]),
             "scene_idx": torch.tensor([1, -1, 0]), "object_idx": torch.tensor([-1, 0, -1])}
    out = task(batch)
    assert torch.isfinite(out["understanding/scene"]) and torch.isfinite(out["understanding/object"])
    rows = _gather_rows(task.scene_text_features, batch["scene_idx"], placeholder_last=True)
    assert torch.equal(rows[1], task.scene_text_features[-1]) and torch.equal(rows[0], task.scene_text_features[1])


def test_stage2_at_batch_one_with_the_official_hard_negative(synth_shards):
    """The official stage-2 setting: batch 1, the hard negative from the understanding logits, Resize(256)-style
    view (here 40 -> 32), no clipping; one forward + backward reaches the mappers and the queries."""
    from uniemo.config.schema import Config
    from uniemo.data.attributes import AttributeTable
    from uniemo.data.loader import build_loader
    from uniemo.data.transforms import build_sample_transform
    from uniemo.training.task import build_stage2_task

    cfg = Config()
    cfg.data.image_size = cfg.data.generator_image_size = cfg.model.understanding.image_size = 32
    cfg.data.crop_resize, cfg.data.train_augment = 40, False
    cfg.training.losses.condition_negative = "understanding"
    loader = build_loader(synth_shards, "train", rank=0, world_size=1, batch_size=1, num_workers=0,
                          transform=build_sample_transform(cfg.data, stage=2, training=True), training=True, seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (1, 3, 32, 32)
    torch.manual_seed(0)
    task = build_stage2_task(cfg, AttributeTable.load(synth_shards / "attributes.json"))
    out = task(batch)
    out["total"].backward()
    grads = {name: p.grad for name, p in task.named_parameters() if p.requires_grad}
    assert torch.isfinite(out["total"])
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "mapper" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "quer" in n)
