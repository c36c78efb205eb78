"""``uniemo export``, ``generate``, ``classify`` and ``transfer``: using a trained run.

::

    uniemo export   --run DIR [--out DIR] [--official]
    uniemo generate --run DIR --emotion awe [--num 8] --out DIR [--seed S] [--steps N] [--guidance G]
                    [--sampler {unipc,ddim}] [--batch-size B]
    uniemo classify --run DIR IMAGE... [--json FILE]
    uniemo transfer --run DIR (--image IMG | --emoset ROOT) --emotion awe [--object bag] [--official] --out DIR
                    [--num 1] [--seed S] [--steps N]

``--run`` is a run folder (``runs/<name>``, its latest checkpoint is used) or a folder written by ``uniemo export``.
``export --official`` writes the official UniEmo layout (best.pth; VIT_query.pth, mapper*.pth, params.json,
UniEmo_space/); ``transfer --official`` takes the official ``inference_transfer.py`` defaults: the stage-1 ViT, the
object ``bag`` and, with ``--emoset``, a random image of the target emotion per output (:mod:`uniemo.inference.official`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from uniemo.config.schema import EMOTIONS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export``, ``generate`` and ``classify`` commands."""
    e = sub.add_parser("export", help="write safetensors weights, the emotion space and a diffusers pipeline")
    e.add_argument("--run", required=True, help="run folder (runs/<name>) or an earlier export")
    e.add_argument("--out", default=None,
                   help="export folder: new, empty, or an earlier export to replace (default <run>/export; with "
                        "--official: new or empty, default <run>/official)")
    e.add_argument("--official", action="store_true",
                   help="write the official UniEmo layout (best.pth, or VIT_query.pth + mapper*.pth + params.json + "
                        "UniEmo_space/) that the official inference scripts load")
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="generate images of an emotion with sampled conditions (METHOD §4.2)")
    g.add_argument("--run", required=True, help="stage-2 run folder or export folder")
    g.add_argument("--emotion", required=True, help=f"target emotion: one of {', '.join(EMOTIONS)}")
    g.add_argument("--num", type=int, default=8, help="number of images (default 8)")
    g.add_argument("--out", required=True, help="folder for <emotion>_<seed>.png and generations.jsonl")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (default random)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default model.generator.sampling_steps)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default model.generator.guidance_scale)")
    g.add_argument("--sampler", choices=["unipc", "ddim"], default=None, help="default model.generator.sampler")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images denoised together (default model.generator.generation_batch_size)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.set_defaults(func=_generate)

    c = sub.add_parser("classify", help="emotion probabilities of image files")
    c.add_argument("--run", required=True, help="run folder (stage 1 or 2) or export folder")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE ('-': stdout only)")
    c.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    c.set_defaults(func=_classify)

    t = sub.add_parser("transfer", help="render a real image with a target emotion (emotion transfer)")
    t.add_argument("--run", required=True, help="stage-2 run folder or export folder")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", default=None, help="the source image file (the same for every output)")
    source.add_argument("--emoset", default=None, metavar="ROOT",
                        help="draw each output's source image at random (from its seed) from ROOT/image/<emotion>/, "
                             "the target emotion's EmoSet folder, as the official inference_transfer.py")
    t.add_argument("--emotion", required=True, help=f"target emotion: one of {', '.join(EMOTIONS)}")
    t.add_argument("--object", default=None, dest="object_word",
                   help="an object word after the emotion token, as in the official '<emotion> bag' (default none; "
                        "'bag' with --official)")
    t.add_argument("--official", action="store_true",
                   help="the official transfer's defaults: the stage-1 ViT the run started from (with the run's "
                        "mappers) and the object 'bag'")
    t.add_argument("--out", required=True,
                   help="folder for <image>-<emotion>_<seed>.png, its textual-inversion embedding and generations.jsonl")
    t.add_argument("--num", type=int, default=1, help="number of images (default 1)")
    t.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (default random)")
    t.add_argument("--steps", type=int, default=None, help="denoising steps (default model.generator.sampling_steps)")
    t.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default model.generator.guidance_scale)")
    t.add_argument("--sampler", choices=["unipc", "ddim"], default=None, help="default model.generator.sampler")
    t.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    t.set_defaults(func=_transfer)


