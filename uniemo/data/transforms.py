"""Image transforms of the loader, in PIL and torch (torchvision is deliberately not a dependency).

- Understanding input ``image`` (METHOD §2.6): training = RandomResizedCrop(S) + horizontal flip with
  torchvision's sampling rule; evaluation = Resize(R) (shorter side, R = ``data.crop_resize`` or S) +
  CenterCrop(S). Normalised by
  ``data.normalization``: ImageNet mean/std (the official Stage-1 choice), CLIP's, or ``symmetric`` ([-1, 1],
  the official Stage-2 ``image``, METHOD §3.2).
- Generator input ``pixel_values`` (stage 2, METHOD §3.2 b): the whole image resized to G x G (aspect ratio
  not kept, as in the official code; bicubic by default, the filter of the official ``PIL.Image.resize`` call,
  ``data.generator_resample``), flipped with p = 0.5 in training, independently of ``image``, in [-1, 1].

Decoded images go through :func:`uniemo.data.images.to_rgb` first (orientation, bit depth, transparency).
Every random choice draws from the ``random.Random`` passed in, so the loader can make a sample's
augmentation depend only on its position in the stream (exact resumption, :mod:`uniemo.data.loader`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from uniemo.data.images import to_rgb

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
"""Mean and std per channel of each ``data.normalization``."""

RESAMPLE = Image.Resampling.BILINEAR  # torchvision's default for PIL inputs
GENERATOR_RESAMPLE: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,  # PIL's default of Image.resize: the official VAE input (METHOD §3.2)
    "bilinear": Image.Resampling.BILINEAR,
}
"""``data.generator_resample`` -> the PIL filter of the ``pixel_values`` resize."""


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random crop, torchvision's ``RandomResizedCrop.get_params`` rule.

    Ten tries at an area in ``scale`` and a log-uniform aspect ratio in ``ratio``; else a central crop
    clamped to the ratio range.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def resize_center_crop(image: Image.Image, size: int, resize: int = 0) -> Image.Image:
    """Resize the shorter side to ``resize`` (0: ``size``), then crop the central ``size`` x ``size``
    (torchvision's ``Resize`` + ``CenterCrop`` rounding)."""
    w, h = image.size
    side = resize or size
    if (w, h) != (size, size) or side != size:
        if w <= h:
            new_w, new_h = side, int(side * h / w)
        else:
            new_w, new_h = int(side * w / h), side
        image = image.resize((new_w, new_h), RESAMPLE)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


def _affine(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``uint8 * scale - shift == (uint8 / 255 - mean) / std``, shaped ``[3, 1, 1]``."""
    mean, std = NORMALIZATIONS[name]
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)]).view(3, 1, 1)
    return scale, shift


_AFFINE = {name: _affine(name) for name in NORMALIZATIONS}


def to_normalized_tensor(image: Image.Image, name: str) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` normalised by ``name``, in one multiply-subtract."""
    scale, shift = _AFFINE[name]
    # Reorder the uint8 pixels to a contiguous CHW block first: the float maths and the later batch stack
    # then run on contiguous memory (about 2x and 3x faster than on the permuted view).
    pixels_CHW = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels_CHW.float().mul_(scale).sub_(shift)


@dataclass(frozen=True)
class SampleTransform:
    """Decoded PIL image -> the image tensors of one sample (``image`` and, in stage 2, ``pixel_values``)."""

    image_size: int
    normalization: str = "imagenet"
    augment: bool = False
    """RandomResizedCrop + horizontal flip (training, METHOD §2.6); else Resize + CenterCrop."""
    crop_resize: int = 0
    """Shorter side before the centre crop of a view without augmentation; 0: ``image_size`` (METHOD §3.2: 256)."""
    generator_size: int | None = None
    """Side of ``pixel_values`` (stage 2); None: no ``pixel_values``."""
    flip_pixel_values: bool = False
    """Horizontal flip of ``pixel_values`` with p = 0.5 (training, METHOD §3.2)."""
    generator_resample: str = "bicubic"
    """Filter of the ``pixel_values`` resize (:data:`GENERATOR_RESAMPLE`)."""

    @property
    def is_random(self) -> bool:
        """Whether the output depends on the ``rng`` (else one shared generator will do)."""
        return self.augment or (self.flip_pixel_values and self.generator_size is not None)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if self.generator_resample not in GENERATOR_RESAMPLE:
            raise ValueError(
                f"generator_resample must be one of {', '.join(GENERATOR_RESAMPLE)}, got {self.generator_resample!r}"
            )

    def __call__(self, image: Image.Image, rng: random.Random, pixels: bool = True) -> dict[str, Any]:
        """``{"image"}`` and, in stage 2, ``"pixel_values"``; with ``pixels`` False (the sample's VAE latents are
        precomputed, :mod:`uniemo.data.latents`) ``"pixel_flip"`` instead: the flip the pixels would have had,
        drawn from ``rng`` at the same point, so every other draw (and the ``image`` view) stays the same."""
        image = to_rgb(image)  # EXIF orientation, 16-bit scaled, transparency on white (uniemo.data.images)
        if self.augment:
            box = random_resized_crop_box(image.width, image.height, rng)
            view = image.resize((self.image_size, self.image_size), RESAMPLE, box=box)
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            view = resize_center_crop(image, self.image_size, self.crop_resize)
        out: dict[str, Any] = {"image": to_normalized_tensor(view, self.normalization)}
        if self.generator_size is not None:
            flip = self.flip_pixel_values and rng.random() < 0.5
            if pixels:
                out["pixel_values"] = generator_pixels(image, self.generator_size, flip, self.generator_resample)
            else:
                out["pixel_flip"] = flip
        return out


def generator_pixels(image: Image.Image, size: int, flip: bool, resample: str) -> torch.Tensor:
    """The VAE input of an RGB image (METHOD §3.2 b): the whole image resized to ``size`` x ``size`` (aspect ratio
    not kept) with the ``resample`` filter (``data.generator_resample``), flipped left-right when ``flip``, in
    [-1, 1]; float32 ``[3, size, size]``. The one definition of ``pixel_values``, shared by the loader and the
    precomputed latents."""
    pixels = image if image.size == (size, size) else image.resize((size, size), GENERATOR_RESAMPLE[resample])
    if flip:
        pixels = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_normalized_tensor(pixels, "symmetric")


def build_sample_transform(data_cfg: Any, *, stage: int, training: bool) -> SampleTransform:
    """The transform of a stream from ``DataConfig``: augmentation only when training and ``train_augment``."""
    return SampleTransform(
        image_size=data_cfg.image_size,
        normalization=data_cfg.normalization,
        augment=training and data_cfg.train_augment,
        crop_resize=data_cfg.crop_resize,
        generator_size=data_cfg.generator_image_size if stage == 2 else None,
        flip_pixel_values=training,
        generator_resample=data_cfg.generator_resample,
    )
