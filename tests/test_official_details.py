"""The official details a recipe can switch on (docs/RECIPES.md), each against a re-computation that follows the
official code: alpha's attribute retrieval in CLIP's text space (``fine_tune.py``'s ``generate_attr``), the
bicubic VAE input resize (``image.resize((512, 512))``, PIL's default filter), and the emotion space's view
(``train_vit.py``'s train loader: RandomResizedCrop + flip, ImageNet mean/std)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uniemo.cli import main
from uniemo.config.schema import Config
from uniemo.data.attributes import AttributeTable, resolve_attribute_table

OBJECT_ATTR = {"attr_amusement": ["balloon", "roller_coaster", "tower"], "attr_fear": ["spider", "carousel"],
               "attr_sadness": ["wheelchair", "coffin"]}
SCENE_ATTR = {"attr_awe": ["tower", "glacier", "mountain"], "attr_sadness": ["cemetery", "hospital_room"],
              "attr_excitement": ["amusement_park", "stadium/football"]}
PHI = {n: np.random.default_rng(i).dirichlet(np.ones(8)).astype(np.float32)
       for i, n in enumerate(["balloon", "roller_coaster", "tower", "spider", "wheelchair", "coffin", "glacier",
                              "mountain", "cemetery", "hospital_room", "amusement_park", "stadium/football"])}
TOKEN_DIM = 32  # the tiny generator's text width


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel saved as a transformers folder, with a CLIPProcessor (the local tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from uniemo.models.tokenizer import build_local_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_local_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TOKEN_DIM)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def emogen_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset_balance")
    for name, value in (("object_attr.pkl", OBJECT_ATTR), ("scene_attr.pkl", SCENE_ATTR),
                        ("attr_coefficient_emotion_scene.pkl", {k: v for k, v in list(PHI.items())[6:]}),
                        ("attr_coefficient_emotion_object.pkl", {k: v for k, v in list(PHI.items())[:6]})):
        (folder / name).write_bytes(pickle.dumps(value, protocol=4))
    out = folder / "emogen_attributes.json"
    assert main(["data", "attributes", "--from-emogen", str(folder), "--out", str(out)]) == 0
    return out


def _official_alpha(clip_dir, names, coefficient, mapped, labels):
    """``fine_tune.py``: ``generate_attr`` (CLIPProcessor, padding=True, ``get_text_features``), then per sample the
    cosine argmax over the base and ``attr_coefficient[name][label]`` (0 for a name without one)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        data = processor(text=names, return_tensors="pt", padding=True)
        out = model.get_text_features(**data)
        total_attr_embed = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 / 4
    alphas, indices = [], []
    for e, label in zip(mapped, labels, strict=True):
        score = F.cosine_similarity(total_attr_embed, e[None]).unsqueeze(0)
        index = torch.argmax(score, dim=1)
        alpha = 0
        if names[index] in coefficient:
            alpha = coefficient[names[index]][label].item()
        alphas.append(alpha)
        indices.append(int(index))
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(indices)


