"""Quality of a pretrained CPU-world generator (METHOD D15), measured on the test split of its data config.

For every test image, its caption (colour words measured on it, its scene and objects; never its emotion) is
given to the generator; the independent judge (``uniemo train-judge`` on the same data's train split) then
says which emotion each generated image evokes. Caption-conditioned Emo-A is the share judged as the emotion of
the image the caption came from. Also: the judge's accuracy on the real test images and on their VAE
reconstructions (the ceiling the VAE leaves), FID on judge features of generated vs real test images, and the
generated images' diversity within each emotion as a fraction of the real ones' (Sem-D on judge features).

    python launchers/generator_quality.py --config configs/tiny_generator.yaml \\
        --generator generators/cpu-world --judge runs/generator-judge [--guidance 7.5] [--steps 20] \\
        [--record]           # also write the figures into the generator's provenance.json
        [key=value ...]      # overrides of --config (e.g. data.synthetic.world=hard data.synthetic.images=2000)

Prints a table and writes ``<generator>/quality.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from uniemo.config import load_config
from uniemo.config.schema import EMOTIONS
from uniemo.data.captions import batch_captions
from uniemo.data.loader import build_loader_from_config, load_attribute_table
from uniemo.evaluation.judge import load_judge
from uniemo.evaluation.metrics import (
    FeatureStats,
    diversity_against_real,
    diversity_per_emotion,
    fid_from_stats,
)
from uniemo.models.generation import _to_uint8, generate_from_prompts
from uniemo.models.generator import Generator


def measure(cfg, generator: Generator, judge, guidance: float, steps: int, sampler: str, seed: int) -> dict:
    attributes = load_attribute_table(cfg.data)
    loader = build_loader_from_config(cfg.data, "test", stage=2, training=False, batch_size=32, num_workers=0)
    real, recon, fake, labels, captions = [], [], [], [], []
    for batch in loader:
        prompts = batch_captions(batch, attributes.scenes, attributes.objects)
        seeds = [seed * 100_000 + len(labels) + i for i in range(len(prompts))]
        fake.append(generate_from_prompts(generator, prompts, seeds, steps=steps, guidance_scale=guidance,
                                          sampler=sampler, batch_size=32))
        real.append(_to_uint8(batch["pixel_values"]))
        with torch.no_grad():
            latents = generator.encode_images(batch["pixel_values"], torch.Generator().manual_seed(seed))
            recon.append(_to_uint8(generator.decode_latents(latents)))
        labels.extend(batch["label"].tolist())
        captions.extend(prompts)
        print(f"  {len(labels)} test captions done", file=sys.stderr)
    labels_N = np.asarray(labels)
    real_i, recon_i, fake_i = (np.concatenate(x) for x in (real, recon, fake))
    acc = {name: float((judge.classify(images).argmax(1) == labels_N).mean())
           for name, images in (("real", real_i), ("vae_reconstruction", recon_i), ("generated", fake_i))}
    preds = judge.classify(fake_i).argmax(1)
    per_emotion = {e: float((preds[labels_N == k] == k).mean()) for k, e in enumerate(EMOTIONS)
                   if (labels_N == k).any()}
    real_f, fake_f = judge.features(real_i), judge.features(fake_i)
    fid = fid_from_stats(FeatureStats.of(real_f), FeatureStats.of(fake_f))
    # Within each emotion, on judge features: how much the generated images vary against the real ones they were
    # captioned from (the pipeline's Sem-D ratio, here for caption-conditioned images).
    pairs, div_seed = cfg.evaluation.diversity_pairs, cfg.evaluation.seed
    diversity = diversity_against_real(diversity_per_emotion(fake_f, labels_N, pairs, div_seed),
                                       diversity_per_emotion(real_f, labels_N, pairs, div_seed))
    return {
        "test_captions": len(labels),
        "caption_emo_a": acc["generated"],
        "caption_emo_a_per_emotion": per_emotion,
        "judge_on_real": acc["real"],
        "judge_on_vae_reconstructions": acc["vae_reconstruction"],
        "fid_judge_features": fid,
        "diversity_vs_real": diversity["sem_d"],
        "diversity_vs_real_per_emotion": {e: v["sem_d"] for e, v in diversity["per_emotion"].items()},
        "guidance_scale": guidance,
        "sampling_steps": steps,
        "sampler": sampler,
        "example_captions": captions[:5],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the generator's data config (configs/tiny_generator.yaml)")
    ap.add_argument("--generator", required=True, help="diffusers folder of the pretrained generator")
    ap.add_argument("--judge", required=True, help="judge folder (uniemo train-judge on the same data)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="unipc", choices=["unipc", "ddim"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--record", action="store_true", help="add the figures to the generator's provenance.json")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. data.synthetic.world=hard")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(args.config, args.overrides)
    generator = Generator.from_pretrained(args.generator)
    judge = load_judge(args.judge)
    results = []
    for g in args.guidance:
        started = time.perf_counter()
        r = measure(cfg, generator, judge, g, args.steps, args.sampler, args.seed)
        r["seconds"] = round(time.perf_counter() - started, 1)
        results.append(r)
    print(f"{'guidance':>8} {'steps':>5} {'captions':>8} {'Emo-A':>6} {'FID(judge)':>10} {'judge real':>10} "
          f"{'judge VAE':>9} {'diversity':>9}")
    for r in results:
        print(f"{r['guidance_scale']:>8} {r['sampling_steps']:>5} {r['test_captions']:>8} "
              f"{r['caption_emo_a']:>6.3f} {r['fid_judge_features']:>10.2f} {r['judge_on_real']:>10.3f} "
              f"{r['judge_on_vae_reconstructions']:>9.3f} {r['diversity_vs_real']:>8.2f}x")
    out = Path(args.out) if args.out else Path(args.generator) / "quality.json"
    out.write_text(json.dumps({"judge": str(args.judge), "results": results}, indent=1) + "\n")
    if args.record:
        prov_path = Path(args.generator) / "provenance.json"
        prov = json.loads(prov_path.read_text())
        prov["quality"] = {"judge": str(args.judge), "results": results}
        prov_path.write_text(json.dumps(prov, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
