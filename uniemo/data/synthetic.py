"""The project's synthetic emotion set, written in the exact EmoSet-118K layout (METHOD.md §8.1).

Every test and the CPU demo train on it, so it has to behave like a small real dataset:

- each of the 8 emotions (METHOD.md §1) has its own palette (hue, saturation, brightness), its favourite
  scenes (background patterns) and objects (1-3 drawn shapes);
- those cues OVERLAP: palettes are jittered and one image in ~six takes the palette of another emotion, and
  every scene and object can occur with every emotion. A small CNN learns the task well but not perfectly;
- attributes carry emotion information UNEVENLY: a few scenes/objects are tied to one emotion (``rainy_street``
  to sadness, ``Heart`` to contentment), others are spread over all eight (``checkered_floor``, ``Circle``), so
  the correlation table Phi of METHOD.md D6 has both sharp and flat rows.

Generation is deterministic for a seed: image ``i`` draws from a generator seeded by ``(seed, i)``, so the
bytes do not depend on ``workers`` or chunking. ``brightness`` and ``colorfulness`` are measured on the drawn
image (mean HSV value and saturation) and rounded to EmoSet's 0.1 bins.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from uniemo.atomic import atomic_write
from uniemo.config.schema import EMOTIONS
from uniemo.data.folders import split_counts
from uniemo.data.records import SPLITS
from uniemo.errors import ConfigError

SPLIT_RATIOS: tuple[float, float, float] = (0.75, 0.10, 0.15)
"""Train/val/test share of every emotion (stratified)."""

SCENES: tuple[str, ...] = (
    "striped_wall",
    "checkered_floor",
    "polka_dot_room",
    "ocean_waves",
    "sky_gradient",
    "office_grid",
    "ripple_pond",
    "foggy_field",
    "brick_wall",
    "rainy_street",
    "starry_night",
    "sunburst_plaza",
    "mossy_ground",
)
"""Scene names (EmoSet style: lowercase with underscores); each is a background pattern."""

OBJECTS: tuple[str, ...] = (
    "Circle",
    "Square",
    "Triangle",
    "Star",
    "Heart",
    "Cross",
    "Diamond",
    "Ring",
    "Crescent",
    "Hexagon",
    "Arrow",
    "Lightning bolt",
)
"""Object names (EmoSet style: capitalised with spaces); each is a drawn shape."""

JPEG_QUALITY = 90

# --- worlds ------------------------------------------------------------------------------------------------
# A world is the set of generative tables that decide what an image of each emotion looks like: the palette of
# each emotion, how often an image takes another emotion's palette, and P(scene | emotion), P(objects | emotion).
# The drawing code (scenes, objects, colours) is shared by every world.


@dataclass(frozen=True)
class World:
    """The generative tables of a synthetic world (the module docstring says how an image is drawn from them)."""

    name: str
    palettes: dict[str, tuple[float, float, float, float]]
    """Per emotion: hue centre and spread (degrees), saturation and value centres (0-1)."""
    off_palette_p: float
    """Chance that an image takes the palette of another emotion (uniform over the other 7)."""
    scene_weights: dict[str, tuple[float, ...]]
    """Per scene, a weight per emotion (EMOTIONS order); ``scene_base`` is added to every entry."""
    scene_base: float
    object_weights: dict[str, tuple[float, ...]]
    """Per object, a weight per emotion; ``object_base`` is added to every entry."""
    object_base: float
    hue_jitter: float = 1.0
    sv_jitter: float = 0.07
    object_counts: tuple[float, float, float] = (0.45, 0.35, 0.20)
    """P(1, 2, 3 objects in an image); objects are drawn without replacement from P(object | emotion)."""
    pattern_scale: float = 1.0
    """Size of the scene patterns (stripes, cells, dots, waves, bricks, rings, drops) relative to the easy world."""
    bg2_value: tuple[float, float] = (0.55, 0.85)
    """The pattern's second colour has the value of the first times a draw from this range (lower: more contrast)."""
    object_radius: tuple[float, float] = (0.12, 0.26)
    """Object radius as a fraction of the image side (drawn uniformly)."""
    scenes: tuple[str, ...] = ()
    """The world's scene names, in the order of its tables; empty: :data:`SCENES`."""

    @property
    def scene_names(self) -> tuple[str, ...]:
        return self.scenes or SCENES

    @property
    def p_scene(self) -> np.ndarray:
        """P(scene | emotion), [E, S] in :attr:`scene_names` order."""
        return _conditional(self.scene_weights, self.scene_names, self.scene_base)

    @property
    def p_object(self) -> np.ndarray:
        """P(object | emotion) of one draw, [E, O] in OBJECTS order."""
        return _conditional(self.object_weights, OBJECTS, self.object_base)


