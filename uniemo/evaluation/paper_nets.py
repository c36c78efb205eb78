"""The networks of EmoGen's evaluation protocol (METHOD §6.2), built from local weight files only.

Each file is a key of ``evaluation.weights`` (:class:`uniemo.config.schema.MetricWeightsConfig`). Loading:

- nothing is downloaded: torchmetrics' Inception is always given its weight file, lpips builds its AlexNet with
  ``pnet_rand=True`` (no torchvision download) and gets the AlexNet weights from ``lpips_alexnet``, torchvision
  models are built with ``weights=None``, CLIP is built from its folder's ``config.json`` and safetensors;
- nothing is unpickled freely: uniemo's own loads pass ``weights_only=True``, and the libraries' own
  ``torch.load`` calls (torch-fidelity passes ``weights_only=False``) run inside :func:`sealed`, which forces
  torch's weights-only unpickler for every load (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``);
- a missing file, a file that is not what the key wants, or a pickle that holds more than tensors and plain data
  is one :class:`UserError` line naming the key.

Every loaded network comes with the :class:`WeightsFile` s it was read from (name and sha256), for
``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniemo.config.schema import NUM_EMOTIONS, EvaluationConfig, MetricWeightsConfig
from uniemo.data.shards import file_digest
from uniemo.errors import ConfigError, UserError

KEY = "evaluation.weights."

EXPECTED = {
    "inception": "torch-fidelity's Inception-v3 state dict (weights-inception-2015-12-05-6726825d.pth)",
    "clip": "a transformers CLIP folder (CLIPModel.save_pretrained of openai/clip-vit-large-patch14)",
    "emo_a_probe": "EmoGen's linear probe state dict (fc.weight [8, 768], fc.bias [8]; "
    "weights/Clip_emotion_classifier/time_2023-11-12_03-29-best.pth)",
    "lpips_alexnet": "torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth)",
    "places365_resnet50": "the CSAIL Places365 ResNet-50 (resnet50_places365.pth.tar)",
    "imagenet_resnet50": "torchvision's ImageNet ResNet-50 state dict (resnet50-0676ba61.pth)",
}
"""What each ``evaluation.weights`` key must hold, for messages."""


@dataclass(frozen=True)
class WeightsFile:
    """A weight file a metric read: its config key, path and sha256."""

    key: str
    path: Path
    sha256: str

    def describe(self) -> dict[str, str]:
        return {"key": self.key, "file": self.path.name, "path": str(self.path), "sha256": self.sha256}


def _one_line(error: BaseException) -> str:
    """The telling part of a library's error, on one line: the unpickler's refusal, the first key that does not
    fit a state dict, else the start of the message."""
    text = " ".join(str(error).split())
    refusal = re.search(r"(?:WeightsUnpickler error: |Trying to load )(.*?)(?: Check the |$)", text)
    if refusal:
        return refusal.group(1).strip()
    misfit = re.search(r'(Missing|Unexpected) key\(s\) in state_dict: "([^"]+)"', text)
    if misfit:
        return f"{misfit.group(1).lower()} key {misfit.group(2)}"
    shape = re.search(r"size mismatch for ([^:]+): .*?torch\.Size\((\[[^\]]*\])\).*?torch\.Size\((\[[^\]]*\])\)", text)
    if shape:
        return f"{shape.group(1)} is {shape.group(2)}, not {shape.group(3)}"
    return text if len(text) <= 240 else text[:237] + "..."


def weight_path(weights: MetricWeightsConfig, name: str, folder: bool = False) -> Path:
    """The path of ``evaluation.weights.<name>``, which must exist (a folder for ``folder``)."""
    path = Path(getattr(weights, name)).expanduser()
    if not path.exists():
        raise UserError(
            f"{KEY}{name}: {path} does not exist; give {EXPECTED[name]}, or leave the key empty to skip its metric"
        )
    if folder != path.is_dir():
        kind = "a folder" if folder else "a file"
        raise UserError(f"{KEY}{name}: {path} is not {kind}; give {EXPECTED[name]}")
    return path


def check_weights(weights: MetricWeightsConfig) -> None:
    """Every configured weight path exists (before any heavy work); one line naming the key otherwise."""
    for name in EXPECTED:
        if getattr(weights, name):
            weight_path(weights, name, folder=name == "clip")


def describe_file(name: str, path: Path) -> WeightsFile:
    return WeightsFile(KEY + name, path.resolve(), file_digest(path)[1])


@contextlib.contextmanager
def sealed() -> Iterator[None]:
    """Weights-only unpickling for every ``torch.load``, and no library warnings or info lines on the console."""
    from transformers.utils import logging as hf_logging

    from uniemo.training.safe_pickle import forced_weights_only

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with forced_weights_only(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_pickle(name: str, path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a one-line error naming the key otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{KEY}{name}: {path} holds more than tensors and plain data, and uniemo unpickles only with "
            f"weights_only=True ({_one_line(e)}); re-save it as a state dict, or give {EXPECTED[name]}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{KEY}{name}: {path} is not a torch weights file ({_one_line(e)}); give {EXPECTED[name]}") from None


def load_into(name: str, path: Path, module: nn.Module, state: Any) -> None:
    """``module.load_state_dict(state, strict=True)``; a one-line error naming the key and the first misfit."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{KEY}{name}: {path} is not a state dict of tensors; give {EXPECTED[name]}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
            else f"{wrong[0]} is {list(state[wrong[0]].shape)}, not {list(expected[wrong[0]].shape)}"
        )
        raise UserError(f"{KEY}{name}: {path} does not fit ({what}); give {EXPECTED[name]}")
    module.load_state_dict(dict(state), strict=True)


