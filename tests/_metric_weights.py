"""Random weights of the paper's metric networks, saved in each library's own format, and tiny image folders.

Used by tests/test_paper_metrics.py and tests/test_evaluation.py. Every file is what the real download is, with
random values: torch-fidelity's Inception-v3 state dict, a transformers CLIPModel folder (projection 768, so that
EmoGen's ``Linear(768, 8)`` probe fits), the probe's state dict (``fc.weight``, ``fc.bias``), torchvision's AlexNet
and ResNet-50 state dicts, and the CSAIL Places365 checkpoint (``state_dict`` with ``module.`` prefixes, saved in
torch's legacy, non-zip format as the 2017 file is).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import nn

PROBE_DIM = 768


def _relu_init(module: nn.Module) -> None:
    """He-normal convolutions and linears, so random deep nets keep activations of order 1 (the default init
    shrinks them layer after layer, and FIDs of vanishing features would compare nothing)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)


def inception_state() -> dict[str, torch.Tensor]:
    """A random state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` (built without its download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class _Random(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        net = _Random("inception-v3-compat", ["2048"])
    _relu_init(net)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_metric_weights(folder: Path, seed: int = 0, keys: tuple[str, ...] = ()) -> dict[str, Path]:
    """The ``evaluation.weights`` files under ``folder`` (those of ``keys``; all when empty): key -> path."""
    import torchvision

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "inception": folder / "weights-inception-2015-12-05-6726825d.pth",
        "clip": folder / "clip-vit-large-patch14",
        "emo_a_probe": folder / "time_2023-11-12_03-29-best.pth",
        "lpips_alexnet": folder / "alexnet-owt-7be5be79.pth",
        "places365_resnet50": folder / "resnet50_places365.pth.tar",
        "imagenet_resnet50": folder / "resnet50-0676ba61.pth",
    }
    paths = {k: v for k, v in paths.items() if not keys or k in keys}
    if "inception" in paths:
        torch.save(inception_state(), paths["inception"])
    if "clip" in paths:
        _clip().save_pretrained(paths["clip"])
    if "emo_a_probe" in paths:
        torch.save(_probe_state(), paths["emo_a_probe"])
    if "lpips_alexnet" in paths:
        alexnet = torchvision.models.alexnet(weights=None)
        _relu_init(alexnet.features)
        torch.save(alexnet.state_dict(), paths["lpips_alexnet"])
    if "places365_resnet50" in paths:
        places = torchvision.models.resnet50(weights=None, num_classes=365)
        checkpoint = {"epoch": 90, "arch": "resnet50", "best_prec1": 54.74,
                      "state_dict": {f"module.{k}": v for k, v in places.state_dict().items()}}
        torch.save(checkpoint, paths["places365_resnet50"], _use_new_zipfile_serialization=False)
    if "imagenet_resnet50" in paths:
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), paths["imagenet_resnet50"])
    return paths


def _clip():
    """A tiny CLIPModel whose projection is 768 wide, as ViT-L/14's (EmoGen's probe takes 768 features)."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=PROBE_DIM,
    ))


def _probe_state() -> dict[str, torch.Tensor]:
    class EmoClassifier(nn.Module):  # EmoGen's training/model.py::emo_classifier
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(PROBE_DIM, 8)

    probe = EmoClassifier()
    nn.init.normal_(probe.fc.weight, std=0.5)
    return probe.state_dict()


def weight_overrides(paths: dict[str, Path], *keys: str) -> list[str]:
    """``evaluation.weights.<key>=<path>`` for ``keys`` (all when none are named)."""
    return [f"evaluation.weights.{k}={paths[k]}" for k in (keys or paths)]


def write_image_folder(root: Path, counts: dict[str, int], seed: int, size: tuple[int, int] = (40, 32),
                       suffix: str = ".png") -> Path:
    """``root/<emotion>/<i><suffix>``: random smooth images (a colour gradient plus noise), ``counts`` per emotion."""
    rng = np.random.default_rng(seed)
    for emotion, n in counts.items():
        (root / emotion).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size
            base = rng.integers(0, 256, size=3)
            ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, size=3)
            pixels = np.clip(base + ramp + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / emotion / f"{i}{suffix}")
    return root