def test_clip_text_space_reproduces_the_official_alpha(clip_dir, emogen_base, synth_shards):
    from uniemo.models.conditioner import correlation_coefficient
    from uniemo.training.task import build_stage2_task

    cfg = Config()
    cfg.data.image_size = cfg.data.generator_image_size = cfg.model.understanding.image_size = 32
    cfg.data.attributes, cfg.data.attribute_base = "emogen", str(emogen_base)
    cfg.data.cache_dir = str(emogen_base.parent / "cache")
    cfg.model.conditioner.attribute_space = "clip_text"
    cfg.model.conditioner.attribute_clip_path = str(clip_dir)
    table = resolve_attribute_table(AttributeTable.load(synth_shards), cfg.data)
    names = list(table.base_names)
    assert names[:3] == ["balloon", "roller_coaster", "tower"] and "carousel" in names  # raw names, official order
    torch.manual_seed(0)
    task = build_stage2_task(cfg, table)
    mapped = torch.randn(200, TOKEN_DIM, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(200) % 8
    alpha, index = correlation_coefficient(mapped, task.attribute_embeddings, task.phi, labels)
    want_alpha, want_index = _official_alpha(clip_dir, names, PHI, mapped, labels.tolist())
    assert torch.equal(index, want_index)
    assert torch.equal(alpha, want_alpha)
    assert len(set(index.tolist())) >= 6 and (alpha == 0).sum() > 0  # many names retrieved, carousel gives 0

    # Control: D6's space retrieves other attributes for the same vectors, so the test sees which space is used.
    cfg.model.conditioner.attribute_space = "token_embeddings"
    torch.manual_seed(0)
    d6 = build_stage2_task(cfg, table)
    _, d6_index = correlation_coefficient(mapped, d6.attribute_embeddings, d6.phi, labels)
    assert (d6_index != want_index).float().mean() > 0.3


def test_clip_text_space_needs_a_fitting_clip_folder(clip_dir, emogen_base, synth_shards, tmp_path):
    from uniemo.errors import ConfigError
    from uniemo.training.task import build_stage2_task

    cfg = Config()
    cfg.data.image_size = cfg.data.generator_image_size = cfg.model.understanding.image_size = 32
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.model.conditioner.attribute_space = "clip_text"
    table = AttributeTable.load(synth_shards)
    with pytest.raises(ConfigError, match="attribute_clip_path"):
        build_stage2_task(cfg, table)
    cfg.model.conditioner.attribute_clip_path = str(clip_dir)
    cfg.model.generator.preset = "small"  # text width 64, not the CLIP's projection 32
    cfg.model.understanding.preset = "small"
    with pytest.raises(ConfigError, match="projection_dim is 64"):
        build_stage2_task(cfg, table)


def test_vae_input_is_resized_with_pils_default_filter(tmp_path):
    """``fine_tune.py``: ``Image.fromarray(img).resize((size, size))``, flip, ``image / 127.5 - 1``."""
    from uniemo.data.transforms import build_sample_transform

    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(path)
    cfg = Config()
    cfg.data.image_size, cfg.data.generator_image_size = 32, 24
    image = Image.open(path)
    official = np.array(Image.fromarray(np.array(image.convert("RGB"))).resize((24, 24))).astype(np.uint8)
    official = torch.from_numpy((official / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)
    got = build_sample_transform(cfg.data, stage=2, training=False)(image, random.Random(0))["pixel_values"]
    torch.testing.assert_close(got, official, rtol=0, atol=1e-6)
    cfg.data.generator_resample = "bilinear"  # control: the other filter gives other pixels
    other = build_sample_transform(cfg.data, stage=2, training=False)(image, random.Random(0))["pixel_values"]
    assert (other - official).abs().max() > 0.05


def test_emotion_space_view_official_is_the_stage1_training_transform(synth_shards):
    from uniemo.data.transforms import NORMALIZATIONS, SampleTransform
    from uniemo.training.emotion_space import emotion_space_loader

    cfg = Config()
    cfg.data.shards, cfg.data.image_size, cfg.data.num_workers = str(synth_shards), 32, 0
    cfg.data.normalization = "symmetric"  # the stage-2 input: the official space ignores it (ImageNet)
    eval_loader = emotion_space_loader(cfg)
    cfg.training.emotion_space_view = "official"
    loader = emotion_space_loader(cfg)
    assert loader.transform == SampleTransform(image_size=32, normalization="imagenet", augment=True)
    assert eval_loader.transform.augment is False and eval_loader.transform.normalization == "symmetric"
    first = [b for b in loader]
    again = [b for b in emotion_space_loader(cfg)]
    evaluated = [b for b in eval_loader]
    labels = torch.cat([b["label"] for b in first])
    assert torch.equal(labels, torch.cat([b["label"] for b in evaluated]))  # every train image once, same order
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))  # seeded
    assert not torch.allclose(first[0]["image"], evaluated[0]["image"])
    # ImageNet normalisation: un-normalised pixels lie in [0, 1].
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    pixels = first[0]["image"] * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_the_attribute_clip_folder_is_checked_before_training(clip_dir, tmp_path):
    from uniemo.models.weights import WeightsError, check_model_folders

    cfg = Config()
    cfg.model.conditioner.attribute_space = "clip_text"
    cfg.model.conditioner.attribute_clip_path = str(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="attribute_clip_path .*nowhere does not exist"):
        check_model_folders(cfg.model)
    cfg.model.conditioner.attribute_clip_path = str(clip_dir)
    check_model_folders(cfg.model)
