"""Captions for pretraining the CPU world's generator (METHOD D15): what is in an image, never its emotion.

A caption is built from three parts, in this order:

- **colour words** measured on the image itself: brightness (mean HSV value), colourfulness (mean saturation)
  and the dominant hue (circular mean of the hue, weighted by saturation x value), e.g. ``dark muted purple``;
- the **scene** of the annotation, its underscores read as spaces (``foggy field``);
- the **objects** of the annotation, lower-cased (``cross lightning bolt``).

A dataset without annotations (an image folder) gives colour words only. No word of a caption is an emotion
name (:func:`check_no_emotion_words`); the emotion is what stage 2 has to teach through the condition token.

Every word of the vocabulary becomes one whole-word token of the generator's tokenizer
(:func:`caption_vocabulary`), so the text encoder learns one embedding per word and a single token vector
(the condition token c) can stand for a whole colour or scene.

For classifier-free guidance a caption is dropped entirely with ``caption_drop``; each part is also dropped
with ``part_drop`` so that short prompts (a colour alone, a scene alone) are part of the training distribution.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch

from uniemo.config.schema import EMOTIONS

BRIGHTNESS_WORDS: tuple[tuple[float, str], ...] = ((0.35, "dark"), (0.55, "dim"), (0.75, "light"), (2.0, "bright"))
"""Upper bound of mean HSV value -> word."""
COLOURFULNESS_WORDS: tuple[tuple[float, str], ...] = (
    (0.3, "greyish"),
    (0.55, "muted"),
    (0.8, "rich"),
    (2.0, "vivid"),
)
"""Upper bound of mean HSV saturation -> word."""
HUE_WORDS: tuple[tuple[float, str], ...] = (
    (18.0, "red"),
    (42.0, "orange"),
    (68.0, "yellow"),
    (95.0, "lime"),
    (150.0, "green"),
    (190.0, "teal"),
    (218.0, "azure"),
    (250.0, "blue"),
    (300.0, "purple"),
    (342.0, "magenta"),
    (361.0, "red"),
)
"""Upper bound of the dominant hue in degrees -> word (red wraps around)."""

COLOUR_VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(w for table in (BRIGHTNESS_WORDS, COLOURFULNESS_WORDS, HUE_WORDS) for _, w in table)
)


def _pick(table: Sequence[tuple[float, str]], value: float) -> str:
    for bound, word in table:
        if value < bound:
            return word
    return table[-1][1]


def rgb_to_hsv(rgb_B3HW: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV with hue in degrees [0, 360) and saturation, value in [0, 1], ``[B,3,H,W]``."""
    r, g, b = rgb_B3HW.unbind(1)
    cmax, argmax = rgb_B3HW.max(dim=1)
    cmin = rgb_B3HW.min(dim=1).values
    delta = cmax - cmin
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        argmax == 0,
        ((g - b) / safe) % 6,
        torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(delta > 0, hue * 60.0, torch.zeros_like(hue))
    sat = torch.where(cmax > 0, delta / torch.where(cmax > 0, cmax, torch.ones_like(cmax)), torch.zeros_like(cmax))
    return torch.stack([hue % 360.0, sat, cmax], dim=1)


def colour_words(pixel_values_B3HW: torch.Tensor) -> list[list[str]]:
    """``[brightness, colourfulness, hue]`` words of each image; ``pixel_values`` in [-1, 1] (METHOD §3.2 b)."""
    rgb = ((pixel_values_B3HW.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    hsv = rgb_to_hsv(rgb)
    hue, sat, val = hsv.unbind(1)
    weight = (sat * val).flatten(1) + 1e-6
    angle = torch.deg2rad(hue).flatten(1)
    mean_angle = torch.atan2((weight * angle.sin()).sum(1), (weight * angle.cos()).sum(1))
    hue_deg = torch.rad2deg(mean_angle) % 360.0
    words = []
    for v, s, h in zip(val.flatten(1).mean(1).tolist(), sat.flatten(1).mean(1).tolist(), hue_deg.tolist(),
                       strict=True):
        words.append([_pick(BRIGHTNESS_WORDS, v), _pick(COLOURFULNESS_WORDS, s), _pick(HUE_WORDS, h)])
    return words


def name_words(name: str) -> list[str]:
    """An attribute name as caption words: lower case, underscores, slashes and spaces split (EmoSet's
    ``bakery/shop`` -> ``bakery shop``, ``Lightning bolt`` -> ``lightning bolt``)."""
    return [w for w in re.split(r"[\s_/]+", name.lower()) if w]


def caption_vocabulary(scenes: Sequence[str], objects: Sequence[str]) -> list[str]:
    """Every word a caption can hold: the colour words, then the words of the scene and object names (sorted,
    each once). Raises ``ValueError`` when a name contains an emotion word."""
    words = dict.fromkeys(COLOUR_VOCABULARY)
    for name in sorted(set(scenes) | set(objects)):
        words.update(dict.fromkeys(name_words(name)))
    vocabulary = list(words)
    check_no_emotion_words(" ".join(vocabulary))
    return vocabulary


def check_no_emotion_words(text: str) -> None:
    """``ValueError`` when ``text`` names one of the 8 emotions (a caption must never do)."""
    found = sorted(set(name_words(text)) & set(EMOTIONS))
    if found:
        raise ValueError(f"caption text names an emotion ({', '.join(found)}): {text!r}")


def build_caption(
    colour: Sequence[str],
    scene: str | None,
    objects: Sequence[str],
    rng: random.Random | None = None,
    caption_drop: float = 0.0,
    part_drop: float = 0.0,
) -> str:
    """One caption: ``colour words + scene words + object words``; with ``rng``, the whole caption is dropped
    (``""``, the unconditional prompt of guidance) with ``caption_drop`` and each part with ``part_drop``
    (at least one part is kept)."""
    parts = [list(colour), name_words(scene) if scene else [], [w for o in objects for w in name_words(o)]]
    parts = [p for p in parts if p]
    if rng is not None:
        if rng.random() < caption_drop:
            return ""
        if part_drop > 0 and len(parts) > 1:
            kept = [p for p in parts if rng.random() >= part_drop]
            parts = kept or [parts[rng.randrange(len(parts))]]
    return " ".join(w for p in parts for w in p)


def batch_captions(
    batch: dict,
    scenes: Sequence[str],
    objects: Sequence[str],
    rng: random.Random | None = None,
    caption_drop: float = 0.0,
    part_drop: float = 0.0,
) -> list[str]:
    """One caption per sample of a loader batch (``pixel_values``, ``scene_idx``, ``objects_multi_hot``; the
    names they index are ``scenes`` and ``objects``); ``rng`` draws the drops."""
    captions = []
    scene_idx = batch["scene_idx"].tolist()
    for i, colour in enumerate(colour_words(batch["pixel_values"])):
        scene = scenes[scene_idx[i]] if 0 <= scene_idx[i] < len(scenes) else None
        held = torch.nonzero(batch["objects_multi_hot"][i] > 0).flatten().tolist()
        captions.append(build_caption(colour, scene, [objects[j] for j in held if j < len(objects)], rng,
                                      caption_drop, part_drop))
    return captions
