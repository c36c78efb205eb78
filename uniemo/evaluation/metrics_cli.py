"""``uniemo metrics``: EmoGen's evaluation protocol on any folder of generated images.

::

    uniemo metrics --generated DIR [--real DIR] [--config FILE] [--judge DIR] [--out FILE] [key=value ...]

Both folders are laid out ``<emotion>/<images>`` (uniemo's ``<run>/eval/generated``, EmoGen's ``<run>/img``, a
folder of plain Stable Diffusion outputs, EmoSet's ``image/``), so runs of different methods are scored on the
same numbers. The weights come from ``evaluation.weights`` (the config file or ``key=value`` overrides); a
metric without them is left out and ``metrics.json`` says so. The metrics are those of
:mod:`uniemo.evaluation.paper_metrics`; with a judge (``--judge`` or ``evaluation.judge``) its Emo-A is added,
named ``judge:<name>``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE_VERSION = 1
"""Version of the file ``uniemo metrics`` writes."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``metrics`` command."""
    m = sub.add_parser("metrics", help="EmoGen's metrics (FID, Emo-A, LPIPS, Sem-C, Sem-D) of an image folder")
    m.add_argument("--generated", required=True, help="folder <emotion>/<images> of generated images")
    m.add_argument("--real", default=None,
                   help="folder <emotion>/<images> of real images, for FID (EmoSet's image/ folder, all splits)")
    m.add_argument("--config", default=None, help="YAML config whose evaluation.weights name the metric networks")
    m.add_argument("--judge", default=None, help="judge folder for a second Emo-A (default evaluation.judge)")
    m.add_argument("--out", default=None, help="the result (default <generated>/metrics.json)")
    m.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluation.weights.inception=FILE")
    m.set_defaults(func=_metrics)


def run_metrics(
    generated_dir: str | Path,
    real_dir: str | Path | None,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    judge_dir: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``generated_dir`` (FID against ``real_dir``), write the result to ``out`` and return it."""
    from uniemo.config import load_config
    from uniemo.data.attributes import write_json_atomic
    from uniemo.errors import UserError
    from uniemo.evaluation import paper_nets
    from uniemo.evaluation.image_sets import read_image_folder
    from uniemo.evaluation.judge import load_judge
    from uniemo.evaluation.paper_metrics import compute_paper_metrics

    started = time.perf_counter()
    cfg = load_config(config, list(overrides))
    ev = cfg.evaluation
    target = Path(out).expanduser() if out else Path(generated_dir).expanduser() / "metrics.json"
    if target.is_dir():
        raise UserError(f"--out {target} is a folder; give a file name (e.g. {target / 'metrics.json'})")
    paper_nets.check_weights(ev.weights)  # before reading any image
    paper_nets.resolve_device(ev)
    generated = read_image_folder(generated_dir, "--generated")
    real = read_image_folder(real_dir, "--real") if real_dir else None
    judge_path = judge_dir or ev.judge
    judge = load_judge(judge_path) if judge_path else None
    result = compute_paper_metrics(ev, generated, real, judge=judge, workers=cfg.data.num_workers,
                                   progress=cfg.logging.progress)
    document = {
        "version": METRICS_FILE_VERSION,
        "command": "uniemo metrics",
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generated": generated.describe(),
        "real": real.describe() if real is not None else None,
        **result,
    }
    document["seconds"]["total"] = round(time.perf_counter() - started, 2)
    write_json_atomic(target, document)
    document["file"] = str(target)
    return document


def _metrics(args: argparse.Namespace) -> int:
    from uniemo.evaluation.paper_metrics import summary

    result = run_metrics(args.generated, args.real, args.config, args.overrides, args.judge, args.out)
    print(f"{result['file']}: {summary(result)}", file=sys.stdout)
    return 0
