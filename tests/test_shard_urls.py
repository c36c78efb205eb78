"""Shards streamed from URLs: a real HTTP server and a real S3-compatible server (moto) on 127.0.0.1.

The session's shard folder is served over HTTP (``http.server`` in a thread) and uploaded to a bucket of a moto
server (its own process). Checked: the streams from each URL (and from a ``pipe:`` command) are the local
folder's batches exactly, a training stream restored mid-epoch continues exactly, a missing or unreachable URL,
a missing or truncated shard are one line before any stream starts, and (slow) ``uniemo train`` streams from
HTTP and S3 with the local run's losses, stopped and resumed included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from _ports import free_ports

from uniemo.config.schema import DataConfig, SourceConfig, StorageConfig
from uniemo.data.loader import build_loader, build_loader_from_config
from uniemo.data.shards import MANIFEST_FILE, ensure_synthetic_shards, read_manifest
from uniemo.data.transforms import SampleTransform
from uniemo.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
EVAL = SampleTransform(image_size=24)
TRAIN = SampleTransform(image_size=24, augment=True)
BUCKET = "uniemo-shards"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def www(synth_shards, tmp_path_factory) -> Path:
    """The served folder: ``shards/`` (the session's shards) and ``broken/`` (one shard missing, one truncated)."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(synth_shards, root / "shards")
    broken = root / "broken"
    shutil.copytree(synth_shards, broken)
    names = [e["name"] for e in read_manifest(broken)["shards"]]
    (broken / names[1]).unlink()
    return root


@pytest.fixture(scope="module")
def http_root(www):
    """``http://127.0.0.1:PORT`` serving :func:`www` from a thread of this process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"moto server did not listen on port {port} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def s3_endpoint(www):
    """A moto S3 server on a free loopback port, with :func:`www`'s ``shards/`` uploaded to ``s3://uniemo-shards/
    shards/``. Credentials are moto's test values in the standard AWS variables (set for this module, so the
    Ray workers of the slow test inherit them); the endpoint travels in ``data.storage.endpoint_url``."""
    try:
        import boto3
        import moto.server  # noqa: F401 - the server runs in its own process below
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("moto[server] and boto3 are not installed (pip install -e '.[dev]')")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for path in sorted((www / "shards").iterdir()):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"shards/{path.name}")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _data_cfg(shards: str, cache: Path, endpoint: str = "", **kw) -> DataConfig:
    return DataConfig(shards=shards, cache_dir=str(cache), storage=StorageConfig(endpoint_url=endpoint), **kw)


@pytest.fixture(scope="module")
def sources(synth_shards, http_root, s3_endpoint, tmp_path_factory) -> dict[str, DataConfig]:
    """The same shards as a local folder, over HTTP, from S3, and through a ``pipe:`` command."""
    cache = tmp_path_factory.mktemp("cache")
    return {
        "local": _data_cfg(str(synth_shards), cache),
        "http": _data_cfg(f"{http_root}/shards", cache),
        "s3": _data_cfg(f"s3://{BUCKET}/shards", cache, s3_endpoint),
        "pipe": _data_cfg(f"pipe:cat {synth_shards}/{{name}}", cache),
    }


def _take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("kind", ["http", "s3", "pipe"])
def test_url_streams_equal_the_local_folder(sources, kind):
    """Evaluation and training streams (2 loader workers) from the URL give the local folder's batches exactly."""
    local = ensure_synthetic_shards(sources["local"])
    remote = ensure_synthetic_shards(sources[kind])
    assert remote != local and read_manifest(remote) == read_manifest(local)  # the mirror of the manifest
    for split, transform, training in (("test", EVAL, False), ("train", TRAIN, True)):
        args = dict(rank=0, world_size=1, batch_size=8, num_workers=2, transform=transform, training=training)
        ref = _take(build_loader(local, split, **args), 12)
        loader = build_loader(remote, split, **args)
        got = _take(loader, 12)
        assert [b["key"] for b in got] == [b["key"] for b in ref] and len(got) >= 9
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert loader.stats()["skipped"]["total"] == 0


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_report_reads_real_images_from_a_url_source(sources, kind, tmp_path):
    """The report's real test images come through the loader's stages, so a run trained on a URL source shows the
    same pictures as one trained on the local folder."""
    import dataclasses

    import numpy as np

    from uniemo.config import save_resolved
    from uniemo.config.schema import Config
    from uniemo.evaluation.report_collect import ReportData
    from uniemo.evaluation.report_images import read_examples, shard_folder

    shown = {}
    for name in ("local", kind):
        run = tmp_path / name
        save_resolved(dataclasses.replace(Config(), data=sources[name]), run)
        folder, why = shard_folder(ReportData(target=run, pipeline=False, runs={"run": run}))
        assert folder is not None, why
        split, found = read_examples(folder, 2)
        assert split == "test" and sum(len(v) for v in found.values()) > 8
        shown[name] = {e: [np.asarray(i) for i in images] for e, images in found.items()}
    assert shown["local"].keys() == shown[kind].keys()
    for emotion, images in shown["local"].items():
        assert len(images) == len(shown[kind][emotion])
        assert all(np.array_equal(a, b) for a, b in zip(images, shown[kind][emotion], strict=True))


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_training_stream_from_url_resumes_exactly(sources, kind):
    """A position saved mid-epoch (3 batches, 2 workers) continues with the uninterrupted stream's batches."""
    cfg = sources[kind]
    straight = _take(build_loader_from_config(cfg, "train", seed=3, num_workers=2, batch_size=8), 7)
    first = build_loader_from_config(cfg, "train", seed=3, num_workers=2, batch_size=8)
    _take(first, 3)
    position = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = _take(build_loader_from_config(cfg, "train", seed=3, num_workers=2, batch_size=8, position=position), 4)
    assert [b["key"] for b in resumed] == [b["key"] for b in straight[3:]]
    for a, b in zip(resumed, straight[3:], strict=True):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


