"""The streaming loader on real shards with real webdataset and torch DataLoader workers (data/FORMAT.md)."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from uniemo.config.schema import EMOTIONS, DataConfig, SourceConfig, SyntheticConfig
from uniemo.data.attributes import AttributeTable
from uniemo.data.loader import Source, build_loader, build_loader_from_config
from uniemo.data.shards import read_manifest, update_manifest, write_sample_shard, write_shards
from uniemo.data.transforms import SampleTransform, random_resized_crop_box, resize_center_crop
from uniemo.errors import DataError

EVAL = SampleTransform(image_size=24)
TRAIN = SampleTransform(image_size=24, augment=True)


@pytest.fixture(scope="module")
def small_shards(synth_root, tmp_path_factory):
    """``synth_root`` in shards of 10: 30 train, 4 val, 7 test shards."""
    out = tmp_path_factory.mktemp("small_shards")
    write_shards(source="emoset", root=synth_root, out=out, shard_size=10, workers=1, progress=False)
    return out


def _keys_of_split(folder: Path, split: str) -> list[str]:
    urls = [str(folder / e["name"]) for e in read_manifest(folder)["shards"] if e["split"] == split]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]


def _keys_of_split_shard(folder: Path, name: str) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(str(folder / name), shardshuffle=False)]


def _loader(folder, split="train", **kw):
    args = dict(rank=0, world_size=1, batch_size=8, num_workers=2, transform=TRAIN, training=True)
    args.update(kw)
    return build_loader(folder, split, **args)


def test_eval_stream_sees_every_sample_once_over_2_ranks_x_2_workers(small_shards):
    for split in ("test", "train"):
        seen: Counter = Counter()
        for rank in range(2):
            loader = _loader(small_shards, split, rank=rank, world_size=2, transform=EVAL, training=False)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert sum(len(b["key"]) for b in batches) == loader.num_samples
            assert any(len(b["key"]) < 8 for b in batches)  # last partial batches are kept
            for b in batches:
                seen.update(b["key"])
        assert sorted(seen) == sorted(_keys_of_split(small_shards, split))
        assert set(seen.values()) == {1}


@pytest.mark.parametrize("world_size, workers", [(2, 2), (3, 1), (1, 3)])
def test_fewer_eval_shards_than_readers_deal_out_samples_once(synth_shards, world_size, workers):
    """The val split has 2 shards: with more readers (ranks x workers) than that, samples are dealt out."""
    expected = sorted(_keys_of_split(synth_shards, "val"))
    seen: Counter = Counter()
    for rank in range(world_size):
        loader = _loader(synth_shards, "val", rank=rank, world_size=world_size, num_workers=workers,
                         batch_size=4, transform=EVAL, training=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert sum(len(b["key"]) for b in batches) == loader.num_samples > 0
        for b in batches:
            seen.update(b["key"])
    assert sorted(seen) == expected and set(seen.values()) == {1}


def test_batch_contract(synth_shards):
    table = AttributeTable.load(synth_shards)
    transform = SampleTransform(image_size=24, normalization="symmetric", generator_size=16)
    loader = _loader(synth_shards, "test", batch_size=5, num_workers=0, transform=transform, training=False)
    batch = next(iter(loader))
    assert set(batch) == {
        "image",
        "pixel_values",
        "label",
        "scene_idx",
        "object_idx",
        "objects_multi_hot",
        "key",
        "source",
    }
    assert batch["image"].shape == (5, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["pixel_values"].min() >= -1
    assert batch["objects_multi_hot"].shape == (5, len(table.objects))
    assert batch["source"] == ["real"] * 5
    raw = {
        s["__key__"]: json.loads(s["json"])
        for s in wds.WebDataset(
            [
                str(synth_shards / e["name"])
                for e in read_manifest(synth_shards)["shards"]
                if e["split"] == "test"
            ],
            shardshuffle=False,
        )
    }
    for i, key in enumerate(batch["key"]):
        meta = raw[key]
        assert batch["label"][i].item() == EMOTIONS.index(meta["emotion"])
        assert batch["scene_idx"][i].item() == table.scene_index(meta["scene"])
        last = meta["objects"][-1] if meta["objects"] else None
        assert batch["object_idx"][i].item() == table.object_index(last)
        hot = {table.objects[j] for j in batch["objects_multi_hot"][i].nonzero().flatten().tolist()}
        assert hot == {o for o in meta["objects"] if table.object_index(o) >= 0}
    for name in ("label", "scene_idx", "object_idx"):
        assert batch[name].dtype == torch.int64


def test_training_streams_give_every_rank_the_same_number_of_batches(small_shards):
    world = 3
    per_rank = []
    for rank in range(world):
        loader = _loader(small_shards, rank=rank, world_size=world, batch_size=8, num_workers=2)
        assert loader.batches_per_epoch == 296 // (world * 8) == 12
        epoch0 = [b["key"] for b in loader]
        assert loader.epoch == 1
        epoch1 = [b["key"] for b in loader]
        assert len(epoch0) == len(epoch1) == 12 and all(len(k) == 8 for k in epoch0 + epoch1)
        assert epoch0 != epoch1  # a new epoch draws new shards and a new order
        per_rank.append(epoch0)
    assert per_rank[0] != per_rank[1] != per_rank[2]


def test_a_training_epoch_delivers_each_sample_once_over_2_ranks_x_2_workers(small_shards):
    """296 train samples, 2 ranks x 8: 18 batches per rank, 288 distinct samples, 8 left out; the next epoch
    leaves out others. A position saved mid-epoch, restored in a fresh loader, gives the same batches."""
    all_keys = set(_keys_of_split(small_shards, "train"))
    left_out = []
    for epoch in range(2):
        seen: Counter = Counter()
        for rank in range(2):
            loader = _loader(small_shards, rank=rank, world_size=2, batch_size=8, num_workers=2, epoch=epoch)
            batches = [b["key"] for b in loader]
            assert len(batches) == loader.batches_per_epoch == 18
            for keys in batches:
                seen.update(keys)
        assert set(seen.values()) == {1} and len(seen) == 2 * 18 * 8
        left_out.append(all_keys - set(seen))
        assert len(left_out[-1]) == 296 - 288
    assert left_out[0] != left_out[1]

    kw = dict(rank=1, world_size=2, batch_size=8, num_workers=2)
    reference = [(b["key"], b["image"]) for b in _loader(small_shards, **kw)]
    first = _loader(small_shards, **kw)
    head = []
    for b in first:
        head.append((b["key"], b["image"]))
        if len(head) == 7:  # odd: the restored epoch starts at the second worker
            break
    tail = [(b["key"], b["image"]) for b in _loader(small_shards, position=first.state_dict(), **kw)]
    assert [k for k, _ in head + tail] == [k for k, _ in reference]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(head + tail, reference, strict=True))


def test_reader_slices_cover_a_pass_in_proportion_to_the_batches_owed():
    from uniemo.data.loader import reader_slice

    for total, bpe, world, workers in [(296, 18, 2, 2), (1000, 7, 3, 2), (50, 5, 1, 3), (37, 4, 2, 4)]:
        slices = [reader_slice(total, bpe, r, world, w, workers) for r in range(world) for w in range(workers)]
        owed = [len(range(w, bpe, workers)) for _ in range(world) for w in range(workers)]
        assert slices[0][0] == 0 and slices[-1][1] == total  # the whole pass, cut without gaps or overlaps
        assert [a for a, _ in slices[1:]] == [b for _, b in slices[:-1]]
        for (a, b), n in zip(slices, owed, strict=True):
            assert b - a >= total * n // (world * bpe)  # in proportion to the batches owed
    assert reader_slice(3, 10, 0, 2, 0, 2) == (0, 3)  # a source of fewer samples than readers: the whole pass


def test_sources_mix_by_weight_and_rounds_join_as_sub_folders(small_shards, synth_root, tmp_path):
    feedback = tmp_path / "feedback"
    keys = set()
    for rnd in range(2):
        images = sorted((synth_root / "image" / "awe").glob("*.jpg"))[rnd * 10 : rnd * 10 + 10]
        samples = [
            {
                "__key__": f"synthetic_r{rnd}_{i}",
                "jpg": p.read_bytes(),
                "cls": 1,
                "json": {"emotion": "awe", "source": "synthetic", "round": rnd},
            }
            for i, p in enumerate(images)
        ]
        keys |= {s["__key__"] for s in samples}
        entry = write_sample_shard(samples, feedback / f"round-{rnd}" / "train-000000.tar")
        update_manifest(feedback / f"round-{rnd}", [entry], round=rnd)
    sources = [Source.of("real", small_shards, 1.0), Source.of("synthetic", feedback, 3.0)]
    loader = _loader(sources, batch_size=16, num_workers=2, transform=EVAL)
    assert loader.train_samples == 296 + 20
    sources_seen, synth_keys = Counter(), set()
    for b in loader:
        sources_seen.update(b["source"])
        synth_keys |= {k for k, s in zip(b["key"], b["source"], strict=True) if s == "synthetic"}
    n = sum(sources_seen.values())
    assert n == 19 * 16
    assert 0.75 - 0.08 < sources_seen["synthetic"] / n < 0.75 + 0.08
    assert synth_keys == keys  # both rounds are drawn from
    assert loader.stats()["by_source"] == dict(sources_seen)


def _rewrite_member(tar_path: Path, ext: str, new_bytes: bytes) -> str:
    """Replace the ``ext`` member of the first sample of a tar; return that sample's key."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".")[0]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name == f"{victim}.{ext}":
                data = new_bytes
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return victim