def _export(args: argparse.Namespace) -> int:
    from uniemo.inference.export import export_run
    from uniemo.run_layout import EXPORT_MANIFEST

    if args.official:
        from uniemo.inference.official import export_official

        files = export_official(args.run, args.out or Path(args.run) / "official")
        shown = sorted({str(f.relative_to(files[0].parent)).split("/")[0] for f in files})
        print(f"exported {args.run} in the official UniEmo layout to {files[0].parent}: {', '.join(shown)}")
        return 0

    out = export_run(args.run, args.out)
    info = json.loads((out / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    parts = ", ".join(info["files"].values())
    print(f"exported stage-{info['stage']} run {args.run} (step {info['step']}) to {out}: {parts}")
    if info["stage"] == 2:
        print(f"  diffusers: StableDiffusionPipeline.from_pretrained({str(out / 'pipeline')!r})(\"<awe>\")")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from uniemo.inference.runs import emotion_index, generate_images, load_run

    emotion_index(args.emotion)  # a bad name fails before the models load
    run = load_run(args.run, device=_device(args.device))
    records = generate_images(
        run, args.emotion, args.num, args.out, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
        sampler=args.sampler, batch_size=args.batch_size,
    )
    seeds = ", ".join(str(r["seed"]) for r in records)
    print(f"wrote {len(records)} {records[0]['emotion']} image(s) to {args.out} (seeds {seeds}); see generations.jsonl")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from uniemo.errors import UserError
    from uniemo.inference.official import (
        OFFICIAL_OBJECT,
        check_official_transfer_source,
        emoset_images,
        official_transfer_run,
    )
    from uniemo.inference.runs import emotion_index, load_run
    from uniemo.inference.transfer import check_request, transfer_image
    from uniemo.seeds import request_seeds

    emotion_index(args.emotion)  # bad arguments or a missing image fail before the models load
    object_word = OFFICIAL_OBJECT if args.official and args.object_word is None else args.object_word
    check_request(args.num, object_word, args.seed, args.steps)
    if args.image is not None and not Path(args.image).is_file():
        raise UserError(f"--image {args.image!r} does not exist; give an image file")
    if args.official:
        check_official_transfer_source(args.run)
    seeds = request_seeds(args.seed, args.num)
    sources = emoset_images(args.emoset, args.emotion.strip().lower(), seeds) if args.emoset else []
    run = load_run(args.run, device=_device(args.device))
    if args.official:
        run, note = official_transfer_run(run)
        print(note)
    records = []
    if args.emoset:  # one source image per output, drawn from the output's seed: one transfer each
        for seed, image in zip(seeds, sources, strict=True):
            records += transfer_image(run, image, args.emotion, args.out, num=1, object_word=object_word, seed=seed,
                                      steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler)
    else:
        records = transfer_image(run, args.image, args.emotion, args.out, num=args.num, object_word=object_word,
                                 seed=args.seed, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler)
    first = records[0]
    what = args.image if args.image else f"{len({r['source_image'] for r in records})} image(s) of {args.emoset}"
    print(f"wrote {len(records)} {first['emotion']} transfer(s) of {what} to {args.out} "
          f"(prompt {first['prompt']!r}); diffusers: pipe.load_textual_inversion({first['embedding']!r})")
    return 0


def _classify(args: argparse.Namespace) -> int:
    from uniemo.inference.runs import classify_images, load_run

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        from uniemo.errors import UserError

        raise UserError(f"image file {missing[0]!r} does not exist")
    run = load_run(args.run, device=_device(args.device), compute_missing_emotion_space=False)
    results = classify_images(run, args.images)
    text = json.dumps(results, indent=1) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return 0
    for r in results:
        probs = " ".join(f"{e}={p:.3f}" for e, p in r["probabilities"].items())
        print(f"{r['image']}: {r['emotion']} ({r['probability']:.3f})  {probs}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return 0


def _device(name: str | None):
    """``--device``: None keeps the default; a name torch does not know is a one-line error."""
    if name is None:
        return None
    import torch

    from uniemo.errors import UserError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device