def test_url_extra_source_is_mixed_in(sources, http_root, tmp_path):
    """``data.extra_sources[*].path`` may be a URL too: its samples join the training mix under its name."""
    cfg = _data_cfg(sources["local"].shards, tmp_path,
                    extra_sources=[SourceConfig(name="mirror", path=f"{http_root}/shards", weight=1.0)])
    batches = _take(build_loader_from_config(cfg, "train", num_workers=1, batch_size=16), 4)
    names = {s for b in batches for s in b["source"]}
    assert names == {"real", "mirror"}


def test_a_manifest_never_lists_shards_by_url_or_path(synth_shards, http_root, tmp_path):
    """Shard names are plain file names of the manifest's own folder (or URL): a name that is a URL, a path or a
    command is one line naming the manifest and the entry, before anything is opened. A folder of shards elsewhere
    is a source of its own (``data.shards`` or ``data.extra_sources`` set to its URL)."""
    folder = tmp_path / "listing"
    folder.mkdir()
    shutil.copy(synth_shards / "attributes.json", folder)
    for bad in (f"{http_root}/shards/train-000000.tar", "pipe:cat train-000000.tar", "../shards/train-000000.tar",
                str(synth_shards / "train-000000.tar")):
        manifest = read_manifest(synth_shards)
        manifest["shards"][1]["name"] = bad
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(DataError) as info:
            ensure_synthetic_shards(_data_cfg(str(folder), tmp_path))
        message = str(info.value)
        assert "\n" not in message and f"{folder / MANIFEST_FILE} entry 1: shard name {bad!r}" in message, message
        assert "is not a plain file name" in message


def test_missing_or_unreachable_urls_are_one_line(sources, http_root, s3_endpoint, tmp_path):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    cases = [
        (_data_cfg(f"{http_root}/nope", tmp_path), "data.shards='http", "is missing (HTTP 404"),
        (_data_cfg(f"{dead}/shards", tmp_path), "data.shards='http", "cannot read"),
        (_data_cfg("s3://no-such-bucket/shards", tmp_path, s3_endpoint), "data.shards='s3://no-such", "is missing"),
        (_data_cfg(f"s3://{BUCKET}/shards", tmp_path, dead), "data.shards='s3://", "cannot read"),
        (_data_cfg(f"{http_root}/broken", tmp_path), "lists shard train-000001.tar, which is missing", "HTTP 404"),
        (_data_cfg("pipe:false {name}", tmp_path), "data.shards='pipe:false", "exited with 1"),
        (_data_cfg("pipe:cat shards/manifest.json", tmp_path), "needs {name}", "pipe:"),
    ]
    for cfg, first, second in cases:
        started = time.monotonic()
        with pytest.raises((DataError, ConfigError)) as info:
            ensure_synthetic_shards(cfg)
        message = str(info.value)
        assert "\n" not in message and first in message and second in message, message
        assert time.monotonic() - started < 30