def test_corrupt_shards_and_images_are_skipped_and_counted(small_shards, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(small_shards, folder)
    truncated = folder / "test-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[: 4 * 1024 + 700])  # cut inside a sample
    bad_key = _rewrite_member(folder / "test-000004.tar", "jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "test-000006.tar").unlink()

    loader = _loader(folder, "test", num_workers=2, transform=EVAL, training=False)
    keys = [k for b in loader for k in b["key"]]
    stats = loader.stats()
    reasons = stats["skipped"]["by_reason"]
    assert (
        reasons["undecodable_image"] == 1 and reasons["corrupt_shard"] == 1 and reasons["missing_shard"] == 1
    )
    assert len(keys) == len(set(keys)) == stats["samples"]
    by_shard = {
        e["name"]: _keys_of_split_shard(small_shards, e["name"]) for e in read_manifest(folder)["shards"]
    }
    intact = {
        k
        for name in (
            "test-000000.tar",
            "test-000002.tar",
            "test-000003.tar",
            "test-000004.tar",
            "test-000005.tar",
        )
        for k in by_shard[name]
    } - {bad_key}
    from_truncated = set(keys) - intact
    assert intact <= set(keys) and bad_key not in keys
    assert from_truncated < set(by_shard["test-000001.tar"])  # a strict part of the cut shard survives

    # training streams keep going through the same damage
    train = _loader(folder, "test", batch_size=4, num_workers=1, transform=TRAIN, training=True)
    assert len(list(train)) == 16

    # ... but a source with no readable shard at all is an error, not an endless loop
    for entry in read_manifest(folder)["shards"]:
        if entry["split"] == "val":
            (folder / entry["name"]).write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"^source 'real': \d+ shard reads in a row gave no sample"):
        next(iter(_loader(folder, "val", num_workers=1)))


def test_position_restore_continues_the_stream_exactly(small_shards):
    def run(loader, n):
        out = []
        for b in loader.batches():
            out.append((b["key"], b["image"]))
            if len(out) == n:
                return out

    kw = dict(batch_size=8, num_workers=2, seed=7)
    reference = run(_loader(small_shards, **kw), 50)  # epochs of 37 batches: crosses into epoch 1

    for cut in (5, 37, 40):
        first = _loader(small_shards, **kw)
        head = run(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store plain data
        assert state["samples_consumed"] == cut * 8
        assert state["epoch"] == cut // 37 and state["batches_in_epoch"] == cut % 37
        resumed = _loader(small_shards, position=state, **{**kw, "seed": 0})  # the position's seed wins
        tail = run(resumed, 50 - cut)
        for (ka, ia), (kb, ib) in zip(head + tail, reference, strict=True):
            assert ka == kb and torch.equal(ia, ib)

    # leaving an epoch early and iterating again continues at the next batch
    loader = _loader(small_shards, **kw)
    got = []
    for _ in range(3):
        for b in loader:
            got.append(b["key"])
            if len(got) % 4 == 0:
                break
    assert got == [k for k, _ in reference[:12]]

    # another worker count cannot replay the epoch: it warns and starts the next one
    first = _loader(small_shards, **kw)
    run(first, 3)
    with pytest.warns(UserWarning, match="num_workers"):
        moved = _loader(small_shards, position=first.state_dict(), **{**kw, "num_workers": 1})
    assert moved.epoch == 1 and moved.samples_consumed == 24


def test_build_loader_from_config_makes_the_synthetic_set(tmp_path):
    cfg = DataConfig(
        cache_dir=str(tmp_path),
        image_size=24,
        generator_image_size=16,
        batch_size=4,
        num_workers=1,
        synthetic=SyntheticConfig(images=64, size=16, seed=1, shard_size=8),
    )
    train = build_loader_from_config(cfg, "train", stage=2)
    batch = next(iter(train))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["pixel_values"].shape == (4, 3, 16, 16)
    test = build_loader_from_config(cfg, "test", world_size=1)
    assert sum(len(b["key"]) for b in test) == test.num_samples > 0
    cfg.extra_sources = [SourceConfig(name="feedback", path=str(tmp_path / "none-yet"), weight=0.5)]
    with pytest.warns(UserWarning, match="no train shards yet"):
        mixed = build_loader_from_config(cfg, "train")
    assert {s for b in mixed for s in b["source"]} == {"real"}


def test_transforms_follow_torchvision_rules():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(10, 300), rng.randint(10, 300)
        left, top, right, bottom = random_resized_crop_box(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    image = Image.new("RGB", (90, 40), (10, 200, 30))
    assert resize_center_crop(image, 32).size == (32, 32)
    a = TRAIN(image, random.Random(3))["image"]
    assert torch.equal(a, TRAIN(image, random.Random(3))["image"]) and a.shape == (3, 24, 24)
    gray = Image.new("L", (40, 40), 128)
    clip = SampleTransform(image_size=8, normalization="clip")(gray, random.Random(0))["image"]
    assert clip[0, 0, 0].item() == pytest.approx((128 / 255 - 0.48145466) / 0.26862954, abs=1e-5)
