"""Run logging: ``metrics.jsonl``, wandb, sample grids and the progress bar, on rank 0 only (STYLE 14); and
:func:`say`, the one way a uniemo module tells the user something on stderr (``uniemo: ...``).

:func:`make_run_logger` returns a :class:`RunLogger` on rank 0 and a :class:`NullRunLogger` (same methods, no
effects) elsewhere, so the loop calls ``logger.log(...)`` on every rank without ``if rank == 0``.

- ``metrics.jsonl``: one JSON object per logged step (``step``, each loss term, learning rates, ``samples_per_s``,
  ``data_wait_share``, validation metrics when the step validated). Opening it for a run resumed at step N drops the lines after N,
  so the file stays one line per step however often the run was interrupted.
- wandb with ``logging.wandb.mode`` passed explicitly (``online`` / ``offline`` / ``disabled``; offline by
  default, no network needed), files under ``<run_dir>/wandb/``, the resolved config attached, one wandb run
  per uniemo run (its id is kept in ``<run_dir>/wandb_id``). Only config values and metrics are sent; no
  environment variable, token or path outside the run is logged or printed.
- Sample grids (stage 2): ``<run_dir>/samples/<emotion>.png`` and ``samples/grid.png`` (one row per emotion),
  logged to wandb as images.
- A tqdm progress bar with loss and samples/s. On a terminal it redraws in place; when stderr is not a
  terminal (a Ray worker, whose output Ray forwards line by line) it prints a line at most every 10 s.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.atomic import atomic_path, atomic_write
from uniemo.errors import UserError
from uniemo.run_layout import SAMPLES_DIR, STEP_METRICS_FILE, WANDB_ID_FILE, sample_grid_path

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from uniemo.config.schema import Config

def say(message: str, topic: str = "") -> None:
    """One user-facing line on stderr, flushed: ``uniemo: <message>``, or ``uniemo <topic>: <message>`` for a
    command's own lines (``topic="feedback"``). Every module of uniemo writes its messages to the user here."""
    sys.stderr.write(f"uniemo{' ' + topic if topic else ''}: {message}\n")
    sys.stderr.flush()


def check_wandb_credentials(cfg: Config) -> None:
    """With ``logging.wandb.mode=online``: one line when no wandb credentials are found (before any work)."""
    if cfg.logging.wandb.mode != "online":
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise UserError(
        "logging.wandb.mode=online needs wandb credentials (WANDB_API_KEY or `wandb login`); "
        "use logging.wandb.mode=offline (sync later with `wandb sync`) or disabled"
    )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line valid
    return value


