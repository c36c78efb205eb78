"""A full disk, wherever it strikes: how to recognise it, how much space is left, how to say what is needed.

Every writer that can run out of space (the shard writer, a checkpoint save, a feedback round's shards) catches the
failure where it knows what it was writing, removes its partial files, and raises a
:class:`~uniemo.errors.DiskFullError` whose one line names the path and the space still needed (an estimate from
what was being written). The CLI prints it with exit code 2 like any user error. Not every library reports a full
disk as ``OSError(ENOSPC)``: torch's zip writer (``torch.save``, and DeepSpeed's checkpoint files through it) raises
a ``RuntimeError`` without an errno, so :func:`is_disk_full` also accepts such an error when the file system really
has less free space than the write needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from uniemo.errors import DISK_FULL_ERRNOS

_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (or of its nearest existing
    parent); -1 when unknown."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        stat = os.statvfs(where)
    except OSError:
        return -1
    return stat.f_bavail * stat.f_frsize


def is_disk_full(exc: BaseException, path: str | Path, needed: int = 0) -> bool:
    """Whether ``exc``, raised while writing under ``path``, means there is no space (module docstring).

    An ``OSError`` says so by its errno (``ENOSPC``, ``EDQUOT``, ``EFBIG``); torch's writer errors count when the
    file system of ``path`` has less than ``max(needed, 1 MiB)`` free."""
    for err in _chain(exc):
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_FAILURES):
            free = free_bytes(path)
            return 0 <= free < max(needed, 1 << 20)
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def human_bytes(n: int) -> str:
    """``n`` bytes as a short number with a binary unit: ``512 B``, ``3.4 MiB``, ``1.2 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def space_report(path: str | Path, needed: int) -> str:
    """``"12.3 MiB needed, 1.0 MiB free on /mnt/data"``: what a disk-full message says about space (``needed`` is
    an estimate, so messages say "about")."""
    free = free_bytes(path)
    where = _mount_point(Path(path))
    have = f"{human_bytes(free)} free on {where}" if free >= 0 else f"free space on {where} unknown"
    return f"{human_bytes(needed)} needed, {have}"


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
