"""The feedback filter on real images (uniemo/feedback/filter_control.py): would it keep real images of one emotion?

    python launchers/filter_control.py runs/<run>/stage2 --deltas 0.95,0.99,1.0 --caps 0.25,1.0 \\
        [--feedback-run runs/<run>/feedback]   # its generated funnel, from the round reports, beside the real one
        [--split test] [--tau 0.6] [--out filter_control.json]

For every (delta, cap) pair, the real images' funnel: pools of ``feedback.candidates_per_emotion`` images of each
emotion, scored by the run's understanding model, filtered with the run's tau and K. A rule that rejects real
images of one emotion as much as generated ones measures the features, not the generator.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def table(control: dict, generated: dict[str, int] | None) -> str:
    lines = ["| images | delta | cap | candidates | pass fidelity | duplicate | attribute cap | kept | kept share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in control["funnels"]:
        s, t = f["settings"], f["total"]
        lines.append(f"| real ({control['split']}) | {s['delta']:g} | {s['attribute_cap']:g} | {t['candidates']} | "
                     f"{f['passed_fidelity']} | {t['duplicate']} | {t['attribute_cap']} | {t['kept']} | "
                     f"{f['kept_share']:.2f} |")
    if generated:
        g = generated
        share = g.get("kept", 0) / g["candidates"] if g.get("candidates") else float("nan")
        lines.append(f"| generated (feedback run) | run's | run's | {g.get('candidates', '-')} | "
                     f"{g.get('passed_fidelity', '-')} | {g.get('duplicate', '-')} | {g.get('attribute_cap', '-')} | "
                     f"{g.get('kept', '-')} | {share:.2f} |")
    q = control.get("within_pool_cosine") or {}
    if q:
        lines += ["", "f_cls cosine of two real images of one pool (what delta is compared with): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in q.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a stage-2 run folder (or an export) whose understanding model filters")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tau", type=float, default=None, help="fidelity threshold (default: the run's)")
    parser.add_argument("--deltas", default="", help="near-duplicate thresholds to try (default: the run's)")
    parser.add_argument("--caps", default="", help="attribute caps r to try (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=None,
                        help="real images per pool (default: the run's feedback.candidates_per_emotion)")
    parser.add_argument("--feedback-run", type=Path, help="a feedback run whose generated funnel to show beside")
    parser.add_argument("--out", type=Path, help="write every funnel as JSON here")
    args = parser.parse_args(argv)
    from uniemo.errors import UserError
    from uniemo.evaluation.evaluate import funnel_totals
    from uniemo.feedback.filter_control import filter_control

    tau = {} if args.tau is None else {"tau": args.tau}
    deltas, caps = _floats(args.deltas) or [None], _floats(args.caps) or [None]
    settings = [{**tau, **({} if d is None else {"delta": d}), **({} if c is None else {"attribute_cap": c})}
                for d in deltas for c in caps]
    try:
        control = filter_control(args.run, args.split, settings, args.seed, args.pool_size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    generated = funnel_totals(args.feedback_run) if args.feedback_run else None
    if generated:
        control["generated"] = generated
    if args.out:
        args.out.write_text(json.dumps(control, indent=2) + "\n")
    print(table(control, generated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