def truncate_metrics(path: str | Path, keep_through_step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` whose step is after ``keep_through_step`` (and unreadable lines).

    Returns the number of lines kept. The file is replaced atomically.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and int(record.get("step", 0)) <= keep_through_step:
            kept.append(line)
    atomic_write(path, "".join(f"{line}\n" for line in kept))
    return len(kept)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``<run_dir>/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / STEP_METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 ``[N,H,W,3]`` images tiled into one ``[rows*H, columns*W, 3]`` image (row-major)."""
    import numpy as np

    n, h, w, c = images.shape
    columns = columns or n
    rows = max(1, math.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    return grid


class _LineStream:
    """A file for tqdm that turns its carriage-return redraws into whole lines (for line-based log forwarding)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class NullRunLogger:
    """The logger of ranks other than 0: every method does nothing (STYLE 14)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, loss: Any = None, samples_per_s: float | None = None) -> None:
        pass

    def start_progress(self, initial: int, total: int) -> None:
        pass

    def end_progress(self) -> None:
        pass

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> list[Path]:
        return []

    def log_samples(self, step: int, make: Callable[[], dict[str, np.ndarray]]) -> list[Path]:
        return []

    def save_artifact(self, name: str, write: Callable[[Path], None]) -> Path | None:
        return None

    def info(self, message: str) -> None:
        pass

    def write_json(self, name: str, data: Any) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullRunLogger):
    """Rank 0's logger: ``metrics.jsonl``, wandb, sample grids, progress bar (module docstring).

    Args:
        cfg: the resolved config (attached to the wandb run).
        run_dir: the run directory.
        resume_step: the step the run continues from; ``metrics.jsonl`` lines after it are dropped.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, resume_step: int = 0) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / STEP_METRICS_FILE
        truncate_metrics(self.metrics_path, resume_step)
        self._metrics = open(self.metrics_path, "a")
        self._bar = None
        self._wandb = self._start_wandb(resume_step)

    # -- wandb --------------------------------------------------------------------------------------------------
    def _start_wandb(self, resume_step: int) -> Any:
        mode = self.cfg.logging.wandb.mode
        if mode == "disabled":
            return None
        import dataclasses

        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
        return wandb.init(
            project=self.cfg.logging.wandb.project,
            name=self.cfg.run.name,
            group=self.cfg.logging.wandb.group or None,  # a sweep's points share their sweep's group
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,  # explicit: the config decides, not a WANDB_MODE left in the environment
            config=dataclasses.asdict(self.cfg),
            settings=wandb.Settings(silent=True, console="off"),
        )

    # -- metrics ------------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=int(step))
        if self._bar is not None and "val/accuracy" in record:
            self._bar.write(f"step {step}: val/loss {record.get('val/loss', float('nan')):.4f} "
                            f"val/accuracy {record['val/accuracy']:.3f}")

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.run_dir / name, json.dumps(data, indent=1) + "\n")

    def info(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"uniemo: {message}")
        else:
            say(message)

    # -- progress -----------------------------------------------------------------------------------------------
    def start_progress(self, initial: int, total: int) -> None:
        if not self.cfg.logging.progress:
            return
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=f"uniemo stage {self.cfg.training.stage}",  # a uniemo line on the console (uniemo.console)
            unit="step",
            file=sys.stderr if tty else _LineStream(sys.stderr),
            mininterval=0.5 if tty else 10.0,
            dynamic_ncols=tty,
            ncols=None if tty else 100,
        )
        self._last_refresh = time.monotonic()

    def progress(self, step: int, loss: Any = None, samples_per_s: float | None = None) -> None:
        if self._bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if samples_per_s is not None:
            postfix["samples/s"] = f"{samples_per_s:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    # -- artifacts ----------------------------------------------------------------------------------------------
    def save_artifact(self, name: str, write: Callable[[Path], None]) -> Path:
        """A file of the run written once (by this rank) and atomically: ``write(tmp)``, then renamed to
        ``<run_dir>/<name>``."""
        path = self.run_dir / name
        with atomic_path(path) as tmp:
            write(tmp)
        return path

    def log_samples(self, step: int, make: Callable[[], dict[str, np.ndarray]]) -> list[Path]:
        """Generate sample images (``make``, called on this rank only) and log them as grids."""
        return self.log_images(step, make())

    # -- images -------------------------------------------------------------------------------------------------
    def log_images(self, step: int, images: dict[str, np.ndarray]) -> list[Path]:
        """Save one grid per emotion and an overview (a row per emotion); log them to wandb."""
        import numpy as np
        from PIL import Image

        folder = self.run_dir / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        rows = []
        for emotion, batch in images.items():
            grid = image_grid(batch)
            path = sample_grid_path(self.run_dir, emotion)
            Image.fromarray(grid).save(path)
            written.append(path)
            rows.append(grid)
        if rows:
            width = max(r.shape[1] for r in rows)
            padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
            overview = sample_grid_path(self.run_dir)
            Image.fromarray(np.concatenate(padded)).save(overview)
            written.append(overview)
        if self._wandb is not None and rows:
            import wandb

            self._wandb.log({f"samples/{e}": wandb.Image(image_grid(b), caption=e) for e, b in images.items()},
                            step=int(step))
        return written

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_progress()
        if not self._metrics.closed:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def make_run_logger(cfg: Config, run_dir: str | Path, is_main: bool, resume_step: int = 0) -> NullRunLogger:
    """A :class:`RunLogger` on the main rank, a :class:`NullRunLogger` elsewhere."""
    if is_main:
        return RunLogger(cfg, run_dir, resume_step=resume_step)
    return NullRunLogger()
