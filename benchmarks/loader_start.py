"""What starting loader workers from a fork server costs against forking them (``uniemo.data.workers``).

The shard loader starts new ``DataLoader`` workers at every epoch (and every evaluation pass). With ``fork`` a
worker is a copy of the main process; with ``forkserver`` (what uniemo uses) the first worker of a process starts
the server (a fresh Python that imports torch and the loader once), and every worker after that is forked from the
server and unpickles the stream it is handed. Per start method, the same training stream of one rank is iterated
for ``--epochs`` epochs; the table gives the first epoch (for ``forkserver``: including the server's start) and
the median of the later ones (a second table: the same for the image loader of the paper's metrics):

- "to 1st batch": seconds from ``iter()`` to the first batch, the start-up a trainer waits for;
- "epoch": seconds for the whole epoch;
- "CPU": CPU seconds of the main process, its workers and (``forkserver``) the server and its workers.

    .venv/bin/python benchmarks/loader_start.py [--images 400] [--workers 2] [--epochs 6] [--ray]

Runs each start method in its own fresh process (``spawn``), so that the first epoch of each starts cold. Writes
nothing outside ``--data`` (default: a temporary folder, removed at exit).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from uniemo.data.loader import build_loader
from uniemo.data.shards import read_manifest, write_shards
from uniemo.data.synthetic import generate_synthetic_set
from uniemo.data.transforms import SampleTransform
from uniemo.data.workers import server_cpu_seconds


def _own_cpu() -> float:
    """CPU seconds of this process and its finished (waited-for) children: the forked workers (those of the fork
    server are its children: :func:`server_cpu_seconds`)."""
    return sum(
        u.ru_utime + u.ru_stime for u in (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def measure(folder: str, method: str, workers: int, batch_size: int, epochs: int) -> list[tuple[float, float, float]]:
    """``(to first batch, epoch, CPU)`` seconds of each epoch of one rank's training stream started with ``method``
    (``forkserver``: uniemo's default; ``fork``: the platform's)."""
    loader = build_loader(
        folder, "train", rank=0, world_size=1, batch_size=batch_size, num_workers=workers,
        transform=SampleTransform(image_size=32, augment=True), training=True,
        multiprocessing_context=multiprocessing.get_context("fork") if method == "fork" else None,
    )
    return _time_epochs(lambda: loader, epochs)


def _time_epochs(make_iter: Any, epochs: int) -> list[tuple[float, float, float]]:
    """``(to first batch, epoch, CPU)`` seconds of each of ``epochs`` passes over ``make_iter()``."""
    out = []
    for _ in range(epochs):
        cpu0 = _own_cpu() + server_cpu_seconds()
        start = time.perf_counter()
        first = None
        for _batch in make_iter():
            if first is None:
                first = time.perf_counter() - start
        wall = time.perf_counter() - start
        time.sleep(0.2)  # let the server reap the epoch's workers, so that their CPU time is counted
        out.append((first or wall, wall, _own_cpu() + server_cpu_seconds() - cpu0))
    return out


def measure_images(folder: str, method: str, workers: int, batch_size: int, epochs: int) -> list[tuple[float, float, float]]:
    """The same for the paper metrics' image loader (:func:`uniemo.evaluation.image_sets.iter_batches`) over the
    test split with FID's transform (torchvision's ``Resize`` + ``ToTensor``): ``fork``, ``forkserver`` with the
    metrics' preload (torchvision imported once by the server) and ``forkserver-bare`` (each worker imports it)."""
    from uniemo.evaluation import image_sets, paper_metrics

    refs = [r for refs in image_sets.read_shard_split(folder, "test").by_emotion.values() for r in refs]
    transform = paper_metrics._fid_transform()

    def passes() -> Any:
        if method == "fork":
            return torch.utils.data.DataLoader(
                image_sets._Images(refs, transform), batch_size=batch_size, num_workers=workers,
                multiprocessing_context=multiprocessing.get_context("fork"))
        preload = paper_metrics.WORKER_MODULES if method == "forkserver" else ()
        return image_sets.iter_batches(refs, transform, batch_size, workers, preload=preload)

    return _time_epochs(passes, epochs)


def _run_fresh(target: Any, *args: object) -> Any:
    """``target(*args)`` in a fresh process (``spawn``), so that its first epoch starts cold."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.SimpleQueue()
    proc = spawn.Process(target=_measure_into, args=(results, target, *args))
    proc.start()
    out = results.get()
    proc.join()
    return out


def _print_rows(rows: dict[str, list[tuple[float, float, float]]]) -> None:
    print("| start method | epoch | to 1st batch (s) | epoch (s) | CPU (s) |")
    print("|---|---|---:|---:|---:|")
    for method, epochs in rows.items():
        later = epochs[1:]
        print(f"| {method} | first | {epochs[0][0]:.3f} | {epochs[0][1]:.3f} | {epochs[0][2]:.2f} |")
        print(f"| {method} | later (median of {len(later)}) | {statistics.median(e[0] for e in later):.3f} | "
              f"{statistics.median(e[1] for e in later):.3f} | {statistics.median(e[2] for e in later):.2f} |")


def _measure_into(results: Any, target: Any, *args: object) -> None:
    results.put(target(*args))


def _in_ray_workers(folder: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float, float]]]:
    """:func:`measure` as a Ray task, in a fresh worker process per start method (a local Ray of 2 CPUs)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(max_calls=1)(measure)
        return {m: ray.get(task.remote(folder, m, args.workers, args.batch_size, args.epochs))
                for m in ("fork", "forkserver")}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="synthetic images (all splits)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ray", action="store_true", help="also measure inside Ray workers (a local Ray)")
    parser.add_argument("--data", type=Path, default=None, help="folder for the shards (default: temporary)")
    args = parser.parse_args()

    root = args.data or Path(tempfile.mkdtemp(prefix="uniemo-loader-start-"))
    try:
        shards = root / "shards"
        if not (shards / "manifest.json").is_file():
            generate_synthetic_set(root / "synth", images=args.images, size=64, seed=0, workers=1, progress=False)
            write_shards(source="emoset", root=root / "synth", out=shards, shard_size=25, workers=1, progress=False)
        train = read_manifest(shards)["totals"]["train"]["samples"]
        test = read_manifest(shards)["totals"]["test"]["samples"]
        rows = {m: _run_fresh(measure, str(shards), m, args.workers, args.batch_size, args.epochs)
                for m in ("fork", "forkserver")}
        images = {m: _run_fresh(measure_images, str(shards), m, args.workers, args.batch_size, args.epochs)
                  for m in ("fork", "forkserver", "forkserver-bare")}
        in_ray = _in_ray_workers(str(shards), args) if args.ray else {}
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
        print(f"\nShard loader, one rank's training stream: {train} train samples, batch {args.batch_size}, "
              f"{args.workers} workers, {train // args.batch_size} batches per epoch, {args.epochs} epochs\n")
        _print_rows(rows)
        print(f"\nPaper metrics' image loader, FID transform: {test} test images, batch {args.batch_size}, "
              f"{args.workers} workers, {args.epochs} passes\n")
        _print_rows(images)
        if in_ray:
            print("\nShard loader inside a Ray worker (a fresh one per start method; Ray's threads, the worker's main "
                  "module imported by the server too)\n")
            _print_rows(in_ray)
    finally:
        if args.data is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
