"""How uniemo starts the worker processes of its torch ``DataLoader`` s: from a fork server, never by forking.

``DataLoader`` starts its workers with the platform's default start method, ``fork`` on Linux, which copies the
calling process with only the calling thread. Every process that builds a loader holds other threads: a Ray
Train worker (Ray's core worker, gRPC, gloo and DeepSpeed threads), the driver and a test process connected to
Ray, a process with a progress bar or wandb. A lock that one of them held at the instant of the fork stays locked
in the child for ever. This was seen: a loader worker forked inside a Ray Train worker hung in CPython 3.11's
after-fork code (``PyOS_AfterFork_Child`` -> ``_PyThreadState_DeleteExcept``, waiting for the runtime lock
another thread held) and its rank waited for the batch for ever (RELIABILITY.md).

So every loader uniemo makes (the shard loader, the image sets of the paper's metrics) starts its workers with
``forkserver``: a fresh, single-threaded Python (fork + exec, which is safe in a threaded process) imports
:data:`PRELOAD` and the main module's package once, and from then on forks each worker of the process from
itself. A training rank starts it first thing and the shard loader when it is built (:func:`start_server`), so
that its imports run while the rank joins its group and builds its model; otherwise the first worker starts it. A worker then costs a fork of a process with torch
imported plus unpickling what it is handed, about what a fork of the main process costs; the server costs about
one ``import torch`` per process (BENCHMARKS.md, loader start method). Always, not only in processes known to hold
threads: any process may hold some (a test process connected to Ray, a tqdm monitor, wandb, threads that C code
started and Python cannot list), and one start method everywhere means the tested path is the path that runs.

What a fork gave the workers for free, they get explicitly: everything handed to them pickles (the dataset with
its plan, transform, attribute table and caps; the collate and init functions are module-level), and
:func:`adopt_environment` gives each worker the environment variables of the process that started it (the server
has those of the moment it started; e.g. credentials that an S3 source reads may have been set since). As with
``spawn``, each worker runs the main module again: a script that builds a loader keeps its work under
``if __name__ == "__main__":`` (Python refuses to start workers otherwise, with a message that says so).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections.abc import Sequence
from functools import partial
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

START_METHOD = "forkserver"
PRELOAD = ("torch", "uniemo.data.loader")
"""Modules the fork server imports once, so that no worker imports them: torch and the shard loader (which imports
webdataset, PIL and numpy); also the package of the main module (:func:`main_package`). A module that cannot be
imported is left out (``multiprocessing`` ignores it)."""


def main_package() -> tuple[str, ...]:
    """The top-level package that holds this process's main module, if one does (a Ray worker's: ``ray``).

    Each worker runs the main module again before it unpickles anything, as ``spawn`` does (CPython 3.11's fork
    server never preloads ``__main__``: it asks for a key of the preparation data that is never filled); with its
    package imported by the server, that is cheap (in a Ray worker, 0.5 CPU seconds per worker otherwise)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:  # python -m NAME; a worker skips NAME = pkg.__main__
        return () if spec.name.endswith(".__main__") else (spec.name.split(".")[0],)
    path = getattr(main, "__file__", None)
    top = ""
    folder = os.path.dirname(os.path.realpath(path)) if path else ""
    while folder and os.path.isfile(os.path.join(folder, "__init__.py")):
        top, folder = os.path.basename(folder), os.path.dirname(folder)
    return (top,) if top else ()


_preload: dict[str, None] = dict.fromkeys(PRELOAD)
"""What the server imports when it starts: :data:`PRELOAD` and every caller's additions so far."""


def worker_context(preload: Sequence[str] = ()) -> BaseContext:
    """The ``multiprocessing`` context of every loader worker uniemo starts (module docstring).

    ``preload`` adds modules the workers of this caller need (e.g. torchvision for the paper's metrics). The
    server imports them only if it is not running yet: it is started once per process (by :func:`start_server` or
    the first worker) with the list as it is then; a worker imports whatever the server lacks itself (correct, only slower to start).
    """
    _preload.update(dict.fromkeys([*main_package(), *preload]))
    context = multiprocessing.get_context(START_METHOD)
    context.set_forkserver_preload(list(_preload))
    return context


def start_server(preload: Sequence[str] = ()) -> None:
    """Start this process's fork server now, if it is not running: it imports :data:`PRELOAD` (and ``preload``)
    while the caller goes on (a trainer builds its model), instead of when the first worker is wanted."""
    worker_context(preload)
    multiprocessing.forkserver.ensure_running()


def loader_worker_options(
    num_workers: int, preload: Sequence[str] = (), context: Any = None
) -> dict[str, Any]:
    """The ``DataLoader`` keyword arguments that start its ``num_workers`` workers from the fork server (or from
    ``context``, a caller's own choice) with this process's environment; none for a loader without workers."""
    if num_workers <= 0:
        return {}
    return {
        "multiprocessing_context": context if context is not None else worker_context(preload),
        "worker_init_fn": partial(adopt_environment, dict(os.environ)),
    }


def adopt_environment(environ: dict[str, str], worker_id: int = 0) -> None:
    """``DataLoader`` ``worker_init_fn``: make this worker's environment ``environ`` (that of the process that
    started it, as a forked worker would have it)."""
    for key in [k for k in os.environ if k not in environ]:
        del os.environ[key]
    os.environ.update(environ)


def server_cpu_seconds() -> float:
    """CPU seconds of this process's fork server and of the workers it has reaped so far (0 when none runs; Linux).
    For measurements: the workers are the server's children, so the caller's ``RUSAGE_CHILDREN`` misses them."""
    pid = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_pid", None)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text() if pid is not None else ""
    except OSError:
        stat = ""
    if not stat:
        return 0.0
    ticks = sum(int(x) for x in stat.rsplit(")", 1)[1].split()[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")