def _conditional(table: dict[str, tuple[float, ...]], names: Sequence[str], base: float) -> np.ndarray:
    """P(attribute | emotion) as an [E, A] array from a weight table (rows: ``names`` order)."""
    w = np.array([table[name] for name in names], dtype=np.float64).T + base
    return w / w.sum(axis=1, keepdims=True)


EASY = World(
    name="easy",
    # Each emotion has its own palette. Neighbouring emotions share hues on purpose (anger/excitement red,
    # awe/sadness blue, fear/sadness dark) so that colour alone does not decide the class, but it nearly does.
    palettes={
        "amusement": (52.0, 12.0, 0.80, 0.92),
        "awe": (228.0, 15.0, 0.65, 0.75),
        "contentment": (115.0, 18.0, 0.50, 0.80),
        "excitement": (22.0, 10.0, 0.92, 0.95),
        "anger": (0.0, 10.0, 0.85, 0.55),
        "disgust": (75.0, 12.0, 0.60, 0.45),
        "fear": (280.0, 20.0, 0.50, 0.30),
        "sadness": (205.0, 15.0, 0.25, 0.50),
    },
    off_palette_p=0.06,
    # Rows: scenes / objects; columns: EMOTIONS order (amu, awe, con, exc, ang, dis, fea, sad).
    scene_weights={
        "striped_wall": (1, 0, 0, 3, 2, 0, 0, 0),
        "checkered_floor": (1, 1, 1, 1, 1, 1, 1, 1),
        "polka_dot_room": (4, 0, 1, 1, 0, 0, 0, 0),
        "ocean_waves": (0, 3, 3, 0, 0, 0, 0, 1),
        "sky_gradient": (0, 2, 2, 0, 0, 0, 0, 1),
        "office_grid": (1, 1, 1, 1, 1, 1, 1, 1),
        "ripple_pond": (0, 0, 2, 0, 0, 2, 0, 1),
        "foggy_field": (0, 0, 0, 0, 0, 1, 3, 3),
        "brick_wall": (0, 0, 0, 0, 4, 2, 0, 0),
        "rainy_street": (0, 0, 0, 0, 0, 0, 1, 9),
        "starry_night": (0, 9, 0, 0, 0, 0, 2, 0),
        "sunburst_plaza": (4, 0, 0, 3, 0, 0, 0, 0),
        "mossy_ground": (0, 0, 0, 0, 0, 4, 1, 0),
    },
    scene_base=0.35,
    object_weights={
        "Circle": (1, 1, 1, 1, 1, 1, 1, 1),
        "Square": (1, 1, 1, 1, 1, 1, 1, 1),
        "Triangle": (0, 1, 0, 0, 2, 0, 2, 0),
        "Star": (2, 3, 0, 2, 0, 0, 0, 0),
        "Heart": (3, 0, 4, 0, 0, 0, 0, 0),
        "Cross": (0, 0, 0, 0, 1, 2, 3, 0),
        "Diamond": (1, 2, 0, 1, 0, 0, 0, 0),
        "Ring": (1, 1, 1, 1, 1, 1, 1, 1),
        "Crescent": (0, 2, 0, 0, 0, 0, 2, 3),
        "Hexagon": (0, 0, 1, 0, 0, 3, 0, 0),
        "Arrow": (0, 0, 0, 3, 2, 0, 0, 0),
        "Lightning bolt": (0, 0, 0, 3, 4, 0, 0, 0),
    },
    object_base=0.35,
)
"""Today's world (the default; the fast tests and goldens use it): colour nearly decides the emotion."""

