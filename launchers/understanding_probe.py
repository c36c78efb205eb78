"""Can the understanding model learn this world, and can extra labels move it? A fast look before the science checks.

    python launchers/understanding_probe.py --seeds 0,1                       # the science checks' hard regime
    python launchers/understanding_probe.py --per-emotion 16 --steps 300 model.understanding.position_init_std=0.02

The science checks' pipeline runs take most of an hour per seed on 2 cores; this takes minutes. It trains the
config's understanding model alone, in one process, on exactly the data the science checks read for ``--world``
and ``--per-emotion`` (launchers/science_checks.py: its world overrides and the label-scarce shards), and with
the config's training view (``data.train_augment``: random resized crop + flip, or none) and init
(``model.understanding.*``). It is **not** the pipeline: emotion cross-entropy only (no query losses), plain
AdamW with one learning rate (linear warm-up of 10 steps, cosine decay), batch 32, no DeepSpeed, no generator.

Per seed:

1. stage 1's analogue: ``--steps`` steps from random weights on the labelled train images; test top-1;
2. three continuations of it for ``--continue-steps`` steps, each batch ``--rho`` from an extra set and the rest
   from the labelled images, training ``--train`` (``queries``: the expert queries and interactive blocks, what
   stage 2 and the feedback rounds train, METHOD §3.1; ``all``: the whole model; ``queries,all``: both, from the
   same stage 1):
   - ``none``: no extra set (the batch is all labelled images);
   - ``real_extra``: ``--extra`` left-out real train images per emotion, rightly labelled (the real-data control);
   - ``wrong_labels``: the same images, each labelled k -> k+1 (the wrong-labels control, on real images).

A regime where the two controls do not move here, beyond the seeds' spread, will not show them in the pipeline
either. Prints a table and writes ``<out>/probe.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uniemo.config import Config, load_config
from uniemo.data.images import image_member, open_image, to_rgb
from uniemo.data.shards import ensure_synthetic_shards, left_out_shards, read_manifest, read_shard_samples
from uniemo.data.transforms import build_sample_transform
from uniemo.feedback.controls import wrong_label
from uniemo.models.understanding import UnderstandingModel

ARMS = ("none", "real_extra", "wrong_labels")


def _science_worlds() -> tuple[dict[str, list[str]], str, int]:
    """The science checks' world overrides and default regime (one definition, in launchers/science_checks.py)."""
    spec = importlib.util.spec_from_file_location("science_checks", Path(__file__).with_name("science_checks.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WORLDS, module.DEFAULT_WORLD, module.DEFAULT_PER_EMOTION


def _images(folder: Path, split: str | None, max_pixels: int,
            per_emotion: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    """The decoded images and labels of ``folder``'s shards (of ``split``; all: None), at most ``per_emotion``
    of each emotion (0: all), in manifest order; images over ``max_pixels`` are refused as the loader does."""
    images: list[Image.Image] = []
    labels: list[int] = []
    counts: dict[int, int] = {}
    for entry in read_manifest(folder)["shards"]:
        if split is not None and entry.get("split") != split:
            continue
        for sample in read_shard_samples(folder / entry["name"]):
            k = int(sample["cls"])
            if per_emotion and counts.get(k, 0) >= per_emotion:
                continue
            counts[k] = counts.get(k, 0) + 1
            ext = image_member(sample)
            if ext is None:
                continue
            images.append(to_rgb(open_image(sample[ext], max_pixels)))
            labels.append(k)
    return images, np.array(labels, dtype=np.int64)


class Probe:
    """The data of one world and regime, decoded once, and the runs of each seed on it."""

    def __init__(self, cfg: Config, extra: int) -> None:
        self.cfg = cfg
        labelled, cap = ensure_synthetic_shards(cfg.data), cfg.data.limits.max_image_pixels
        self.train, self.train_y = _images(labelled, "train", cap)
        self.extra, self.extra_y = _images(left_out_shards(cfg.data), None, cap, extra)
        self.wrong_y = np.array([wrong_label(int(k)) for k in self.extra_y], dtype=np.int64)
        test, self.test_y = _images(labelled, "test", cap)
        evaluate = build_sample_transform(cfg.data, stage=1, training=False)
        self.test = torch.stack([evaluate(im, random.Random(0))["image"] for im in test])
        self.view = build_sample_transform(cfg.data, stage=1, training=True)

    def batch(self, rng: np.random.Generator, view_rng: random.Random, size: int, rho: float,
              arm: str) -> tuple[torch.Tensor, torch.Tensor]:
        n_extra = 0 if arm == "none" else int(round(rho * size))
        picks = [(self.train[i], int(self.train_y[i])) for i in rng.integers(0, len(self.train), size - n_extra)]
        labels = self.extra_labels(arm)
        picks += [(self.extra[i], int(labels[i])) for i in rng.integers(0, len(self.extra), n_extra)]
        images = torch.stack([self.view(im, view_rng)["image"] for im, _ in picks])
        return images, torch.tensor([k for _, k in picks])

    def extra_labels(self, arm: str) -> np.ndarray:
        """The labels the extra images carry in ``arm``: their own, or each one's wrong label (k -> k+1)."""
        return self.wrong_y if arm == "wrong_labels" else self.extra_y

    @torch.no_grad()
    def top1(self, model: UnderstandingModel) -> float:
        model.eval()
        logits = torch.cat([model(chunk).emotion_logits for chunk in self.test.split(128)])
        model.train()
        return float((logits.argmax(1).numpy() == self.test_y).mean())

    def train_steps(self, model: UnderstandingModel, params: list[torch.nn.Parameter], steps: int, lr: float,
                    seed: int, arm: str, rho: float) -> None:
        rng, view_rng = np.random.default_rng(seed), random.Random(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        for step in range(steps):
            scale = min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            images, labels = self.batch(rng, view_rng, 32, rho, arm)
            loss = F.cross_entropy(model(images).emotion_logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def seed(self, seed: int, args: argparse.Namespace) -> dict[str, float]:
        torch.manual_seed(seed)
        model = UnderstandingModel(self.cfg.model.understanding, 0, 0)
        self.train_steps(model, list(model.parameters()), args.steps, args.lr, seed, "none", 0.0)
        out = {"stage1": self.top1(model)}
        modes = args.train.split(",")
        for mode in modes:
            for arm in ARMS:
                cont = copy.deepcopy(model)
                roles = cont.parameter_roles()
                params = [p for n, p in cont.named_parameters() if mode == "all" or roles[n] == "queries"]
                self.train_steps(cont, params, args.continue_steps, args.continue_lr, seed + 1000, arm, args.rho)
                out[arm if len(modes) == 1 else f"{arm} ({mode})"] = self.top1(cont)
        return out


def main(argv: list[str] | None = None) -> int:
    worlds, default_world, default_per_emotion = _science_worlds()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--world", default=default_world, choices=sorted(worlds))
    parser.add_argument("--per-emotion", type=int, default=default_per_emotion)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=1500,
                        help="stage 1's analogue (default 1500, as the science checks' hard world)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--continue-steps", type=int, default=80, help="each continuation (default 80: the "
                        "feedback rounds' 2 x 40)")
    parser.add_argument("--continue-lr", type=float, default=1e-3)
    parser.add_argument("--train", default="queries", help="what the continuations train: queries, all, or "
                        "both (queries,all) from the same stage 1")
    parser.add_argument("--extra", type=int, default=16, help="extra images per emotion (default 16)")
    parser.add_argument("--rho", type=float, default=0.25, help="share of each batch from the extra set")
    parser.add_argument("--out", default="runs/understanding-probe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config, after the world's")
    args = parser.parse_args(argv)
    if not set(args.train.split(",")) <= {"queries", "all"}:
        parser.error(f"--train: queries, all or queries,all, got {args.train!r}")
    if args.per_emotion < 1:
        parser.error("--per-emotion must be >= 1: the extra images are the train images the regime leaves out")
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*worlds[args.world], f"data.labelled_per_emotion={args.per_emotion}",
                                    *args.overrides])
    started = time.monotonic()
    probe = Probe(cfg, args.extra)
    runs: dict[str, dict[str, float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        runs[f"seed-{seed}"] = probe.seed(seed, args)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[f"seed-{seed}"].items()),
              file=sys.stderr, flush=True)
    rows = list(next(iter(runs.values())))
    lines = [f"world {args.world}, {args.per_emotion} labelled train images per emotion, {len(probe.train)} in all; "
             f"continuations train {args.train}, rho {args.rho}, {args.extra} extra images per emotion",
             "", "| test top-1 | " + " | ".join(runs) + " | mean ± std |", "|---|" + "---:|" * (len(runs) + 1)]
    for row in rows:
        values = [r[row] for r in runs.values()]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f}{spread} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"args": vars(args), "runs": runs, "seconds": round(time.monotonic() - started, 1),
                              "labelled": len(probe.train), "extra": len(probe.extra), "test": len(probe.test_y)}
    (out / "probe.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
