"""Generation for a target emotion (METHOD §4.2, D10).

For emotion k and each image: draw (v_cls, v_s, v_o) from the emotion space, map and fuse them with alpha taken at
the target emotion k, splice c at the placeholder position, denoise from Gaussian latents with UniPC or DDIM and
classifier-free guidance against the empty prompt, and decode.

Reproducibility (D10): every image has its own seed, and a CPU ``torch.Generator`` seeded with it draws first
the emotion-space sample, then the initial latents. An image therefore depends only on (models, emotion, seed,
steps, guidance, sampler), not on the other seeds or on the batch it was denoised in; the batch composition only
changes float rounding in the matmul kernels (at most a level or two of uint8 on a few pixels).

Shape legend: N images, B a batch of them, C/h/w latent channels and sides, Dt text-token width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError
from uniemo.models.conditioner import Conditioner
from uniemo.models.emotion_space import EmotionSpace
from uniemo.models.generator import Generator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import GeneratorConfig

SAMPLERS = ("unipc", "ddim")


class SamplingSettings(NamedTuple):
    """How images are sampled: denoising steps, classifier-free guidance scale, sampler (D10)."""

    steps: int
    guidance_scale: float
    sampler: str


def sampling_settings(
    gen_cfg: GeneratorConfig, steps: int | None = None, guidance_scale: float | None = None,
    sampler: str | None = None,
) -> SamplingSettings:
    """The one resolver of sampling settings: each value given (a command's flag, ``feedback.*``,
    ``evaluation.sampling_steps``) or, when None, ``model.generator``'s (of the config the caller runs with).

    Raises:
        UserError: an unknown sampler.
    """
    steps = gen_cfg.sampling_steps if steps is None else int(steps)
    guidance = gen_cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
    sampler = gen_cfg.sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return SamplingSettings(steps, guidance, sampler)


@dataclass
class GenerationResult:
    """Images for one emotion with everything needed to reproduce and audit each of them."""

    images: np.ndarray
    """uint8 [N,H,W,3]."""
    emotion: int
    """The target emotion k (EmoSet order, D1)."""
    seeds: list[int]
    """Per-image seed: (emotion, seed) regenerates the image (D10)."""
    alpha_scene: np.ndarray
    """alpha_s at emotion k, float32 [N]."""
    alpha_object: np.ndarray
    """alpha_o at emotion k, float32 [N]."""
    scene_attribute: np.ndarray
    """Attribute-base index retrieved by the scene branch, int64 [N] (-1: none)."""
    object_attribute: np.ndarray
    """Attribute-base index retrieved by the object branch, int64 [N] (-1: none)."""


def build_sampler(generator: Generator, sampler: str, steps: int):
    """A fresh UniPC or DDIM scheduler built from the generator's SD scheduler config, with ``steps`` set."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    if sampler == "unipc":
        scheduler = UniPCMultistepScheduler.from_config(generator.scheduler.config)
    elif sampler == "ddim":
        # Latents are not bounded to [-1, 1]: never clip the predicted x0 (DDIM's default would).
        scheduler = DDIMScheduler.from_config(generator.scheduler.config, clip_sample=False)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    scheduler.set_timesteps(steps, device=generator.device)
    return scheduler


def _emotion_index(emotion: int | str) -> int:
    if isinstance(emotion, str):
        if emotion not in EMOTIONS:
            raise ValueError(f"unknown emotion {emotion!r}; choose one of {EMOTIONS}")
        return EMOTIONS.index(emotion)
    if not 0 <= int(emotion) < len(EMOTIONS):
        raise ValueError(f"emotion index must lie in [0, {len(EMOTIONS)}), got {emotion}")
    return int(emotion)


