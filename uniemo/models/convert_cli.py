"""``uniemo convert``: weights in the shapes users download, turned into the folders uniemo loads.

::

    uniemo convert sd-single-file CHECKPOINT OUT --config CONFIG_DIR [--no-ema]

``CHECKPOINT`` is a CompVis-layout ``.safetensors`` (``v1-5-pruned-emaonly.safetensors``); ``CONFIG_DIR`` holds the
diffusers configs and tokenizer of the same model family (``hf download stable-diffusion-v1-5/stable-diffusion-v1-5
--include '*.json' '*.txt' --local-dir sd15-config``). Nothing is downloaded and no pickle is opened.
"""

from __future__ import annotations

import argparse

from uniemo.logging import say


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` command group."""
    p = sub.add_parser("convert", help="convert downloaded weights (single-file SD checkpoints) to diffusers folders")
    csub = p.add_subparsers(dest="convert_cmd", required=True, metavar="{sd-single-file}")
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


def _sd_single_file(args: argparse.Namespace) -> int:
    from uniemo.models.sd_single_file import convert_sd_single_file

    report = convert_sd_single_file(args.checkpoint, args.out, args.config_dir, ema=args.ema)
    weights = "EMA UNet" if report.ema else "UNet as stored"
    say(f"wrote {report.out} ({report.tensors} tensors, {weights}); set model.generator.path={report.out}",
        topic="convert")
    return 0
