"""Where shard bytes come from: a local path, or a URL (``http(s)://``, ``s3://``, ``pipe:``).

``data.shards`` and ``data.extra_sources[*].path`` may each be a local folder or a URL; the shards a manifest
lists are plain file names inside that folder or URL (:func:`is_file_name`: never a path, never a URL). This
module is the one place that tells the two apart and opens bytes from either:

- ``http://host/path`` and ``https://``: a source's manifest is ``<base>/manifest.json`` and a shard
  ``<base>/<name>``, all read with :mod:`urllib` (the checks before training with a short timeout).
- ``s3://bucket/prefix``: the same layout, through botocore (streaming GETs; botocore comes with the
  ``cloud`` extra). The endpoint is ``data.storage.endpoint_url`` when set, else botocore's own settings
  (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``); credentials come only from botocore's
  usual places (``AWS_ACCESS_KEY_ID`` ..., config files, instance roles), never from uniemo's config.
- ``pipe:CMD``: a shell command that writes one file to stdout, with ``{name}`` where the file's name goes
  (``pipe:aws s3 cp s3://bucket/shards/{name} -``). The command is the user's; the name put into it is a plain
  file name, shell-quoted as well. A pipe source has no cheap size check: its manifest is read through the
  command, its shards' sizes are not checked before training (the loader still reads no shard past its listed
  size).

Shards are read in the loader worker's own process (no ``curl`` per shard; one S3 client per worker, made from a
botocore session that the workers' fork server loaded once, :mod:`uniemo.data.s3_preload`): over loopback that
costs about 0.86-0.98x (HTTP) and 0.67-0.79x (S3) of a local read's CPU per sample (BENCHMARKS.md; S3 was
0.88-0.98x when forked workers shared one client made before the fork).
What readers of manifests do with a URL source (a local mirror of its metadata) is in
:func:`uniemo.data.shards.resolve_shard_folder`.

HTTP is read with an opener that knows ``http`` and ``https`` only: no ``file://``, ``ftp://`` or ``data:`` URL,
and no redirect to one. Small files (a manifest) are read up to a cap (``data.limits``, :mod:`uniemo.data.limits`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from uniemo.data.limits import read_capped
from uniemo.errors import ConfigError, UserError

URL_PREFIXES = ("http://", "https://", "s3://", "pipe:")
NAME_FIELD = "{name}"
"""Placeholder of a ``pipe:`` source where a file name goes."""
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STREAM_TIMEOUT_S = 120.0
"""An HTTP shard stream that sends nothing for this long fails (and is counted as a corrupt shard)."""
_HTTP_ATTEMPTS = 3


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


def is_file_name(name: object) -> bool:
    """Whether ``name`` is a plain file name: letters, digits and ``._-``, starting with a letter or digit (no
    path, no URL, nothing a shell or a command's option parser reads specially)."""
    return isinstance(name, str) and _FILE_NAME.fullmatch(name) is not None


def join_location(base: str, name: str) -> str:
    """The location of the file ``name`` (a plain file name, :func:`is_file_name`) of the source ``base``."""
    if not is_file_name(name):
        raise ValueError(f"{name!r} is not a plain file name")  # manifests are checked before: a bug, not input
    if base.startswith("pipe:"):
        return base.replace(NAME_FIELD, shlex.quote(name))
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
    """A binary stream of the whole file at ``location``, read front to back (a shard).

    ``http(s)://`` is read in this process (:mod:`urllib`; a ``curl`` process per shard cost 0.1 CPU ms per
    sample more), retrying the request a few times on a connection error or a 5xx answer; an absent file
    raises :class:`FileNotFoundError` as a missing local shard does. ``pipe:`` runs through webdataset's
    ``gopen``, ``s3://`` as a botocore streaming GET.
    """
    if location.startswith("s3://"):
        return _open_s3(location, storage or Storage())
    if location.startswith("pipe:"):
        from webdataset.gopen import gopen

        stream: IO[bytes] = gopen(location, "rb")
        return stream
    if is_url(location):
        return _open_http(location)
    return open(location, "rb")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another ``http(s)://`` URL (urllib alone also follows one to ``ftp://``)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, f"redirected to {newurl!r}, which is not http(s)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener() -> urllib.request.OpenerDirector:
    """urllib's opener without its ``file:``, ``ftp:`` and ``data:`` handlers (``build_opener`` adds them all)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


_OPENER = _http_opener()


def _open_http(location: str) -> IO[bytes]:
    request = urllib.request.Request(location, headers={"User-Agent": "uniemo"})
    for attempt in range(_HTTP_ATTEMPTS):
        last = attempt == _HTTP_ATTEMPTS - 1
        try:
            response: IO[bytes] = _OPENER.open(request, timeout=_STREAM_TIMEOUT_S)
            return response
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(f"{location}: HTTP {exc.code} {exc.reason}") from None
            if exc.code < 500 or last:
                raise OSError(f"{location}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            if last:
                raise OSError(f"{location}: {getattr(exc, 'reason', exc)}") from None
        time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


_BOTO: dict[Any, Any] = {}
"""``"session"``: one botocore session with the S3 model loaded; ``(pid, endpoint)``: the client of that process
(its connections are never shared with another process)."""


_CHECK_LOCK = threading.Lock()


def _s3_client(storage: Storage) -> Any:
    """This process's botocore S3 client for ``storage`` (credentials and region from botocore's sources)."""
    key = (os.getpid(), storage.endpoint_url)
    if key not in _BOTO:
        _BOTO[key] = _new_s3_client(storage)
    return _BOTO[key]


def _new_s3_client(storage: Storage) -> Any:
    return s3_session().create_client("s3", endpoint_url=storage.endpoint_url or None)


def s3_session() -> Any:
    """This process's botocore session (made once; :mod:`uniemo.data.s3_preload` loads its S3 model early)."""
    if "session" not in _BOTO:
        try:
            import botocore.session
        except ImportError:
            raise ConfigError(
                "s3:// shard sources need botocore; install it with pip install 'uniemo[cloud]'"
            ) from None
        _BOTO["session"] = botocore.session.get_session()
    return _BOTO["session"]


