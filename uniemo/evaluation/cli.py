"""``uniemo train-judge`` and ``uniemo evaluate``.

::

    uniemo train-judge --config FILE [--out DIR] [key=value ...]
    uniemo evaluate    --run DIR [--judge DIR] [--images-per-emotion M] [key=value ...]

``train-judge`` trains the evaluation classifier once on the config's real train shards (default output:
``evaluation.judge``, else ``<run.output_dir>/<run.name>/judge``). ``evaluate`` reads the run's own
``config.yaml``; overrides apply on top of it (e.g. ``distributed.num_workers=1``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uniemo.run_layout import JUDGE_DIR


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train-judge`` and ``evaluate`` commands."""
    j = sub.add_parser("train-judge", help="train the independent evaluation classifier on the real train shards")
    j.add_argument("--config", required=True, help="YAML config whose data section names the real shards")
    j.add_argument("--out", default=None,
                   help="judge folder (default evaluation.judge, else <run.output_dir>/<run.name>/judge)")
    j.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluation.judge_steps=200")
    j.set_defaults(func=_train_judge)

    e = sub.add_parser("evaluate", help="test accuracy, confusion, Emo-A, FID, diversity, feedback funnel -> metrics.json")
    e.add_argument("--run", required=True, help="training run folder (runs/<name>)")
    e.add_argument("--judge", default=None,
                   help="judge folder from `uniemo train-judge` (default evaluation.judge, else <run>/../judge)")
    e.add_argument("--images-per-emotion", type=int, default=None, metavar="M",
                   help="generated images per emotion (= evaluation.images_per_emotion)")
    e.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. distributed.num_workers=1")
    e.set_defaults(func=_evaluate)


def _train_judge(args: argparse.Namespace) -> int:
    from uniemo.config import load_config
    from uniemo.evaluation.judge import describe, load_judge, train_judge
    from uniemo.run_layout import run_dir_of

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.evaluation.judge or run_dir_of(cfg) / JUDGE_DIR)
    train_judge(cfg, out)
    judge = load_judge(out)
    print(f"uniemo: {describe(judge)}; saved to {out} "
          f"({judge.info['training']['steps']} steps, {judge.info['training']['seconds']:.1f} s)", file=sys.stdout)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from uniemo.evaluation.evaluate import evaluate_run, summary_line

    overrides = list(args.overrides)
    if args.images_per_emotion is not None:
        overrides.append(f"evaluation.images_per_emotion={args.images_per_emotion}")
    result = evaluate_run(args.run, args.judge, overrides)
    print(summary_line(result, Path(args.run).expanduser().resolve()), file=sys.stdout)
    return 0
