"""The emotion-space computation at the end of stage 2 (METHOD §4.1, D9).

Over the session's synthetic shards with a ``tiny`` understanding model at 32 px: the shares of two simulated
ranks (rank 0 and rank 1 loaders in one process), merged, equal one pass at world size 1, which covers every
training image exactly once with evaluation transforms; the all-reduce helper adds two real gloo ranks' statistics
(this file run as a script in two processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _all_reduce_worker(rank: int, port: int, out: str) -> None:
    """One gloo rank: deterministic per-rank statistics, all-reduced, saved (run as a script)."""
    import torch.distributed as dist

    from uniemo.models.emotion_space import EmotionSpace
    from uniemo.training.emotion_space import all_reduce_emotion_space

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    space = EmotionSpace({"cls": 4, "object": 3})
    gen = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, 8, (10,), generator=gen)
    space.update({"cls": torch.randn(10, 4, generator=gen), "object": torch.randn(10, 3, generator=gen)}, labels)
    all_reduce_emotion_space(space)
    if rank == 0:
        space.save(out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after all work is done (issue 4)


if __name__ == "__main__":
    _all_reduce_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(shards: Path, **understanding):
    from uniemo.config.schema import Config

    cfg = Config()
    cfg.data.shards = str(shards)
    cfg.data.image_size = 32
    cfg.data.num_workers = 0
    cfg.model.understanding.image_size = 32
    for key, value in understanding.items():
        setattr(cfg.model.understanding, key, value)
    return cfg


def _model(cfg):
    from uniemo.data.loader import load_attribute_table
    from uniemo.models.weights import build_understanding

    attributes = load_attribute_table(cfg.data)
    torch.manual_seed(0)
    return build_understanding(cfg.model.understanding, len(attributes.scenes), len(attributes.objects))


def test_two_ranks_merged_equal_one_pass(synth_shards):
    from uniemo.models.emotion_space import EmotionSpace
    from uniemo.training.emotion_space import compute_emotion_space, emotion_space_loader

    cfg = _cfg(synth_shards)
    model = _model(cfg).train()
    loader = emotion_space_loader(cfg, rank=0, world_size=1)
    assert not loader.training and not loader.transform.augment  # D9: evaluation stream and transforms
    whole = compute_emotion_space(model, loader, "cpu")
    assert model.training  # the mode is restored
    parts = [compute_emotion_space(model, emotion_space_loader(cfg, rank=r, world_size=2), "cpu") for r in (0, 1)]
    assert all(p.counts().sum() > 0 for p in parts)
    merged = EmotionSpace(whole.dims)
    for part in parts:
        merged.merge(part)

    # Every training image exactly once, under its ground-truth emotion.
    totals = json.loads((synth_shards / "manifest.json").read_text())["totals"]["train"]
    assert whole.counts().tolist() == totals["emotion_counts"]
    assert whole.streams == ("cls", "scene", "object")
    for stream in whole.streams:
        assert torch.equal(merged.count[stream], whole.count[stream])
        torch.testing.assert_close(merged.sum[stream], whole.sum[stream], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.sumsq[stream], whole.sumsq[stream], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.mean(stream), whole.mean(stream), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.std(stream), whole.std(stream), rtol=1e-9, atol=1e-12)
        assert whole.std(stream).gt(0).all()

    # The statistics are those of the eval-mode features of the loader's images.
    batch = next(iter(emotion_space_loader(cfg)))
    with torch.no_grad():
        out = model.eval()(batch["image"])
    first = EmotionSpace(whole.dims)
    first.update({"cls": out.cls_feature, "scene": out.scene_feature, "object": out.object_feature}, batch["label"])
    one = compute_emotion_space(model, [batch])
    for stream in whole.streams:
        torch.testing.assert_close(one.sum[stream], first.sum[stream], rtol=1e-6, atol=1e-6)


def test_switched_off_branch_has_no_stream(synth_shards):
    from uniemo.training.emotion_space import compute_emotion_space, emotion_space_loader

    cfg = _cfg(synth_shards, use_scene_queries=False)
    batch = next(iter(emotion_space_loader(cfg)))
    space = compute_emotion_space(_model(cfg), [batch])
    assert space.streams == ("cls", "object")
    assert space.counts().sum() == len(batch["label"])


def test_all_reduce_over_two_gloo_ranks(tmp_path):
    from uniemo.models.emotion_space import EmotionSpace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "space.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]

    expected = EmotionSpace({"cls": 4, "object": 3})
    for rank in (0, 1):  # what each rank added, recomputed here
        gen = torch.Generator().manual_seed(rank)
        labels = torch.randint(0, 8, (10,), generator=gen)
        expected.update({"cls": torch.randn(10, 4, generator=gen), "object": torch.randn(10, 3, generator=gen)}, labels)
    reduced = EmotionSpace.load(out)
    assert reduced.counts().sum() == 20
    for stream in expected.streams:
        assert torch.equal(reduced.count[stream], expected.count[stream])
        torch.testing.assert_close(reduced.sum[stream], expected.sum[stream], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reduced.sumsq[stream], expected.sumsq[stream], rtol=1e-12, atol=1e-12)
