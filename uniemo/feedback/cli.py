"""``uniemo feedback --config FILE [key=value ...] [--resume]``: the feedback loop (METHOD §5).

Continues a finished stage-2 run (``feedback.from_run``, else the newest stage-2 run under ``run.output_dir``) in
the feedback run ``<run.output_dir>/<run.name>/``: rounds of generation and filtering by a Ray actor pool, written
as ``shards/synthetic/round-<r>/``, and training on real + synthetic data, in turns (``feedback.mode=sequential``)
or side by side (``async``). See :mod:`uniemo.feedback.loop`.
"""

from __future__ import annotations

import argparse
import sys

from uniemo.logging import say


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feedback", help="run the feedback loop: generate, filter, continue training on the kept images")
    p.add_argument("--config", required=True, help="YAML config file (e.g. configs/tiny_feedback.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. feedback.rounds=2 feedback.mode=async")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the feedback run: finished rounds are not generated again, training goes on from latest",
    )
    p.set_defaults(func=_feedback)


def _feedback(args: argparse.Namespace) -> int:
    from uniemo.config import load_config
    from uniemo.feedback.loop import run_feedback

    cfg = load_config(args.config, args.overrides)
    summary = run_feedback(cfg, resume=args.resume)
    kept = sum(r["kept"] for r in summary["rounds"])
    loss = summary.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    print(f"uniemo: feedback run {summary['run_dir']}: {len(summary['rounds'])} round(s), {kept} image(s) kept; "
          f"step {summary['step']}{loss_text}; latest checkpoint {summary['checkpoint']}", file=sys.stdout)
    if summary.get("stopped"):
        say("stopped on SIGTERM after a checkpoint; continue with --resume")
        return 143
    return 0
