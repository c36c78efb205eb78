"""Reading a shard's tar members, capped: the one tar reader of the loader and of the latents writer.

Nothing is ever extracted to disk; a member that no shard written by ``uniemo data shards`` holds (a link, a
special file, a name that leaves the archive) makes the shard corrupt, and what a shard may hold is capped
(``data.limits``).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from uniemo.config.schema import LimitsConfig
from uniemo.data.limits import DEFAULT_LIMITS, over_cap
from uniemo.errors import DataError


def tar_members(
    src: Iterator[dict[str, Any]], handler: Callable[[Exception], bool], limits: LimitsConfig = DEFAULT_LIMITS
) -> Iterator[dict[str, Any]]:
    """The members of each opened shard as ``{fname, data, __url__}``, then ``{}`` at the shard's end (what
    ``webdataset``'s ``group_by_keys`` reads), from a plain, gzip, bzip2 or xz tar.

    Nothing is ever extracted to disk, and a shard that is not what ``uniemo data shards`` writes is a corrupt shard
    (``handler``): one holding a link, a device or a fifo, or a member whose name is absolute or holds ``..``. A
    member over ``data.limits.max_member_bytes``, or a shard whose members add up to more than ``max_shard_bytes``
    (after decompression), is refused from the tar headers, before its bytes are read: a :class:`DataError` naming
    the cap, not a skip (a decompression bomb is not a damaged file)."""
    for source in src:
        url = source["url"]
        try:
            total = 0
            with tarfile.open(fileobj=source["stream"], mode="r|*") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    name = info.name
                    if not info.isreg():
                        raise ValueError(f"{url}: member {name!r} is a link or special file, which shards never hold")
                    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                        raise ValueError(f"{url}: member name {name!r} is absolute or leaves the archive")
                    if info.size > limits.max_member_bytes:
                        raise over_cap(f"shard {url}: member {name!r} holds {info.size:,} bytes", "max_member_bytes",
                                       limits.max_member_bytes)
                    total += info.size
                    if total > limits.max_shard_bytes:
                        raise over_cap(f"shard {url}: its members hold more than the cap", "max_shard_bytes",
                                       limits.max_shard_bytes)
                    member = tar.extractfile(info)
                    assert member is not None  # a regular file
                    yield {"fname": name, "data": member.read(), "__url__": url}
                    tar.members = []  # type: ignore[attr-defined]  # stream mode: keep no headers already read
            yield {}
        except DataError:
            raise
        except Exception as exn:  # a truncated or damaged tar, a foreign member: the shard's read is counted
            if handler(exn):
                continue
            return
