"""Checkpoint files written in the background (``training.async_checkpoint``), through DeepSpeed's own save.

DeepSpeed hands every file of a checkpoint (model states, each optimizer shard) to its engine's
``checkpoint_engine.save(state_dict, path)``. :class:`BackgroundCheckpointEngine` takes that place: it serializes
the state into host memory at once (``torch.save`` into a buffer: the copy from the GPU and the pickling, so the
next optimizer step may change the weights right after), and a writer thread puts the bytes on disk. The files hold
what DeepSpeed's ``TorchCheckpointEngine`` writes (the zip's inner folder is named ``archive`` rather than after
the file, which ``torch.load`` ignores) and load with it and with ``zero_to_fp32``.

What the trainer must not do is call such a checkpoint complete before its files are on disk:
:class:`uniemo.training.checkpoint.Checkpointer` publishes it (``COMPLETE``, ``latest``, rotation) only once every
rank's writer is done (:meth:`BackgroundCheckpointEngine.done`, asked after each step, and waited for before the run
ends or the next save). A crash before that leaves the previous ``latest``, as with synchronous saves.

DeepSpeed's own asynchronous engine (``checkpoint.writer.decoupled``) was not used: it needs the ``async_io`` op
(JIT-compiled, libaio) and commits at the next optimizer step, with no hook for uniemo's publication.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine


class BackgroundCheckpointEngine(CheckpointEngine):
    """A DeepSpeed checkpoint engine whose ``save`` returns once the state is serialized in host memory."""

    def __init__(self, zipfile_serialization: bool = True) -> None:
        super().__init__()
        self.name = "uniemo.BackgroundCheckpointEngine"
        self.zipfile_serialization = zipfile_serialization
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uniemo-checkpoint")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.bytes_written = 0

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer, _use_new_zipfile_serialization=self.zipfile_serialization)
        with self._lock:
            self._pending.append(self._executor.submit(_write, buffer, path))

    loads_safely = True
    """Its ``load`` is the restricted one (:func:`uniemo.training.safe_pickle.install_safe_engine` keeps it)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        # DeepSpeed's TorchCheckpointEngine unpickles freely; every checkpoint load of uniemo is restricted.
        from uniemo.training.safe_pickle import safe_load

        return safe_load(path, map_location=map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True

    def done(self) -> bool:
        """Whether every file handed over so far is on disk (raises the writer's error, e.g. a full disk)."""
        with self._lock:
            pending = list(self._pending)
        if not all(f.done() for f in pending):
            return False
        self.wait()
        return True

    def wait(self) -> None:
        """Block until every file handed over so far is on disk; re-raise a writer's error."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            self.bytes_written += future.result()

    def cleanup(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)


def _write(buffer: io.BytesIO, path: str) -> int:
    view = buffer.getbuffer()
    with open(path, "wb") as f:
        f.write(view)
        f.flush()
        os.fsync(f.fileno())
    size = len(view)
    view.release()
    buffer.close()
    return size


def install(ds_engine: Any) -> BackgroundCheckpointEngine:
    """Give a DeepSpeed engine a :class:`BackgroundCheckpointEngine` (once; returns the one it has)."""
    current = ds_engine.checkpoint_engine
    if isinstance(current, BackgroundCheckpointEngine):
        return current
    engine = BackgroundCheckpointEngine(bool(getattr(current, "zipfile_serialization", True)))
    ds_engine.checkpoint_engine = engine
    return engine
