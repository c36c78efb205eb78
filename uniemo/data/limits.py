"""Caps on what data from outside may make uniemo read: the checks behind ``data.limits`` (:class:`LimitsConfig`).

A shard folder, a URL source, a tar member or an image may come from someone the user does not control. Each of
them is read through a cap, so that none can exhaust the memory, disk or network of the machine:

- ``manifest.json`` and ``attributes.json`` (local or fetched): at most ``max_manifest_bytes``, a manifest at most
  ``max_manifest_entries`` shards (:func:`uniemo.data.shards.parse_manifest`);
- the bytes of one shard as stored (a file, a URL, a ``pipe:`` command's output): at most the size its manifest
  lists, and at most ``max_fetch_bytes`` (:class:`BoundedStream`, in the loader's shard opener);
- after decompression (a gzip, bzip2 or xz tar): at most ``max_member_bytes`` per member and ``max_shard_bytes``
  per shard (the loader's tar reader, :func:`uniemo.data.tar_members.tar_members`);
- an image: at most ``max_image_pixels`` (:func:`uniemo.data.images.open_image`).

Going over a cap is one :class:`~uniemo.errors.DataError` line that names its key (:func:`over_cap`).

Functions that read manifests take ``limits`` where their caller has the config; where it has not (a stage's
split totals, the judge's data digest), they use the caps of the config this process last resolved a data source
with (:func:`use_limits`, called by :func:`uniemo.data.shards.ensure_synthetic_shards`), and the defaults in a
process that resolved none (``uniemo data inspect``, the report). Each process runs one config (a pipeline runs its
stages one after another, each resolving its data first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from uniemo.config.schema import LimitsConfig
from uniemo.errors import DataError

DEFAULT_LIMITS = LimitsConfig()
"""The caps of a command that takes no config (``uniemo data inspect``, the report, a plain ``build_loader``)."""

_active = DEFAULT_LIMITS


def limits_of(data_cfg: Any) -> LimitsConfig:
    """``data.limits`` of a ``DataConfig`` (or of anything with a ``limits`` section); the defaults otherwise."""
    limits = getattr(data_cfg, "limits", None)
    return limits if isinstance(limits, LimitsConfig) else DEFAULT_LIMITS


def use_limits(limits: LimitsConfig) -> None:
    """Make ``limits`` this process's caps for readers not handed any (module docstring)."""
    global _active
    _active = limits


def active_limits(limits: LimitsConfig | None = None) -> LimitsConfig:
    """``limits`` when given, else this process's caps (:func:`use_limits`; the defaults until then)."""
    return limits if limits is not None else _active


def size_text(n: int) -> str:
    """``123 bytes``, ``4.0 KiB``, ``256.0 MiB``, ``64.0 GiB``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def over_cap(what: str, key: str, cap: int, unit: str = "bytes") -> DataError:
    """The one-line error of ``what`` going over ``data.limits.<key>`` (``cap`` in ``unit``)."""
    shown = size_text(cap) if unit == "bytes" else f"{cap:,} {unit}"
    return DataError(
        f"{what}: over data.limits.{key} = {shown}; refused (the source may be damaged or hostile; raise "
        f"data.limits.{key} only for a source you trust)"
    )


class BoundedStream:
    """A byte stream that raises ``error()`` as soon as more than ``limit`` bytes have been read from it.

    It reads at most one byte past the limit, so an endless or lying source costs ``limit + 1`` bytes."""

    def __init__(self, stream: IO[bytes], limit: int, error: Callable[[], Exception]):
        self.stream, self.limit, self.error = stream, limit, error
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        allowed = self.limit - self.count + 1
        data = self.stream.read(allowed if n is None or n < 0 else min(n, allowed))
        self.count += len(data)
        if self.count > self.limit:
            raise self.error()
        return data

    def close(self) -> None:
        self.stream.close()


def read_capped(stream: IO[bytes], cap: int, error: Callable[[], Exception]) -> bytes:
    """All of ``stream`` when it holds at most ``cap`` bytes, else ``error()`` (after reading ``cap + 1`` bytes)."""
    bounded = BoundedStream(stream, cap, error)
    chunks = []
    while chunk := bounded.read(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