# The four shared palettes are easy-world palettes (the CPU-world generator knows their colour words); the
# brightest of the dark ones (anger's red), so that the layouts keep their contrast on it.
_WARM, _GREEN, _BLUE, _RED = (
    EASY.palettes["excitement"], EASY.palettes["contentment"], EASY.palettes["awe"], EASY.palettes["anger"]
)
LAYOUT_SCENES: tuple[str, ...] = (
    "cloud_ceiling",  # the palette's first colour above a horizon, its darker second colour below
    "sand_floor",  # the same, upside down
    "spotlight",  # a disc of the first colour (half the image) on the second
    "deep_well",  # the same with the colours swapped
    "river_band",  # a horizontal band of the first colour (half the image) across the second
    "tall_window",  # a vertical band of it
    "attic_corner",  # the first colour in the upper-left half, split along the diagonal
    "cellar_corner",  # the same, turned by 180 degrees
)
"""The hard world's scenes: fixed, coarse layouts of the palette's two colours. The two scenes of each line pair
are mirror images (or the same areas swapped), so they hold the same colours in the same shares: only where
the colours are tells them apart."""
HARD = World(
    name="hard",
    # Four palettes, each shared by two emotions (one pair per palette; contentment/disgust and anger/fear cross
    # the polarity): colour tells the pair, the scene (and, less, the objects) tells the emotion in it.
    palettes={
        "amusement": _WARM, "excitement": _WARM,
        "contentment": _GREEN, "disgust": _GREEN,
        "anger": _RED, "fear": _RED,
        "awe": _BLUE, "sadness": _BLUE,
    },
    off_palette_p=0.06,
    scenes=(*LAYOUT_SCENES, "checkered_floor"),
    # The two emotions of a pair have mirror-image primary scenes (weight 8: a sharp Phi row) and mirror-image
    # secondary scenes (weight 2), each the primary of an emotion of another palette (so a row with a second,
    # smaller peak); checkered_floor is flat. Colour statistics (a histogram) cannot tell the scene within a
    # pair; a model that sees where the colours are can.
    #              amu awe con exc ang dis fea sad
    scene_weights={
        "cloud_ceiling": (8, 2, 0, 0, 0, 0, 0, 0),
        "sand_floor": (0, 0, 0, 8, 0, 0, 0, 2),
        "spotlight": (2, 0, 8, 0, 0, 0, 0, 0),
        "deep_well": (0, 0, 0, 2, 0, 8, 0, 0),
        "river_band": (0, 0, 2, 0, 8, 0, 0, 0),
        "tall_window": (0, 0, 0, 0, 0, 2, 8, 0),
        "attic_corner": (0, 8, 0, 0, 2, 0, 0, 0),
        "cellar_corner": (0, 0, 0, 0, 0, 0, 2, 8),
        "checkered_floor": (1, 1, 1, 1, 1, 1, 1, 1),
    },
    scene_base=0.05,
    # Stronger contrast between the two colours; objects smaller and fewer (they hide the scene).
    bg2_value=(0.35, 0.6),
    object_radius=(0.08, 0.16),
    object_counts=(0.6, 0.3, 0.1),
    # Objects lean towards one emotion of each pair (Heart: amusement/contentment, Star: awe, ...); three are flat.
    object_weights={
        "Circle": (1, 1, 1, 1, 1, 1, 1, 1),
        "Square": (1, 1, 1, 1, 1, 1, 1, 1),
        "Ring": (1, 1, 1, 1, 1, 1, 1, 1),
        "Heart": (3, 0, 3, 0, 0, 0, 0, 0),
        "Diamond": (2, 0, 0, 0, 0, 0, 0, 0),
        "Lightning bolt": (0, 0, 0, 3, 2, 0, 0, 0),
        "Arrow": (0, 0, 0, 1, 3, 0, 0, 0),
        "Hexagon": (0, 0, 0, 0, 0, 3, 0, 0),
        "Cross": (0, 0, 0, 0, 0, 2, 3, 0),
        "Star": (0, 3, 0, 0, 0, 0, 0, 0),
        "Crescent": (0, 1, 0, 0, 0, 0, 0, 3),
        "Triangle": (0, 0, 0, 0, 0, 0, 2, 0),
    },
    object_base=0.35,
)
"""The world with room to learn (``data.synthetic.world: hard``): emotions share palettes, scenes decide."""

WORLDS: dict[str, World] = {w.name: w for w in (EASY, HARD)}


def world_of(name: str) -> World:
    """The world called ``name``; :class:`ConfigError` naming the choices otherwise."""
    if name not in WORLDS:
        raise ConfigError(f"unknown synthetic world {name!r}; choose one of {', '.join(WORLDS)}")
    return WORLDS[name]