@torch.no_grad()
def _denoise(
    generator: Generator,
    latents_BChw: torch.Tensor,
    cond_BLD: torch.Tensor,
    uncond_1LD: torch.Tensor,
    steps: int,
    guidance_scale: float,
    sampler: str,
) -> torch.Tensor:
    scheduler = build_sampler(generator, sampler, steps)
    num = latents_BChw.shape[0]
    latents_BChw, cond_BLD = _pad(generator, latents_BChw), _pad(generator, cond_BLD)
    latents = latents_BChw * scheduler.init_noise_sigma
    guided = guidance_scale > 1.0
    if guided:
        context = torch.cat([uncond_1LD.expand_as(cond_BLD), cond_BLD])
    else:
        context = cond_BLD
    # Compiled with CUDA graphs (fixed_batch on a GPU): each UNet call starts a new graph step, so no output
    # of a replay is read after the next one overwrote it.
    graph_steps = generator.fixed_batch is not None and latents.device.type == "cuda"
    for t in scheduler.timesteps:
        if graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = generator.predict_noise(model_in, t, context)
        if guided:
            # Classifier-free guidance with the empty prompt (METHOD §4.2).
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents[:num]


def _pad(generator: Generator, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` padded to ``generator.fixed_batch`` with copies of its last row (static shapes for CUDA graphs);
    each image is denoised on its own, so the padding rows change no other image (beyond float rounding)."""
    extra = (generator.fixed_batch or 0) - rows.shape[0]
    if extra <= 0:
        return rows
    return torch.cat([rows, rows[-1:].expand(extra, *rows.shape[1:])])


def _decode(generator: Generator, latents: torch.Tensor) -> torch.Tensor:
    """Decoded images of ``latents`` (padded like the denoising batch, then cut back)."""
    return generator.decode_latents(_pad(generator, latents))[: latents.shape[0]]


@torch.no_grad()
def generate(
    generator: Generator,
    conditioner: Conditioner,
    emotion_space: EmotionSpace,
    attribute_embeddings: torch.Tensor,
    phi: torch.Tensor,
    emotion: int | str,
    num: int,
    seeds: list[int] | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "unipc",
    batch_size: int = 8,
    prompt: str | None = None,
) -> GenerationResult:
    """Generate ``num`` images of emotion ``emotion`` (index or name; METHOD §4.2, D10).

    Args:
        attribute_embeddings: the attribute base in the generator's token space, [A,Dt] (``Generator.embed_names``).
        phi: the correlation table, [A,8].
        seeds: one per image; None draws them from the global torch RNG (and records them).
        steps, guidance_scale, sampler: denoising steps, CFG scale (<= 1: no guidance), ``unipc`` or ``ddim``.
        batch_size: images denoised together; images depend on it only up to float rounding.
        prompt: text around the placeholder (default: the bare placeholder, METHOD §4.2).
    """
    k = _emotion_index(emotion)
    seeds = _checked_seeds(seeds, num, sampler, batch_size)
    latent_hw = generator.image_size // generator.vae_scale_factor
    latent_shape = (generator.latent_channels, latent_hw, latent_hw)

    # Per-image draws: emotion-space sample first, then the initial latents, from the image's own generator.
    draws: dict[str, list[torch.Tensor]] = {s: [] for s in emotion_space.streams}
    latents: list[torch.Tensor] = []
    for seed in seeds:
        rng = torch.Generator(device="cpu").manual_seed(seed)
        for stream, value in emotion_space.sample(k, 1, rng).items():
            draws[stream].append(value)
        latents.append(torch.randn((1, *latent_shape), generator=rng))
    features = {s: torch.cat(values) for s, values in draws.items()}
    return render_conditions(
        generator, conditioner, features, latents, k, seeds, attribute_embeddings, phi,
        steps=steps, guidance_scale=guidance_scale, sampler=sampler, batch_size=batch_size, prompt=prompt,
    )


def _checked_seeds(seeds: list[int] | None, num: int, sampler: str, batch_size: int) -> list[int]:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (num,)).tolist()
    seeds = [int(s) for s in seeds]
    if len(seeds) != num:
        raise ValueError(f"got {len(seeds)} seeds for {num} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return seeds


@torch.no_grad()
def render_conditions(
    generator: Generator,
    conditioner: Conditioner,
    features: dict[str, torch.Tensor],
    latents: list[torch.Tensor],
    emotion: int,
    seeds: list[int],
    attribute_embeddings: torch.Tensor,
    phi: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    sampler: str,
    batch_size: int,
    prompt: str | None,
) -> GenerationResult:
    """Map and fuse the understanding features ``features`` (``cls`` and, when present, ``scene``/``object``,
    each [N,D]) with alpha at ``emotion``, splice c into ``prompt`` and denoise the initial ``latents`` (N tensors
    [1,C,h,w]); shared by sampled generation (:func:`generate`) and emotion transfer, whose features come from a
    real image."""
    device = generator.device
    param = next(conditioner.parameters())
    num = len(latents)
    was_training = (conditioner.training, generator.training)
    conditioner.eval()
    generator.eval()
    try:
        uncond_1LD = generator.encode_prompts([""])
        images, alpha_s, alpha_o, attr_s, attr_o = [], [], [], [], []
        for start in range(0, num, batch_size):
            stop = min(start + batch_size, num)
            feats = {s: value[start:stop].to(param.device, param.dtype) for s, value in features.items()}
            labels_B = torch.full((stop - start,), emotion, dtype=torch.long, device=param.device)
            out = conditioner(
                feats["cls"], feats.get("scene"), feats.get("object"), labels_B, attribute_embeddings, phi
            )
            cond_BLD = generator.encode_condition(out.condition.to(device), prompt)
            final = _denoise(
                generator,
                torch.cat(latents[start:stop]).to(device),
                cond_BLD,
                uncond_1LD,
                steps,
                guidance_scale,
                sampler,
            )
            images.append(_to_uint8(_decode(generator, final)))
            alpha_s.append(out.alpha_scene.float().cpu().numpy())
            alpha_o.append(out.alpha_object.float().cpu().numpy())
            attr_s.append(out.scene_attribute.cpu().numpy())
            attr_o.append(out.object_attribute.cpu().numpy())
    finally:
        conditioner.train(was_training[0])
        generator.train(was_training[1])

    h = w = generator.image_size
    return GenerationResult(
        images=np.concatenate(images) if images else np.zeros((0, h, w, 3), np.uint8),
        emotion=emotion,
        seeds=seeds,
        alpha_scene=np.concatenate(alpha_s) if alpha_s else np.zeros(0, np.float32),
        alpha_object=np.concatenate(alpha_o) if alpha_o else np.zeros(0, np.float32),
        scene_attribute=np.concatenate(attr_s) if attr_s else np.zeros(0, np.int64),
        object_attribute=np.concatenate(attr_o) if attr_o else np.zeros(0, np.int64),
    )


def _to_uint8(pixels_B3HW: torch.Tensor) -> np.ndarray:
    """Decoded images in [-1, 1] -> uint8 ``[B,H,W,3]``."""
    return ((pixels_B3HW / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_from_prompts(
    generator: Generator,
    prompts: list[str],
    seeds: list[int],
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "unipc",
    batch_size: int = 8,
) -> np.ndarray:
    """Plain text-to-image with the generator (no condition token): one image per prompt, its initial latents
    drawn from ``torch.Generator().manual_seed(seed)``; uint8 ``[N,H,W,3]``. Used to measure a pretrained
    generator on captions (METHOD D15)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    latent_hw = generator.image_size // generator.vae_scale_factor
    shape = (1, generator.latent_channels, latent_hw, latent_hw)
    was_training = generator.training
    generator.eval()
    try:
        uncond_1LD = generator.encode_prompts([""])
        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds[start : start + batch_size]])
            final = _denoise(generator, latents.to(generator.device), generator.encode_prompts(chunk),
                             uncond_1LD, steps, guidance_scale, sampler)
            images.append(_to_uint8(_decode(generator, final)))
    finally:
        generator.train(was_training)
    h = w = generator.image_size
    return np.concatenate(images) if images else np.zeros((0, h, w, 3), np.uint8)
