"""The data source of a config: which local shard folder ``data.*`` means, resolved once per process.

``data.shards`` names a shard folder or a URL of one (whose ``manifest.json`` and ``attributes.json`` are mirrored
into ``data.cache_dir``, its shards checked against the manifest); empty, it means the built-in synthetic set,
generated and sharded into ``data.cache_dir`` on first use (:func:`uniemo.data.shards.ensure_synthetic_shards`).
Resolving checks every shard of the folder (sizes; for a URL, a request per shard), so a driver that reads the
same source from several places (its checks, the loader of the real test split, the judge) resolves it once:
:func:`data_source` remembers what it resolved for as long as the folder's manifest is there.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from uniemo.data.shards import MANIFEST_FILE, ensure_synthetic_shards

_RESOLVED: dict[tuple[Any, ...], Path] = {}
_LOCK = threading.Lock()


def _key(data_cfg: Any) -> tuple[Any, ...]:
    syn, storage = data_cfg.synthetic, data_cfg.storage
    # Everything that picks the folder: the world and the label-scarce subset too (a full-set folder remembered
    # first must not be handed to a scarce run of the same process).
    return (data_cfg.shards, str(data_cfg.cache_dir), syn.images, syn.size, syn.seed, syn.shard_size, syn.world,
            data_cfg.labelled_per_emotion, data_cfg.min_attribute_count, data_cfg.phi_beta, storage.endpoint_url)


def data_source(data_cfg: Any, progress: bool = False) -> Path:
    """The local shard folder a run reads for ``data_cfg`` (module docstring); resolved (made, mirrored, checked)
    the first time, remembered after.

    Raises:
        DataError: the folder or URL holds no manifest, or a shard is missing or truncated.
    """
    key = _key(data_cfg)
    with _LOCK:
        folder = _RESOLVED.get(key)
    if folder is not None and (folder / MANIFEST_FILE).is_file():
        return folder
    folder = ensure_synthetic_shards(data_cfg, progress=progress)
    with _LOCK:
        _RESOLVED[key] = folder
    return folder
