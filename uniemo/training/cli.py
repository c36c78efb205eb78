"""``uniemo train --config FILE [key=value ...] [--resume]``: one training run (stage 1 or 2, chosen by config).

The run lives in ``<run.output_dir>/<run.name>/`` (ARCHITECTURE.md): ``config.yaml``, ``checkpoints/``,
``metrics.jsonl``, ``wandb/``, and for stage 2 ``emotion_space.safetensors`` and ``samples/``.
"""

from __future__ import annotations

import argparse
import sys

from uniemo.logging import say


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train stage 1 or stage 2 with Ray Train + DeepSpeed")
    p.add_argument("--config", required=True, help="YAML config file (e.g. configs/tiny_stage1.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=10 distributed.zero_stage=3")
    p.add_argument(
        "--resume", action="store_true", help="continue the run from its checkpoints/latest (= training.resume=latest)"
    )
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from uniemo.config import load_config
    from uniemo.training.driver import run_training

    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, resume=args.resume)
    loss = summary["loss"]
    loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    print(f"uniemo: run {summary['run_dir']}: step {summary['step']}{loss_text}; "
          f"latest checkpoint {summary['checkpoint']}", file=sys.stdout)
    if summary.get("stopped"):
        say("stopped on SIGTERM after a checkpoint; continue with --resume")
        return 143  # 128 + SIGTERM: what a launcher expects of a job that was asked to stop
    return 0
