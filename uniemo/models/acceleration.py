"""Speed-ups that leave the models' functions as they are (each proved equal on the CPU, tests/test_fast_paths.py).

- **Fused attention.** The understanding ViT's attention runs ``F.scaled_dot_product_attention`` (unless an
  attention map is asked for); :func:`use_sdpa` makes sure the UNet's and the VAE's attention go through diffusers'
  ``AttnProcessor2_0`` (the same kernel), whatever processor a loaded folder came with. The CLIP text encoder is
  built with transformers' ``sdpa`` implementation, its default.
- **channels_last** (:func:`to_channels_last`): the UNet's and the VAE's weights in the NHWC memory format, which
  the GPU convolution kernels prefer; activations follow the weights' format.
- **torch.compile** (:func:`compile_for_training`, :func:`compile_for_generation`): ``nn.Module.compile`` in place,
  so parameter names, state dicts and checkpoints do not change. Training compiles the UNet and each block of
  the ViT (the blocks share one graph: dynamo treats a block's parameters as inputs). Generation compiles the UNet
  and the VAE decoder; on CUDA in mode ``reduce-overhead``, i.e. replayed CUDA graphs, which need static shapes:
  :attr:`Generator.fixed_batch` makes the denoising loop pad every batch to one size
  (:mod:`uniemo.models.generation`).

Frozen work a step reuses instead of recomputing: the VAE latents (stored once, :mod:`uniemo.data.latents`) and the
token ids of the condition prompt (:meth:`Generator._prompt_ids`). What must run every step although its weights are
frozen: the ViT backbone (the expert queries join the token sequence before block 1, so every block's activations
depend on trained parameters, METHOD §2.1) and the text encoder (c is spliced into its input, D5, and the
diffusion gradient flows back through it to c).

None of them is on by default on the CPU (``training.compile``, ``training.channels_last``,
``model.generator.compile``); the EmoSet recipes turn them on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import TrainingConfig
    from uniemo.models.understanding import UnderstandingModel


class Generator(Protocol):
    """What the fast paths touch of a :class:`uniemo.models.generator.Generator`, typed by shape: the generator
    module uses :func:`use_sdpa`, so this module does not import it (no import cycle)."""

    fixed_batch: int | None

    @property
    def unet(self) -> Any: ...

    @property
    def vae(self) -> Any: ...

    @property
    def text_encoder(self) -> Any: ...

    @property
    def device(self) -> torch.device: ...


def use_sdpa(module: nn.Module) -> int:
    """Give every attention layer of a diffusers model (UNet, VAE) the SDPA processor; returns how many it
    changed (0 for a model built by this diffusers, which picks it already)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    changed = 0
    for sub in module.modules():
        if isinstance(sub, Attention) and not isinstance(sub.processor, AttnProcessor2_0):
            processor: Any = AttnProcessor2_0()  # diffusers types the argument narrower than it accepts
            sub.set_processor(processor)
            changed += 1
    return changed


def attention_kernels(generator: Generator) -> dict[str, set[str]]:
    """Which attention implementation each part of a generator uses (for tests and benchmarks)."""
    from diffusers.models.attention_processor import Attention

    found: dict[str, set[str]] = {}
    for part in ("unet", "vae"):
        found[part] = {type(m.processor).__name__ for m in getattr(generator, part).modules()
                       if isinstance(m, Attention)}
    found["text_encoder"] = {str(generator.text_encoder.config._attn_implementation)}
    return found


def to_channels_last(generator: Generator) -> None:
    """UNet and VAE weights in the channels-last memory format (in place)."""
    parts: tuple[nn.Module, ...] = (generator.unet, generator.vae)
    for part in parts:
        part.to(memory_format=torch.channels_last)


def compile_understanding(understanding: UnderstandingModel, **options: Any) -> None:
    """Compile each ViT block and interactive block of the understanding model (in place)."""
    for block in understanding.encoder.blocks():
        block.compile(**options)
    for interaction in (understanding.scene_interaction, understanding.object_interaction):
        if interaction is not None:
            interaction.compile(**options)


def accelerate_task(task: nn.Module, training_cfg: TrainingConfig) -> list[str]:
    """``training.channels_last`` and ``training.compile`` on a task's models (the ones it has: ``generator``,
    ``understanding``); returns what was done, for the log."""
    done = []
    generator = getattr(task, "generator", None)
    understanding = getattr(task, "understanding", None)
    if training_cfg.channels_last and generator is not None:
        to_channels_last(generator)
        done.append("channels_last UNet + VAE")
    if training_cfg.compile:
        if generator is not None:
            generator.unet.compile()
            done.append("compiled UNet")
        if understanding is not None:
            compile_understanding(understanding)
            done.append("compiled ViT blocks")
    return done


def compile_for_generation(generator: Generator, batch_size: int) -> None:
    """UNet and VAE in channels_last, then compile the UNet and the VAE decoder for generation at a fixed batch
    (module docstring). On CUDA the mode is ``reduce-overhead`` (CUDA graphs); on the CPU the default mode (the
    same code path, for tests)."""
    to_channels_last(generator)
    mode = "reduce-overhead" if generator.device.type == "cuda" else None
    generator.unet.compile(mode=mode)
    generator.vae.decoder.compile(mode=mode)
    generator.fixed_batch = int(batch_size)