def _object_set_probabilities(p_object: np.ndarray, counts: Sequence[float]) -> dict[tuple[int, ...], float]:
    """P(set of objects) of one emotion: n objects (``counts``) drawn one by one without replacement, each draw
    from ``p_object`` renormalised over the objects not drawn yet (numpy's ``choice(replace=False, p=...)``)."""
    out: dict[tuple[int, ...], float] = {}
    for n, p_n in enumerate(counts, start=1):
        for order in itertools.permutations(range(len(p_object)), n):
            prob, left = p_n, 1.0
            for i in order:
                prob *= p_object[i] / left
                left -= p_object[i]
            key = tuple(sorted(order))
            out[key] = out.get(key, 0.0) + prob
    return out


def decision_rates(world: World) -> dict[str, float]:
    """The best accuracies a classifier can reach on the world, computed from its generative tables (uniform
    emotions, as the set draws them):

    - ``colour_only``: one that sees only which palette an image was drawn with. Emotions with the same palette
      table share one palette; the palettes are treated as perfectly told apart, so this is an upper bound of
      any colour-only classifier (overlapping jitter can only lower it).
    - ``bayes``: one that sees the palette, the scene and the set of objects: the Bayes rate of the world's
      latent variables, an upper bound of any classifier of its images.
    - ``scene_and_objects``: one that sees the scene and the objects but not the colour.
    """
    k = len(EMOTIONS)
    families = list(dict.fromkeys(world.palettes[e] for e in EMOTIONS))
    p_family = np.zeros((k, len(families)))
    for i in range(k):
        for j, other in enumerate(EMOTIONS):
            share = 1.0 - world.off_palette_p if j == i else world.off_palette_p / (k - 1)
            p_family[i, families.index(world.palettes[other])] += share
    sets = [_object_set_probabilities(world.p_object[i], world.object_counts) for i in range(k)]
    keys = list(sets[0])
    p_sets = np.array([[sets[i][s] for s in keys] for i in range(k)])
    p_scene = world.p_scene
    joint = p_family[:, :, None, None] * p_scene[:, None, :, None] * p_sets[:, None, None, :]
    no_colour = p_scene[:, :, None] * p_sets[:, None, :]
    return {
        "colour_only": float(p_family.max(axis=0).sum() / k),
        "bayes": float(joint.max(axis=0).sum() / k),
        "scene_and_objects": float(no_colour.max(axis=0).sum() / k),
    }


SYNTH_MARKER = ".uniemo-synthetic.json"
"""Written by ``uniemo data synth`` into its folder: the set's parameters and whether it is complete."""
WORLD_FILE = "world.json"
"""In a synthetic set of another world than ``easy``: :func:`world_record` of its world."""


def world_record(world: World) -> dict[str, Any]:
    """What ``world.json`` holds: the world's name and :func:`decision_rates`."""
    return {"world": world.name, **{k: round(v, 4) for k, v in decision_rates(world).items()}}


@functools.cache
def _p_scene(world: str) -> np.ndarray:
    return WORLDS[world].p_scene


@functools.cache
def _p_object(world: str) -> np.ndarray:
    return WORLDS[world].p_object


