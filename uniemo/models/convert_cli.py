"""``uniemo convert``: weights in the shapes users download, turned into the folders uniemo loads.

::

    uniemo convert sd-single-file CHECKPOINT OUT --config CONFIG_DIR [--no-ema]
    uniemo convert official [--stage1 best.pth] [--stage2 DIR] [--space DIR] --config C --out OUT [key=value ...]

``CHECKPOINT`` is a CompVis-layout ``.safetensors`` (``v1-5-pruned-emaonly.safetensors``); ``CONFIG_DIR`` holds the
diffusers configs and tokenizer of the same model family (``hf download stable-diffusion-v1-5/stable-diffusion-v1-5
--include '*.json' '*.txt' --local-dir sd15-config``). Nothing is downloaded and no pickle is opened.

``official`` turns the files of the official UniEmo code into run folders ``OUT/stage1`` and ``OUT/stage2``
(:mod:`uniemo.inference.official`); its pickles are read with torch's restricted unpickler only.
"""

from __future__ import annotations

import argparse

from uniemo.logging import say


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` command group."""
    p = sub.add_parser("convert", help="convert downloaded weights (single-file SD checkpoints, official UniEmo "
                       "checkpoints) to the folders uniemo loads")
    csub = p.add_subparsers(dest="convert_cmd", required=True, metavar="{sd-single-file,official}")
    s = csub.add_parser(
        "sd-single-file",
        help="a CompVis-layout SD .safetensors (v1-5-pruned*.safetensors) -> a diffusers folder, offline",
    )
    s.add_argument("checkpoint", help="the single-file checkpoint (.safetensors; .ckpt pickles are refused)")
    s.add_argument("out", help="the diffusers folder to write (must not exist)")
    s.add_argument("--config", required=True, dest="config_dir",
                   help="a diffusers SD folder of the same family: model_index.json, part configs, tokenizer")
    s.add_argument("--no-ema", dest="ema", action="store_false",
                   help="take the UNet's training weights, not its EMA copy, from a file holding both")
    s.set_defaults(func=_sd_single_file)

    o = csub.add_parser("official", help="official UniEmo checkpoints (best.pth; VIT_query.pth, mapper*.pth, "
                        "params.json, UniEmo_space/) -> uniemo run folders OUT/stage1, OUT/stage2")
    o.add_argument("--stage1", default=None, help="the official stage-1 checkpoint (runs/train_vit/best.pth)")
    o.add_argument("--stage2", default=None,
                   help="the official stage-2 output_dir (VIT_query.pth, mapper.pth, mapper_scene.pth, "
                        "mapper_object.pth, params.json)")
    o.add_argument("--space", default=None, help="the UniEmo_space/ folder (default: DIR/UniEmo_space of --stage2)")
    o.add_argument("--config", required=True,
                   help="the uniemo config the official model fits (e.g. configs/emoset_stage2.yaml)")
    o.add_argument("--out", required=True, help="new folder for the run folders stage1/ and stage2/")
    o.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. data.shards=DIR")
    o.set_defaults(func=_official)


def _sd_single_file(args: argparse.Namespace) -> int:
    from uniemo.models.sd_single_file import convert_sd_single_file

    report = convert_sd_single_file(args.checkpoint, args.out, args.config_dir, ema=args.ema)
    weights = "EMA UNet" if report.ema else "UNet as stored"
    say(f"wrote {report.out} ({report.tensors} tensors, {weights}); set model.generator.path={report.out}",
        topic="convert")
    return 0


def _official(args: argparse.Namespace) -> int:
    from uniemo.inference.official import convert_official

    report = convert_official(config=args.config, out=args.out, stage1=args.stage1, stage2=args.stage2,
                              space=args.space, overrides=args.overrides)
    for note in report.notes:
        say(note, topic="convert")
    runs = ", ".join(f"{stage} -> {path}" for stage, path in report.runs.items())
    print(f"converted the official checkpoints: {runs}")
    if "stage2" in report.runs:
        print(f"  uniemo generate --run {report.runs['stage2']} --emotion awe --out gen")
    return 0
