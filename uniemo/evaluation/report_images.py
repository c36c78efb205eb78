"""The pictures the report shows: real test images read from a run's shards, generated ones from the run.

Real examples come from the test split of the shard folder the runs trained on (``data.shards`` of their
``config.yaml``, a folder or a URL, else the synthetic set's cache), read through the loader's stages in shard
order. Generated images are the PNGs (or JPEGs) ``uniemo evaluate`` wrote (``<run>/eval/generated/<emotion>/``),
else the sample grids the
run logged in training (``<run>/samples/<emotion>.png``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from uniemo.config import load_config
from uniemo.config.schema import EMOTIONS
from uniemo.data.images import read_rgb, to_rgb
from uniemo.data.loader import list_split_shards, read_split_samples
from uniemo.data.shards import MANIFEST_FILE, resolve_shard_folder, synthetic_shards_folder
from uniemo.data.transforms import resize_center_crop
from uniemo.errors import UserError
from uniemo.evaluation.report_collect import ReportData
from uniemo.run_layout import (
    CONFIG_FILE,
    EVAL_DIR,
    GENERATED_DIR,
    SAMPLES_DIR,
    generated_dir,
    sample_grid_path,
)

__all__ = ["EXAMPLES_PER_EMOTION", "TILE", "generated_images", "read_examples", "shard_folder", "tiles"]

EXAMPLES_PER_EMOTION = 6
"""Real and generated images shown per emotion."""
TILE = 96
"""Side in pixels of one example image in the grids."""


def shard_folder(data: ReportData) -> tuple[Path | None, str]:
    """The real shard folder the runs trained on (``data.shards``: a folder, or a URL source's local mirror; else
    the synthetic set's cache, never made here), or why there is none."""
    candidates = [data.evaluated, data.model_run, *data.runs.values()]
    if data.pipeline:
        candidates.append(data.target)
    seen = set()
    why = "no run folder has a readable config.yaml"
    for run in candidates:
        if run is None or run in seen or not (run / CONFIG_FILE).is_file():
            continue
        seen.add(run)
        try:
            cfg = load_config(run / CONFIG_FILE)
            folder = (resolve_shard_folder(cfg.data.shards, cfg.data, key="data.shards") if cfg.data.shards
                      else synthetic_shards_folder(cfg.data))
        except UserError as e:
            why = f"{run / CONFIG_FILE}: {e}"
            continue
        if (folder / MANIFEST_FILE).is_file():
            return folder, ""
        why = f"the shard folder of {run.name} ({folder}) has no manifest.json"
    return None, why


def read_examples(shards: Path, per_emotion: int) -> tuple[str | None, dict[str, list[Image.Image]]]:
    """Up to ``per_emotion`` images of each emotion from the test split of ``shards`` (val when there is no
    test split), in shard order, read through the loader's stages (:func:`uniemo.data.loader.read_split_samples`:
    local shards or a URL source's): (split, {emotion: [PIL image]})."""
    found: dict[str, list[Image.Image]] = {e: [] for e in EMOTIONS}
    for split in ("test", "val"):
        if list_split_shards([shards], split, required=False):
            break
    else:
        return None, found
    for sample in read_split_samples(shards, split):
        try:
            emotion = EMOTIONS[int(sample["cls"])]
        except (KeyError, ValueError, IndexError):
            continue
        data = sample.get("jpg") or sample.get("png")
        if data is None or len(found[emotion]) >= per_emotion:
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                found[emotion].append(to_rgb(image))
        except Exception:  # a corrupt image is skipped, as the loader skips it
            continue
        if all(len(v) >= per_emotion for v in found.values()):
            break
    return split, found


def tiles(images: list[Image.Image], size: int = TILE) -> np.ndarray:
    """``[N, size, size, 3]`` uint8: each image resized and centre-cropped to a square tile."""
    return np.stack([np.asarray(resize_center_crop(to_rgb(image), size)) for image in images])


def generated_images(data: ReportData) -> tuple[str, dict[str, list[Image.Image] | Path]]:
    """(where they come from, {emotion: list of PIL images | a grid file})."""
    runs: list[Path] = []
    for run in (data.evaluated, *(data.runs.get(k) for k in ("feedback", "stage2", "run"))):
        if run is not None and run not in runs:
            runs.append(run)
    for run in runs:
        folder = generated_dir(run)
        if folder.is_dir():
            found: dict[str, list[Image.Image] | Path] = {}
            for emotion in EMOTIONS:
                # PNG, or JPEG with evaluation.image_format=jpg
                files = sorted([*(folder / emotion).glob("*.png"), *(folder / emotion).glob("*.jpg")])
                files = files[:EXAMPLES_PER_EMOTION]
                if files:
                    found[emotion] = [read_rgb(f) for f in files]
            if found:
                return f"{data.run_label(run)}/{EVAL_DIR}/{GENERATED_DIR} (uniemo evaluate)", found
    for run in runs:
        grids: dict[str, list[Image.Image] | Path] = {
            e: sample_grid_path(run, e) for e in EMOTIONS if sample_grid_path(run, e).is_file()
        }
        if grids:
            return f"{data.run_label(run)}/{SAMPLES_DIR} (sample grids logged in training)", grids
    return "", {}
