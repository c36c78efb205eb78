"""The attribute table: scene/object vocabularies, counts per emotion, the attribute base and Phi (METHOD D6).

Built by the shard writer from the **train** records only and stored as ``attributes.json`` beside the
shards (``data/FORMAT.md``). The vocabularies index the batch fields ``scene_idx``, ``object_idx`` and
``objects_multi_hot``; the base and Phi feed the emotional correlation coefficient alpha (METHOD §3.5).

Project decision D6 replaces EmoGen's pickled tables: an attribute ``a`` seen in at least ``m`` training
images enters the base, and ``Phi[a][k] = (n(a,k) + beta) / (n(a) + 8 beta)`` where ``n(a,k)`` counts the
training images of emotion ``k`` showing ``a`` (an image counts once per distinct attribute). The raw counts
are kept in the file, so another ``m`` or ``beta`` (``data.min_attribute_count``, ``data.phi_beta``) is a
:meth:`AttributeTable.rebased` away, without re-sharding.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS
from uniemo.data.records import EMOTION_INDEX, Record
from uniemo.errors import DataError

if TYPE_CHECKING:
    import torch

ATTRIBUTES_FILE = "attributes.json"


@dataclass
class AttributeTable:
    """Vocabularies, per-emotion counts, the attribute base and Phi of one shard folder.

    ``scenes`` and ``objects`` are sorted vocabularies of every name seen in train. The base lists objects
    first, then scenes (METHOD §3.5 order), each sorted by name; ``phi`` rows align with it.
    """

    scenes: list[str]
    objects: list[str]
    scene_counts: dict[str, list[int]]
    object_counts: dict[str, list[int]]
    min_count: int = 5
    beta: float = 1.0
    base_names: list[str] = field(default_factory=list)
    base_kinds: list[str] = field(default_factory=list)
    """``"object"`` or ``"scene"`` per base entry (a name may appear once of each kind)."""
    phi_rows: list[list[float]] = field(default_factory=list)
    emotions: list[str] = field(default_factory=lambda: list(EMOTIONS))

    def __post_init__(self) -> None:
        self._scene_index = {name: i for i, name in enumerate(self.scenes)}
        self._object_index = {name: i for i, name in enumerate(self.objects)}

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def from_counts(
        cls,
        scene_counts: dict[str, list[int]],
        object_counts: dict[str, list[int]],
        min_count: int = 5,
        beta: float = 1.0,
    ) -> AttributeTable:
        """Derive vocabularies, base and Phi from per-emotion counts (METHOD D6)."""
        if min_count < 1:
            raise DataError(
                f"the attribute minimum count must be >= 1, got {min_count}; set data.min_attribute_count"
            )
        if beta < 0:
            raise DataError(f"the Phi smoothing beta must be >= 0, got {beta}; set data.phi_beta")
        base_names: list[str] = []
        base_kinds: list[str] = []
        phi_rows: list[list[float]] = []
        # METHOD §3.5: the base is objects, then scenes.
        for kind, counts in (("object", object_counts), ("scene", scene_counts)):
            for name in sorted(counts):
                n_ak = counts[name]
                n_a = sum(n_ak)
                if n_a < min_count:
                    continue
                denom = n_a + NUM_EMOTIONS * beta
                base_names.append(name)
                base_kinds.append(kind)
                phi_rows.append([(n + beta) / denom for n in n_ak])
        return cls(
            scenes=sorted(scene_counts),
            objects=sorted(object_counts),
            scene_counts={k: list(scene_counts[k]) for k in sorted(scene_counts)},
            object_counts={k: list(object_counts[k]) for k in sorted(object_counts)},
            min_count=min_count,
            beta=beta,
            base_names=base_names,
            base_kinds=base_kinds,
            phi_rows=phi_rows,
        )

    @classmethod
    def from_records(cls, records: Iterable[Record], min_count: int = 5, beta: float = 1.0) -> AttributeTable:
        """Count scenes and objects per emotion over ``records`` (pass the train split only)."""
        scene_counts: dict[str, list[int]] = {}
        object_counts: dict[str, list[int]] = {}
        for record in records:
            k = EMOTION_INDEX[record.emotion]
            if record.scene:
                scene_counts.setdefault(record.scene, [0] * NUM_EMOTIONS)[k] += 1
            for name in dict.fromkeys(o for o in record.objects if o):  # an image counts once per object
                object_counts.setdefault(name, [0] * NUM_EMOTIONS)[k] += 1
        return cls.from_counts(scene_counts, object_counts, min_count, beta)

    def rebased(self, min_count: int, beta: float) -> AttributeTable:
        """The same counts with another ``m`` and ``beta`` (vocabularies unchanged)."""
        if min_count == self.min_count and beta == self.beta:
            return self
        return AttributeTable.from_counts(self.scene_counts, self.object_counts, min_count, beta)

    # -- lookups ---------------------------------------------------------------------------------------
    @property
    def unannotated_kinds(self) -> list[str]:
        """``"scene"`` / ``"object"`` for each kind of annotation the train data has none of (an image folder:
        both)."""
        return [kind for kind, names in (("scene", self.scenes), ("object", self.objects)) if not names]

    @property
    def phi(self) -> torch.Tensor:
        """Phi as float32 ``[A, 8]`` aligned with :attr:`base_names` (A may be 0)."""
        import torch

        if not self.phi_rows:
            return torch.zeros(0, NUM_EMOTIONS, dtype=torch.float32)
        return torch.tensor(self.phi_rows, dtype=torch.float32)

    def scene_index(self, name: str | None) -> int:
        """Index of ``name`` in :attr:`scenes`, -1 when absent or unknown."""
        return self._scene_index.get(name, -1) if name else -1

    def object_index(self, name: str | None) -> int:
        """Index of ``name`` in :attr:`objects`, -1 when absent or unknown."""
        return self._object_index.get(name, -1) if name else -1

    # -- files -----------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {
            "emotions": list(self.emotions),
            "scenes": list(self.scenes),
            "objects": list(self.objects),
            "scene_counts": self.scene_counts,
            "object_counts": self.object_counts,
            "min_count": self.min_count,
            "beta": self.beta,
            "base": [{"name": n, "kind": k} for n, k in zip(self.base_names, self.base_kinds, strict=True)],
            "phi": self.phi_rows,
        }

    def save(self, path: str | Path) -> None:
        """Write ``attributes.json`` atomically (temporary file, then rename)."""
        write_json_atomic(Path(path), self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> AttributeTable:
        """Read an ``attributes.json`` (a file, or a shard folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / ATTRIBUTES_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path} not found; write the shard folder with `uniemo data shards`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(
                f"{path}: not a valid attribute table ({e}); rewrite it with `uniemo data shards`"
            ) from None
        try:
            if list(data["emotions"]) != list(EMOTIONS):
                raise DataError(
                    f"{path}: emotion order {data['emotions']} differs from {list(EMOTIONS)} (METHOD D1)"
                )
            base = data["base"]
            return cls(
                scenes=list(data["scenes"]),
                objects=list(data["objects"]),
                scene_counts={k: [int(x) for x in v] for k, v in data["scene_counts"].items()},
                object_counts={k: [int(x) for x in v] for k, v in data["object_counts"].items()},
                min_count=int(data["min_count"]),
                beta=float(data["beta"]),
                base_names=[b["name"] for b in base],
                base_kinds=[b["kind"] for b in base],
                phi_rows=[[float(x) for x in row] for row in data["phi"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}: malformed attribute table ({e!r}); rewrite it with `uniemo data shards`"
            ) from None


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is shared by every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