def generate_synthetic_set(
    out_dir: str | Path,
    images: int = 800,
    size: int = 64,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    world: str = "easy",
) -> dict[str, Any]:
    """Draw ``images`` labelled images of ``size`` px into ``out_dir`` in the EmoSet-118K layout.

    Writes ``image/<emo>/<emo>_<id>.jpg``, ``annotation/<emo>/<emo>_<id>.json``, the official 4-item split
    files ``train.json``/``val.json``/``test.json`` and ``info.json`` (written last: a folder with
    ``info.json`` is complete). Emotions are balanced (``images // 8`` each, the remainder going to the first
    emotions in EmoSet order) and split 75/10/15 % per emotion. Same seed, same bytes, whatever ``workers``.
    ``world`` names the generative tables (:data:`WORLDS`); a world other than ``easy`` also writes
    ``world.json`` (its name and :func:`decision_rates`), which ``uniemo data inspect`` prints.

    Returns a summary: ``{"root", "images", "size", "seed", "world", "splits": {split: {emotion: n}}, "totals":
    {split: n}, "seconds"}``.
    """
    if images < len(EMOTIONS):
        raise ConfigError(
            f"synthetic images must be at least {len(EMOTIONS)} (one per emotion), got {images}"
        )
    if size < 16:
        raise ConfigError(f"synthetic image size must be at least 16 px, got {size}")
    if seed < 0:
        raise ConfigError(f"synthetic seed must be non-negative, got {seed}")
    world_of(world)  # a clear error before any work
    workers = max(1, int(workers))
    start = time.perf_counter()
    root = Path(out_dir)
    for emotion in EMOTIONS:
        (root / "image" / emotion).mkdir(parents=True, exist_ok=True)
        (root / "annotation" / emotion).mkdir(parents=True, exist_ok=True)

    plan = _plan(images, seed)  # one (global index, emotion, id, split) per image, emotion-major
    tasks = [
        (str(root), size, seed, world, plan[i : i + _chunk(images, workers)])
        for i in range(0, images, _chunk(images, workers))
    ]
    bar = tqdm(total=images, desc="synthetic set", unit="img", disable=not progress)
    try:
        if workers == 1:
            for task in tasks:
                bar.update(_render_chunk(task))
        else:
            # spawn: never fork a parent that may hold threads (torch, tqdm monitor, data loaders)
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for done in pool.imap_unordered(_render_chunk, tasks):
                    bar.update(done)
    finally:
        bar.close()

    summary_splits = {s: {e: 0 for e in EMOTIONS} for s in SPLITS}
    entries: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    for _, emotion, image_id, split in plan:
        summary_splits[split][emotion] += 1
        entries[split].append(
            [emotion, image_id, f"image/{emotion}/{image_id}.jpg", f"annotation/{emotion}/{image_id}.json"]
        )
    for split in SPLITS:  # one entry per line: readable, and diffs of two sets stay small
        _write_text_atomic(
            root / f"{split}.json", "[\n" + ",\n".join(json.dumps(e) for e in entries[split]) + "\n]\n"
        )
    if world != EASY.name:  # the easy world's folder stays as it always was
        _write_text_atomic(root / WORLD_FILE, json.dumps(world_record(world_of(world)), indent=1) + "\n")
    _write_text_atomic(root / "info.json", json.dumps(build_info(world), indent=1) + "\n")
    return {
        "root": str(root),
        "images": images,
        "size": size,
        "seed": seed,
        "world": world,
        "splits": summary_splits,
        "totals": {s: len(entries[s]) for s in SPLITS},
        "seconds": round(time.perf_counter() - start, 3),
    }


