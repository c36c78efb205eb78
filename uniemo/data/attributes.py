"""The attribute table: scene/object vocabularies, counts per emotion, the attribute base and Phi (METHOD D6).

Built by the shard writer from the **train** records only and stored as ``attributes.json`` beside the
shards (``data/FORMAT.md``). The vocabularies index the batch fields ``scene_idx``, ``object_idx`` and
``objects_multi_hot``; the base and Phi feed the emotional correlation coefficient alpha (METHOD §3.5).

Project decision D6 replaces EmoGen's pickled tables: an attribute ``a`` seen in at least ``m`` training
images enters the base, and ``Phi[a][k] = (n(a,k) + beta) / (n(a) + 8 beta)`` where ``n(a,k)`` counts the
training images of emotion ``k`` showing ``a`` (an image counts once per distinct attribute). The raw counts
are kept in the file, so another ``m`` or ``beta`` (``data.min_attribute_count``, ``data.phi_beta``) is a
:meth:`AttributeTable.rebased` away, without re-sharding.

EmoGen's own tables, the ones the official stage 2 reads (METHOD §3.5, §8.2), are imported by
:func:`import_emogen` (``uniemo data attributes --from-emogen DIR``) into a JSON attribute base that
``data.attributes=emogen`` puts in place of the counted base and Phi (:func:`resolve_attribute_table`). The
pickles are read by a restricted unpickler that builds only containers, strings, numbers and numpy arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniemo.atomic import atomic_write
from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS
from uniemo.data.records import EMOTION_INDEX, Record
from uniemo.errors import DataError
from uniemo.run_layout import ATTRIBUTES_FILE

if TYPE_CHECKING:
    import torch


EMOGEN_BASE_FILES = ("object_attr.pkl", "scene_attr.pkl")
"""EmoGen's curated attribute names per emotion, objects then scenes: the base A (METHOD §3.5, 156 + 122 = 278)."""
EMOGEN_PHI_FILES = ("attr_coefficient_emotion_scene.pkl", "attr_coefficient_emotion_object.pkl")
"""EmoGen's classifier confidences per attribute name, scenes then objects (an object entry overwrites a scene
entry of the same name, as the official ``get_coefficient``): Phi over 655 names."""
EMOGEN_ALL_NAMES_FILE = "all_attribute_object_scene.pkl"
"""EmoGen's list of every attribute name (655), used by its inference to name an image; optional here."""
EMOGEN_FORMAT = "uniemo-emogen-attributes"
EMOGEN_FORMAT_VERSION = 1


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
    base_source: str = "counts"
    """``counts``: base and Phi derived from the counts (D6); ``emogen``: EmoGen's tables (:func:`import_emogen`),
    which re-basing leaves alone."""

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
        """The same counts with another ``m`` and ``beta`` (vocabularies unchanged); an EmoGen base is kept."""
        if self.base_source != "counts" or (min_count == self.min_count and beta == self.beta):
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
            "base_source": self.base_source,
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
                base_source=str(data.get("base_source", "counts")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}: malformed attribute table ({e!r}); rewrite it with `uniemo data shards`"
            ) from None


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0o644 whatever the umask: a manifest is shared by every reader.
    atomic_write(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n", mode=0o644)


# -- EmoGen's tables (METHOD §3.5, §8.2, D6) -----------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled array or scalar names, under numpy 1.x and 2.x module paths."""
    import numpy as np

    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    allowed[("_codecs", "encode")] = __import__("codecs").encode  # protocol-2 pickles store bytes through it
    return allowed


class _TableUnpickler(pickle.Unpickler):
    """Builds plain containers, strings, numbers and numpy arrays; any other global is refused (never run)."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: the pickle asks for {module}.{name}, which an EmoGen attribute table does not "
                "hold; use the dataset_balance/ files of the EmoGen repository as downloaded"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._path}: a pickle with persistent ids is not an EmoGen attribute table")


def _read_pickle(path: Path) -> tuple[Any, str]:
    """The unpickled content of ``path`` (restricted) and the file's sha256."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path} not found; --from-emogen takes EmoGen's dataset_balance/ folder, holding "
            + ", ".join(EMOGEN_BASE_FILES + EMOGEN_PHI_FILES)
        ) from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        value = _TableUnpickler(data, path).load()
    except DataError:
        raise
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds
        raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); download it again") from None
    return value, hashlib.sha256(data).hexdigest()


