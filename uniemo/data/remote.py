"""Where shard bytes come from: a local path, or a URL (``http(s)://``, ``s3://``, ``pipe:``); issue 13.

``data.shards``, ``data.extra_sources[*].path`` and the shard names a manifest lists may each be a local folder
(file) or a URL. This module is the one place that tells the two apart and opens bytes from either:

- ``http://host/path`` and ``https://``: a source's manifest is ``<base>/manifest.json`` and a shard
  ``<base>/<name>``. Shards stream through ``curl`` (webdataset's ``gopen``, with its retries); the small
  files (manifest, attribute table) and the size checks go through :mod:`urllib` with a short timeout.
- ``s3://bucket/prefix``: the same layout, through fsspec/s3fs. The endpoint is ``data.storage.endpoint_url``
  when set, else botocore's own settings (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``);
  credentials come only from botocore's usual places (``AWS_ACCESS_KEY_ID`` ..., config files, instance
  roles), never from uniemo's config.
- ``pipe:CMD``: a shell command that writes one file to stdout, with ``{name}`` where the file's name goes
  (``pipe:aws s3 cp s3://bucket/shards/{name} -``). A pipe source has no cheap size check: its manifest is
  read through the command, its shards' sizes are not checked before training.

A shard name that is itself a URL is used as it is, whatever the source's base. What readers of manifests do
with a URL source (a local mirror of its metadata) is in :func:`uniemo.data.shards.resolve_shard_folder`.
"""

from __future__ import annotations

import contextlib
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from uniemo.errors import ConfigError

URL_PREFIXES = ("http://", "https://", "s3://", "pipe:")
NAME_FIELD = "{name}"
"""Placeholder of a ``pipe:`` source where a file name goes."""
_S3_BLOCK = 8 << 20
"""Read-ahead block of an s3 shard stream: a few round trips per shard, little memory per loader worker."""


@dataclass(frozen=True)
class Storage:
    """How to reach URL sources: ``data.storage`` of the config (plain values, so it travels to workers)."""

    endpoint_url: str = ""
    """S3-compatible endpoint; empty: botocore's own setting (``AWS_ENDPOINT_URL_S3`` ...), else AWS."""
    timeout_s: float = 10.0
    """Connect and read timeout of the checks before training (manifest fetch, shard sizes)."""

    @classmethod
    def of(cls, data_cfg: Any) -> Storage:
        """From a ``DataConfig`` (or anything with a ``storage`` section); defaults when it has none."""
        cfg = getattr(data_cfg, "storage", None)
        if cfg is None:
            return cls()
        return cls(endpoint_url=cfg.endpoint_url, timeout_s=float(cfg.timeout_s))