def resolve_device(ev: EvaluationConfig) -> torch.device:
    """``evaluation.metric_device``, else CUDA when available, else the CPU."""
    if not ev.metric_device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(ev.metric_device)
    except RuntimeError:
        raise ConfigError(f"evaluation.metric_device {ev.metric_device!r} is not a device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"evaluation.metric_device is {ev.metric_device!r} but CUDA is not available; use cpu")
    return device


# ---------------------------------------------------------------------------------------------------------
# FID: torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception-v3
# ---------------------------------------------------------------------------------------------------------
def load_fid(weights: MetricWeightsConfig, device: torch.device) -> tuple[Any, list[WeightsFile]]:
    """``FrechetInceptionDistance(feature=2048, normalize=True)`` with the Inception weights of the config."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = weight_path(weights, "inception")
    try:
        with sealed():  # torch-fidelity loads the file itself, with weights_only=False: forced to True here
            fid = FrechetInceptionDistance(
                feature=2048, normalize=True, feature_extractor_weights_path=str(path)
            )
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{KEY}inception: {path} holds more than tensors and plain data, and uniemo unpickles only with "
            f"weights_only=True ({_one_line(e)}); give {EXPECTED['inception']}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{KEY}inception: {path} does not fit ({_one_line(e)}); give {EXPECTED['inception']}") from None
    return fid.to(device), [describe_file("inception", path)]


# ---------------------------------------------------------------------------------------------------------
# CLIP image features and EmoGen's probe
# ---------------------------------------------------------------------------------------------------------
_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb",
)


@dataclass
class ClipImageEncoder:
    """CLIP's image tower with its projection (``get_image_features``) and the image processor of its folder."""

    model: nn.Module
    processor: Any
    processor_source: str
    description: dict[str, Any]
    files: list[WeightsFile]

    @property
    def dim(self) -> int:
        return int(self.description["projection_dim"])

    @torch.no_grad()
    def features(self, images: list[Any]) -> torch.Tensor:
        """float32 ``[B, projection_dim]``: ``CLIPModel.get_image_features`` of the processor's output for
        ``images`` (PIL images, or float tensors, which the processor rescales by 1/255 again as in EmoGen)."""
        param = next(self.model.parameters())
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(param.device, param.dtype)).image_embeds.float()


