"""Precomputed VAE latents (uniemo.data.latents): the stage-2 loss they give equals the on-the-fly encoder's.

Real tiny models, the real loader and the session's synthetic shards (copied, so the session folder stays as it
is), 32 px images. The loader is run twice over the same shards and seed, once with ``pixel_values`` and once with
the stored moments; the batches must hold the same samples, the same understanding views and moments equal to the
encoder's of the same (flipped or not) pixels, and the task must give the same loss from the same random state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from uniemo.config import load_config
from uniemo.config.schema import SourceConfig
from uniemo.data.attributes import AttributeTable
from uniemo.data.latents import LatentReader, check_latents, covered_shards, latents_folder, write_latents
from uniemo.data.loader import build_loader_from_config
from uniemo.errors import ConfigError, DataError
from uniemo.models.generator import Generator
from uniemo.training.task import build_stage2_task

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(shards: Path, *extra: str):
    return load_config(None, [
        f"data.shards={shards}", f"data.image_size={SIZE}", f"data.generator_image_size={SIZE}",
        f"model.understanding.image_size={SIZE}", "data.batch_size=6", "data.num_workers=0",
        "training.stage=2", *extra,
    ])


@pytest.fixture(scope="module")
def shards(synth_shards, tmp_path_factory) -> Path:
    """A copy of the session's shards with float32 latents of the train and val splits."""
    out = tmp_path_factory.mktemp("latents") / "shards"
    shutil.copytree(synth_shards, out)
    generator = Generator.build_random("tiny", image_size=SIZE, seed=0)
    write_latents(out, generator, SIZE, resample="bicubic", splits=("train", "val"), batch_size=8, dtype="float32",
                  progress=False)
    return out


def _first_batches(cfg, n: int, latents: bool, split: str = "train") -> list[dict]:
    loader = build_loader_from_config(cfg.data, split, stage=2, seed=cfg.run.seed, latents=latents)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def _task(cfg, shards: Path):
    torch.manual_seed(0)
    return build_stage2_task(cfg, AttributeTable.load(shards)).train()


