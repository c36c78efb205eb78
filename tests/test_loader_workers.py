"""Loader workers start from the fork server, never as forks of a process that holds threads (uniemo.data.workers)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from uniemo.data.loader import build_loader
from uniemo.data.transforms import SampleTransform
from uniemo.evaluation.image_sets import iter_batches, read_shard_split

MARK = "UNIEMO_TEST_WORKER_ENV"


@dataclass(frozen=True)
class _Reporting(SampleTransform):
    """The loader's transform, which also writes down who runs it: process, parent, the parent's threads, env."""

    report_dir: str = ""

    def __call__(self, image: Image.Image, rng: random.Random, pixels: bool = True) -> dict[str, Any]:
        ppid = os.getppid()
        status = Path(f"/proc/{ppid}/status").read_text()
        threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
        Path(self.report_dir, f"{os.getpid()}.json").write_text(json.dumps(
            {"ppid": ppid, "parent_threads": threads, "mark": os.environ.get(MARK)}))
        return super().__call__(image, rng, pixels)


def _parent_pid(image: Image.Image) -> torch.Tensor:
    return torch.tensor(os.getppid())


def _reports(folder: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    for p in folder.glob("*.json"):
        p.unlink()
    return found


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_workers_of_a_threaded_process_come_from_the_single_threaded_fork_server(synth_shards, tmp_path, monkeypatch):
    """In a process with busy Python threads (as a Ray worker has), the workers are not its children: their parent
    is the fork server, which holds one thread; they see the environment of the moment they start, not the server's.
    """
    stop = threading.Event()
    lock = threading.Lock()

    def busy() -> None:  # takes Python's and its own locks all the time, as Ray's and gloo's threads do
        while not stop.wait(0.0005):
            with lock:
                _ = [object() for _ in range(100)]

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        monkeypatch.setenv(MARK, "first")
        transform = _Reporting(image_size=24, augment=True, report_dir=str(tmp_path))
        loader = build_loader(synth_shards, "train", rank=0, world_size=1, batch_size=8, num_workers=2,
                              transform=transform, training=True)
        assert sum(len(b["key"]) for b in loader) == loader.batches_per_epoch * 8
        first = _reports(tmp_path)
        assert len(first) == 2  # two workers
        assert all(r["ppid"] != os.getpid() and r["parent_threads"] == 1 and r["mark"] == "first" for r in first)
        assert len({r["ppid"] for r in first}) == 1  # one server for the process

        # The next epoch's workers come from the same (running) server with the environment of now.
        monkeypatch.setenv(MARK, "second")
        next(iter(loader))
        second = _reports(tmp_path)
        assert second and all(r["ppid"] == first[0]["ppid"] and r["mark"] == "second" for r in second)
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_fork_server_stream_equals_the_forked_stream(synth_shards):
    """Same batches, same order, same pixels as the forked workers gave: an epoch and a half of training (the
    second epoch reshuffles) and a mid-epoch restore."""

    def stream(context: Any, position: dict | None = None, n: int = 0) -> tuple[list[dict], Any]:
        loader = build_loader(synth_shards, "train", rank=0, world_size=1, batch_size=8, num_workers=2,
                              transform=SampleTransform(image_size=24, augment=True), training=True, seed=5,
                              multiprocessing_context=context, position=position)
        batches = []
        for batch in loader.batches():
            batches.append(batch)
            if len(batches) == n:
                break
        return batches, loader

    n = stream(None, n=1)[1].batches_per_epoch * 3 // 2
    forked, _ = stream(multiprocessing.get_context("fork"), n=n)
    served, _ = stream(None, n=n)
    _, cut = stream(None, n=n // 3)
    resumed, _ = stream(None, position=json.loads(json.dumps(cut.state_dict())), n=n - n // 3)
    for got in (served, resumed):
        assert [b["key"] for b in forked[-len(got):]] == [b["key"] for b in got]
        for a, b in zip(forked[-len(got):], got, strict=True):
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


def test_image_set_workers_come_from_the_fork_server(synth_shards):
    """The paper metrics' image-set loader (a map-style DataLoader) starts its workers the same way."""
    refs = [r for refs in read_shard_split(synth_shards, "test").by_emotion.values() for r in refs][:12]
    parents = torch.cat(list(iter_batches(refs, _parent_pid, batch_size=4, workers=2)))
    assert len(parents) == 12 and os.getpid() not in parents.tolist()


def test_the_server_imports_the_package_of_the_main_module(monkeypatch):
    """Each worker runs the main module again: the server imports the package that holds it (a Ray worker's main
    module is in ``ray``), nothing for a plain script, and nothing for ``python -m pkg`` (workers skip
    ``pkg.__main__``)."""
    import types

    import uniemo.data.loader as loader_module
    from uniemo.data.workers import main_package

    def main_module(file: str | None, spec_name: str | None = None) -> types.ModuleType:
        module = types.ModuleType("__main__")
        module.__file__ = file
        module.__spec__ = types.SimpleNamespace(name=spec_name) if spec_name else None  # type: ignore[assignment]
        return module

    for module, expected in (
        (main_module(loader_module.__file__), ("uniemo",)),
        (main_module(__file__), ()),  # tests/ is no package
        (main_module(None, "pytest.__main__"), ()),
        (main_module(None, "uniemo.cli"), ("uniemo",)),
    ):
        monkeypatch.setitem(sys.modules, "__main__", module)
        assert main_package() == expected
