"""Checkpoint files are unpickled with torch's restricted unpickler only: nothing in a checkpoint can run code.

A ``*.pt`` file is a pickle, and a pickle can call any function while it loads (``__reduce__`` naming
``os.system``). DeepSpeed 0.19 reads its checkpoint files with ``torch.load(weights_only=False)``, in its
``TorchCheckpointEngine.load`` and in ``zero_to_fp32``. So every load of a checkpoint goes through torch's
restricted unpickler (``weights_only=True``), which builds tensors, containers and numbers and refuses every other
global except the few plain DeepSpeed classes the checkpoints hold (:func:`_deepspeed_globals`, passed as
``safe_globals``):

- uniemo's own loads call :func:`safe_load`;
- :func:`install_safe_engine` swaps the DeepSpeed engine's checkpoint engine for :class:`SafeCheckpointEngine`,
  whose ``load`` is :func:`safe_load` (DeepSpeed's model, optimizer and ZeRO shards all load through it);
- :func:`weights_only_loads` surrounds calls into DeepSpeed that call ``torch.load`` themselves (``zero_to_fp32``,
  and ``engine.load_checkpoint`` as a second guard) with torch's own switch ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``,
  which makes every ``torch.load`` restricted even where ``weights_only=False`` is passed.

The load is the check: there is no walk over the files before loading, and so no window in which a file could be
swapped between a check and the load. A refused file is one :class:`CheckpointFileError` line naming it.

:func:`check_step_folder` refuses a step folder holding a symbolic link that leaves it (a ``ds/`` that points at
a folder of someone else's). :func:`check_checkpoint_folder` is the driver's early check before Ray starts: the same
restricted loads, memory-mapped, so a bad checkpoint is one line before any worker starts. It adds no safety.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from uniemo.errors import UserError

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch's switch: ``torch.load`` is restricted (weights-only) wherever it is called, whatever its arguments."""


class CheckpointFileError(UserError):
    """A checkpoint file that is not a plain torch file of tensors and DeepSpeed's own state classes."""


def _deepspeed_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The classes DeepSpeed writes into its checkpoints (model/optimizer states of ZeRO 0-3, fp16/bf16/fp32).

    Each is a plain data holder: an enum, a dataclass, or a loss scaler restored by setting attributes. The type
    is what ``torch.serialization.safe_globals`` takes (an entry may also be ``(class, its pickled name)``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


DEEPSPEED_GLOBALS = ("LossScaler", "DynamicLossScaler", "ZeroStageEnum", "fragment_address")
"""Names of the classes :func:`_deepspeed_globals` allows (documentation; the list itself is built lazily)."""

_LOCK = threading.RLock()
"""``torch.serialization.safe_globals`` and the environment switch are process-wide: two threads loading at once
(the async feedback pool beside the training driver) would each drop the other's setting mid-load."""


@contextlib.contextmanager
def _allowed_globals() -> Iterator[None]:
    with _LOCK, torch.serialization.safe_globals(_deepspeed_globals()):
        yield


def _refused(exc: Exception, where: str) -> CheckpointFileError:
    """The one line for a file the restricted unpickler refused (``exc``) or could not read."""
    if isinstance(exc, pickle.UnpicklingError):  # what the restricted unpickler raises for anything not allowed
        found = re.search(r"unsupported (GLOBAL \S+|\w+ opcode)|GLOBAL \S+|Unsupported operand \d+", str(exc),
                          re.IGNORECASE)
        what = found.group(0).rstrip(".") if found else "a forbidden pickle instruction"
        return CheckpointFileError(
            f"refusing to load {where}: it would run code when unpickled ({what}); only load checkpoints written by "
            "uniemo or DeepSpeed"
        )
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return CheckpointFileError(
        f"cannot read checkpoint file {where} ({reason}); the folder is damaged, use an earlier step folder"
    )


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's state classes allowed; a file that needs anything
    else (or does not load) is a :class:`CheckpointFileError` naming it. A missing file stays a
    :class:`FileNotFoundError` (callers such as DeepSpeed tell those apart)."""
    try:
        with _allowed_globals():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise _refused(exc, str(path)) from None


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` in this block is restricted (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), whatever its
    caller passes: for library code that calls ``torch.load(weights_only=False)`` itself (DeepSpeed, torch-fidelity).
    Held under a lock; the variable is restored afterwards."""
    with _LOCK:
        before = os.environ.get(_FORCE_WEIGHTS_ONLY)
        os.environ[_FORCE_WEIGHTS_ONLY] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
            else:
                os.environ[_FORCE_WEIGHTS_ONLY] = before


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """:func:`forced_weights_only` with DeepSpeed's state classes allowed: around calls into DeepSpeed."""
    with _allowed_globals(), forced_weights_only():
        yield


def refused_file_in(folder: Path, exc: Exception) -> CheckpointFileError:
    """The error of a load inside ``folder`` that library code refused (``exc``, which names no file): the first
    ``*.pt`` file there that the restricted unpickler refuses too, read again to name it; else the folder."""
    for path in sorted(folder.glob("*.pt")):
        try:
            safe_load(path, mmap=zipfile.is_zipfile(path))
        except CheckpointFileError as named:
            return named
        except OSError:
            continue
    return _refused(exc, f"a file in {folder}")


def check_step_folder(folder: str | Path) -> Path:
    """The step folder, resolved, after checking that no symbolic link in it points outside it.

    A link inside the folder (DeepSpeed writes none) may only point at another file of the same folder; one that
    leaves it (``ds/`` -> a folder elsewhere) is a :class:`CheckpointFileError`. Files are loaded only through
    :func:`safe_load` anyway: this keeps a step folder one self-contained thing."""
    root = Path(folder).resolve()
    for current, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed, not entered
        for name in dirs + files:
            path = Path(current) / name
            if path.is_symlink():
                target = path.resolve()
                if target != root and root not in target.parents:
                    raise CheckpointFileError(
                        f"refusing to load {path}: it is a symbolic link to {target}, outside the step folder "
                        f"{root}; copy the files into the folder instead"
                    )
    return root


def check_checkpoint_folder(folder: str | Path) -> None:
    """The driver's early check (module docstring): :func:`check_step_folder`, then every ``*.pt`` file of the step
    folder through :func:`safe_load`, memory-mapped (no tensor data is copied)."""
    root = check_step_folder(folder)
    for path in sorted(root.rglob("*.pt")):
        try:
            safe_load(path, mmap=zipfile.is_zipfile(path))
        except FileNotFoundError as exc:
            raise _refused(exc, str(path)) from None


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through :func:`safe_load`; everything else (saving, commit,
    the data-parallel writer rules) is the wrapped engine's."""

    loads_safely = True

    def __init__(self, inner: Any):
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install_safe_engine(engine: Any) -> None:
    """Make every checkpoint file a DeepSpeed engine loads go through :func:`safe_load` (idempotent; an engine of
    uniemo's own that loads safely, ``loads_safely = True``, is kept as it is)."""
    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and not getattr(current, "loads_safely", False):
        engine.checkpoint_engine = SafeCheckpointEngine(current)