def _open_s3(location: str, storage: Storage) -> IO[bytes]:
    """A streaming GET of ``s3://bucket/key`` (botocore's StreamingBody, read in this process)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = location[len("s3://") :].partition("/")
    try:
        body: IO[bytes] = _s3_client(storage).get_object(Bucket=bucket, Key=key)["Body"]
        return body
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(f"{location}: {code}") from None
        raise OSError(f"{location}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"{location}: {exc}") from None


def worker_modules(locations: Iterable[str]) -> tuple[str, ...]:
    """Modules that loader workers reading ``locations`` import beyond the loader's own, for the fork server to
    import once (:mod:`uniemo.data.workers`): for ``s3://`` shards, botocore and a session with the S3 model
    loaded (:mod:`uniemo.data.s3_preload`); each worker still makes its own client (about 0.05 CPU seconds)."""
    return ("uniemo.data.s3_preload",) if any(url.startswith("s3://") for url in locations) else ()


# ---------------------------------------------------------------------------------------------------------
# Small files and sizes (checks before any worker starts)
# ---------------------------------------------------------------------------------------------------------
def fetch(location: str, storage: Storage, max_bytes: int, too_large: Callable[[], Exception]) -> bytes:
    """The whole (small) file at URL ``location``; :class:`SourceUnavailable` when absent or unreachable,
    ``too_large()`` when it holds more than ``max_bytes`` (read no further than that)."""
    if location.startswith("s3://"):
        data: bytes = _s3_call(location, storage, "get_object", max_bytes=max_bytes, too_large=too_large)
        return data
    if location.startswith("pipe:"):
        return _run_pipe(location, storage, max_bytes, too_large)
    body, _ = _http(location, "GET", storage, max_bytes=max_bytes, too_large=too_large)
    return body


def size_of(location: str, storage: Storage) -> int | None:
    """Bytes of the file at URL ``location`` (``None`` for ``pipe:``, which cannot tell without reading it)."""
    if location.startswith("pipe:"):
        return None
    if location.startswith("s3://"):
        return int(_s3_call(location, storage, "head_object")["ContentLength"])
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


def _http(
    location: str,
    method: str,
    storage: Storage,
    *,
    max_bytes: int = 0,
    too_large: Callable[[], Exception] | None = None,
) -> tuple[bytes, int | None]:
    """``(body, Content-Length)`` of one request with the storage timeout (a HEAD has an empty body; a GET reads
    at most ``max_bytes``, else ``too_large()``)."""
    request = urllib.request.Request(location, method=method, headers={"User-Agent": "uniemo"})
    try:
        with _OPENER.open(request, timeout=storage.timeout_s) as response:
            length = response.headers.get("Content-Length")
            body = b""
            if method == "GET":
                assert too_large is not None
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise too_large()
                body = read_capped(response, max_bytes, too_large)
            return body, int(length) if length is not None and length.isdigit() else None
    except urllib.error.HTTPError as exc:
        missing = exc.code in (403, 404, 410)
        raise SourceUnavailable(location, f"HTTP {exc.code} {exc.reason}", missing=missing) from None
    except urllib.error.URLError as exc:
        raise SourceUnavailable(location, f"unreachable: {exc.reason}", missing=False) from None
    except TimeoutError:
        raise SourceUnavailable(location, f"no answer within {storage.timeout_s:g} s", missing=False) from None
    except OSError as exc:
        raise SourceUnavailable(location, f"unreachable: {exc}", missing=False) from None


def _run_pipe(location: str, storage: Storage, max_bytes: int, too_large: Callable[[], Exception]) -> bytes:
    """The output of a ``pipe:`` command (the user's command, with a quoted file name), at most ``max_bytes``."""
    command = location[len("pipe:") :]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr)
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(max(storage.timeout_s, 30.0), stop)
        timer.start()
        try:
            assert proc.stdout is not None
            output = read_capped(proc.stdout, max_bytes, too_large)
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()
        if timed_out.is_set():
            raise SourceUnavailable(location, "the command did not finish", missing=False)
        if returncode != 0:
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
            lines = stderr.read().decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            raise SourceUnavailable(location, f"the command exited with {returncode}{detail}", missing=True)
    return output