class SourceUnavailable(OSError):
    """A URL could not be read. ``missing``: the server answered that it does not exist (vs unreachable)."""

    def __init__(self, location: str, reason: str, missing: bool):
        super().__init__(f"{location}: {reason}")
        self.location, self.reason, self.missing = location, reason, missing


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names a URL source rather than a local path."""
    return isinstance(location, str) and location.startswith(URL_PREFIXES)


def join_location(base: str, name: str) -> str:
    """The location of file ``name`` of the source ``base`` (a URL ``name`` is kept as it is)."""
    if is_url(name):
        return name
    if base.startswith("pipe:"):
        return base.replace(NAME_FIELD, name)
    if is_url(base):
        return f"{base.rstrip('/')}/{name}"
    return str(Path(base) / name)


def check_location(location: str, key: str) -> None:
    """A :class:`ConfigError` for a URL uniemo cannot read (``key`` names the config field)."""
    if location.startswith("pipe:") and NAME_FIELD not in location:
        raise ConfigError(
            f"{key}={location!r}: a pipe: source needs {NAME_FIELD} where the file name goes, e.g. "
            f"'pipe:aws s3 cp s3://bucket/shards/{NAME_FIELD} -'"
        )
    if location.startswith("s3://") and not location[5:].strip("/"):
        raise ConfigError(f"{key}={location!r} names no bucket; give s3://bucket/prefix")


# ---------------------------------------------------------------------------------------------------------
# Byte streams (the loader's shard opener)
# ---------------------------------------------------------------------------------------------------------
def open_stream(location: str, storage: Storage | None = None) -> IO[bytes]:
    """A binary stream of the whole file at ``location``, read front to back (a shard)."""
    if location.startswith("s3://"):
        return _s3(storage or Storage()).open(location, "rb", block_size=_S3_BLOCK, cache_type="readahead")
    if is_url(location):
        from webdataset.gopen import gopen

        stream: IO[bytes] = gopen(location, "rb")
        return stream
    return open(location, "rb")


def preload_clients(locations: Iterable[str]) -> None:
    """Import the S3 client in this process when any of ``locations`` needs it, before loader workers fork:
    each worker would otherwise import s3fs and aiobotocore again (about 0.3 CPU seconds) at every epoch."""
    if any(loc.startswith("s3://") for loc in locations):
        with contextlib.suppress(ImportError):  # open_stream names the missing package when it is needed
            import s3fs  # noqa: F401


# ---------------------------------------------------------------------------------------------------------
# Small files and sizes (checks before any worker starts)
# ---------------------------------------------------------------------------------------------------------
def fetch(location: str, storage: Storage) -> bytes:
    """The whole (small) file at URL ``location``; :class:`SourceUnavailable` when absent or unreachable."""
    if location.startswith("s3://"):
        return _s3_call(location, storage, lambda fs: fs.cat_file(location))
    if location.startswith("pipe:"):
        return _run_pipe(location, storage)
    body, _ = _http(location, "GET", storage)
    return body


def size_of(location: str, storage: Storage) -> int | None:
    """Bytes of the file at URL ``location`` (``None`` for ``pipe:``, which cannot tell without reading it)."""
    if location.startswith("pipe:"):
        return None
    if location.startswith("s3://"):
        return int(_s3_call(location, storage, lambda fs: fs.info(location))["size"])
    _, length = _http(location, "HEAD", storage)
    return length


def sizes_of(locations: Sequence[str], storage: Storage, threads: int = 8) -> list[int | None | SourceUnavailable]:
    """:func:`size_of` for many URLs at once (a few requests in flight); a failure is returned, not raised."""

    def one(location: str) -> int | None | SourceUnavailable:
        try:
            return size_of(location, storage)
        except SourceUnavailable as exc:
            return exc

    if len(locations) <= 1:
        return [one(loc) for loc in locations]
    with ThreadPoolExecutor(max_workers=min(threads, len(locations))) as pool:
        return list(pool.map(one, locations))


def _http(location: str, method: str, storage: Storage) -> tuple[bytes, int | None]:
    """``(body, Content-Length)`` of one request with the storage timeout (a HEAD has an empty body)."""
    request = urllib.request.Request(location, method=method, headers={"User-Agent": "uniemo"})
    try:
        with urllib.request.urlopen(request, timeout=storage.timeout_s) as response:
            length = response.headers.get("Content-Length")
            body = response.read() if method == "GET" else b""
            return body, int(length) if length is not None else None
    except urllib.error.HTTPError as exc:
        missing = exc.code in (403, 404, 410)
        raise SourceUnavailable(location, f"HTTP {exc.code} {exc.reason}", missing=missing) from None
    except urllib.error.URLError as exc:
        raise SourceUnavailable(location, f"unreachable: {exc.reason}", missing=False) from None
    except TimeoutError:
        raise SourceUnavailable(location, f"no answer within {storage.timeout_s:g} s", missing=False) from None
    except OSError as exc:
        raise SourceUnavailable(location, f"unreachable: {exc}", missing=False) from None


def _run_pipe(location: str, storage: Storage) -> bytes:
    command = location[len("pipe:") :]
    try:
        done = subprocess.run(command, shell=True, capture_output=True, timeout=max(storage.timeout_s, 30.0))
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(location, "the command did not finish", missing=False) from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
        raise SourceUnavailable(location, f"the command exited with {done.returncode}{detail}", missing=True)
    return done.stdout


def _s3(storage: Storage, quick: bool = False) -> Any:
    """An s3fs filesystem for ``storage``; ``quick``: one attempt with the storage timeout (checks)."""
    try:
        import s3fs
    except ImportError:
        raise ConfigError(
            "s3:// shard sources need s3fs; install it with pip install 'uniemo[cloud]'"
        ) from None
    kwargs: dict[str, Any] = {}
    if storage.endpoint_url:
        kwargs["endpoint_url"] = storage.endpoint_url
    if quick:
        kwargs["config_kwargs"] = {
            "connect_timeout": storage.timeout_s,
            "read_timeout": storage.timeout_s,
            "retries": {"max_attempts": 1},
        }
    return s3fs.S3FileSystem(**kwargs)


def _s3_call(location: str, storage: Storage, call: Any) -> Any:
    try:
        return call(_s3(storage, quick=True))
    except FileNotFoundError:
        raise SourceUnavailable(location, "no such object", missing=True) from None
    except PermissionError as exc:
        raise SourceUnavailable(
            location, f"access denied ({exc}); check the AWS credentials (AWS_ACCESS_KEY_ID ...)", missing=True
        ) from None
    except ConfigError:
        raise
    except Exception as exc:  # botocore and aiohttp raise many types for an endpoint that does not answer
        if type(exc).__name__ == "NoCredentialsError":
            reason = "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        else:
            text = str(exc).strip()
            reason = f"unreachable: {text.splitlines()[0] if text else type(exc).__name__}"
        raise SourceUnavailable(location, reason, missing=False) from None
