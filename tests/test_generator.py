"""The generator wrapper: load-through-real-code, the differentiable splice (D5), frozen parts, names (D6)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from uniemo.errors import UserError
from uniemo.models.generator import Generator


@pytest.fixture(scope="module")
def tiny():
    return Generator.build_random("tiny", image_size=64, seed=0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd_tiny")
    tiny.save_pretrained(path)
    return path


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_build_random_is_deterministic_for_a_seed(tiny):
    rng_before = torch.random.get_rng_state()
    again = Generator.build_random("tiny", image_size=64, seed=0)
    other = Generator.build_random("tiny", image_size=64, seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state()), (
        "build_random must not consume the global RNG"
    )
    a, b, c = _state(tiny), _state(again), _state(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sizes_of_tiny_preset(tiny):
    assert tiny.token_dim == 32
    assert tiny.unet.config.cross_attention_dim == 32
    assert tiny.max_length == 77
    assert tiny.image_size == 64
    assert tiny.latent_scale == pytest.approx(0.18215)
    cfg = tiny.noise_scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.num_train_timesteps == 1000 and cfg.prediction_type == "epsilon"
    assert type(tiny.noise_scheduler).__name__ == "DDPMScheduler"


def test_save_pretrained_layout_and_reload_gives_same_outputs(tiny, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "text_encoder" / "model.safetensors").is_file()

    loaded = Generator.from_pretrained(saved)
    assert loaded.placeholder_token == tiny.placeholder_token
    assert loaded.placeholder_id == tiny.placeholder_id
    assert len(loaded.tokenizer) == len(tiny.tokenizer)
    a, b = _state(tiny), _state(loaded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    c = torch.randn(2, tiny.token_dim)
    hs_a, hs_b = tiny.encode_condition(c), loaded.encode_condition(c)
    assert hs_a.shape == (2, 77, 32)
    assert torch.equal(hs_a, hs_b)
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(tiny.predict_noise(latents, t, hs_a), loaded.predict_noise(latents, t, hs_b))
    assert torch.equal(tiny.encode_prompts(["a dog", ""]), loaded.encode_prompts(["a dog", ""]))


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Generator.from_pretrained(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="unet"):
        Generator.from_pretrained(tmp_path / "half")


def test_frozen_parts(tiny):
    for part in (tiny.vae, tiny.text_encoder, tiny.unet):
        assert all(not p.requires_grad for p in part.parameters())
    tiny.train()
    assert tiny.training
    assert not tiny.vae.training and not tiny.text_encoder.training and not tiny.unet.training
    tiny.eval()

    trainable = Generator.build_random("tiny", image_size=64, seed=0, train_unet=True)
    assert all(p.requires_grad for p in trainable.unet.parameters())
    assert all(not p.requires_grad for p in trainable.text_encoder.parameters())
    trainable.train()
    assert trainable.unet.training and not trainable.vae.training


def test_placeholder_added_and_initialised_from_init_word(tiny):
    assert tiny.tokenizer.convert_tokens_to_ids(tiny.placeholder_token) == tiny.placeholder_id
    ids = tiny.tokenize([tiny.placeholder_token])[0].tolist()
    assert ids[:3] == [tiny.tokenizer.bos_token_id, tiny.placeholder_id, tiny.tokenizer.eos_token_id]
    row = tiny.text_encoder.get_input_embeddings().weight[tiny.placeholder_id]
    assert torch.allclose(row, tiny.embed_names(["cat"])[0])


def test_splice_equals_writing_the_embedding_row(tiny):
    """The official route (METHOD §3.6) overwrites the row; the splice must compute the same thing (D5)."""
    c = torch.randn(1, tiny.token_dim)
    spliced = tiny.encode_condition(c)
    official = copy.deepcopy(tiny)
    with torch.no_grad():
        official.text_encoder.get_input_embeddings().weight[official.placeholder_id] = c[0]
    assert torch.allclose(spliced, official.encode_prompts([official.placeholder_token]), atol=1e-6)
    # a batch splices each row's own c
    c2 = torch.randn(3, tiny.token_dim)
    batch = tiny.encode_condition(c2)
    assert torch.allclose(batch[1:2], tiny.encode_condition(c2[1:2]), atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        tiny.encode_condition(c, prompt="no slot here")


def test_splice_gradient_matches_finite_differences():
    gen = Generator.build_random("tiny", image_size=64, seed=3).double()
    c = torch.randn(2, gen.token_dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 77, gen.token_dim, dtype=torch.float64)

    hs = gen.encode_condition(c)
    (hs * weight).sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert gen.text_encoder.get_input_embeddings().weight.grad is None  # frozen table untouched

    assert torch.autograd.gradcheck(
        lambda x: (gen.encode_condition(x) * weight).sum(),
        (c.detach().requires_grad_(),),
        eps=1e-6,
        atol=1e-6,
    )


def test_diffusion_gradient_reaches_c(tiny):
    c = torch.randn(2, tiny.token_dim, requires_grad=True)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    inputs = tiny.diffusion_inputs(pixels, torch.Generator().manual_seed(0))
    eps = tiny.predict_noise(inputs.noisy_latents, inputs.timesteps, tiny.encode_condition(c))
    torch.nn.functional.mse_loss(eps, inputs.noise).backward()
    assert c.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_diffusion_inputs(tiny):
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    a = tiny.diffusion_inputs(pixels, torch.Generator().manual_seed(7))
    b = tiny.diffusion_inputs(pixels, torch.Generator().manual_seed(7))
    noisy, noise, latents, timesteps = a
    assert noisy.shape == noise.shape == latents.shape == (3, 4, 16, 16)
    assert timesteps.dtype == torch.int64 and timesteps.shape == (3,)
    assert int(timesteps.min()) >= 0 and int(timesteps.max()) < 1000
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.allclose(noisy, tiny.noise_scheduler.add_noise(latents, noise, timesteps))
    # latents are the scaled VAE posterior sample (METHOD §3.7)
    posterior = tiny.vae.encode(pixels).latent_dist
    assert torch.allclose(latents, posterior.sample(torch.Generator().manual_seed(7)) * 0.18215, atol=1e-6)


def test_embed_names(tiny):
    emb = tiny.embed_names(["big_dog", "big dog", "a"])
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.equal(emb[0], emb[1])
    table = tiny.text_encoder.get_input_embeddings().weight
    ids = tiny.tokenizer("a", add_special_tokens=False).input_ids
    assert len(ids) == 1
    assert torch.allclose(emb[2], table[ids[0]])
    special = {tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id}
    dog_ids = tiny.tokenizer("big dog", add_special_tokens=False).input_ids
    assert not special & set(dog_ids)
    assert torch.allclose(emb[0], table[dog_ids].mean(0))
    assert tiny.embed_names([]).shape == (0, 32)


def test_small_preset_pairs_with_small_understanding():
    small = Generator.build_random("small", image_size=64, seed=0)
    assert small.token_dim == 64 and small.unet.config.cross_attention_dim == 64
