"""Loading CLIP into the understanding model (D2, D3) and the cached attribute text features (METHOD §2.3).

A small random ``transformers.CLIPModel`` shaped like the ``tiny`` preset is saved with ``save_pretrained``;
with the queries off, the loaded backbone must reproduce ``CLIPVisionModel``'s pooled output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from uniemo.config.schema import UnderstandingConfig
from uniemo.errors import UserError
from uniemo.models.text_features import attribute_text_features, attribute_text_features_path
from uniemo.models.tokenizer import build_local_tokenizer
from uniemo.models.understanding import UnderstandingModel
from uniemo.models.weights import (
    build_understanding,
    build_understanding_reported,
    dims_from_clip,
    load_clip_into_understanding,
)

SCENES, OBJECTS = 4, 6


def _tiny_clip_config() -> CLIPConfig:
    tok = build_local_tokenizer()
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
        logit_scale_init_value=4.0,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random tiny CLIPModel (the ``tiny`` preset's shape) saved with its local tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(_tiny_clip_config()).save_pretrained(path)
    build_local_tokenizer(path)
    return path


def _cfg(clip_dir, **overrides) -> UnderstandingConfig:
    return UnderstandingConfig(preset="tiny", clip_path=str(clip_dir), **overrides)


def test_backbone_equals_clip_vision_tower_when_queries_are_off(clip_dir):
    model, report = build_understanding_reported(
        _cfg(clip_dir, use_scene_queries=False, use_object_queries=False), 4, 6
    )
    model.eval()
    reference = CLIPVisionModel.from_pretrained(clip_dir, local_files_only=True).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = reference(pixel_values=images).pooler_output
        got = model(images).cls_feature
    assert (got - expected).abs().max().item() < 1e-5
    assert report is not None and report.new == sorted(
        f"emotion_head.{n}" for n in ("fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight")
    )
    assert "text_projection.weight" in report.ignored and "logit_scale" in report.ignored


def test_report_lists_exactly_the_new_parameters_with_queries_on(clip_dir):
    model = UnderstandingModel(_cfg(clip_dir), SCENES, OBJECTS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = load_clip_into_understanding(model, clip_dir)
    checkpoint = load_file(str(clip_dir / "model.safetensors"))
    provided = {k.removeprefix("vision_model.") for k in checkpoint if k.startswith("vision_model.")}
    provided.add("logit_scale_scene")  # CLIP's own logit scale drives the scene logits (METHOD §2.3)
    names = {n for n, _ in model.named_parameters()}
    assert set(report.new) == names - provided and len(report.new) == len(set(report.new))
    assert set(report.loaded) == names & provided
    roles = model.parameter_roles()
    assert {roles[n] for n in report.new} == {
        "queries",
        "head",
        "attribute_classifiers",
        "projections",
        "logit_scales",
    }
    assert all(roles[n] == "backbone" for n in report.loaded if n != "logit_scale_scene")
    assert set(report.ignored) == {
        k for k in checkpoint if not k.startswith("vision_model.") and k != "logit_scale"
    }
    params = dict(model.named_parameters())
    for name in report.new:  # fresh parameters untouched
        assert torch.equal(params[name], before[name]), name
    for key, tensor in checkpoint.items():
        if key.startswith("vision_model."):
            assert torch.equal(params[key.removeprefix("vision_model.")], tensor), key
    assert params["logit_scale_scene"].item() == pytest.approx(4.0)


def test_vision_only_and_sharded_folders_load(clip_dir, tmp_path):
    vision = CLIPVisionModel.from_pretrained(clip_dir, local_files_only=True)
    vision.save_pretrained(tmp_path / "vision")
    full = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    full.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    images = torch.randn(2, 3, 64, 64)
    outs = []
    for folder in (clip_dir, tmp_path / "vision", tmp_path / "sharded"):
        torch.manual_seed(0)  # the same fresh parameters in every model
        model, report = build_understanding_reported(_cfg(folder), SCENES, OBJECTS)
        with torch.no_grad():
            outs.append(model.eval()(images).cls_feature)
        assert report is not None and "scene_queries.weight" in report.new
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])


def test_from_clip_preset_reads_the_architecture(clip_dir):
    dims = dims_from_clip(clip_dir)
    assert (dims.width, dims.depth, dims.heads, dims.patch_size, dims.image_size) == (64, 6, 4, 8, 64)
    assert (dims.embed_dim, dims.mlp_dim, dims.scene_layer, dims.object_layer) == (32, 256, 2, 4)
    model = build_understanding(UnderstandingConfig(preset="from_clip", clip_path=str(clip_dir)), 3, 3)
    assert model.dims == dims and model.scene_queries.weight.shape == (32, 64)


def test_mismatched_or_unusable_folders_are_user_errors(clip_dir, tmp_path):
    with pytest.raises(UserError, match=r"width 128 vs checkpoint hidden_size=64.*depth 8"):
        build_understanding(UnderstandingConfig(preset="small", clip_path=str(clip_dir)), SCENES, OBJECTS)
    with pytest.raises(UserError, match="patch_size 16"):
        build_understanding(_cfg(clip_dir, patch_size=16), SCENES, OBJECTS)
    with pytest.raises(UserError, match="no config.json"):
        build_understanding(_cfg(tmp_path / "missing"), SCENES, OBJECTS)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((clip_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match=r"holds only pickled weights \(pytorch_model.bin\), which uniemo never unpickles"):
        build_understanding(_cfg(pickled), SCENES, OBJECTS)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((clip_dir / "config.json").read_text())
    tensors = load_file(str(clip_dir / "model.safetensors"))
    tensors.pop("vision_model.post_layernorm.weight")
    save_file(tensors, str(partial / "model.safetensors"))
    with pytest.raises(UserError, match="post_layernorm.weight"):
        build_understanding(_cfg(partial), SCENES, OBJECTS)


def test_random_tower_text_features_are_cached_by_vocabulary(tmp_path):
    cfg = UnderstandingConfig(preset="tiny")
    names = ["amusement_park", "Tree", "scene", "object"]
    state = torch.random.get_rng_state()
    features = attribute_text_features(cfg, names, tmp_path)
    assert torch.equal(state, torch.random.get_rng_state())  # the private seed leaves the global RNG alone
    assert features.shape == (4, 32) and torch.allclose(features.norm(dim=1), torch.ones(4), atol=1e-5)
    assert len({tuple(row.tolist()) for row in features}) == 4
    path = attribute_text_features_path(cfg, names, tmp_path)
    assert path.is_file()
    # Second call: read from the cache (proved by planting a marker in the file).
    save_file({"features": torch.full((4, 32), 7.0)}, str(path))
    assert torch.equal(attribute_text_features(cfg, names, tmp_path), torch.full((4, 32), 7.0))
    # Another vocabulary misses the cache and is computed by the same seeded tower.
    other = attribute_text_features(cfg, ["Tree", "beach"], tmp_path)
    assert attribute_text_features_path(cfg, ["Tree", "beach"], tmp_path) != path
    assert torch.allclose(other[0], features[1], atol=1e-6)
    # A different tower (embedding width) is a different cache entry.
    wider = attribute_text_features(UnderstandingConfig(preset="small"), names, tmp_path)
    assert wider.shape == (4, 64)
    assert len(list(tmp_path.glob("attribute_text_*.safetensors"))) == 3


def test_clip_text_features_match_transformers(clip_dir, tmp_path):
    cfg = _cfg(clip_dir)
    names = ["sunset", "Tree", "amusement_park"]
    features = attribute_text_features(cfg, names, tmp_path)
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    tok = build_local_tokenizer()
    batch = tok(names, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = clip.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if not isinstance(expected, torch.Tensor):
        expected = expected.pooler_output
    assert torch.allclose(features, F.normalize(expected, dim=-1), atol=1e-5)
    assert attribute_text_features_path(cfg, names, tmp_path).is_file()
    vision_only = tmp_path / "vision"
    CLIPVisionModel.from_pretrained(clip_dir, local_files_only=True).save_pretrained(vision_only)
    with pytest.raises(UserError, match="only a CLIP vision tower"):
        attribute_text_features(_cfg(vision_only), names, tmp_path)
