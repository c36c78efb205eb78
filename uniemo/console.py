"""What a command shows on the console: uniemo's own lines. Other packages' output goes to the run's log file.

A successful run's console holds uniemo's progress (every line :func:`uniemo.logging.say` writes starts with
``uniemo``, and so do the trainers' progress bars), the command's result, and nothing else: a newcomer reads a
traceback as a failure. Inside :func:`quiet_console` (the drivers of ``uniemo train``, ``run``, ``feedback`` and
``evaluate`` enter it once their run folder is known), the rest goes to ``<run folder>/uniemo.log``
(:data:`uniemo.run_layout.LOG_FILE`):

- the output of Ray's worker processes that Ray forwards to the driver (Ray Train's controller and its internal
  tracebacks, e.g. the ``GetTimeoutError`` of a resource request; DeepSpeed's and torch's warnings in the trainers;
  model-loading progress bars): every line that is not uniemo's;
- Python warnings raised in this process (e.g. torch's ``FutureWarning`` about ``all_gather_into_tensor``);
- the log records of Ray, DeepSpeed, transformers and diffusers in this process (e.g. Ray's note that token
  authentication is on).

``--verbose`` (environment ``UNIEMO_VERBOSE=1``) shows everything on the console as well. A real failure is still
one line (a :class:`uniemo.errors.UserError`, also when it starts in a worker); any other error keeps its
traceback, and the console then names the log file.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uniemo.logging import say
from uniemo.run_layout import LOG_FILE

VERBOSE_ENV = "UNIEMO_VERBOSE"
"""``1``: everything on the console too (``uniemo --verbose``)."""

THIRD_PARTY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "transformers", "diffusers", "torch", "urllib3", "filelock")
"""Loggers of other packages whose records go to the log file instead of the console."""

_ACTIVE: dict[str, Any] = {}
"""The open scope: its log file and handler (one per process: the outermost scope wins)."""


def verbose() -> bool:
    """Whether the user asked for everything on the console (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def is_uniemo_line(line: str) -> bool:
    """A line of uniemo's own: a ``say`` line, an end-of-run summary, a trainer's progress bar."""
    return line.lstrip("\r").startswith("uniemo")


def log_file() -> Path | None:
    """The log file of the open scope (None: none is open)."""
    return _ACTIVE.get("path")


class _LogFile(logging.FileHandler):
    """The log file, made (with its folder) only when there is something to write: a command that fails on bad
    input before anything was logged leaves no file behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        """Kept: ``ray.init`` sets its format on every handler of Ray's logger, this one included."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def write(self, text: str) -> None:
        """Append raw text (forwarded worker lines, already prefixed)."""
        self.acquire()
        try:
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text if text.endswith("\n") else text + "\n")
            self.stream.flush()
        finally:
            self.release()


def write_to_log(text: str) -> None:
    """Append ``text`` to the open scope's log file (nothing when none is open)."""
    handler = _ACTIVE.get("handler")
    if handler is not None:
        handler.write(text)


@contextmanager
def quiet_console(folder: str | Path) -> Iterator[Path | None]:
    """Send other packages' console output to ``<folder>/uniemo.log`` inside the block (module docstring); yields
    the log file (None with ``--verbose``, or inside an outer scope, whose file is used)."""
    if _ACTIVE or verbose():
        yield log_file()
        return
    path = Path(folder) / LOG_FILE
    handler = _LogFile(path)
    _ACTIVE.update(path=path, handler=handler, saved={})
    route_loggers()
    showwarning = warnings.showwarning
    logging.captureWarnings(True)
    _quiet_progress_bars()
    route_worker_output()
    failed = False
    try:
        yield path
    except BaseException as exc:
        from uniemo.errors import UserError

        failed = not isinstance(exc, (UserError, KeyboardInterrupt))
        raise
    finally:
        unroute_worker_output()
        logging.captureWarnings(False)
        warnings.showwarning = showwarning
        for name, (handlers, propagate) in _ACTIVE["saved"].items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        _ACTIVE.clear()
        handler.close()
        if failed and path.is_file():
            say(f"other packages' output of this run (Ray's logs, warnings): {path}")


def route_loggers() -> None:
    """Inside a scope: the records of other packages' loggers go to the log file only. Called again once a package
    is imported (``import ray`` gives its logger a console handler of its own)."""
    if not _ACTIVE:
        return
    handler, saved = _ACTIVE["handler"], _ACTIVE["saved"]
    for name in (*THIRD_PARTY_LOGGERS, "py.warnings"):
        logger = logging.getLogger(name)
        if name not in saved:
            saved[name] = (list(logger.handlers), logger.propagate)
        else:  # handlers added since (by the package's import): they are the package's to restore
            saved[name][0].extend(h for h in logger.handlers if h is not handler and h not in saved[name][0])
        logger.handlers = [handler]
        logger.propagate = False


def _quiet_progress_bars() -> None:
    """Model-loading progress bars of transformers and the hub stay off the console."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# -- what Ray forwards from its workers ---------------------------------------------------------------------------

_RAY_HANDLER = "ray_print_logs"
"""The name under which Ray registers the printer of forwarded worker output (``ray._private.worker``)."""


def route_worker_output() -> None:
    """Inside a scope, with Ray connected: forwarded worker lines that are not uniemo's go to the log file. Ray
    prints worker output through a handler of its stdstream dispatcher; it is replaced by a filter around it
    (restored by :func:`unroute_worker_output`)."""
    if not _ACTIVE or "ray" not in sys.modules or _ACTIVE.get("ray_printer") is not None:
        return
    import ray

    if not ray.is_initialized():
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handle for name, handle in dispatcher.handlers if name == _RAY_HANDLER]
    if not printers:
        return  # log_to_driver=False: nothing is forwarded
    printer = printers[0]

    from ray._private.worker import filter_autoscaler_events  # what Ray itself prints of the autoscaler

    def forward(data: dict[str, Any]) -> None:
        lines = list(data.get("lines", []))
        if data.get("pid") == "autoscaler":
            lines = list(filter_autoscaler_events(lines))
        ours = [line for line in lines if is_uniemo_line(line)]
        others = [line for line in lines if not is_uniemo_line(line)]
        if others:
            who = data.get("actor_name") or data.get("task_name") or "worker"
            write_to_log("".join(f"({who} pid={data.get('pid')}) {line}\n" for line in others))
        if ours:
            printer({**data, "lines": ours})

    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, forward)
    _ACTIVE["ray_printer"] = printer


def unroute_worker_output() -> None:
    """Put Ray's own printer back (when Ray is still connected)."""
    printer = _ACTIVE.pop("ray_printer", None)
    if printer is None:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if any(name == _RAY_HANDLER for name, _ in dispatcher.handlers):
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler(_RAY_HANDLER, printer)