def load_clip(weights: MetricWeightsConfig, device: torch.device) -> ClipImageEncoder:
    """The image tower of the CLIP folder ``evaluation.weights.clip`` (config.json + safetensors, no hub)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from uniemo.models.weights import read_clip_folder, read_safetensors, safetensors_files

    path = weight_path(weights, "clip", folder=True)
    if not (path / "config.json").is_file():
        raise UserError(f"{KEY}clip: {path} has no config.json; give {EXPECTED['clip']}")
    try:
        folder = read_clip_folder(path)
        files = safetensors_files(path)
    except UserError as e:
        raise UserError(f"{KEY}clip: {e}") from None
    vision = {k: v for k, v in folder.vision.items() if k not in ("model_type", "transformers_version")}
    with sealed():
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**vision, "projection_dim": folder.projection_dim}))
    state = read_safetensors(path, keep=lambda k: k.startswith("vision_model.") or k == "visual_projection.weight")
    load_into("clip", path, model, state)
    size = int(folder.vision["image_size"])
    config_file = path / "preprocessor_config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{KEY}clip: cannot read {config_file} ({_one_line(e)}); fix or remove it") from None
        processor = CLIPImageProcessorPil(**{k: raw[k] for k in _PROCESSOR_KEYS if k in raw})
        source = "preprocessor_config.json"
    else:
        # CLIPModel.save_pretrained writes no processor config: the processor's defaults (OpenAI's mean and std,
        # bicubic shortest side, centre crop) at the tower's size are openai/clip-vit-*'s own settings.
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        source = f"CLIPImageProcessor defaults at {size} px (the folder has no preprocessor_config.json)"
    v = folder.vision
    description = {
        "folder": path.name,
        "image_size": size,
        "patch_size": int(v["patch_size"]),
        "hidden_size": int(v["hidden_size"]),
        "layers": int(v["num_hidden_layers"]),
        "projection_dim": folder.projection_dim,
    }
    return ClipImageEncoder(
        model.eval().to(device), processor, source, description, [describe_file("clip", f) for f in files]
    )


class EmoProbe(nn.Module):
    """EmoGen's ``emo_classifier`` (``training/model.py``): one ``fc = Linear(dim, 8)`` on CLIP image features."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, NUM_EMOTIONS)

    def forward(self, features_BD: torch.Tensor) -> torch.Tensor:
        return self.fc(features_BD)


def load_emo_probe(weights: MetricWeightsConfig, dim: int, device: torch.device) -> tuple[EmoProbe, WeightsFile]:
    """EmoGen's probe from a state dict with ``fc.weight`` [8, dim] and ``fc.bias`` [8]."""
    path = weight_path(weights, "emo_a_probe")
    probe = EmoProbe(dim)
    load_into("emo_a_probe", path, probe, load_pickle("emo_a_probe", path))
    return probe.eval().to(device), describe_file("emo_a_probe", path)


# ---------------------------------------------------------------------------------------------------------
# LPIPS (AlexNet)
# ---------------------------------------------------------------------------------------------------------
def load_lpips(weights: MetricWeightsConfig, device: torch.device) -> tuple[nn.Module, list[WeightsFile]]:
    """``lpips.LPIPS(net='alex')`` (v0.1): its linear layers from the package, its AlexNet from the config."""
    import lpips
    import torchvision

    path = weight_path(weights, "lpips_alexnet")
    state = load_pickle("lpips_alexnet", path)
    alexnet = torchvision.models.alexnet(weights=None)
    load_into("lpips_alexnet", path, alexnet, state)
    with sealed():  # pnet_rand: lpips builds a random AlexNet instead of downloading torchvision's
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
    # lpips keeps torchvision's layer indices inside its five slices (slice2 holds features.2-4, ...).
    for index in range(1, 6):
        for name, layer in getattr(model.net, f"slice{index}").named_children():
            layer.load_state_dict(alexnet.features[int(name)].state_dict())
    package = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    files = [describe_file("lpips_alexnet", path), WeightsFile("lpips package", package.resolve(), file_digest(package)[1])]
    return model.eval().to(device), files


# ---------------------------------------------------------------------------------------------------------
# Sem-C: Places365 and ImageNet ResNet-50
# ---------------------------------------------------------------------------------------------------------
def load_resnets(weights: MetricWeightsConfig, device: torch.device) -> tuple[nn.Module, nn.Module, list[WeightsFile]]:
    """(scene net, object net, files): torchvision ResNet-50s with 365 and 1000 classes."""
    import torchvision

    scene_path = weight_path(weights, "places365_resnet50")
    checkpoint = load_pickle("places365_resnet50", scene_path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise UserError(
            f"{KEY}places365_resnet50: {scene_path} has no 'state_dict' entry; give {EXPECTED['places365_resnet50']}"
        )
    # The CSAIL file was saved from nn.DataParallel: its keys carry a `module.` prefix (places365's own loader
    # strips it the same way).
    scene_state = {str(k).replace("module.", ""): v for k, v in checkpoint["state_dict"].items()}
    scene = torchvision.models.resnet50(weights=None, num_classes=365)
    load_into("places365_resnet50", scene_path, scene, scene_state)
    object_path = weight_path(weights, "imagenet_resnet50")
    objects = torchvision.models.resnet50(weights=None)
    load_into("imagenet_resnet50", object_path, objects, load_pickle("imagenet_resnet50", object_path))
    files = [describe_file("places365_resnet50", scene_path), describe_file("imagenet_resnet50", object_path)]
    return scene.eval().to(device), objects.eval().to(device), files