def test_a_shard_gone_from_the_server_is_skipped_and_counted(synth_shards, http_root, tmp_path):
    """Past the checks (a shard deleted while training runs), a 404 counts as a missing shard, as a local one."""
    from uniemo.data.shards import mirror_source

    folder = mirror_source(f"{http_root}/broken", _data_cfg("", tmp_path), key="data.shards", require_attributes=True)
    loader = build_loader(folder, "train", rank=0, world_size=1, batch_size=8, num_workers=1, transform=EVAL,
                          training=False)
    samples = sum(len(b["key"]) for b in loader)
    entries = [e for e in read_manifest(synth_shards)["shards"] if e["split"] == "train"]
    assert samples == sum(e["samples"] for e in entries) - entries[1]["samples"]
    assert loader.stats()["skipped"]["by_reason"] == {"missing_shard": 1}


def test_truncated_remote_shard_is_named(synth_shards, tmp_path):
    """A shard the server holds with another size than the manifest lists (HTTP HEAD) is one line."""
    served = tmp_path / "www" / "shards"
    shutil.copytree(synth_shards, served)
    name = read_manifest(served)["shards"][2]["name"]
    (served / name).write_bytes((served / name).read_bytes()[:1000])
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = _data_cfg(f"http://127.0.0.1:{server.server_address[1]}/shards", tmp_path / "cache")
        with pytest.raises(DataError, match=f"{name} has 1000 bytes, .*{MANIFEST_FILE} says"):
            ensure_synthetic_shards(cfg)
    finally:
        server.shutdown()
        server.server_close()


def test_cli_train_with_a_missing_url_exits_2_before_ray(http_root, tmp_path):
    runs = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "uniemo", "train", "--config", str(REPO / "configs" / "tiny_stage1.yaml"),
         f"data.shards={http_root}/nope", f"run.output_dir={runs}", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "data.shards=" in lines[0] and "manifest.json is missing" in lines[0], lines
    assert not runs.exists()  # nothing written, no worker started


# ---------------------------------------------------------------------------------------------------------
# uniemo train streaming from each source (Ray Train, DeepSpeed ZeRO-2 on gloo)
# ---------------------------------------------------------------------------------------------------------
TRAIN_STEPS = 6


@pytest.fixture(scope="module")
def ray_with_aws_env(s3_endpoint, ray_cluster):
    """The module's Ray cluster, started after :func:`s3_endpoint` set the AWS variables its workers inherit."""
    yield


def _train(sources: dict[str, DataConfig], kind: str, runs: Path, name: str, *extra: str,
           resume: bool = False) -> Path:
    from uniemo.config import load_config
    from uniemo.training.driver import run_training

    data = sources[kind]
    cfg = load_config(None, [
        f"run.output_dir={runs}", f"run.name={name}", f"data.shards={data.shards}",
        f"data.cache_dir={data.cache_dir}", f"data.storage.endpoint_url={data.storage.endpoint_url}",
        "data.image_size=32", "model.understanding.image_size=32", "data.batch_size=16", "data.num_workers=1",
        "training.stage=1", f"training.steps={TRAIN_STEPS}", "training.checkpoint_every=3", "training.eval_every=3",
        "distributed.num_workers=1", "distributed.zero_stage=2", "logging.every=1",
        "logging.wandb.mode=disabled", *extra,
    ])
    return Path(run_training(cfg, resume=resume)["run_dir"])


def _losses(run: Path) -> list[float]:
    from uniemo.logging import read_metrics

    return [r["loss"] for r in read_metrics(run)]


@pytest.mark.slow
def test_uniemo_train_streams_from_http_and_s3_with_exact_resume(sources, ray_with_aws_env, tmp_path):
    """A straight run from S3 and a run from HTTP stopped at step 3 and resumed have the same losses, step for
    step (the streams equal the local folder's: test_url_streams_equal_the_local_folder)."""
    from uniemo.logging import read_metrics

    runs = tmp_path / "runs"
    s3_run = _train(sources, "s3", runs, "s3")
    reference = _losses(s3_run)
    assert len(reference) == TRAIN_STEPS
    val = [r["val/samples"] for r in read_metrics(s3_run) if "val/samples" in r]
    assert val and all(n == sum(e["samples"] for e in read_manifest(sources["local"].shards)["shards"]
                                if e["split"] == "val") for n in val)  # the val split, once, from S3
    _train(sources, "http", runs, "http", "training.stop_at_step=3")
    http_run = _train(sources, "http", runs, "http", resume=True)
    assert [r["step"] for r in read_metrics(http_run)] == list(range(1, TRAIN_STEPS + 1))
    assert _losses(http_run) == pytest.approx(reference, rel=1e-6, abs=1e-7)
