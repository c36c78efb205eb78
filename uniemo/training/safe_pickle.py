"""Refuse checkpoint files that would run code when unpickled, before anything unpickles them.

DeepSpeed 0.19 reads its checkpoint files with ``torch.load(..., weights_only=False)`` (its
``TorchCheckpointEngine.load``), and so does DeepSpeed's ``zero_to_fp32``: a crafted ``*.pt`` file in a
checkpoint folder would execute arbitrary code in every rank. Before our code hands a checkpoint folder to those
loaders, :func:`check_checkpoint_folder` opens every ``*.pt`` file in it with torch's restricted unpickler
(``torch.load(weights_only=True)``, memory-mapped, so no tensor data is copied), allowing only the few plain
DeepSpeed classes its checkpoints hold (:data:`DEEPSPEED_GLOBALS`). A file that needs anything else (a
``__reduce__`` calling ``os.system``, an unknown class) is refused with a one-line :class:`CheckpointFileError`
naming the file, and nothing of it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uniemo.errors import UserError


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

_SAFE_GLOBALS_LOCK = threading.Lock()
"""``torch.serialization.safe_globals`` sets and restores one process-wide list: two threads checking at once (the
async feedback pool beside the training driver) would each drop the other's allowance mid-load."""


def check_torch_file(path: str | Path) -> None:
    """Raise :class:`CheckpointFileError` unless ``path`` loads with torch's restricted (weights-only) unpickler."""
    import pickle
    import re
    import zipfile

    path = Path(path)
    try:
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(_deepspeed_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:  # what the restricted unpickler raises for anything not allowed
        found = re.search(r"unsupported (GLOBAL \S+|\w+ opcode)|Unsupported operand \d+", str(exc), re.IGNORECASE)
        what = found.group(0).rstrip(".") if found else "a forbidden pickle instruction"
        raise CheckpointFileError(
            f"refusing to load {path}: it would run code when unpickled ({what}); "
            "only load checkpoints written by uniemo or DeepSpeed"
        ) from None
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointFileError(
            f"cannot read checkpoint file {path} ({reason}); the folder is damaged, use an earlier step folder"
        ) from None


def check_checkpoint_folder(folder: str | Path) -> None:
    """:func:`check_torch_file` on every ``*.pt`` file under ``folder`` (a ``step-NNNNNN`` folder)."""
    for path in sorted(Path(folder).rglob("*.pt")):
        check_torch_file(path)
