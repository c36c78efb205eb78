"""EmoGen's evaluation protocol (METHOD §6.2) on image sets, computed with the maintained implementations.

Each metric follows EmoGen's code (JingyuanYY/EmoGen ``metrics/FID.py``, ``metrics/Semantic_metrics.py``,
``training/inference.py::emo_cls``; UniEmo's copies are the same), with the networks of :mod:`paper_nets`:

| metric | network | computation |
|---|---|---|
| FID | Inception-v3 (torch-fidelity's), torchmetrics ``FrechetInceptionDistance(feature=2048, normalize=True)`` | images ``Resize((299, 299))`` + ``ToTensor``; per emotion the FID of that emotion's real and generated images; ``aggregated`` is the FID of the statistics summed over the emotions (EmoGen's ``aggregate_compute``) |
| Emo-A | CLIP image features (``get_image_features``) + EmoGen's ``Linear(768, 8)`` | top-1 of the probe against the folder's emotion; also the mean target probability and the positive/negative accuracy, as EmoGen logs them |
| LPIPS | ``lpips.LPIPS(net='alex')`` v0.1 | mean distance over seeded random pairs of one emotion's images, given as [0, 1] tensors without ``normalize=True`` (EmoGen passes them so); the mean over emotions |
| Sem-C | Places365 and ImageNet ResNet-50 | per image the larger of the two top softmax scores (``Resize(256)``, ``CenterCrop(224)``, ImageNet normalisation); the mean over all images |
| Sem-D | CLIP image features | per pair (the LPIPS pairs) the MSE of the two feature vectors; the mean per emotion, then over emotions. ``paper``: the features of [0, 1] tensors, which ``CLIPProcessor`` rescales by 1/255 a second time, as EmoGen's script does; ``corrected``: of the images |

Where uniemo departs from the scripts (docs/RECIPES.md has each difference and why): pairs are drawn within each
emotion with a fixed count and seed (the script draws 10 with Python's ``random`` from a path list that is not
reset between emotions); every image format the folder reader takes is read (the scripts read only ``*.jpg``
for Emo-A, LPIPS, Sem-C and Sem-D); FID covers the emotions that have generated images.

Shapes: ``B`` batch, ``D`` CLIP projection width, ``S`` scene classes (365), ``O`` object classes (1000).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from uniemo.config.schema import EMOTIONS, EvaluationConfig, MetricWeightsConfig
from uniemo.data.workers import loader_worker_options
from uniemo.errors import DataError
from uniemo.evaluation import metrics, paper_nets
from uniemo.evaluation.image_sets import ImageRef, ImageSet, iter_batches
from uniemo.logging import say

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

    from uniemo.evaluation.judge import Judge

NEEDS: dict[str, tuple[str, ...]] = {
    "fid": ("inception",),
    "emo_a": ("clip", "emo_a_probe"),
    "lpips": ("lpips_alexnet",),
    "sem_c": ("places365_resnet50", "imagenet_resnet50"),
    "sem_d": ("clip",),
}
"""Each metric -> the ``evaluation.weights`` keys it needs."""
WORKER_MODULES = ("torchvision.transforms", __name__)
"""What the loader workers' transforms import (``ToTensor``, ``Resize``, ...; this module's functions): their fork
server imports it once instead of every worker (about 2 CPU seconds for torchvision, :mod:`uniemo.data.workers`)."""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_FID_STATES = (
    "real_features_sum", "real_features_cov_sum", "real_features_num_samples",
    "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples",
)


def _say(message: str) -> None:
    say(message, topic="metrics")


def left_out_metrics(weights: MetricWeightsConfig) -> dict[str, str]:
    """Metric -> why it is left out, for each metric whose weights are not all configured."""
    out = {}
    for metric, keys in NEEDS.items():
        missing = [paper_nets.KEY + k for k in keys if not getattr(weights, k)]
        if missing:
            out[metric] = f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
    return out


@dataclass
class _Run:
    """What every metric of one computation shares."""

    ev: EvaluationConfig
    device: torch.device
    workers: int
    progress: bool

    def bar(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not self.progress,
                    mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def batches(self, refs: list[ImageRef], transform: Callable[[Image.Image], Any], stack: bool = True) -> Any:
        return iter_batches(refs, transform, self.ev.metric_batch_size, self.workers, stack=stack, preload=WORKER_MODULES)


def _as_is(image: Image.Image) -> Image.Image:
    return image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image)


# ---------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------
def _fid_transform() -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms

    # EmoGen's ImageFolderDataset: Resize((299, 299)) on the PIL image (bilinear), ToTensor; torchmetrics then
    # scales to uint8 itself (normalize=True).
    return transforms.Compose([transforms.Resize((299, 299)), transforms.ToTensor()])


def _fid_value(fid: Any) -> float | None:
    if int(fid.real_features_num_samples) < 2 or int(fid.fake_features_num_samples) < 2:
        return None  # torchmetrics needs two images on each side for a covariance
    return float(fid.compute())


def _check_fid_emotions(generated: ImageSet, real: ImageSet) -> None:
    missing = [e for e in generated.emotions if not real.by_emotion.get(e)]
    if missing:
        raise DataError(
            f"the real set {real.source} has no images of {', '.join(missing)}, which the generated set has; FID "
            "compares each emotion with its own real images: give a real folder with every generated emotion"
        )


def compute_fid(fid: Any, files: list[paper_nets.WeightsFile], generated: ImageSet, real: ImageSet, run: _Run) -> dict:
    """Per-emotion FIDs and the aggregated FID of the summed statistics (module docstring)."""
    import torchmetrics

    emotions = generated.emotions
    _check_fid_emotions(generated, real)
    transform = _fid_transform()
    per_emotion: dict[str, float | None] = {}
    totals: dict[str, torch.Tensor] = {}
    real_count = sum(len(real.by_emotion[e]) for e in emotions)
    bar = run.bar(real_count + sum(len(generated.by_emotion[e]) for e in emotions), "FID")
    for emotion in emotions:
        fid.reset()
        for is_real, refs in ((True, real.by_emotion[emotion]), (False, generated.by_emotion[emotion])):
            for batch in run.batches(refs, transform):
                fid.update(batch.to(run.device), real=is_real)
                bar.update(len(batch))
        for name in _FID_STATES:
            state = getattr(fid, name).detach().clone()
            totals[name] = totals[name] + state if name in totals else state
        per_emotion[emotion] = _fid_value(fid)
    bar.close()
    # EmoGen's aggregate: one more FID object whose states are the sums of the per-emotion states.
    fid.reset()
    for name in _FID_STATES:
        getattr(fid, name).add_(totals[name])
    return {
        "aggregated": _fid_value(fid),
        "per_emotion": per_emotion,
        "network": "Inception-v3, torch-fidelity's port of the TF FID network (2048-d pool features)",
        "library": f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance(feature=2048, normalize=True)",
        "preprocessing": "Resize((299, 299)) of the PIL image (bilinear), ToTensor; uint8 inside torchmetrics",
        "weights": [f.describe() for f in files],
        "images": sum(len(generated.by_emotion[e]) for e in emotions),
        "real_images": real_count,
        "emotions": emotions,
        "note": "aggregated = FID of the per-emotion statistics summed over the emotions (EmoGen's "
                "aggregate_compute); a per-emotion FID needs at least 2 images on each side",
    }


# ---------------------------------------------------------------------------------------------------------
# CLIP: Emo-A and Sem-D features
# ---------------------------------------------------------------------------------------------------------
def clip_features(encoder: paper_nets.ClipImageEncoder, images: ImageSet, run: _Run, variant: str) -> dict[str, torch.Tensor]:
    """float32 ``[N_e, D]`` CLIP image features per emotion. ``corrected``: the processor gets the images;
    ``paper``: ``ToTensor`` outputs in [0, 1], which it rescales by 1/255 again (EmoGen's Sem-D script)."""
    transform = _to_tensor if variant == "paper" else _as_is
    out = {}
    bar = run.bar(len(images), f"CLIP features ({variant})")
    for emotion in images.emotions:
        chunks = []
        for batch in run.batches(images.by_emotion[emotion], transform, stack=False):
            chunks.append(encoder.features(list(batch)).cpu())
            bar.update(len(batch))
        out[emotion] = torch.cat(chunks)
    bar.close()
    return out


def _accuracy(probs_by_emotion: dict[str, np.ndarray]) -> dict:
    """:func:`metrics.emotion_accuracy` over all images and per emotion (the folder's emotion is the target)."""
    emotions = list(probs_by_emotion)
    probs = np.concatenate([probs_by_emotion[e] for e in emotions])
    targets = np.concatenate([np.full(len(probs_by_emotion[e]), EMOTIONS.index(e)) for e in emotions])
    out = metrics.emotion_accuracy(probs, targets)
    out["per_emotion"] = {
        e: metrics.emotion_accuracy(probs_by_emotion[e], np.full(len(probs_by_emotion[e]), EMOTIONS.index(e)))
        for e in emotions
    }
    return out


def compute_emo_a(probe: paper_nets.EmoProbe, probe_file: paper_nets.WeightsFile,
                  encoder: paper_nets.ClipImageEncoder, features: dict[str, torch.Tensor], run: _Run) -> dict:
    """Emo-A of EmoGen's CLIP probe (top-1 against the folder's emotion)."""
    probs = {e: probe(f.to(run.device)).float().softmax(dim=-1).cpu().numpy() for e, f in features.items()}
    return {
        **_accuracy(probs),
        "network": f"CLIP image features ({_clip_name(encoder)}) + EmoGen's linear probe Linear({encoder.dim}, 8)",
        "preprocessing": encoder.processor_source,
        "weights": [f.describe() for f in [*encoder.files, probe_file]],
    }


def compute_judge_emo_a(judge: Judge, generated: ImageSet, run: _Run) -> dict:
    """Emo-A of the project's judge (``uniemo train-judge``), named ``judge:<name>``."""
    probs = {}
    for emotion in generated.emotions:
        chunks = [judge.predict(judge.preprocess(list(b)))[0] for b in run.batches(generated.by_emotion[emotion], _as_is, stack=False)]
        probs[emotion] = np.concatenate(chunks)
    return {**_accuracy(probs), "network": f"judge:{judge.name}", "judge_dir": str(judge.path)}


def _clip_name(encoder: paper_nets.ClipImageEncoder) -> str:
    d = encoder.description
    return f"{d['folder']}: {d['layers']} layers of {d['hidden_size']}, patch {d['patch_size']}, {d['image_size']} px"


def compute_sem_d(encoder: paper_nets.ClipImageEncoder, features: dict[str, torch.Tensor], variant: str, run: _Run) -> dict:
    """Sem-D: mean over emotions of the mean MSE of CLIP features over the emotion's pairs (module docstring)."""
    per_emotion: dict[str, dict[str, Any]] = {}
    for emotion, feats in features.items():
        k = EMOTIONS.index(emotion)
        idx = metrics.sample_pairs(len(feats), run.ev.diversity_pairs, run.ev.seed + k)
        if not len(idx):
            per_emotion[emotion] = {"pairs": 0, "sem_d": None, "cosine_distance": None}
            continue
        a, b = feats[idx[:, 0]], feats[idx[:, 1]]
        per_emotion[emotion] = {
            "pairs": int(len(idx)),
            "sem_d": float(((a - b) ** 2).mean(dim=1).mean()),
            "cosine_distance": float((1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean()),
        }
    scored = [v for v in per_emotion.values() if v["pairs"]]
    return {
        "sem_d": float(np.mean([v["sem_d"] for v in scored])) if scored else None,
        "cosine_distance": float(np.mean([v["cosine_distance"] for v in scored])) if scored else None,
        "per_emotion": per_emotion,
        "variant": variant,
        "variant_note": (
            "paper: the features of ToTensor outputs in [0, 1] that CLIPProcessor rescales by 1/255 a second time, "
            "as EmoGen's script computes them (its published Sem-D values have this scale)"
            if variant == "paper" else "corrected: the features of the images as CLIPProcessor expects them"
        ),
        "network": f"CLIP image features ({_clip_name(encoder)})",
        "preprocessing": encoder.processor_source,
        "weights": [f.describe() for f in encoder.files],
        "images": sum(len(f) for f in features.values()),
        "pairs_per_emotion": run.ev.diversity_pairs,
        "seed": run.ev.seed,
    }


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------
class _Pairs(torch.utils.data.Dataset):
    """Map-style dataset of image pairs as [0, 1] tensors (module-level, so loader workers pickle it)."""

    def __init__(self, refs: list[ImageRef], idx: np.ndarray, size: int):
        self.refs, self.idx, self.size = refs, idx, size

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        from PIL import Image

        a, b = self.refs[int(self.idx[i, 0])].open(), self.refs[int(self.idx[i, 1])].open()
        resized = False
        if self.size:
            a = a.resize((self.size, self.size), Image.Resampling.BILINEAR)
            b = b.resize((self.size, self.size), Image.Resampling.BILINEAR)
        elif b.size != a.size:  # LPIPS compares two images of one size
            b, resized = b.resize(a.size, Image.Resampling.BILINEAR), True
        return _to_tensor(a), _to_tensor(b), resized


def _pair_batch(items: list[Any]) -> list[Any]:
    return items


def compute_lpips(model: torch.nn.Module, files: list[paper_nets.WeightsFile], generated: ImageSet, run: _Run) -> dict:
    """LPIPS diversity: per emotion the mean distance of seeded random pairs; the mean over emotions."""
    per_emotion: dict[str, dict[str, Any]] = {}
    resized = 0
    pairs_of = {e: metrics.sample_pairs(len(generated.by_emotion[e]), run.ev.diversity_pairs, run.ev.seed + EMOTIONS.index(e))
                for e in generated.emotions}
    bar = run.bar(sum(len(p) for p in pairs_of.values()), "LPIPS pairs")
    for emotion, idx in pairs_of.items():
        distances: list[float] = []
        loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(
            _Pairs(generated.by_emotion[emotion], idx, run.ev.lpips_image_size), batch_size=run.ev.metric_batch_size,
            num_workers=run.workers, collate_fn=_pair_batch, **loader_worker_options(run.workers, WORKER_MODULES),
        )
        for items in loader:
            resized += sum(int(r) for _, _, r in items)
            start = 0
            while start < len(items):  # one forward per run of pairs of the same size
                end = start + 1
                while end < len(items) and items[end][0].shape == items[start][0].shape:
                    end += 1
                a = torch.stack([x[0] for x in items[start:end]]).to(run.device)
                b = torch.stack([x[1] for x in items[start:end]]).to(run.device)
                # [0, 1] inputs without normalize=True, as EmoGen's script passes them (lpips expects [-1, 1]).
                distances += model(a, b).flatten().float().cpu().tolist()
                start = end
            bar.update(len(items))
        per_emotion[emotion] = {"pairs": len(distances), "lpips": float(np.mean(distances)) if distances else None}
    bar.close()
    scored = [v["lpips"] for v in per_emotion.values() if v["pairs"]]
    return {
        "lpips": float(np.mean(scored)) if scored else None,
        "per_emotion": per_emotion,
        "network": "LPIPS v0.1, AlexNet trunk and the lpips package's linear layers",
        "preprocessing": "ToTensor in [0, 1], lpips' normalize=False (as EmoGen passes them)"
                         + (f", resized to {run.ev.lpips_image_size} px" if run.ev.lpips_image_size else ", own size"),
        "weights": [f.describe() for f in files],
        "images": len(generated),
        "pairs_per_emotion": run.ev.diversity_pairs,
        "seed": run.ev.seed,
        "resized_pairs": resized,
    }


# ---------------------------------------------------------------------------------------------------------
# Sem-C
# ---------------------------------------------------------------------------------------------------------
def semantic_clarity_scores(scene_logits_BS: torch.Tensor, object_logits_BO: torch.Tensor) -> torch.Tensor:
    """``[B]``: per image the larger of the top softmax probabilities of the scene and the object classifier."""
    scene_B = scene_logits_BS.float().softmax(dim=1).max(dim=1).values
    object_B = object_logits_BO.float().softmax(dim=1).max(dim=1).values
    return torch.maximum(scene_B, object_B)


def compute_sem_c(scene: torch.nn.Module, objects: torch.nn.Module, files: list[paper_nets.WeightsFile],
                  generated: ImageSet, run: _Run) -> dict:
    """Sem-C: the mean over all images of :func:`semantic_clarity_scores`."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    scores: dict[str, list[float]] = {}
    bar = run.bar(len(generated), "Sem-C")
    for emotion in generated.emotions:
        scores[emotion] = []
        for batch in run.batches(generated.by_emotion[emotion], transform):
            x = batch.to(run.device)
            scores[emotion] += semantic_clarity_scores(scene(x), objects(x)).cpu().tolist()
            bar.update(len(batch))
    bar.close()
    everything = [s for v in scores.values() for s in v]
    return {
        "sem_c": float(np.mean(everything)) if everything else None,
        "per_emotion": {e: float(np.mean(v)) for e, v in scores.items()},
        "network": "ResNet-50 on Places365 (365 scenes) and ResNet-50 on ImageNet (1000 objects), torchvision",
        "preprocessing": "Resize(256), CenterCrop(224), ToTensor, ImageNet mean/std",
        "weights": [f.describe() for f in files],
        "images": len(everything),
    }


# ---------------------------------------------------------------------------------------------------------
# All of them
# ---------------------------------------------------------------------------------------------------------
def compute_paper_metrics(
    ev: EvaluationConfig,
    generated: ImageSet,
    real: ImageSet | None,
    *,
    judge: Judge | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Every metric whose weights ``ev.weights`` configures, on ``generated`` (FID against ``real``).

    Returns ``metrics`` (metric -> its numbers, network, weight files, image count; ``emo_a_judge`` when a
    ``judge`` is given), ``left_out`` (metric -> why), ``settings`` and ``seconds``.
    """
    paper_nets.check_weights(ev.weights)
    left_out = left_out_metrics(ev.weights)
    if real is None and "fid" not in left_out:
        left_out["fid"] = "no real image set was given"
    run = _Run(ev, paper_nets.resolve_device(ev), workers, progress)
    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, compute: Callable[[], dict]) -> None:
        start = time.perf_counter()
        out[name] = compute()
        seconds[name] = round(time.perf_counter() - start, 2)
        _say(f"{name}: {_headline(name, out[name])} ({out[name].get('images', len(generated))} images, "
             f"{seconds[name]:.1f} s)")

    with paper_nets.sealed(), torch.no_grad():
        if "fid" not in left_out and real is not None:
            _check_fid_emotions(generated, real)
            fid, files = paper_nets.load_fid(ev.weights, run.device)
            timed("fid", lambda: compute_fid(fid, files, generated, real, run))
            del fid
        encoder = None
        features: dict[str, torch.Tensor] = {}
        if "emo_a" not in left_out or "sem_d" not in left_out:
            encoder = paper_nets.load_clip(ev.weights, run.device)
        if "emo_a" not in left_out and encoder is not None:
            probe, probe_file = paper_nets.load_emo_probe(ev.weights, encoder.dim, run.device)
            clip = encoder

            def emo_a() -> dict:
                features.update(clip_features(clip, generated, run, "corrected"))
                return compute_emo_a(probe, probe_file, clip, features, run)

            timed("emo_a", emo_a)
        if judge is not None:
            timed("emo_a_judge", lambda: compute_judge_emo_a(judge, generated, run))
        if "lpips" not in left_out:
            model, lpips_files = paper_nets.load_lpips(ev.weights, run.device)
            timed("lpips", lambda: compute_lpips(model, lpips_files, generated, run))
            del model
        if "sem_c" not in left_out:
            scene, objects, resnet_files = paper_nets.load_resnets(ev.weights, run.device)
            timed("sem_c", lambda: compute_sem_c(scene, objects, resnet_files, generated, run))
            del scene, objects
        if "sem_d" not in left_out and encoder is not None:
            clip, variant = encoder, ev.sem_d_variant

            def sem_d() -> dict:
                if variant == "paper" or not features:
                    return compute_sem_d(clip, clip_features(clip, generated, run, variant), variant, run)
                return compute_sem_d(clip, features, variant, run)

            timed("sem_d", sem_d)
    for name, why in left_out.items():
        _say(f"{name}: left out ({why})")
    return {
        "metrics": out,
        "left_out": left_out,
        "settings": {
            "device": str(run.device),
            "batch_size": ev.metric_batch_size,
            "diversity_pairs": ev.diversity_pairs,
            "seed": ev.seed,
            "sem_d_variant": ev.sem_d_variant,
            "lpips_image_size": ev.lpips_image_size,
        },
        "seconds": seconds,
    }


HEADLINES = {"fid": "aggregated", "emo_a": "top1", "emo_a_judge": "top1", "lpips": "lpips", "sem_c": "sem_c",
             "sem_d": "sem_d"}
"""Each metric's headline number in its block."""


def _headline(name: str, block: dict) -> str:
    value = block.get(HEADLINES[name])
    label = {"fid": "FID", "emo_a": "Emo-A", "emo_a_judge": "Emo-A", "lpips": "LPIPS", "sem_c": "Sem-C",
             "sem_d": "Sem-D"}[name]
    text = f"{label} n/a" if value is None else f"{label} {value:.4g}"
    if name == "emo_a_judge":
        text += f" by {block['network']}"
    elif name == "sem_d":
        text += f" ({block['variant']})"
    return text


def summary(result: dict[str, Any]) -> str:
    """One line of the headline numbers and what was left out."""
    parts = [_headline(name, block) for name, block in result["metrics"].items()]
    if result["left_out"]:
        parts.append("left out: " + ", ".join(result["left_out"]))
    return ", ".join(parts) if parts else "no metric computed"
