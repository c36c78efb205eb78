"""Atomic file writes: the one way uniemo replaces a file that others may read while it is written.

A reader (another rank, a resumed run, a crash) sees the old content or the new, never a partial file, and a
planted symlink is never followed. Every writer goes through :func:`atomic_file`:

1. ``mkstemp`` in the target's own folder: a new file with a random name, created with ``O_EXCL`` (so a symlink
   or file someone put at a predictable ``X.tmp`` name is never opened), on the same file system as the target;
2. write, flush, ``fsync``;
3. ``os.replace`` onto the target (atomic on POSIX), then ``fsync`` the folder so the rename survives a crash.

On any error the temporary file is removed and the target is untouched. Temporary files are named
``.<target name>.<random>.tmp``: hidden, and recognisable as leftovers of a killed writer.

The new file gets ``0o666 & ~umask``, as ``open()`` would give it (``mkstemp`` alone makes ``0600``), unless the
caller asks for a mode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


def temp_name_prefix(path: str | Path) -> str:
    """The prefix of the temporary files written for ``path`` (``.<name>.``): what cleanup code looks for."""
    return f".{Path(path).name}."


def is_temp_file(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_file`'s temporary files (a leftover of a killed writer)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _default_mode() -> int:
    """``0o666`` less this process's umask (read without changing it, so threads are safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_beside(path: Path, mode: int | None) -> Iterator[tuple[IO[bytes], Path]]:
    """Steps 1-3 of the module docstring around the caller's writing: ``(open file, its temporary name)``."""
    fd, tmp_name = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` atomically when the ``with`` block ends without error.

    The folder must exist. ``mode``: the permission bits of the new file (default ``0o666 & ~umask``).
    """
    with _temp_beside(Path(path), mode) as (f, _):
        yield f


@contextlib.contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """For writers that take a file name (``safetensors.save_file``, ``Image.save``): a fresh, empty temporary file
    beside ``path`` that they overwrite, moved onto ``path`` when the ``with`` block ends without error."""
    with _temp_beside(Path(path), mode) as (_, tmp):
        yield tmp
        # The writer wrote through its own file object (maybe a new inode): fsync what the name now holds.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes | str, *, mode: int | None = None, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` (text is encoded with ``encoding``) atomically (module docstring)."""
    with atomic_file(path, mode=mode) as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)
