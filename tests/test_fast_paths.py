"""The GPU speed-ups compute what the plain path computes (uniemo.models.acceleration, the engine's optimiser).

Each fast path is checked on the CPU against the path it replaces, on the tiny presets: fused AdamW (where torch
has it on the CPU) and the rule that picks it; SDPA attention in the ViT, the UNet, the VAE and the text encoder;
channels_last; the fixed generation batch; and, marked slow (inductor compiles C++ on the CPU), torch.compile of
the training step and of generation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniemo.config.schema import Config
from uniemo.data.attributes import AttributeTable
from uniemo.models.acceleration import (
    accelerate_task,
    attention_kernels,
    compile_for_generation,
    to_channels_last,
    use_sdpa,
)
from uniemo.models.generator import Generator
from uniemo.training.engine import adamw_options
from uniemo.training.task import build_stage2_task


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg() -> Config:
    cfg = Config()
    cfg.data.image_size = cfg.data.generator_image_size = cfg.model.understanding.image_size = 32
    return cfg


def _batch(cfg: Config, attributes: AttributeTable, n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    s, gs = cfg.data.image_size, cfg.data.generator_image_size
    return {
        "image": torch.randn(n, 3, s, s, generator=g),
        "pixel_values": torch.rand(n, 3, gs, gs, generator=g) * 2 - 1,
        "label": torch.tensor([0, 3, 6][:n]),
        "scene_idx": torch.tensor([0, -1, 1][:n]),
        "object_idx": torch.tensor([1, 0, -1][:n]),
        "objects_multi_hot": torch.zeros(n, len(attributes.objects)),
    }


def _step(task, batch: dict, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and the gradients of the trainable parameters after one forward + backward."""
    task.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = task(batch)
    out["total"].backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad and p.grad is not None}
    return out["total"].detach(), grads


@pytest.fixture(scope="module")
def attributes(synth_shards) -> AttributeTable:
    return AttributeTable.load(synth_shards)


def _task(cfg: Config, attributes: AttributeTable):
    torch.manual_seed(0)
    return build_stage2_task(cfg, attributes).train()


# -- the optimiser -------------------------------------------------------------------------------------------------


def test_fused_adamw_is_chosen_on_cuda_only():
    assert adamw_options(torch.device("cpu")) == {}  # CPU runs keep torch's default (the golden loss curve)
    assert adamw_options(torch.device("cuda", 0)) == {"fused": True}


def test_fused_adamw_takes_the_default_step():
    """Where torch has a fused AdamW on the CPU, it takes the step the default implementation takes."""
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    results = []
    for options in ({}, {"fused": True}):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "lr": 1e-2, "weight_decay": 1e-2}, {"params": params[2:], "lr": 5e-3,
                                                                              "weight_decay": 0.0}]
        try:
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **options)
            for step in grads:
                for p, g in zip(params, step, strict=True):
                    p.grad = g.clone()
                optimizer.step()
        except RuntimeError as e:  # a torch without the CPU kernel: only the selection rule can be tested
            pytest.skip(f"no fused AdamW on this CPU build: {e}")
        results.append([p.detach() for p in params])
    for plain, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


# -- attention --------------------------------------------------------------------------------------------------------


def test_every_attention_runs_sdpa():
    generator = Generator.build_random("tiny", image_size=32, seed=0)
    kernels = attention_kernels(generator)
    assert kernels == {"unet": {"AttnProcessor2_0"}, "vae": {"AttnProcessor2_0"}, "text_encoder": {"sdpa"}}

    # A folder saved with an older processor is switched to SDPA, and the UNet computes the same.
    from diffusers.models.attention_processor import AttnProcessor

    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        sdpa = generator.unet(x, t, encoder_hidden_states=h).sample
        generator.unet.set_attn_processor(AttnProcessor())
        assert attention_kernels(generator)["unet"] == {"AttnProcessor"}
        plain = generator.unet(x, t, encoder_hidden_states=h).sample
        assert use_sdpa(generator.unet) > 0 and attention_kernels(generator)["unet"] == {"AttnProcessor2_0"}
    torch.testing.assert_close(sdpa, plain, rtol=1e-5, atol=1e-5)