def _names_by_emotion(value: Any, path: Path) -> list[str]:
    """EmoGen's ``{attr_<emotion>: [names]}``, flattened in the file's order (the official ``read_attr``)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v)
        for k, v in value.items()
    ):
        raise DataError(f"{path}: expected a dict of attr_<emotion> -> list of names (EmoGen's format)")
    return [name for names in value.values() for name in names]


def _confidences(value: Any, path: Path) -> dict[str, list[float]]:
    """EmoGen's ``{name: 8 emotion confidences}`` as plain floats, checked."""
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a dict of attribute name -> 8 emotion confidences (EmoGen's format)")
    table: dict[str, list[float]] = {}
    for name, row in value.items():
        try:
            floats = [float(x) for x in (row.tolist() if hasattr(row, "tolist") else row)]
        except (TypeError, ValueError):
            floats = []
        if not isinstance(name, str) or len(floats) != NUM_EMOTIONS or not all(
            math.isfinite(x) and x >= 0 for x in floats
        ):
            raise DataError(
                f"{path}: entry {name!r} is not {NUM_EMOTIONS} non-negative confidences ({row!r:.80}); "
                "use the file of the EmoGen repository as downloaded"
            )
        table[name] = floats
    return table


def import_emogen(folder: str | Path) -> dict[str, Any]:
    """EmoGen's ``dataset_balance/`` tables as uniemo's attribute base (METHOD §3.5, §8.2).

    The base is the names of ``object_attr.pkl`` then ``scene_attr.pkl`` in file order, duplicates kept (278
    names, 274 distinct, in the official files); Phi is ``attr_coefficient_emotion_scene.pkl`` updated by
    ``attr_coefficient_emotion_object.pkl`` (655 names). A base name that Phi lacks gets a zero row: alpha 0, as
    the official code sets it (``carousel``, which EmoSet spells ``carrousel``).

    Returns:
        The JSON-ready attribute base (see :func:`load_emogen_base`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give EmoGen's dataset_balance/ folder")
    sources: dict[str, str] = {}
    names: list[str] = []
    kinds: list[str] = []
    for file_name, kind in zip(EMOGEN_BASE_FILES, ("object", "scene"), strict=True):
        value, sources[file_name] = _read_pickle(folder / file_name)
        found = _names_by_emotion(value, folder / file_name)
        names += found
        kinds += [kind] * len(found)
    phi_table: dict[str, list[float]] = {}
    for file_name in EMOGEN_PHI_FILES:
        value, sources[file_name] = _read_pickle(folder / file_name)
        phi_table.update(_confidences(value, folder / file_name))
    all_names: list[str] | None = None
    if (folder / EMOGEN_ALL_NAMES_FILE).is_file():
        value, sources[EMOGEN_ALL_NAMES_FILE] = _read_pickle(folder / EMOGEN_ALL_NAMES_FILE)
        if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
            raise DataError(f"{folder / EMOGEN_ALL_NAMES_FILE}: expected a list of attribute names (EmoGen's format)")
        all_names = list(value)
    if not names:
        raise DataError(f"{folder}: {' and '.join(EMOGEN_BASE_FILES)} list no attribute names")
    zero = [0.0] * NUM_EMOTIONS
    return {
        "format": EMOGEN_FORMAT,
        "version": EMOGEN_FORMAT_VERSION,
        "emotions": list(EMOTIONS),
        "base": [{"name": n, "kind": k} for n, k in zip(names, kinds, strict=True)],
        "phi": [list(phi_table.get(n, zero)) for n in names],
        "without_phi": sorted({n for n in names if n not in phi_table}),
        "phi_table": phi_table,
        "all_names": all_names,
        "sources": sources,
    }


def load_emogen_base(path: str | Path) -> dict[str, Any]:
    """Read an attribute base written by ``uniemo data attributes --from-emogen`` (checked)."""
    path = Path(path)
    hint = "write it with `uniemo data attributes --from-emogen <EmoGen dataset_balance folder> --out <file>`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data.attribute_base {path} not found; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data.attribute_base {path} is not readable ({e}); {hint}") from None
    if not isinstance(data, dict) or data.get("format") != EMOGEN_FORMAT:
        raise DataError(f"data.attribute_base {path} is not an EmoGen attribute base; {hint}")
    if data.get("version") != EMOGEN_FORMAT_VERSION or list(data.get("emotions", [])) != list(EMOTIONS):
        raise DataError(f"data.attribute_base {path} has another version or emotion order; {hint}")
    return data


def resolve_attribute_table(table: AttributeTable, data_cfg: Any) -> AttributeTable:
    """The run's table: the counted base and Phi re-based for ``data.min_attribute_count`` / ``data.phi_beta``, or,
    with ``data.attributes=emogen``, EmoGen's base and Phi from ``data.attribute_base`` (vocabularies kept)."""
    if data_cfg.attributes != "emogen":
        return table.rebased(data_cfg.min_attribute_count, data_cfg.phi_beta)
    base = load_emogen_base(data_cfg.attribute_base)
    return AttributeTable(
        scenes=list(table.scenes),
        objects=list(table.objects),
        scene_counts=table.scene_counts,
        object_counts=table.object_counts,
        min_count=table.min_count,
        beta=table.beta,
        base_names=[b["name"] for b in base["base"]],
        base_kinds=[b["kind"] for b in base["base"]],
        phi_rows=[[float(x) for x in row] for row in base["phi"]],
        base_source="emogen",
    )
