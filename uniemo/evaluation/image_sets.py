"""The image sets the paper's metrics read: folders laid out ``<emotion>/<images>``, or a split of local shards.

An :class:`ImageSet` maps each emotion to :class:`ImageRef` s, references that open an image only when a metric
reads it, so a real set as large as EmoSet (118k images) is never held in memory:

- :func:`read_image_folder`: ``<root>/<emotion>/*.{jpg,png,...}``, the layout of EmoSet's ``image/`` folder, of
  EmoGen's and plain SD's outputs and of ``<run>/eval/generated/``. Emotion folders are matched as the project's
  folder reader matches them (:func:`uniemo.data.folders.list_emotion_folders`: names in any case, the same
  image formats, system files ignored). A folder named after no emotion is refused, so that no image is
  silently left out.
- :func:`read_shard_split`: the images of one split of a local shard folder (``data/FORMAT.md``), read in place
  from the tar files by offset.

:func:`iter_batches` turns references into batches through a transform, with loader workers.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from uniemo.config.schema import EMOTIONS
from uniemo.data.folders import describe_ignored, list_emotion_folders
from uniemo.data.images import to_rgb
from uniemo.data.loader import list_split_shards
from uniemo.data.records import SkipLog
from uniemo.data.workers import loader_worker_options
from uniemo.errors import DataError


@dataclass(frozen=True)
class ImageRef:
    """One image: a file, or a member of a tar file (``offset``/``size`` of its bytes in ``path``)."""

    path: Path
    offset: int = -1
    size: int = 0
    name: str = ""
    """What messages call it (the member name of a tar image; the path of a file)."""

    def open(self) -> Image.Image:
        """The image as RGB (EXIF orientation applied, as the project's loader reads it)."""
        try:
            if self.offset < 0:
                with Image.open(self.path) as image:
                    return to_rgb(image)
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
            with Image.open(io.BytesIO(data)) as image:
                return to_rgb(image)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {self.name or self.path} ({e}); remove or replace it") from None


@dataclass
class ImageSet:
    """Images by emotion (EmoSet order), and where they come from."""

    source: str
    by_emotion: dict[str, list[ImageRef]] = field(default_factory=dict)
    ignored: str = ""
    """What the reader left out (system files, files beside the emotion folders, ...), as one phrase."""

    @property
    def emotions(self) -> list[str]:
        """The emotions that have images, in EmoSet order."""
        return [e for e in EMOTIONS if self.by_emotion.get(e)]

    def counts(self) -> dict[str, int]:
        return {e: len(self.by_emotion.get(e, [])) for e in EMOTIONS}

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_emotion.values())

    def describe(self) -> dict[str, Any]:
        """For ``metrics.json``: source, image count, per-emotion counts and what was ignored."""
        out: dict[str, Any] = {"source": self.source, "images": len(self), "per_emotion": self.counts()}
        if self.ignored:
            out["ignored"] = self.ignored
        return out


def read_image_folder(root: str | Path, what: str) -> ImageSet:
    """The images of ``<root>/<emotion>/`` (module docstring); ``what`` names the folder in messages (``--real``).

    Raises:
        DataError: ``root`` is missing, holds no image, or has image folders named after no emotion (one line).
    """
    root = Path(root).expanduser()
    ignored = SkipLog()
    try:
        by_emotion, problems = list_emotion_folders(root, ignored)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    if problems:
        bad = sorted({Path(str(p).split(": ", 1)[0]).parent.name for p in problems})
        raise DataError(
            f"{what}: {root} has image folders named after no emotion ({', '.join(bad)}); the layout is "
            f"<folder>/<emotion>/<images> with the emotions {', '.join(EMOTIONS)}: rename or move them"
        )
    refs = {e: [ImageRef(f, name=str(f)) for f in files] for e, files in by_emotion.items() if files}
    return ImageSet(str(root), refs, describe_ignored(ignored.as_dict()))


def read_shard_split(folder: str | Path, split: str) -> ImageSet:
    """The images of ``split`` in the local shard folder ``folder`` by emotion (each sample's ``cls``).

    Raises:
        DataError: the folder has no such split, or lists a shard that is not a local file.
    """
    refs = list_split_shards([Path(folder)], split, required=True)
    if not refs:
        raise DataError(f"shard folder {folder} has no {split} split; set evaluation.real_images to an image folder")
    by_emotion: dict[str, list[ImageRef]] = {}
    for ref in refs:
        path = Path(ref.url)
        if not path.is_file():
            raise DataError(
                f"shard {ref.url} is not a local file; set evaluation.real_images to a local image folder "
                "(<emotion>/<images>)"
            )
        for emotion, member, offset, size in _tar_images(path):
            by_emotion.setdefault(emotion, []).append(ImageRef(path, offset, size, f"{path.name}:{member}"))
    return ImageSet(f"{folder} ({split} split)", by_emotion)


def _tar_images(path: Path) -> Iterator[tuple[str, str, int, int]]:
    """(emotion, member name, data offset, size) of each sample's image in one shard, in shard order."""
    # Members of a sample are consecutive, named <key>.<ext> (uniemo.data.shards): the label is in <key>.cls.
    with tarfile.open(path, mode="r:") as tar:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            if member.isfile():
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                samples.setdefault(key, {})[ext] = member
        for members in samples.values():
            image = members.get("jpg") or members.get("png")
            label = members.get("cls")
            if image is None or label is None:
                continue
            content = tar.extractfile(label)
            try:
                emotion = EMOTIONS[int(content.read()) if content else -1]
            except (ValueError, IndexError):
                continue
            yield emotion, image.name, image.offset_data, image.size


def _identity(batch: list[Any]) -> list[Any]:
    return batch


class _Images(torch.utils.data.Dataset):
    """A map-style dataset of references through a transform (module-level, so loader workers pickle it)."""

    def __init__(self, refs: Sequence[ImageRef], transform: Callable[[Image.Image], Any]):
        self.refs = list(refs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.refs[i].open())


def iter_batches(
    refs: Sequence[ImageRef],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    workers: int = 0,
    stack: bool = True,
    preload: Sequence[str] = (),
) -> Iterator[Any]:
    """Batches of ``transform(image)`` in order: stacked tensors (``stack``), else lists (PIL images, tensors of
    different sizes). ``workers`` loader processes decode the images; ``preload`` names the modules they need
    (the transform's), for their fork server to import once (:mod:`uniemo.data.workers`)."""
    if not refs:
        return
    loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(
        _Images(refs, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=None if stack else _identity, **loader_worker_options(workers, preload),
    )
    yield from loader

