"""Captions of the generator pretraining (METHOD D15): colour words measured on the image, scene and objects from
the annotation, never an emotion word."""

from __future__ import annotations

import random

import pytest
import torch

from uniemo.config.schema import EMOTIONS
from uniemo.data.captions import (
    build_caption,
    caption_vocabulary,
    check_no_emotion_words,
    colour_words,
    name_words,
)
from uniemo.data.synthetic import OBJECTS, SCENES
from uniemo.models.tokenizer import build_local_tokenizer


def _solid(r: float, g: float, b: float, size: int = 8) -> torch.Tensor:
    """A [1,3,S,S] image of one RGB colour (0-1), in the loader's [-1, 1] range."""
    return (torch.tensor([r, g, b]).view(1, 3, 1, 1).expand(1, 3, size, size) * 2 - 1).clone()


@pytest.mark.parametrize(
    ("rgb", "words"),
    [
        ((0.9, 0.1, 0.1), ["bright", "vivid", "red"]),
        ((0.2, 0.1, 0.25), ["dark", "rich", "purple"]),
        ((0.35, 0.45, 0.5), ["dim", "greyish", "azure"]),
        ((0.1, 0.7, 0.1), ["light", "vivid", "green"]),
        ((0.95, 0.85, 0.1), ["bright", "vivid", "yellow"]),
    ],
)
def test_colour_words_describe_the_pixels(rgb, words):
    assert colour_words(_solid(*rgb)) == [words]


def test_hue_is_a_circular_mean_weighted_by_colour():
    # Half red just below 360 degrees, half red just above 0: the mean is red, not cyan (a linear mean's 180).
    img = torch.cat([_solid(0.9, 0.1, 0.2), _solid(0.9, 0.2, 0.1)], dim=3)
    assert colour_words(img)[0][2] == "red"
    # A grey half carries no hue: the other half decides.
    img = torch.cat([_solid(0.5, 0.5, 0.5), _solid(0.1, 0.2, 0.9)], dim=3)
    assert colour_words(img)[0][2] == "blue"


def test_vocabulary_of_the_synthetic_world_has_no_emotion_word():
    vocabulary = caption_vocabulary(SCENES, OBJECTS)
    assert not set(vocabulary) & set(EMOTIONS)
    assert {"foggy", "field", "lightning", "bolt", "dark", "purple"} <= set(vocabulary)
    with pytest.raises(ValueError, match="names an emotion"):
        caption_vocabulary(["fear_tunnel"], [])
    with pytest.raises(ValueError, match="sadness"):
        check_no_emotion_words("a dark Sadness street")


def test_every_caption_of_the_synthetic_set_is_free_of_emotion_words(synth_root):
    import json

    seen = 0
    for path in sorted(synth_root.glob("annotation/*/*.json"))[:200]:
        ann = json.loads(path.read_text())
        caption = build_caption(["dark", "muted", "blue"], ann.get("scene"), ann.get("object", []))
        check_no_emotion_words(caption)
        assert ann["emotion"] not in caption.split()
        seen += 1
    assert seen == 200


def test_caption_parts_and_drops():
    full = build_caption(["dim", "muted", "teal"], "rainy_street", ["Lightning bolt", "Cross"])
    assert full == "dim muted teal rainy street lightning bolt cross"
    assert build_caption(["dim", "muted", "teal"], None, []) == "dim muted teal"  # a folder without annotations
    rng = random.Random(0)
    drawn = [build_caption(["dim", "muted", "teal"], "rainy_street", ["Cross"], rng, 0.1, 0.25) for _ in range(2000)]
    empty = sum(c == "" for c in drawn) / len(drawn)
    assert 0.07 < empty < 0.13  # classifier-free guidance: ~caption_drop of the captions are empty
    assert all(c for c in drawn if c != "") and len(set(drawn)) > 3  # shorter prompts, never an empty part list
    short = [c for c in drawn if c == "dim muted teal"]
    assert short  # a colour alone is in the training distribution


def test_caption_words_are_single_tokens():
    words = caption_vocabulary(SCENES, OBJECTS)
    tok = build_local_tokenizer(words=words)
    ids = tok("dark rich red striped wall star", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["dark", "rich", "red", "striped", "wall", "star"]
    # single-word tokens: "red" inside another word stays characters, "star" is not cut out of "starry"
    assert "red" not in tok.convert_ids_to_tokens(tok("bored", add_special_tokens=False).input_ids)
    assert tok.convert_ids_to_tokens(tok("starry", add_special_tokens=False).input_ids) == ["starry"]
    assert name_words("bakery/shop") == ["bakery", "shop"]
