"""Throughput of the uniemo loader against a bare tar-reading loop (samples/s).

Both sides read the same shard files, decode with PIL, apply the same :class:`SampleTransform` and run in a
torch ``DataLoader`` with the same number of worker processes; the bare loop deals whole shard files to
workers, reads them with ``tarfile``, decodes the image, reads the ``cls`` member and lets ``DataLoader``
collate. The uniemo side adds what the bare loop lacks: webdataset's pipeline, JSON metadata, attribute
indices and multi-hot, skip counting, position tracking, and (training) resampled shards, a shuffle buffer
and random crops. Each measurement is the best of ``--repeats`` full passes, worker start-up included: wall-clock samples/s,
and CPU milliseconds per sample over the main process and its workers (robust to other jobs on the machine;
"vs bare (CPU)" is bare CPU per sample / uniemo CPU per sample, so above 1 means uniemo does less work).

A second table streams the same shards from URLs (issue 13): an HTTP server (``python -m http.server``) and an
S3-compatible server (moto, with the shards uploaded to a bucket), each its own process on 127.0.0.1, read by
the same uniemo loader; "vs local" compares with the local folder. Its CPU column is the loader's side (main
process, loader workers and their ``curl`` children), not the server's.

    .venv/bin/python benchmarks/loader.py --images 3000 --workers 2 [--sources local,http,s3]

Writes nothing outside ``--data`` (default: a temporary folder, removed at exit).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from uniemo.config.schema import DataConfig, StorageConfig
from uniemo.data.loader import ShardLoader, build_loader
from uniemo.data.remote import worker_modules
from uniemo.data.shards import ensure_synthetic_shards, read_manifest, write_shards
from uniemo.data.synthetic import generate_synthetic_set
from uniemo.data.transforms import SampleTransform
from uniemo.data.workers import server_cpu_seconds, start_server


class BareTarStream(torch.utils.data.IterableDataset):
    """Shard files dealt to workers; ``tarfile`` + PIL decode + the same transform; one (image, label) each."""

    def __init__(self, urls: list[str], transform: SampleTransform):
        self.urls = urls
        self.transform = transform

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(wid)
        for url in self.urls[wid::n]:
            with tarfile.open(url, mode="r|") as tar:
                sample: dict[str, bytes] = {}
                key = None
                for member in tar:
                    k, ext = member.name.split(".", 1)
                    if key is not None and k != key:
                        yield self._make(sample, rng)
                        sample = {}
                    key = k
                    sample[ext] = tar.extractfile(member).read()
                if sample:
                    yield self._make(sample, rng)

    def _make(self, sample: dict[str, bytes], rng: random.Random):
        image = Image.open(io.BytesIO(sample["jpg"] if "jpg" in sample else sample["png"]))
        image.load()
        return self.transform(image, rng)["image"], int(sample["cls"])


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the bare loop's DataLoader workers),
    and of the fork server with the workers it has reaped (uniemo's, :mod:`uniemo.data.workers`)."""
    total = server_cpu_seconds()
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def uniemo_train_split(
    folder: Path, args: argparse.Namespace, transform: SampleTransform, training: bool
) -> ShardLoader:
    """The uniemo loader of ``folder``'s train split with the benchmark's batch size and workers, one rank."""
    return build_loader(
        folder,
        "train",
        rank=0,
        world_size=1,
        batch_size=args.batch_size,
        num_workers=args.workers,
        transform=transform,
        training=training,
    )