def _loss(task, batch: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return task(batch)


def test_stored_moments_are_the_encoders_and_the_loss_is_the_same(shards):
    cfg = _cfg(shards)
    task = _task(cfg, shards)
    plain = _first_batches(cfg, 3, latents=False)
    stored = _first_batches(cfg, 3, latents=True)
    rows = {}
    for path in covered_shards(shards, SIZE).values():
        keys = LatentReader()._open(path)[1]
        rows.update({key: (path, row) for key, row in keys.items()})
    reader = LatentReader()
    flips_seen = set()
    for a, b in zip(plain, stored, strict=True):
        assert a["key"] == b["key"]  # the same samples in the same order
        assert torch.equal(a["image"], b["image"])  # the same understanding views (same draws from the rng)
        assert "pixel_values" not in b and "pixel_rows" not in b
        mean, std = task.generator.latent_moments(a["pixel_values"])
        torch.testing.assert_close(b["latent_mean"], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["latent_std"], std, rtol=1e-5, atol=1e-6)
        # A flip changes the latent, so storing one orientation would not do: the other one is far off.
        other, _ = task.generator.latent_moments(a["pixel_values"].flip(-1))
        assert (b["latent_mean"] - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        for i, key in enumerate(b["key"]):
            as_is, _ = reader.read(*rows[key], flip=False)
            flips_seen.add(not torch.equal(b["latent_mean"][i], as_is))
        on_the_fly, precomputed = _loss(task, a, seed=7), _loss(task, b, seed=7)
        for term in ("diffusion", "total"):
            torch.testing.assert_close(precomputed[term], on_the_fly[term], rtol=1e-5, atol=1e-6)
        # ...and a different random state gives a different loss: the equality above is not vacuous.
        assert not torch.allclose(_loss(task, b, seed=8)["diffusion"], on_the_fly["diffusion"])
    assert flips_seen == {True, False}  # both orientations were drawn and both were looked up correctly


def test_validation_stream_reads_the_unflipped_moments(shards):
    cfg = _cfg(shards)
    task = _task(cfg, shards)
    a, b = _first_batches(cfg, 1, False, "val")[0], _first_batches(cfg, 1, True, "val")[0]
    assert a["key"] == b["key"]
    mean, _ = task.generator.latent_moments(a["pixel_values"])
    torch.testing.assert_close(b["latent_mean"], mean, rtol=1e-5, atol=1e-5)


def test_a_source_without_latents_is_encoded_in_the_step(shards, tmp_path):
    """A feedback-like extra source has no latents: its samples come as pixel_rows + pixel_values and are encoded
    by the task; the loss still equals the all-on-the-fly loss."""
    extra = tmp_path / "extra"
    shutil.copytree(shards, extra, ignore=shutil.ignore_patterns("latents-*"))
    cfg = _cfg(shards)
    cfg.data.extra_sources = [SourceConfig("synthetic", str(extra), 1.0)]
    task = _task(cfg, shards)
    plain = _first_batches(cfg, 3, latents=False)
    mixed = _first_batches(cfg, 3, latents=True)
    saw_mixed = False
    for a, b in zip(plain, mixed, strict=True):
        assert a["key"] == b["key"] and a["source"] == b["source"]
        rows = b.get("pixel_rows", torch.zeros(0, dtype=torch.int64)).tolist()
        assert rows == [i for i, s in enumerate(b["source"]) if s == "synthetic"]
        saw_mixed |= 0 < len(rows) < len(b["key"])
        torch.testing.assert_close(_loss(task, b, 3)["total"], _loss(task, a, 3)["total"], rtol=1e-5, atol=1e-6)
    assert saw_mixed


def test_writer_resumes_and_refuses_another_vae_or_stale_shards(shards, tmp_path):
    folder = latents_folder(shards, SIZE)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and {e["split"] for e in manifest["shards"]} == {"train", "val"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    same = Generator.build_random("tiny", image_size=SIZE, seed=0)
    write_latents(shards, same, SIZE, resample="bicubic", splits=("train", "val"), dtype="float32",
                  progress=False)  # nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")} == mtimes
    check_latents(shards, SIZE, "bicubic", same.vae)

    other = Generator.build_random("tiny", image_size=SIZE, seed=1)
    with pytest.raises(DataError, match="another vae_sha256"):
        write_latents(shards, other, SIZE, resample="bicubic", dtype="float32", progress=False)
    with pytest.raises(ConfigError, match="another VAE"):
        check_latents(shards, SIZE, "bicubic", other.vae)
    with pytest.raises(ConfigError, match="holds no latents"):
        check_latents(shards, 64, "bicubic", same.vae)
    with pytest.raises(ConfigError, match="bilinear, data.generator_resample"):
        check_latents(shards, SIZE, "bilinear", same.vae)  # latents depend on the resize filter

    # A rewritten shard (another sha256 in the shard manifest) makes its latents stale: the loader refuses.
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard_manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in shard_manifest["shards"] if e["split"] == "train")
    entry["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(shard_manifest))
    assert entry["name"] not in covered_shards(copy, SIZE)
    with pytest.raises(DataError, match="have no current 32 px latents"):
        build_loader_from_config(_cfg(copy).data, "train", stage=2, latents=True)


def test_cli_writes_float16_latents_of_the_configs_generator(synth_shards, tmp_path):
    """`uniemo data latents` with the CPU world's pretrained generator (configs/tiny_stage2.yaml): float16 moments
    of that VAE, accepted by check_latents, equal to its encoder's to half precision."""
    from uniemo.cli import main
    from uniemo.models.generator import build_generator

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    config = str(REPO / "configs" / "tiny_stage2.yaml")
    overrides = [f"data.shards={shards}", f"data.generator_image_size={SIZE}",
                 f"model.generator.path={REPO / 'generators' / 'cpu-world'}"]
    assert main(["data", "latents", "--config", config, *overrides, "--splits", "train", "--no-progress",
                 "--device", "cpu"]) == 0
    manifest = json.loads((latents_folder(shards, SIZE) / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and all(e["split"] == "train" for e in manifest["shards"])
    cfg = load_config(config, [*overrides, f"data.image_size={SIZE}", "data.num_workers=0"])
    generator = build_generator(cfg.model.generator, image_size=SIZE, seed=cfg.run.seed)
    check_latents(shards, SIZE, cfg.data.generator_resample, generator.vae)
    a, b = _first_batches(cfg, 1, False)[0], _first_batches(cfg, 1, True)[0]
    assert a["key"] == b["key"] and b["latent_mean"].dtype == torch.float16
    mean, _ = generator.latent_moments(a["pixel_values"])
    torch.testing.assert_close(b["latent_mean"].float(), mean, rtol=2e-3, atol=2e-3)
    assert main(["data", "latents", "--config", config, *overrides, "--part", "2/2"]) == 2
