"""The local CLIP tokenizer: vocabulary layout, reload through transformers and diffusers, added tokens."""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer

from uniemo.models.tokenizer import BOS_TOKEN, EOS_TOKEN, MAX_LENGTH, build_local_tokenizer, bytes_to_unicode


def test_vocabulary_layout_and_encoding():
    tok = build_local_tokenizer()
    chars = list(bytes_to_unicode().values())
    assert len(set(chars)) == 256
    assert len(tok) == 514 and tok.model_max_length == MAX_LENGTH
    assert tok.convert_tokens_to_ids(BOS_TOKEN) == 512 and tok.bos_token_id == 512
    assert tok.eos_token_id == tok.pad_token_id == 513 and tok.convert_tokens_to_ids(EOS_TOKEN) == 513
    ids = tok("A cat", padding="max_length", max_length=MAX_LENGTH).input_ids
    assert len(ids) == MAX_LENGTH
    # Lower-cased, spelled out per character, the last character of each word carries </w>.
    assert tok.convert_ids_to_tokens(ids[:6]) == [BOS_TOKEN, "a</w>", "c", "a", "t</w>", EOS_TOKEN]
    assert ids[6:] == [513] * (MAX_LENGTH - 6)
    # Any byte string encodes without unknown tokens (byte-level fallback).
    weird = tok("émotion ☺ 42").input_ids
    assert all(0 <= i < 512 for i in weird[1:-1])
    assert tok.decode(tok("amusement park").input_ids, skip_special_tokens=True) == "amusement park"


def test_save_reload_and_add_tokens(tmp_path):
    tok = build_local_tokenizer(tmp_path / "tok", extra_tokens=["<dummy>"])
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "tok").iterdir()}
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "a photo of <dummy> by the sea"
    assert reloaded(text).input_ids == tok(text).input_ids
    assert len(reloaded) == 515 and reloaded.model_max_length == MAX_LENGTH
    dummy = reloaded.convert_tokens_to_ids("<dummy>")
    assert reloaded("<dummy>").input_ids == [512, dummy, 513]
    assert reloaded.add_tokens(["<awe>"]) == 1
    awe = reloaded.convert_tokens_to_ids("<awe>")
    assert awe == 515 and reloaded("<awe> bag").input_ids[:2] == [512, awe]


def test_stable_diffusion_pipeline_reloads_the_tokenizer(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_local_tokenizer(extra_tokens=["<awe>"])
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    assert isinstance(loaded.tokenizer, CLIPTokenizer)
    assert loaded.tokenizer("<awe> at dusk").input_ids == tok("<awe> at dusk").input_ids
    assert len(loaded.tokenizer) == len(tok) == loaded.text_encoder.get_input_embeddings().num_embeddings