def _s3_call(
    location: str,
    storage: Storage,
    method: str,
    *,
    max_bytes: int = 0,
    too_large: Callable[[], Exception] | None = None,
) -> Any:
    """One S3 request (``get_object``, read up to ``max_bytes``, or ``head_object``) of the checks: one attempt,
    the storage timeout."""
    from botocore.config import Config
    from botocore.exceptions import ClientError, NoCredentialsError

    bucket, _, key = location[len("s3://") :].partition("/")
    with _CHECK_LOCK:  # sizes_of asks from several threads; one client (thread-safe) serves them all
        cache_key = ("check", os.getpid(), storage)
        if cache_key not in _BOTO:
            config = Config(
                connect_timeout=storage.timeout_s, read_timeout=storage.timeout_s, retries={"max_attempts": 1}
            )
            _BOTO[cache_key] = s3_session().create_client(
                "s3", endpoint_url=storage.endpoint_url or None, config=config
            )
        client = _BOTO[cache_key]
    try:
        response = getattr(client, method)(Bucket=bucket, Key=key)
        if method != "get_object":
            return response
        assert too_large is not None
        if int(response.get("ContentLength") or 0) > max_bytes:
            response["Body"].close()
            raise too_large()
        return read_capped(response["Body"], max_bytes, too_large)
    except UserError:
        raise
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise SourceUnavailable(location, f"no such object ({code})", missing=True) from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise SourceUnavailable(
                location, f"access denied ({code}); check the AWS credentials (AWS_ACCESS_KEY_ID ...)", missing=True
            ) from None
        raise SourceUnavailable(location, f"S3 error {code}", missing=False) from None
    except NoCredentialsError:
        reason = "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        raise SourceUnavailable(location, reason, missing=False) from None
    except Exception as exc:  # botocore and urllib3 raise many types for an endpoint that does not answer
        text = str(exc).strip()
        reason = f"unreachable: {text.splitlines()[0] if text else type(exc).__name__}"
        raise SourceUnavailable(location, reason, missing=False) from None
