"""The feedback pool (issue 5): model bundle and workers in-process, then real Ray rounds with tiny presets.

The Ray tests share one embedded local Ray (module fixture, own short temp folder, shut down at the end) and a
random tiny bundle, so no trained run is needed.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from uniemo.config.schema import EMOTIONS, Config, DistributedConfig
from uniemo.data.attributes import AttributeTable
from uniemo.data.shards import MANIFEST_FILE, read_manifest
from uniemo.distributed.ray_session import ray_session
from uniemo.feedback.actors import FilterWorker, GenerationJob, GeneratorWorker, ModelBundle
from uniemo.feedback.filtering import REJECTIONS
from uniemo.feedback.rounds import plan_jobs, run_round, synthetic_source
from uniemo.run_layout import STAGING_DIR, round_dir, round_report_path


def _config() -> Config:
    cfg = Config()
    fb = cfg.feedback
    fb.candidates_per_emotion = 8
    fb.batch_size = 4
    fb.keep = 3
    # The random understanding model sees every tiny-generator image alike (f_cls cosines ~0.99, one argmax
    # class, one retrieved attribute): no threshold, a near-duplicate delta above those cosines and no attribute
    # cap, so that the one emotion the model predicts keeps K images and the round writes several shards. The
    # filter's rules are tested on crafted inputs in test_filtering.py.
    fb.tau = 0.0
    fb.delta = 0.9995
    fb.attribute_cap = 1.0
    fb.sampling_steps = 4
    fb.generator_actors = 2
    fb.generator_cpus = 1.0
    fb.filter_cpus = 0.5
    fb.shard_size = 2
    return cfg


@pytest.fixture(scope="module")
def bundle(synth_shards) -> ModelBundle:
    return ModelBundle.random(_config(), AttributeTable.load(synth_shards), checkpoint_id="random-0")


def test_bundle_pickles_and_generation_is_identical_across_workers(bundle):
    restored = pickle.loads(pickle.dumps(bundle))
    job = GenerationJob(
        job_id=0, emotion=1, seeds=(11, 12), first_index=0, steps=3, guidance_scale=7.5, sampler="ddim"
    )
    meta_a, images_a = GeneratorWorker(bundle).generate(job)
    meta_b, images_b = GeneratorWorker(restored).generate(job)
    assert images_a == images_b  # seeded generation: the same PNG bytes in any actor (D10)
    assert meta_a.seeds == [11, 12] and meta_a.checkpoint_id == "random-0" and len(images_a) == 2

    scores = FilterWorker(restored).score(0, images_a)
    assert scores.probs.shape == (2, 8) and np.allclose(scores.probs.sum(axis=1), 1.0, atol=1e-5)
    assert scores.features.shape == (2, bundle.understanding_dims.width)
    kinds = np.asarray(bundle.attributes.base_kinds)
    assert scores.similarity.shape == (2, len(kinds))
    # both query branches are on: every base entry is compared (scene names by the scene branch, objects by the
    # object branch) and the values are cosines
    assert not np.isnan(scores.similarity).any()
    assert (np.abs(scores.similarity) <= 1.0 + 1e-5).all()


def test_bundle_from_a_loaded_run_generates_and_scores_as_the_run(bundle, synth_shards):
    """The adapter to ``load_run``: the bundle of a stage-2 LoadedRun makes the images the run's own models make."""
    import io

    from PIL import Image

    from uniemo.data.transforms import build_sample_transform
    from uniemo.inference.runs import LoadedRun
    from uniemo.models.generation import generate
    from uniemo.training.task import build_stage2_task

    cfg = _config()
    attributes = AttributeTable.load(synth_shards)
    task = build_stage2_task(cfg, attributes).eval()
    run = LoadedRun(
        cfg,
        2,
        7,
        Path("runs/x/checkpoints/step-7"),
        task.understanding,
        build_sample_transform(cfg.data, stage=1, training=False),
        attributes.rebased(cfg.data.min_attribute_count, cfg.data.phi_beta),
        conditioner=task.conditioner,
        generator=task.generator,
        emotion_space=bundle.emotion_space,
        attribute_embeddings=task.attribute_embeddings,
        phi=task.phi,
    )
    from_run = ModelBundle.from_loaded_run(run, checkpoint_id="run-x-step-7")
    job = GenerationJob(
        job_id=3, emotion=6, seeds=(5, 9), first_index=0, steps=3, guidance_scale=7.5, sampler="unipc"
    )
    meta, images = GeneratorWorker(from_run).generate(job)
    direct = generate(
        run.generator,
        run.conditioner,
        run.emotion_space,
        run.attribute_embeddings,
        run.phi,
        6,
        2,
        seeds=[5, 9],
        steps=3,
        guidance_scale=7.5,
        sampler="unipc",
    )
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in images])
    assert np.array_equal(decoded, direct.images)  # PNG is lossless: the exact pixels
    assert meta.checkpoint_id == "run-x-step-7"

    scores = FilterWorker(from_run).score(3, images)
    with torch.no_grad():
        batch = torch.stack([run.transform(Image.open(io.BytesIO(b)), None)["image"] for b in images])
        expected = run.understanding(batch).emotion_logits.softmax(dim=-1).numpy()
    assert np.allclose(scores.probs, expected, atol=1e-6)


