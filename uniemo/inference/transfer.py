"""Emotion transfer: a real image rendered with a target emotion (the official ``inference_transfer.py``).

The source image goes through the understanding model (evaluation transform) and gives its own features
(v_cls, v_s, v_o) in place of the emotion-space draws of sampled generation (METHOD §4.2): the mappers and the
fusion are unchanged, and alpha is taken at the *target* emotion k, so the image's retrieved scene and object
attributes weigh in as much as they relate to k (METHOD §3.5). c is spliced at the placeholder of the prompt —
the bare placeholder, or ``"<placeholder> <object>"`` when an object word is given (the official script's
``"{} bag"`` template) — and denoised from per-seed Gaussian latents with CFG against the empty prompt.

Besides the images, each transfer writes c as a textual-inversion embedding (``<stem>_<emotion>.safetensors``,
one key: the token ``<stem-emotion>``). Because c replaces the placeholder's input embedding (D5), an exported
pipeline that loads it with ``pipe.load_textual_inversion(file)`` encodes ``"<stem-emotion> bag"`` exactly as
uniemo does, so the transfer can be rendered again without uniemo.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import torch

from uniemo.config.schema import EMOTIONS
from uniemo.data.images import load_image_bytes
from uniemo.data.records import RecordProblem
from uniemo.errors import UserError
from uniemo.inference.runs import LoadedRun, emotion_index, image_record, require_stage2, save_generations
from uniemo.models.conditioner import Conditioner
from uniemo.models.generation import render_conditions, sampling_settings
from uniemo.seeds import request_seeds

__all__ = ["check_request", "image_features", "transfer_image", "transfer_token"]


def transfer_token(stem: str, emotion: str) -> str:
    """The textual-inversion token of a transfer: ``<photo-awe>`` for ``photo.jpg`` and ``awe``."""
    safe = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "image"
    return f"<{safe}-{emotion}>"


def check_request(num: int, object_word: str | None, seed: int | None, steps: int | None = None) -> None:
    """The request's own values, checked before any model loads (UserError names the flag)."""
    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if object_word is not None and not re.fullmatch(r"[A-Za-z][A-Za-z -]*", object_word.strip()):
        raise UserError(f"--object {object_word!r}: give a plain word such as 'bag' or 'old house'")
    if seed is not None and seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")


@torch.no_grad()
def image_features(run: LoadedRun, path: str | Path) -> dict[str, torch.Tensor]:
    """The understanding features of one image file, each [1,D]: ``cls`` and the enabled query streams."""
    from PIL import Image

    try:
        data, _ = load_image_bytes(path)
    except RecordProblem as e:
        raise UserError(str(e)) from None
    with Image.open(io.BytesIO(data)) as image:
        pixels = run.transform(image, random.Random(0))["image"]  # the evaluation transform (no augmentation)
    model = run.understanding
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        out = model(pixels[None].to(param.device, param.dtype))
    finally:
        model.train(was_training)
    features = {"cls": out.cls_feature}
    if out.scene_feature is not None:
        features["scene"] = out.scene_feature
    if out.object_feature is not None:
        features["object"] = out.object_feature
    return {k: v.detach() for k, v in features.items()}


def transfer_image(
    run: LoadedRun,
    image: str | Path,
    emotion: str,
    out_dir: str | Path,
    *,
    num: int = 1,
    object_word: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
) -> list[dict[str, Any]]:
    """Render ``image`` with ``emotion``: ``num`` images ``<stem>_<emotion>_<seed>.png`` in ``out_dir``, one line
    each in ``generations.jsonl``, and the condition as a textual-inversion file (module docstring).

    Raises:
        UserError: a bad emotion, image, count, seed or sampler, a stage-1 run, or an object word that is not one
            plain word.
    """
    from safetensors.torch import save_file

    k = emotion_index(emotion)
    parts = require_stage2(run, "emotion transfer")
    generator, conditioner, base, phi = parts.generator, parts.conditioner, parts.attribute_embeddings, parts.phi
    check_request(num, object_word, seed, steps)
    steps, guidance_scale, sampler = sampling_settings(run.config.model.generator, steps, guidance_scale, sampler)
    seeds = request_seeds(seed, num)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the images")

    features = {s: v.expand(num, -1) for s, v in image_features(run, image).items()}
    latent_hw = generator.image_size // generator.vae_scale_factor
    shape = (1, generator.latent_channels, latent_hw, latent_hw)
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    placeholder = generator.placeholder_token
    prompt = placeholder if object_word is None else f"{placeholder} {object_word.strip()}"
    result = render_conditions(
        generator, conditioner, features, latents, k, seeds, base, phi,
        steps=steps, guidance_scale=guidance_scale, sampler=sampler, batch_size=num, prompt=prompt,
    )

    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image).stem
    token = transfer_token(stem, EMOTIONS[k])
    condition = _condition(conditioner, base, phi, features, k)
    embedding_file = f"{token[1:-1]}.safetensors"
    save_file({token: condition.contiguous()}, str(out / embedding_file))
    names = run.attribute_names
    records = []
    for i in range(len(result.images)):
        name = f"{token[1:-1]}_{result.seeds[i]}.png"
        record = {
            "file": name,
            "source_image": str(image),
            "emotion": EMOTIONS[k],
            "object": object_word,
            "prompt": prompt.replace(placeholder, token),
            **image_record(result, i, names, steps, guidance_scale, sampler),
            "embedding": embedding_file,
            "checkpoint": str(run.source),
            "step": run.step,
        }
        records.append(record)
    save_generations(out, result.images, records)
    return records


@torch.no_grad()
def _condition(
    conditioner: Conditioner, base: torch.Tensor, phi: torch.Tensor, features: dict[str, torch.Tensor], k: int
) -> torch.Tensor:
    """c of the image at emotion k, [Dt] float32 (the same for every seed)."""
    param = next(conditioner.parameters())
    one = {s: v[:1].to(param.device, param.dtype) for s, v in features.items()}
    labels = torch.full((1,), k, dtype=torch.long, device=param.device)
    was_training = conditioner.training
    conditioner.eval()
    try:
        out = conditioner(one["cls"], one.get("scene"), one.get("object"), labels, base, phi)
    finally:
        conditioner.train(was_training)
    return out.condition[0].float().cpu()


