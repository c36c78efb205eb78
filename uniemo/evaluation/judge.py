"""The evaluation classifier ("judge"): a small CNN trained once on the real train shards (METHOD D12).

Emo-A must be judged by a classifier that was not trained in the run under test, and without Inception-v3
weights the FID uses this classifier's features instead (reported as ``judge:<name>``). The judge is
deliberately a different model family from the run's (a 4-block CNN, not a ViT with expert queries), trained
on the same real data the runs train on, never on generated images.

``uniemo train-judge`` writes a folder::

    <out>/model.safetensors   the weights (safetensors only: nothing is ever unpickled)
    <out>/judge.json          architecture, image size, normalisation, val accuracy, the data and the seed

``judge.json`` is written last, so a folder with it is complete. Images given to :meth:`Judge.classify` and
:meth:`Judge.features` pass the same evaluation transform as the loader's (Resize + CenterCrop to the judge's
image size, its normalisation), so real shards and generated PNGs are judged alike.

Shapes: ``B`` batch, ``C`` channels, ``H``/``W`` pixels, ``F`` feature width, ``K`` = 8 emotions.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from uniemo.atomic import atomic_path, is_temp_file
from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS, TrainingConfig
from uniemo.data.attributes import write_json_atomic
from uniemo.data.images import to_rgb
from uniemo.data.loader import build_loader_from_config
from uniemo.data.shards import MANIFEST_FILE, file_digest, read_manifest
from uniemo.data.source import data_source
from uniemo.data.transforms import SampleTransform
from uniemo.distributed.env import worker_threads
from uniemo.errors import UserError
from uniemo.run_layout import JUDGE_FILE, WEIGHTS_FILE
from uniemo.training.engine import lr_factor
from uniemo.training.preflight import check_judge_data

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.data.transforms import SampleTransform

JUDGE_FORMAT = 1
ARCHITECTURE = "cnn4"


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------
class JudgeNet(nn.Module):
    """Four conv-BN-ReLU blocks (width w, 2w, 4w, 8w; max-pool between), global average pool, dropout, linear.

    The penultimate features are the pooled ``8w`` activations.
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_EMOTIONS, dropout: float = 0.2):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2**i
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def forward(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        features_BF = self.blocks(images_BCHW).mean(dim=(2, 3))
        return {"features": features_BF, "logits": self.head(self.dropout(features_BF))}


# ---------------------------------------------------------------------------------------------------------
# The loaded judge
# ---------------------------------------------------------------------------------------------------------
class Judge:
    """A trained judge: ``name``, ``info`` (``judge.json``), ``classify`` and ``features`` of images."""

    def __init__(self, net: JudgeNet, info: dict[str, Any], path: Path | None = None):

        self.net = net.eval()
        self.info = info
        self.path = path
        self.image_size = int(info["image_size"])
        self.normalization = str(info["normalization"])
        self.name = str(info["name"])
        self.transform: SampleTransform = SampleTransform(image_size=self.image_size, normalization=self.normalization)

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    def preprocess(self, images: Any) -> torch.Tensor:
        """float32 ``[B,3,S,S]`` ready for the net from: uint8 ``[B,H,W,3]`` (numpy or torch), floats in [0, 1]
        as ``[B,H,W,3]`` or ``[B,3,H,W]``, or a sequence of PIL images / uint8 ``[H,W,3]`` arrays."""
        from PIL import Image

        rng = random.Random(0)  # the evaluation transform draws nothing; the argument is required
        return torch.stack([self.transform(Image.fromarray(a), rng)["image"] for a in _as_uint8_images(images)])

    @torch.no_grad()
    def predict(self, batch_BCHW: torch.Tensor, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [B,K], features [B,F])`` of already preprocessed images."""
        param = next(self.net.parameters())
        probs, feats = [], []
        for start in range(0, len(batch_BCHW), chunk):
            out = self.net(batch_BCHW[start : start + chunk].to(param.device, param.dtype))
            probs.append(out["logits"].float().softmax(dim=-1).cpu())
            feats.append(out["features"].float().cpu())
        if not probs:
            return np.zeros((0, NUM_EMOTIONS), np.float32), np.zeros((0, self.feature_dim), np.float32)
        return torch.cat(probs).numpy(), torch.cat(feats).numpy()

    def classify(self, images: Any) -> np.ndarray:
        """float32 ``[B,8]`` emotion probabilities (EmoSet order, METHOD §1) of images (see :meth:`preprocess`)."""
        return self.predict(self.preprocess(images))[0]

    def features(self, images: Any) -> np.ndarray:
        """float32 ``[B,F]`` penultimate features of images (see :meth:`preprocess`)."""
        return self.predict(self.preprocess(images))[1]

    def to(self, device: torch.device | str) -> Judge:
        self.net.to(device)
        return self


def _as_uint8_images(images: Any) -> list[np.ndarray]:
    """The accepted image inputs of :meth:`Judge.preprocess` as a list of uint8 ``[H,W,3]`` arrays."""
    from PIL import Image


    if isinstance(images, (list, tuple)):
        out = []
        for image in images:
            if isinstance(image, Image.Image):
                out.append(np.asarray(to_rgb(image)))
            else:
                out.extend(_as_uint8_images(np.asarray(image)[None]))
        return out
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4:
        raise ValueError(f"images must be a batch [B,H,W,3] or [B,3,H,W], got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return list(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_judge(path: str | Path, device: torch.device | str = "cpu") -> Judge:
    """A judge folder (or its ``model.safetensors``, with ``judge.json`` beside it) -> :class:`Judge`.

    Raises:
        UserError: the folder is missing or incomplete, or the weights are not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(
                f"judge weights {str(p)!r} are not a .safetensors file; only safetensors judges are loaded "
                "(no pickle): train one with `uniemo train-judge`"
            )
        folder, weights = p.parent, p
    else:
        folder, weights = p, p / WEIGHTS_FILE
    if not folder.is_dir():
        raise UserError(
            f"judge folder {str(folder)!r} does not exist; train one with `uniemo train-judge --config FILE "
            f"--out {folder}`"
        )
    meta = folder / JUDGE_FILE
    if not meta.is_file() or not weights.is_file():
        raise UserError(
            f"{str(folder)!r} is not a complete judge folder (needs {JUDGE_FILE} and {WEIGHTS_FILE}); "
            "train it again with `uniemo train-judge`"
        )
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except (ValueError, OSError, SafetensorError) as e:
        raise UserError(f"judge {str(folder)!r} is unreadable ({e}); train it again with `uniemo train-judge`") from None
    if info.get("format") != JUDGE_FORMAT or info.get("architecture") != ARCHITECTURE:
        raise UserError(
            f"{meta} describes a judge of format {info.get('format')!r} / architecture "
            f"{info.get('architecture')!r}, not {JUDGE_FORMAT} / {ARCHITECTURE!r}; train it again"
        )
    net = JudgeNet(width=int(info["width"]), dropout=float(info.get("dropout", 0.2)))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{weights} does not fit {meta} ({first}); train the judge again") from None
    return Judge(net, info, folder).to(device)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def _judge_data(cfg: Config) -> dict[str, Any]:
    """What the judge is trained on: the real shard folder and its manifest's digest and split totals."""

    folder = data_source(cfg.data, progress=True).resolve()
    manifest = read_manifest(folder)
    return {
        "shards": str(folder),
        "manifest_sha256": file_digest(folder / MANIFEST_FILE)[1],
        "totals": {split: t["samples"] for split, t in manifest.get("totals", {}).items()},
        "source": "real",
    }


def same_data(judge: Judge, cfg: Config) -> bool:
    """Whether the judge was trained on the shard folder (same manifest) that ``cfg`` reads."""
    return _judge_data(cfg)["manifest_sha256"] == judge.info.get("data", {}).get("manifest_sha256")


@torch.no_grad()
def _accuracy(net: JudgeNet, loader: Any) -> tuple[float, int]:
    net.eval()
    correct = total = 0
    for batch in loader:
        logits = net(batch["image"])["logits"]
        correct += int((logits.argmax(dim=-1) == batch["label"]).sum())
        total += len(batch["label"])
    net.train()
    return (correct / total if total else 0.0), total


def train_judge(cfg: Config, out_dir: str | Path) -> Path:
    """Train the judge on the real train shards of ``cfg.data`` (one process) and save it to ``out_dir``.

    ``evaluation.judge_*`` set the steps, batch, learning rate, width and seed; images are ``data.image_size``
    px with ``data.normalization`` and the loader's training augmentation. Validation accuracy over the whole
    val split is recorded. An existing judge in ``out_dir`` is replaced; a folder holding anything else is
    refused.
    """
    from safetensors.torch import save_file


    ev = cfg.evaluation
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    check_judge_data(cfg)
    data = _judge_data(cfg)
    torch.manual_seed(ev.judge_seed)
    net = JudgeNet(width=ev.judge_width)
    train = build_loader_from_config(
        cfg.data, "train", stage=1, training=True, seed=ev.judge_seed, batch_size=ev.judge_batch_size
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=ev.judge_lr, weight_decay=5e-4)
    # The trainers' schedule: linear warm-up over 5 % of the steps, then cosine to 0.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(TrainingConfig(), ev.judge_steps))
    net.train()
    threads = torch.get_num_threads()
    # One process on the CPUs of one worker: more intra-op threads than cores (loader workers share them) make a
    # small CNN several times slower, not faster.
    torch.set_num_threads(worker_threads(cfg.distributed))
    try:
        start = time.perf_counter()
        loss_ema, val_accuracy, val_samples = _fit(net, optimizer, schedule, train, cfg)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    out.mkdir(parents=True, exist_ok=True)
    (out / JUDGE_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new judge.json lands
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": str(JUDGE_FORMAT), "architecture": ARCHITECTURE})
    digest = hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    info = {
        "format": JUDGE_FORMAT,
        "name": f"{ARCHITECTURE}-w{ev.judge_width}-{cfg.data.image_size}px-{digest[:8]}",
        "architecture": ARCHITECTURE,
        "width": ev.judge_width,
        "dropout": 0.2,
        "feature_dim": net.feature_dim,
        "image_size": cfg.data.image_size,
        "normalization": cfg.data.normalization,
        "emotions": list(EMOTIONS),
        "val_accuracy": val_accuracy,
        "val_samples": val_samples,
        "data": data,
        "training": {
            "steps": ev.judge_steps,
            "batch_size": ev.judge_batch_size,
            "lr": ev.judge_lr,
            "weight_decay": 5e-4,
            "schedule": "linear warm-up (5 % of the steps), cosine to 0",
            "augment": cfg.data.train_augment,
            "seed": ev.judge_seed,
            "final_loss_ema": loss_ema,
            "seconds": round(seconds, 2),
        },
        "weights_sha256": digest,
    }
    write_json_atomic(out / JUDGE_FILE, info)
    return out


def _fit(net: JudgeNet, optimizer: Any, schedule: Any, train: Any, cfg: Config) -> tuple[float, float, int]:
    """``evaluation.judge_steps`` steps of cross-entropy, then the val split: ``(loss EMA, val accuracy, n)``."""
    from tqdm import tqdm


    steps = cfg.evaluation.judge_steps
    bar = tqdm(total=steps, desc="judge", unit="step", file=sys.stderr, disable=not cfg.logging.progress,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    batches = train.batches()
    loss_ema = float("nan")
    for step in range(steps):
        batch = next(batches)
        loss = nn.functional.cross_entropy(net(batch["image"])["logits"], batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        loss_ema = value if step == 0 else 0.9 * loss_ema + 0.1 * value
        bar.set_postfix({"loss": f"{loss_ema:.3f}"}, refresh=False)
        bar.update(1)
    bar.close()
    val_loader = build_loader_from_config(cfg.data, "val", stage=1, training=False, batch_size=64)
    val_accuracy, val_samples = _accuracy(net.eval(), val_loader)
    return loss_ema, val_accuracy, val_samples


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"judge output {str(out)!r} is a file; give a folder")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in (JUDGE_FILE, WEIGHTS_FILE) and not is_temp_file(p.name)]
        if foreign:
            raise UserError(
                f"judge output {str(out)!r} holds other files ({', '.join(sorted(foreign)[:3])}); give an empty "
                "folder or an earlier judge folder to replace"
            )


def describe(judge: Judge) -> str:
    """One line for progress output."""
    data = judge.info.get("data", {})
    return (f"judge:{judge.name} (val accuracy {judge.info.get('val_accuracy', float('nan')):.3f}, "
            f"trained on {data.get('shards', '?')})")


__all__: Sequence[str] = ["Judge", "JudgeNet", "describe", "load_judge", "same_data", "train_judge"]