def test_plan_jobs_gives_every_emotion_its_quota():
    cfg = _config()
    cfg.feedback.candidates_per_emotion = 10
    jobs = plan_jobs(cfg, round_index=2)
    for k in range(8):
        mine = [j for j in jobs if j.emotion == k]
        assert sum(len(j.seeds) for j in mine) == 10 and [j.first_index for j in mine] == [0, 4, 8]
    seeds = [s for j in jobs for s in j.seeds]
    assert len(set(seeds)) == len(seeds)
    assert [j.seeds for j in plan_jobs(cfg, 2)] == [j.seeds for j in jobs]
    assert [j.seeds for j in plan_jobs(cfg, 3)] != [j.seeds for j in jobs]
    assert {j.steps for j in jobs} == {4}


# ---------------------------------------------------------------------------------------------------------
# Real Ray
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    with ray_session(DistributedConfig(num_workers=1, cpus_per_worker=1.0), extra_cpus=3.0):
        yield


def _check_counts(report: dict) -> None:
    for row in [*report["emotions"].values(), report["totals"]]:
        assert set(row["rejections"]) == set(REJECTIONS)
        assert row["candidates"] == row["kept"] + sum(row["rejections"].values()) + row["lost_in_flight"]
        assert row["candidates"] == row["scored"] + row["lost_in_flight"]


