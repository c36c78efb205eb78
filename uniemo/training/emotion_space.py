"""Computing the emotion space at the end of stage 2 (METHOD §4.1, D9).

One evaluation-style pass over the **train** split: the model in eval mode, no gradients, evaluation transforms
(Resize + CenterCrop; ``training.emotion_space_view=official`` takes the official view instead, the stage-1 training
augmentation with ImageNet mean/std, METHOD §9.9), every training image exactly once over all ranks (the evaluation stream deals shards ``[rank::world_size]``). Each rank accumulates
count / sum / sum of squares of ``f_cls``, ``f_scene`` and ``f_object`` per ground-truth emotion; the ranks' sums
are then added (:func:`all_reduce_emotion_space`), so the result equals one pass over the whole split on one
process, up to float64 summation order. That fixes the official "last rank to write wins" (METHOD §4.1 caveat).

Typical use on every rank of a stage-2 run::

    loader = emotion_space_loader(cfg, rank=rank, world_size=world_size)
    space = compute_emotion_space(task.understanding, loader, device)
    all_reduce_emotion_space(space, device)     # collective: every rank calls it
    if rank == 0:
        space.save(run_dir / EMOTION_SPACE_FILE)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from uniemo.data.loader import build_loader_from_config, list_split_shards
from uniemo.data.source import data_source
from uniemo.data.transforms import SampleTransform
from uniemo.models.emotion_space import EmotionSpace

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.data.loader import ShardLoader
    from uniemo.models.understanding import UnderstandingModel

__all__ = [
    "all_reduce_emotion_space",
    "compute_emotion_space",
    "emotion_space_dims",
    "emotion_space_loader",
    "official_space_transform",
]


def emotion_space_dims(understanding: UnderstandingModel) -> dict[str, int]:
    """The streams of the model's emotion space and their widths: ``cls`` always, ``scene`` / ``object`` when
    that query type is on (a switched-off branch, D13, has no stream)."""
    dims = {"cls": understanding.width}
    if understanding.use_scene_queries:
        dims["scene"] = understanding.width
    if understanding.use_object_queries:
        dims["object"] = understanding.width
    return dims


def emotion_space_loader(
    cfg: Config, *, rank: int = 0, world_size: int = 1, num_workers: int | None = None
) -> ShardLoader:
    """This rank's share of the train split as an evaluation stream (every image once) with evaluation transforms
    (D9), or with ``training.emotion_space_view=official`` the official view: RandomResizedCrop + flip, ImageNet
    mean/std (``train_vit.py``'s train loader, METHOD §4.1), drawn per sample from the run seed.

    No ``pixel_values`` (stage-1 transform): only the understanding input is needed. ``num_workers`` defaults to
    ``data.num_workers``, lowered so that every loader worker of every rank gets a shard.
    """

    if num_workers is None:
        shards = list_split_shards([data_source(cfg.data)], "train", required=True)
        num_workers = max(0, min(cfg.data.num_workers, len(shards) // max(1, world_size)))
    return build_loader_from_config(
        cfg.data,
        "train",
        rank=rank,
        world_size=world_size,
        stage=1,
        training=False,
        seed=cfg.run.seed,
        num_workers=num_workers,
        transform=official_space_transform(cfg) if cfg.training.emotion_space_view == "official" else None,
    )


def official_space_transform(cfg: Config) -> SampleTransform:
    """The official emotion-space view: the stage-1 training transform of ``train_vit_class/EmoSet.py``
    (RandomResizedCrop(S) + horizontal flip, ImageNet mean/std), whatever ``data.normalization`` is."""
    return SampleTransform(image_size=cfg.data.image_size, normalization="imagenet", augment=True)


@torch.no_grad()
def compute_emotion_space(
    understanding: UnderstandingModel, loader: Iterable[dict[str, Any]], device: torch.device | str | None = None
) -> EmotionSpace:
    """This process's emotion-space statistics over ``loader`` (METHOD §4.1): per ground-truth emotion, count,
    sum and sum of squares of ``f_cls``, ``f_scene``, ``f_object``.

    The model runs in eval mode without gradients (its mode is restored afterwards); images are cast to the
    model's device and parameter dtype (a bf16 engine's module works as is). The statistics are LOCAL: add
    other ranks' with :func:`all_reduce_emotion_space` (or :meth:`EmotionSpace.merge`).

    Args:
        understanding: the :class:`uniemo.models.understanding.UnderstandingModel` (e.g. ``task.understanding``).
        loader: batches of ``data/FORMAT.md`` with ``image`` and ``label``; use :func:`emotion_space_loader`.
        device: where to run the model; None: the model's device.
    """
    param = next(understanding.parameters())
    device = param.device if device is None else torch.device(device)
    space = EmotionSpace(emotion_space_dims(understanding))
    was_training = understanding.training
    understanding.eval()
    try:
        for batch in loader:
            images = batch["image"].to(device=device, dtype=param.dtype, non_blocking=True)
            out = understanding(images)
            space.update(
                {"cls": out.cls_feature, "scene": out.scene_feature, "object": out.object_feature},
                batch["label"],
            )
    finally:
        understanding.train(was_training)
    return space


def all_reduce_emotion_space(space: EmotionSpace, device: torch.device | str | None = None) -> EmotionSpace:
    """Sum the statistics of every rank into ``space`` (a collective: every rank must call it); returns it.

    One float64 all-reduce of :meth:`EmotionSpace.statistics_tensor` on ``device`` (the process group's device:
    CPU for gloo, the rank's GPU for NCCL). Without an initialised process group (one process) it is a no-op.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return space
    flat = space.statistics_tensor().to("cpu" if device is None else device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    space.load_statistics_tensor(flat)
    return space