def time_pass(make_iter, repeats: int) -> tuple[int, float, float]:
    """``(samples, best wall seconds, best CPU seconds)`` over ``repeats`` full passes.

    CPU time counts the workers once they have exited (every pass ends them), so it measures the work done
    per sample even when other jobs compete for the cores, where wall-clock rates are noisy.
    """
    best_wall = best_cpu = float("inf")
    count = 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        count = 0
        for batch in make_iter():
            count += len(batch["key"]) if isinstance(batch, dict) else len(batch[1])
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, cpu_seconds() - start_cpu)
    return count, best_wall, best_cpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(args: list[str], port: int) -> Iterator[str]:
    """A server process listening on ``127.0.0.1:port``; yields its base URL and stops it afterwards."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[:3]} exited with {proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[:3]} did not listen on port {port}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def url_sources(kinds: list[str], base: Path, shards: Path, stack: ExitStack) -> dict[str, DataConfig]:
    """``data`` sections reading ``shards`` from each of ``kinds``: ``local``, ``http`` (``python -m
    http.server`` serving ``base``), ``s3`` (a moto server, the shards uploaded to a bucket; AWS test
    credentials in this process's environment, which the loader workers inherit)."""
    cache = str(base / "cache")
    out: dict[str, DataConfig] = {}
    for kind in kinds:
        if kind == "local":
            out[kind] = DataConfig(shards=str(shards), cache_dir=cache)
        elif kind == "http":
            port = _free_port()
            root = stack.enter_context(_server(
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(base), str(port)],
                port,
            ))
            out[kind] = DataConfig(shards=f"{root}/{shards.name}", cache_dir=cache)
        elif kind == "s3":
            import boto3

            for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                               ("AWS_DEFAULT_REGION", "us-east-1")):
                os.environ.setdefault(key, value)
            port = _free_port()
            endpoint = stack.enter_context(_server(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port
            ))
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="bench")
            for path in sorted(shards.iterdir()):
                if path.is_file():
                    client.upload_file(str(path), "bench", f"shards/{path.name}")
            out[kind] = DataConfig(
                shards="s3://bench/shards", cache_dir=cache, storage=StorageConfig(endpoint_url=endpoint)
            )
        else:
            raise SystemExit(f"--sources: unknown source {kind!r}; use local, http and s3")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="synthetic images (all splits)")
    parser.add_argument("--size", type=int, default=128, help="side of the synthetic images")
    parser.add_argument("--image-size", type=int, default=64, help="transform output side")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sources", default="local,http,s3", help="sources of the second table (local, http, s3); empty: none"
    )
    parser.add_argument(
        "--data", default="", help="folder for the synthetic set and shards (kept); default: temporary"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The loader workers' fork server starts once per process, with the modules of the first loader's sources; a
    # rank that reads s3:// has its S3 session preloaded there, so start it as such a rank would.
    start_server(worker_modules(["s3://"] if "s3" in args.sources.split(",") else []))

    tmp = None if args.data else tempfile.mkdtemp(prefix="uniemo-bench-")
    base = Path(args.data or tmp)
    try:
        raw, shards = base / "raw", base / "shards"
        if not (raw / "info.json").is_file():
            generate_synthetic_set(
                raw, images=args.images, size=args.size, seed=0, workers=args.workers, progress=False
            )
        write_shards(
            source="emoset",
            root=raw,
            out=shards,
            shard_size=args.shard_size,
            workers=args.workers,
            progress=False,
        )
        urls = [str(shards / e["name"]) for e in read_manifest(shards)["shards"] if e["split"] == "train"]

        rows = []
        for label, transform, training in (
            ("eval transform (resize + center crop)", SampleTransform(args.image_size), False),
            (
                "train transform (random resized crop + flip)",
                SampleTransform(args.image_size, augment=True),
                True,
            ),
        ):

            def bare(transform=transform):
                return torch.utils.data.DataLoader(
                    BareTarStream(urls, transform), batch_size=args.batch_size, num_workers=args.workers
                )

            ours = partial(uniemo_train_split, shards, args, transform, training)
            n_bare, t_bare, c_bare = time_pass(bare, args.repeats)
            n_ours, t_ours, c_ours = time_pass(ours, args.repeats)
            mode = "training stream" if training else "evaluation stream"
            rows.append((label, "bare tarfile loop", n_bare, t_bare, c_bare, n_bare, t_bare, c_bare))
            rows.append((label, f"uniemo {mode}", n_ours, t_ours, c_ours, n_bare, t_bare, c_bare))

        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}"
        )
        print(
            f"data: {len(urls)} train shards of {args.shard_size}, synthetic {args.size} px JPEG -> {args.image_size} px, "
            f"batch {args.batch_size}, {args.workers} workers, best of {args.repeats}\n"
        )
        print(
            "| transform | pipeline | samples | seconds | samples/s | vs bare | CPU ms/sample | vs bare (CPU) |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for label, name, n, t, c, n0, t0, c0 in rows:
            rate, cpu = n / t, 1000 * c / n
            print(
                f"| {label} | {name} | {n} | {t:.2f} | {rate:.0f} | {rate / (n0 / t0):.2f}x "
                f"| {cpu:.2f} | {(1000 * c0 / n0) / cpu:.2f}x |"
            )
        kinds = [k for k in args.sources.split(",") if k]
        if kinds:
            with ExitStack() as stack:
                print_url_table(args, url_sources(kinds, base, shards, stack))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def print_url_table(args: argparse.Namespace, sources: dict[str, DataConfig]) -> None:
    """The uniemo loader on each source, both streams; rates relative to the first source (local)."""
    rows = []
    for label, transform, training in (
        ("evaluation stream", SampleTransform(args.image_size), False),
        ("training stream", SampleTransform(args.image_size, augment=True), True),
    ):
        first = None
        for kind, data in sources.items():
            folder = ensure_synthetic_shards(data)  # a URL source: its manifest mirrored, shard sizes checked
            n, t, c = time_pass(partial(uniemo_train_split, folder, args, transform, training), args.repeats)
            first = first or (n, t, c)
            rows.append((label, kind, data.shards, n, t, c, *first))
    print("\nThe same train shards from URLs on 127.0.0.1 (each server its own process):\n")
    print("| stream | source | samples | seconds | samples/s | vs local | CPU ms/sample | vs local (CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, kind, _, n, t, c, n0, t0, c0 in rows:
        rate, cpu = n / t, 1000 * c / n
        print(
            f"| {label} | {kind} | {n} | {t:.2f} | {rate:.0f} | {rate / (n0 / t0):.2f}x | {cpu:.2f} "
            f"| {(1000 * c0 / n0) / cpu:.2f}x |"
        )


if __name__ == "__main__":
    main()