def _no_stray_files(folder: Path) -> None:
    """Every tar in the round folder is listed; no temporary files; no staging left."""
    listed = {e["name"] for e in read_manifest(folder)["shards"]}
    tars = {p.name for p in folder.glob("*.tar")}
    assert tars == listed
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def _kill_while_running(pid: int, events: list) -> None:
    """SIGKILL actor process ``pid`` (for real) while it runs the job just submitted to it: after half the
    shortest generation seen so far, so that the job has reached the actor and has not ended yet. A fixed wait
    missed the job on a quiet machine (done before the kill: the next job was lost instead)."""
    seconds = [info["seconds"] for event, info in events if event == "generated"]
    time.sleep(min(seconds) / 2 if seconds else 0.3)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_round_end_to_end(ray_local, bundle, synth_shards, tmp_path):
    import webdataset as wds

    from uniemo.data.loader import Source, build_loader
    from uniemo.data.transforms import build_sample_transform

    cfg = _config()
    run_dir = tmp_path / "run"
    # Leftovers of an interrupted attempt of this round: they must never become part of it.
    staging = run_dir / STAGING_DIR / "round-0"
    staging.mkdir(parents=True)
    (staging / "train-000000.tar").write_bytes(b"not a tar")
    (staging / ".train-000001.tar.x.tmp").write_bytes(b"partial")

    seen_before_end = []

    def observer(event, info):
        if event == "scored":
            seen_before_end.append(round_dir(run_dir, 0).exists())

    report = run_round(bundle, cfg, run_dir, 0, observer=observer, log=lambda line: None)
    final = round_dir(run_dir, 0)
    assert seen_before_end and not any(seen_before_end)  # invisible while the round runs
    assert not staging.exists()

    # report: counts add up, per emotion and in total, and agree with the manifest
    _check_counts(report)
    assert report["totals"]["candidates"] == 8 * 8 and report["totals"]["lost_in_flight"] == 0
    assert json.loads(round_report_path(run_dir, 0).read_text()) == report
    manifest = read_manifest(final)
    assert manifest["round"] == 0 and manifest["checkpoint"] == "random-0" and manifest["report"] == report
    kept = report["totals"]["kept"]
    assert kept >= 2 and manifest["totals"]["train"]["samples"] == kept == report["samples"]
    assert len(manifest["shards"]) == -(-kept // 2)  # shard_size 2
    _no_stray_files(final)
    for name, row in report["emotions"].items():
        assert row["kept"] <= 3
        assert row["kept"] == manifest["totals"]["train"]["emotion_counts"][EMOTIONS.index(name)]
        if row["kept"]:
            assert 0 < row["mean_p_k"] <= 1 and sum(row["attribute_spread"]["counts"].values()) == row["kept"]

    # plain webdataset reads the shards, with the feedback fields in json
    urls = [str(final / e["name"]) for e in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == kept
    keys = {s["__key__"] for s in samples}
    assert len(keys) == kept
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["source"] == "synthetic" and meta["round"] == 0 and meta["checkpoint"] == "random-0"
        assert {"seed", "p_k", "s", "attribute"} <= meta.keys()
        assert int(s["cls"]) == EMOTIONS.index(meta["emotion"])
        assert s["png"][:8] == b"\x89PNG\r\n\x1a\n"
    # shards are tar files with members in key order (no partial member)
    with tarfile.open(urls[0]) as tar:
        assert all(m.isfile() for m in tar.getmembers())

    # the loader reads them as an extra source, mixed with the real shards by weight (rho)
    source = synthetic_source(cfg, run_dir)
    assert source.weight == pytest.approx(0.25 / 0.75)
    loader = build_loader(
        [Source.of("real", synth_shards), Source.of(source.name, source.path, source.weight)],
        "train",
        rank=0,
        world_size=1,
        batch_size=8,
        num_workers=0,
        transform=build_sample_transform(cfg.data, stage=1, training=True),
        training=True,
        seed=0,
    )
    batches = [b for _, b in zip(range(8), loader.batches(), strict=False)]
    sources = [s for b in batches for s in b["source"]]
    assert "synthetic" in sources and "real" in sources
    assert loader.stats()["skipped"]["total"] == 0
    synthetic_keys = {
        k for b in batches for k, s in zip(b["key"], b["source"], strict=True) if s == "synthetic"
    }
    assert synthetic_keys <= keys

    # a finished round is not generated again
    again = run_round(bundle, cfg, run_dir, 0, log=lambda line: None)
    assert again == report and sorted(p.name for p in final.glob("*.tar")) == sorted(
        e["name"] for e in manifest["shards"]
    )


@pytest.mark.slow
def test_killed_generator_actor_loses_only_its_batch(ray_local, bundle, tmp_path):
    cfg = _config()
    cfg.feedback.sampling_steps = 12  # a job of ~1 s: the kill lands while it runs
    cfg.feedback.max_restarts = 1
    cfg.feedback.max_task_retries = 0  # the killed batch is lost (and counted), not retried
    run_dir = tmp_path / "run"
    killed: dict = {}
    events: list = []

    def observer(event, info):
        events.append((event, dict(info)))
        if event == "submitted" and info["job_id"] == 6 and not killed:
            _kill_while_running(info["pid"], events)  # the pid the actor reported
            killed.update(info)

    report = run_round(bundle, cfg, run_dir, 1, observer=observer, log=lambda line: None)
    assert killed
    lost_emotion = EMOTIONS[killed["emotion"]]
    _check_counts(report)
    assert report["pool"]["lost_jobs"] == [6]
    assert report["totals"]["lost_in_flight"] == 4  # exactly the killed actor's in-flight batch
    assert report["emotions"][lost_emotion]["lost_in_flight"] == 4
    assert report["emotions"][lost_emotion]["scored"] == 4
    assert all(r["lost_in_flight"] == 0 for name, r in report["emotions"].items() if name != lost_emotion)
    assert report["totals"]["candidates"] == 64
    # Ray restarted the actor: a new process took over, and later jobs ran on it or on the other actor
    restarted = [info for event, info in events if event == "restarted"]
    assert restarted and restarted[0]["old_pid"] == killed["pid"] and restarted[0]["pid"] != killed["pid"]
    later = [info for event, info in events if event == "submitted" and info["job_id"] > 6]
    assert later and killed["pid"] not in {info["pid"] for info in later}
    # the round completed; nothing partial or unlisted remains
    final = round_dir(run_dir, 1)
    assert (final / MANIFEST_FILE).is_file()
    _no_stray_files(final)
    assert not (run_dir / STAGING_DIR / "round-1").exists()
    assert read_manifest(final)["totals"].get("train", {}).get("samples", 0) == report["totals"]["kept"]


@pytest.mark.slow
def test_generator_actor_out_of_restarts_ends_the_round_with_one_line(ray_local, bundle, tmp_path):
    """The one generator actor is killed with no restart left: the pool finds it dead (not restarting), stops
    with jobs still queued and names the fix; nothing of the round remains."""
    from uniemo.feedback.actors import FeedbackError

    cfg = _config()
    cfg.feedback.generator_actors = 1
    cfg.feedback.max_restarts = 0
    cfg.feedback.max_task_retries = 0
    run_dir = tmp_path / "run"
    killed: dict = {}
    events: list = []

    def observer(event, info):
        events.append((event, dict(info)))
        if event == "submitted" and info["job_id"] == 2 and not killed:
            # At once: with no restart left, the job fails whether or not it has reached the actor yet.
            os.kill(info["pid"], signal.SIGKILL)
            killed.update(info)

    with pytest.raises(FeedbackError, match="every generator actor died.*raise feedback.max_restarts"):
        run_round(bundle, cfg, run_dir, 0, observer=observer, log=lambda line: None)
    assert killed
    names = [event for event, _ in events]
    assert ("dead", {"pid": killed["pid"]}) in events and "restarted" not in names
    assert [info["job_id"] for event, info in events if event == "lost"] == [2]
    assert max(info["job_id"] for event, info in events if event == "submitted") == 2  # nothing after the kill
    assert not round_dir(run_dir, 0).exists() and not (run_dir / STAGING_DIR / "round-0").exists()
    assert not round_report_path(run_dir, 0).exists()


@pytest.mark.slow
def test_failure_while_writing_shards_leaves_no_round(ray_local, bundle, tmp_path):
    """A writer fails after another shard of the round is complete: nothing of the round may remain."""
    run_dir = tmp_path / "run"
    cfg = _config()
    cfg.feedback.generator_actors = 1  # fewer processes to start: the failure is what matters here
    staging = run_dir / STAGING_DIR / "round-0"

    def observer(event, info):
        if event == "scored" and info["job_id"] == 0:
            # After the round cleared its staging folder: the second shard's name is taken by a folder, so its
            # writer fails at the final rename while the first shard is written completely.
            (staging / "train-000001.tar").mkdir(parents=True)

    with pytest.raises(IsADirectoryError):
        run_round(bundle, cfg, run_dir, 0, observer=observer, log=lambda line: None)
    assert not round_dir(run_dir, 0).exists()
    assert not staging.exists()
    assert not round_report_path(run_dir, 0).exists()
    assert not list(run_dir.rglob("*.tar")) and not list(run_dir.rglob("*.tmp"))
