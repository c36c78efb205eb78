"""Where Ray puts the trainers and the feedback pool's actors, and the record of where they ran.

``distributed.placement`` is Ray's placement-group strategy for the workers (``pack``, ``spread``, ``strict_pack``,
``strict_spread``, :data:`PLACEMENT_STRATEGIES`); ``distributed.worker_resource`` (and ``feedback.actor_resource``)
names a custom resource each worker (actor) asks a tiny share of (:data:`RESOURCE_SHARE`), so they run only on nodes
started with it (``ray start --resources '{"trainers": 1}'``). A resource no node has is a one-line error before
training starts (:func:`check_custom_resource`). Every start of a trainer or pool actor appends where it runs (Ray
node id, address, the node's custom resources) to ``<run_dir>/workers/placement.jsonl`` (:func:`record_placement`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from uniemo.errors import UserError
from uniemo.run_layout import PLACEMENT_FILE

RESOURCE_SHARE = 0.001
"""The share of a custom resource (``distributed.worker_resource``, ``feedback.actor_resource``) one worker or
actor asks for: the resource selects nodes and never limits how many run there."""

PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK",
                        "strict_spread": "STRICT_SPREAD"}
"""``distributed.placement`` -> Ray's placement-group strategy of the workers."""


def record_placement(run_dir: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append ``records`` (:func:`uniemo.distributed.env.ray_node_record`) to ``<run_dir>/workers/placement.jsonl``,
    one JSON line each, in one ``O_APPEND`` write (processes on several nodes append to the same file)."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    if not data:
        return
    path = Path(run_dir) / PLACEMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_placement(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/workers/placement.jsonl``, oldest first (none: an empty list)."""
    path = Path(run_dir) / PLACEMENT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_custom_resource(name: str, key: str) -> None:
    """One line when no node of the connected Ray cluster offers the custom resource ``name`` (set as ``key``):
    the workers or actors asking for it would wait forever."""
    if not name:
        return
    import ray

    if ray.cluster_resources().get(name, 0) <= 0:
        raise UserError(
            f"{key}={name}: no node of the Ray cluster has the custom resource {name!r}; start the nodes meant for "
            f"it with `ray start ... --resources '{{\"{name}\": 1}}'`, or set {key}= (empty) to use any node"
        )