def build_info(world: str = "easy") -> dict[str, dict[str, dict[str, Any]]]:
    """EmoSet's ``info.json``: ``{label2idx, idx2label}`` for emotion, brightness, colorfulness, scene (the
    world's scenes), object."""
    bins = [f"{i / 10:.1f}" for i in range(11)]

    def maps(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {
            "label2idx": {label: i for i, label in enumerate(labels)},
            "idx2label": {str(i): label for i, label in enumerate(labels)},
        }

    return {
        "emotion": maps(EMOTIONS),
        "brightness": maps(bins),
        "colorfulness": maps(bins),
        "scene": maps(sorted(world_of(world).scene_names)),
        "object": maps(sorted(OBJECTS)),
    }


def _plan(images: int, seed: int) -> list[tuple[int, str, str, str]]:
    plan: list[tuple[int, str, str, str]] = []
    base, extra = divmod(images, len(EMOTIONS))
    index = 0
    for k, emotion in enumerate(EMOTIONS):
        n = base + (1 if k < extra else 0)
        n_train, n_val, _ = split_counts(n, SPLIT_RATIOS)
        # Which images of this emotion go to which split: a seeded permutation, stratified by construction.
        order = np.random.default_rng([seed, k, 0x5B117]).permutation(n)
        split_of = np.empty(n, dtype=object)
        split_of[order[:n_train]] = "train"
        split_of[order[n_train : n_train + n_val]] = "val"
        split_of[order[n_train + n_val :]] = "test"
        for j in range(n):
            plan.append((index, emotion, f"{emotion}_{j + 1:05d}", str(split_of[j])))
            index += 1
    return plan


def _chunk(images: int, workers: int) -> int:
    # several chunks per worker balance the pool; the bytes never depend on the chunking (per-image RNG)
    return 64 if workers == 1 else max(8, math.ceil(images / (workers * 4)))


def _render_chunk(task: tuple[str, int, int, str, list[tuple[int, str, str, str]]]) -> int:
    root_s, size, seed, world, items = task
    root = Path(root_s)
    for index, emotion, image_id, _ in items:
        img, annotation = render_image(seed, index, emotion, size, world)
        img.save(root / "image" / emotion / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY)
        (root / "annotation" / emotion / f"{image_id}.json").write_text(
            json.dumps(annotation), encoding="utf-8"
        )
    return len(items)


def render_image(
    seed: int, index: int, emotion: str, size: int, world: str = "easy"
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw image ``index`` of the set with ``seed`` for ``emotion`` in ``world``; return it with its EmoSet
    annotation."""
    w = world_of(world)
    rng = np.random.default_rng([seed, index])
    k = EMOTIONS.index(emotion)
    palette_emotion = emotion
    if rng.random() < w.off_palette_p:
        palette_emotion = EMOTIONS[(k + 1 + int(rng.integers(len(EMOTIONS) - 1))) % len(EMOTIONS)]
    colors = _palette_colors(rng, w, palette_emotion)
    scene = w.scene_names[int(rng.choice(len(w.scene_names), p=_p_scene(world)[k]))]
    n_objects = int(rng.choice([1, 2, 3], p=list(w.object_counts)))
    objects = [
        OBJECTS[int(i)] for i in rng.choice(len(OBJECTS), size=n_objects, replace=False, p=_p_object(world)[k])
    ]

    img = _draw_scene(rng, scene, size, colors, w.pattern_scale)
    draw = ImageDraw.Draw(img)
    for name in objects:
        _draw_object(rng, img, draw, name, size, colors, w.object_radius)

    hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255.0
    annotation = {
        "emotion": emotion,
        "scene": scene,
        "object": objects,
        "brightness": _bin(float(hsv[..., 2].mean())),
        "colorfulness": _bin(float(hsv[..., 1].mean())),
    }
    return img, annotation


def _bin(x: float) -> float:
    """EmoSet's 0.1 bins; exact one-decimal floats so ``str(value)`` looks up ``info.json``."""
    return round(min(max(x, 0.0), 1.0) * 10) / 10


# --- colours -----------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    h = (h % 360.0) / 60.0
    s = min(max(s, 0.0), 1.0)
    v = min(max(v, 0.0), 1.0)
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return (round((r + m) * 255), round((g + m) * 255), round((b + m) * 255))


def _palette_colors(rng: np.random.Generator, world: World, emotion: str) -> dict[str, tuple[int, int, int]]:
    """Background pair, accent and outline colours drawn around an emotion's palette."""
    hue, spread, sat, val = world.palettes[emotion]
    h = hue + rng.uniform(-spread, spread) * world.hue_jitter
    s = sat + rng.normal(0, world.sv_jitter)
    v = val + rng.normal(0, world.sv_jitter)
    bg1 = _hsv_to_rgb(h, s, v)
    bg2 = _hsv_to_rgb(h + rng.uniform(-20, 20), s * rng.uniform(0.6, 1.0), v * rng.uniform(*world.bg2_value))
    # The accent stays in the palette family but contrasts in value, so objects are visible on the scene.
    acc_v = v - 0.35 if v > 0.55 else v + 0.4
    accent = _hsv_to_rgb(h + rng.uniform(-35, 35), min(1.0, s + 0.15), acc_v)
    outline = _hsv_to_rgb(h, s, 0.1 if acc_v > 0.5 else 0.95)
    return {"bg1": bg1, "bg2": bg2, "accent": accent, "outline": outline}


# --- scenes ------------------------------------------------------------------------------------------------


def _draw_scene(rng: np.random.Generator, scene: str, size: int, colors: dict, scale: float = 1.0) -> Image.Image:
    s = size
    u = max(1.0, s / 64.0) * scale  # pattern unit: patterns keep their look from 32 to 256 px
    # Scattered primitives: below 64 px they are at their minimum size, so their number follows the area;
    # above, they grow with u, so their number stays put and the covered fraction does not change.
    area = (s / 64.0) ** 2 / u**2
    bg1, bg2 = colors["bg1"], colors["bg2"]
    img = Image.new("RGB", (s, s), bg1)
    d = ImageDraw.Draw(img)
    if scene == "striped_wall":
        period = max(2, int(rng.integers(6, 13) * u))
        for y in range(int(rng.integers(period)) - period, s, period):
            d.rectangle([0, y, s, y + period // 2 - 1], fill=bg2)
    elif scene == "checkered_floor":
        cell = max(2, int(rng.integers(6, 13) * u))
        for y in range(0, s, cell):
            for x in range(0, s, cell):
                if (x // cell + y // cell) % 2:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=bg2)
    elif scene == "polka_dot_room":
        step = max(4, int(rng.integers(9, 15) * u))
        r = max(1, step // 4)
        for y in range(step // 2, s + step, step):
            shift = step // 2 if (y // step) % 2 else 0
            for x in range(shift, s + step, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=bg2)
    elif scene == "ocean_waves":
        period = max(3, int(rng.integers(7, 12) * u))
        amp = rng.uniform(1.5, 3.5) * u
        freq = rng.uniform(1.5, 3.0) * 2 * math.pi / s
        phase = rng.uniform(0, 2 * math.pi)
        xs = np.arange(0, s + 1, max(1, s // 32))
        for y0 in range(0, s + period, period):
            pts = [(float(x), y0 + amp * math.sin(freq * x + phase)) for x in xs]
            d.line(pts, fill=bg2, width=max(1, period // 3))
    elif scene == "sky_gradient":
        t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]
        arr = (1 - t) * np.array(bg1, np.float32) + t * np.array(bg2, np.float32)
        img = Image.fromarray(np.broadcast_to(arr, (s, s, 3)).astype(np.uint8), "RGB")
    elif scene == "office_grid":
        cell = max(3, int(rng.integers(7, 12) * u))
        w = max(1, int(u))
        for v in range(int(rng.integers(cell)), s, cell):
            d.line([(v, 0), (v, s)], fill=bg2, width=w)
            d.line([(0, v), (s, v)], fill=bg2, width=w)
    elif scene == "ripple_pond":
        cx, cy = rng.uniform(0.2, 0.8, size=2) * s
        step = max(2, int(rng.integers(4, 8) * u))
        for r in range(step, int(1.5 * s), 2 * step):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=bg2, width=max(1, step // 2))
    elif scene == "foggy_field":
        low = rng.random((5, 5)).astype(np.float32)
        t = np.asarray(
            Image.fromarray((low * 255).astype(np.uint8)).resize((s, s), Image.Resampling.BILINEAR), np.float32
        )
        t = (t / 255.0)[..., None]
        arr = (1 - t) * np.array(bg1, np.float32) + t * np.array(bg2, np.float32)
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    elif scene == "brick_wall":
        bh = max(3, int(rng.integers(6, 10) * u))
        bw = 2 * bh
        img = Image.new("RGB", (s, s), bg2)  # mortar
        d = ImageDraw.Draw(img)
        for row, y in enumerate(range(0, s, bh)):
            off = (bw // 2) * (row % 2)
            for x in range(-off, s, bw):
                d.rectangle([x + 1, y + 1, x + bw - 1, y + bh - 1], fill=bg1)
    elif scene == "rainy_street":
        n = int(rng.integers(18, 30) * area) + 6
        length = 8 * u
        for _ in range(n):
            drop_x, drop_y = rng.uniform(-length, s), rng.uniform(-length, s)
            d.line([(drop_x, drop_y), (drop_x + length * 0.35, drop_y + length)], fill=bg2, width=max(1, int(u)))
    elif scene == "starry_night":
        dark = tuple(int(c * 0.35) for c in bg2)
        img = Image.new("RGB", (s, s), dark)
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(15, 30) * area * u) + 4):  # more, smaller stars when large
            x, y = rng.uniform(0, s, size=2)
            r = rng.uniform(0.5, 1.5) * u**0.5
            d.ellipse([x - r, y - r, x + r, y + r], fill=bg1)
    elif scene == "sunburst_plaza":
        cx, cy = rng.uniform(0.2, 0.8, size=2) * s
        rays = int(rng.integers(8, 16))
        start = rng.uniform(0, 360.0 / rays)
        for i in range(0, rays, 2):
            a0 = start + i * 360.0 / rays
            d.pieslice([cx - 2 * s, cy - 2 * s, cx + 2 * s, cy + 2 * s], a0, a0 + 360.0 / rays, fill=bg2)
    elif scene == "mossy_ground":
        for _ in range(int(rng.integers(20, 35) * area) + 6):
            x, y = rng.uniform(0, s, size=2)
            rx, ry = rng.uniform(2, 6, size=2) * u
            mix = rng.uniform(0, 1)
            c = tuple(int((1 - mix) * a + mix * b) for a, b in zip(bg1, bg2, strict=True))
            d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=c)
    elif scene in LAYOUT_SCENES:
        img = _draw_layout(rng, scene, s, bg1, bg2)
    else:  # pragma: no cover - the worlds' scenes and this function are kept in step
        raise ValueError(f"no drawing for scene {scene!r}")
    return img


def _draw_layout(
    rng: np.random.Generator, scene: str, s: int, bg1: tuple[int, int, int], bg2: tuple[int, int, int]
) -> Image.Image:
    """A hard-world layout (:data:`LAYOUT_SCENES`): the first colour where the signed distance ``d`` to the
    layout's boundary is negative, the second elsewhere, blended over a soft edge. The geometry is jittered by
    the same symmetric draw for both scenes of a mirror pair, so both hold the same colours in the same shares."""
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s
    shift = float(rng.uniform(-0.08, 0.08))
    if scene in ("cloud_ceiling", "sand_floor"):
        d = yy - (0.5 + shift)
        d = d if scene == "cloud_ceiling" else -d
    elif scene in ("spotlight", "deep_well"):
        cx, cy = 0.5 + rng.uniform(-0.08, 0.08, size=2)
        d = np.hypot(xx - cx, yy - cy) - math.sqrt(0.5 / math.pi) * (1 + shift)  # a disc of half the image
        d = d if scene == "spotlight" else -d
    elif scene == "river_band":
        d = np.abs(yy - (0.5 + shift)) - 0.25
    elif scene == "tall_window":
        d = np.abs(xx - (0.5 + shift)) - 0.25
    else:  # attic_corner / cellar_corner
        d = (xx + yy) - (1.0 + 2 * shift)
        d = d if scene == "attic_corner" else -d
    t = (1.0 / (1.0 + np.exp(d / 0.03)))[..., None]  # 1 inside (first colour), 0 outside
    arr = t * np.array(bg1, np.float32) + (1 - t) * np.array(bg2, np.float32)
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


# --- objects -----------------------------------------------------------------------------------------------


def _regular(n: int, radii: Sequence[float], rot: float) -> list[tuple[float, float]]:
    """Unit-centred polygon with ``n * len(radii)`` vertices cycling through ``radii``."""
    m = n * len(radii)
    return [
        (
            radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / m),
            radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / m),
        )
        for i in range(m)
    ]


def _unit_shape(name: str) -> list[tuple[float, float]]:
    """Outline of a polygonal object in a unit box centred on 0 (before rotation and scaling)."""
    if name == "Square":
        return [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    if name == "Triangle":
        return _regular(3, [1.0], -math.pi / 2)
    if name == "Star":
        return _regular(5, [1.0, 0.42], -math.pi / 2)
    if name == "Heart":
        pts = []
        for i in range(24):
            t = 2 * math.pi * i / 24
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0))
        return pts
    if name == "Cross":
        a, b = 0.3, 0.95
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if name == "Diamond":
        return [(0, -1.0), (0.6, 0), (0, 1.0), (-0.6, 0)]
    if name == "Hexagon":
        return _regular(6, [0.95], 0.0)
    if name == "Arrow":
        return [(-1.0, -0.25), (0.2, -0.25), (0.2, -0.6), (1.0, 0), (0.2, 0.6), (0.2, 0.25), (-1.0, 0.25)]
    if name == "Lightning bolt":
        return [(-0.2, -1.0), (0.45, -1.0), (0.1, -0.2), (0.55, -0.2), (-0.3, 1.0), (-0.05, 0.1), (-0.5, 0.1)]
    raise ValueError(f"no polygon for object {name!r}")


def _draw_object(
    rng: np.random.Generator, img: Image.Image, draw: ImageDraw.ImageDraw, name: str, size: int, colors: dict,
    radius: tuple[float, float] = (0.12, 0.26),
) -> None:
    r = rng.uniform(*radius) * size
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    width = max(1, round(size / 64))
    fill, outline = colors["accent"], colors["outline"]
    if name == "Circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif name == "Ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(r * 0.35)))
    elif name == "Crescent":
        # Disk minus an offset disk, through a mask (the background is patterned, so no "erase" colour exists).
        mask = Image.new("L", img.size, 0)
        md = ImageDraw.Draw(mask)
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot)
        md.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=0)
        img.paste(fill, (0, 0), mask)
    else:
        c, s_ = math.cos(rot), math.sin(rot)
        pts = [(cx + r * (x * c - y * s_), cy + r * (x * s_ + y * c)) for x, y in _unit_shape(name)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, text)