def test_vit_attention_sdpa_equals_the_explicit_softmax():
    from uniemo.models.understanding import Attention

    torch.manual_seed(0)
    attention = Attention(64, 4)
    x, context = torch.randn(2, 9, 64), torch.randn(2, 17, 64)
    for ctx in (None, context):
        fused, none = attention(x, ctx)
        explicit, weights = attention(x, ctx, return_weights=True)
        assert none is None and weights is not None
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    # The fused path really is SDPA: the same result as calling it on the projections.
    q, k, v = (attention._split(proj(x)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    direct = attention.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(attention(x)[0], direct, rtol=0, atol=0)


# -- channels_last and the fixed generation batch ------------------------------------------------------------------


def test_channels_last_gives_the_same_step(attributes):
    cfg = _cfg()
    batch = _batch(cfg, attributes)
    plain = _task(cfg, attributes)
    loss, grads = _step(plain, batch)
    fast = _task(cfg, attributes)
    cfg.training.channels_last = True
    assert accelerate_task(fast, cfg.training) == ["channels_last UNet + VAE"]
    weight = fast.generator.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    fast_loss, fast_grads = _step(fast, batch)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _generate(generator: Generator, num: int, batch_size: int) -> np.ndarray:
    from uniemo.models.generation import generate_from_prompts

    prompts = ["a red house", "a blue lake", "a dark forest", "a sunny field", "a cat"][:num]
    return generate_from_prompts(generator, prompts, seeds=list(range(num)), steps=3, guidance_scale=7.5,
                                 sampler="unipc", batch_size=batch_size)


def test_fixed_generation_batch_pads_without_changing_the_images():
    generator = Generator.build_random("tiny", image_size=32, seed=0).eval()
    plain = _generate(generator, 5, batch_size=3)  # batches of 3 and 2
    generator.fixed_batch = 4  # both batches padded to 4 (static shapes for CUDA graphs)
    padded = _generate(generator, 5, batch_size=3)
    assert padded.shape == plain.shape
    assert np.abs(padded.astype(int) - plain.astype(int)).max() <= 1  # float rounding of another batch size


# -- torch.compile (inductor builds C++ on the CPU: slow) -------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_step_matches_eager(attributes):
    cfg = _cfg()
    batch = _batch(cfg, attributes, n=2)
    loss, grads = _step(_task(cfg, attributes), batch)
    compiled = _task(cfg, attributes)
    cfg.training.compile = True
    assert accelerate_task(compiled, cfg.training) == ["compiled UNet", "compiled ViT blocks"]
    for _ in range(2):  # the second step reuses the compiled graphs
        compiled_loss, compiled_grads = _step(compiled, batch)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    # The state dict keeps its names (checkpoints of compiled runs load anywhere).
    assert not any("_orig_mod" in k for k in compiled.state_dict())


@pytest.mark.slow
def test_compiled_generation_matches_eager():
    eager = Generator.build_random("tiny", image_size=32, seed=0).eval()
    reference = _generate(eager, 3, batch_size=4)
    compiled = Generator.build_random("tiny", image_size=32, seed=0).eval()
    compile_for_generation(compiled, batch_size=4)
    assert compiled.fixed_batch == 4
    images = _generate(compiled, 3, batch_size=4)  # 3 images padded to the fixed batch of 4
    assert images.shape == reference.shape
    assert np.abs(images.astype(int) - reference.astype(int)).max() <= 2


def test_channels_last_helper_keeps_the_function():
    generator = Generator.build_random("tiny", image_size=32, seed=0).eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = generator.latent_moments(pixels)
    to_channels_last(generator)
    mean_cl, std_cl = generator.latent_moments(pixels)
    torch.testing.assert_close(mean_cl, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std_cl, std, rtol=1e-5, atol=1e-6)
