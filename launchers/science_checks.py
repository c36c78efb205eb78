"""The science checks of RESULTS.md on the synthetic set (issue 6, part 4), end to end, for several seeds.

    python launchers/science_checks.py --seeds 0,1,2 --out runs/science        # then read runs/science/results.json

Per seed s (``run.seed = s``; the data set is the same for every seed, so seeds vary initialisation, data order,
noise and generation):

(a) stage 1 with the expert queries vs without (``use_scene_queries = use_object_queries = false``): test top-1,
    after the config's steps and stopped early (``--early-steps``, before the set's ceiling);
(b) stage 2 (joint training from (a)'s with-queries run) vs stage 1 alone: test top-1;
(c) Emo-A and FID of stage 2's generated images, judged by an independent classifier (one judge, trained once),
    and of the generation-side ablations: alpha fixed, no condition loss, no implicit feedback (METHOD D13);
(d) continuing stage 2 for the same number of steps with: filtered feedback (the config's METHOD §5 thresholds),
    unfiltered feedback (tau = 0, no near-duplicate removal, no attribute cap, keep all), and no feedback (real
    data only): test top-1 of each.

Every job is the ordinary code path (``run_training``, ``run_feedback``, ``train_judge``, ``evaluate_run``) in ONE
Ray session. Finished jobs are skipped when the script is run again (each writes ``metrics.json``), so an
interrupted run continues. The base config is ``configs/demo.yaml``'s stage overrides (``--config``), with
wandb off. Results: ``<out>/results.json`` (every number) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from uniemo.config import Config, load_config, with_overrides

NO_QUERIES = ["model.understanding.use_scene_queries=false", "model.understanding.use_object_queries=false"]
GENERATION_ABLATIONS = {
    "fixed_alpha": ["model.conditioner.fixed_alpha=true"],
    "no_condition_loss": ["training.losses.condition_loss=false"],
    "no_implicit_feedback": ["training.losses.implicit_feedback=false"],
}
"""Stage-2 variants of check (c): name -> overrides (METHOD D13)."""


def _stage_cfg(base: Config, out: Path, name: str, stage_overrides: list[str], extra: list[str]) -> Config:
    return with_overrides(base, [f"run.output_dir={out}", f"run.name={name}", *stage_overrides, *extra])


def _done(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def _evaluate(run_dir: Path, judge: Path) -> dict[str, Any]:
    from uniemo.evaluation.evaluate import evaluate_run

    if _done(run_dir):
        return json.loads((run_dir / "metrics.json").read_text())
    return evaluate_run(run_dir, judge, ["distributed.num_workers=1"])  # in-process: no Ray Train start-up


def _train(cfg: Config) -> Path:
    from uniemo.distributed.ray_train import run_dir_of, run_training
    from uniemo.training.checkpoint import latest_checkpoint

    run_dir = run_dir_of(cfg)
    if not _done(run_dir):
        if latest_checkpoint(run_dir) is None or not (run_dir / "emotion_space.safetensors").exists():
            run_training(cfg, resume=latest_checkpoint(run_dir) is not None)
    return run_dir


def _feedback(cfg: Config) -> Path:
    from uniemo.distributed.ray_train import run_dir_of
    from uniemo.feedback.loop import run_feedback

    run_dir = run_dir_of(cfg)
    if not _done(run_dir):
        run_feedback(cfg, resume=(run_dir / "config.yaml").is_file())
    return run_dir


def _no_feedback(cfg: Config, from_run: Path) -> Path:
    """The same continued training as the feedback run (steps, schedule, start weights), on real data only."""
    from uniemo.training.checkpoint import resolve_checkpoint

    fb = cfg.feedback
    plain = with_overrides(cfg, [
        "training.stage=2", f"training.init_from={resolve_checkpoint(str(from_run))}",
        f"training.steps={fb.rounds * fb.steps_per_round}", "training.epochs=0",
    ])
    return _train(plain)


def _seed(results: dict[str, Any], seed: int) -> tuple[str, list[str], dict[str, Any]]:
    """A seed's run-folder tag, its override and its (possibly already filled) results entry."""
    tag = f"seed-{seed}"
    return tag, [f"run.seed={seed}"], results["runs"].setdefault(tag, {})


def _top1(m: dict[str, Any]) -> float:
    return float(m["understanding"]["top1"])


def run_checks(config: str, seeds: list[int], out: Path, overrides: list[str] = (), only_a: bool = False,
               early_steps: int = 40) -> dict[str, Any]:
    from uniemo.distributed.ray_train import ray_session
    from uniemo.evaluation.judge import train_judge
    from uniemo.feedback.rounds import pool_cpus

    base = load_config(config, ["logging.wandb.mode=disabled", "logging.progress=false", *overrides])
    pipe = base.pipeline
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": config, "seeds": seeds, "runs": {}}
    results_path = out / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    started = time.monotonic()
    with ray_session(base.distributed, extra_cpus=pool_cpus(base)):
        judge = out / "judge"
        if not (judge / "judge.json").is_file():
            train_judge(with_overrides(base, list(pipe.judge)), judge)
        # Three passes over the seeds, the headline checks first: (a)-(c); the generation ablations; (d).
        for seed in seeds:
            tag, seed_o, entry = _seed(results, seed)
            s1q = _train(_stage_cfg(base, out, f"{tag}/stage1-queries", list(pipe.stage1),
                                    seed_o + ["training.stage=1"]))
            entry["a_stage1_queries"] = _top1(_evaluate(s1q, judge))
            s1n = _train(_stage_cfg(base, out, f"{tag}/stage1-no-queries", list(pipe.stage1), seed_o + [
                "training.stage=1", *NO_QUERIES]))
            entry["a_stage1_no_queries"] = _top1(_evaluate(s1n, judge))
            # (a) before convergence: both variants stop after `early_steps` (the full budget reaches the
            # set's ceiling, where the queries cannot show).
            for key, name, extra in (("a_early_queries", "stage1-queries-early", []),
                                     ("a_early_no_queries", "stage1-no-queries-early", NO_QUERIES)):
                run = _train(_stage_cfg(base, out, f"{tag}/{name}", list(pipe.stage1), seed_o + [
                    "training.stage=1", f"training.steps={early_steps}", *extra]))
                entry[key] = _top1(_evaluate(run, judge))
            save()
            if only_a:
                continue
            s2 = _train(_stage_cfg(base, out, f"{tag}/stage2", list(pipe.stage2),
                                   seed_o + ["training.stage=2", f"training.init_from={s1q}"]))
            m2 = _evaluate(s2, judge)
            entry["b_stage2"] = _top1(m2)
            entry["c_emo_a"] = float(m2["generation"]["emo_a"]["top1"])
            entry["c_fid"] = float(m2["generation"]["fid"]["pooled"])
            entry["c_fid_extractor"] = m2["generation"]["fid"]["extractor"]
            save()
            print(f"seed {seed} (a)-(c): {json.dumps(entry)}", file=sys.stderr, flush=True)
        for seed in [] if only_a else seeds:
            tag, seed_o, entry = _seed(results, seed)
            s1q = out / tag / "stage1-queries"
            # Generation-side ablations (METHOD D13): the same stage 2 with one switch changed.
            for key, extra in GENERATION_ABLATIONS.items():
                run = _train(_stage_cfg(base, out, f"{tag}/stage2-{key}", list(pipe.stage2),
                                        seed_o + ["training.stage=2", f"training.init_from={s1q}", *extra]))
                m = _evaluate(run, judge)
                entry[f"c_{key}_emo_a"] = float(m["generation"]["emo_a"]["top1"])
                entry[f"c_{key}_fid"] = float(m["generation"]["fid"]["pooled"])
                entry[f"c_{key}_top1"] = _top1(m)
                save()
        for seed in [] if only_a else seeds:
            tag, seed_o, entry = _seed(results, seed)
            s2 = out / tag / "stage2"
            fb_common = list(pipe.feedback) + seed_o + [f"feedback.from_run={s2}", "feedback.mode=sequential"]
            filtered = _feedback(_stage_cfg(base, out, f"{tag}/feedback-filtered", fb_common, []))
            entry["d_filtered"] = _top1(_evaluate(filtered, judge))
            entry["d_filtered_kept"] = _kept(filtered)
            save()
            n = base.feedback.candidates_per_emotion
            unfiltered = _feedback(_stage_cfg(base, out, f"{tag}/feedback-unfiltered", fb_common, [
                "feedback.tau=0.0", "feedback.delta=1.0", "feedback.attribute_cap=1.0", f"feedback.keep={n}"]))
            entry["d_unfiltered"] = _top1(_evaluate(unfiltered, judge))
            entry["d_unfiltered_kept"] = _kept(unfiltered)
            save()
            plain = _no_feedback(_stage_cfg(base, out, f"{tag}/no-feedback", fb_common, []), s2)
            entry["d_no_feedback"] = _top1(_evaluate(plain, judge))
            save()
            print(f"seed {seed}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["judge"] = json.loads((out / "judge" / "judge.json").read_text()).get("val_accuracy")
    save()
    return results


def _kept(run_dir: Path) -> int:
    """Synthetic images kept over all rounds of a feedback run (the funnels of its round reports)."""
    from uniemo.evaluation.evaluate import summarize_rounds

    return sum(r["funnel"]["kept"] for r in summarize_rounds(run_dir))


def table(results: dict[str, Any]) -> str:
    rows = [
        ("(a) stage 1, with expert queries: test top-1", "a_stage1_queries"),
        ("(a) stage 1, without queries: test top-1", "a_stage1_no_queries"),
        ("(a) stage 1, with expert queries, early stop: test top-1", "a_early_queries"),
        ("(a) stage 1, without queries, early stop: test top-1", "a_early_no_queries"),
        ("(b) stage 2 (joint, from (a) with queries): test top-1", "b_stage2"),
        ("(c) Emo-A of stage-2 images (judge; chance 0.125)", "c_emo_a"),
        ("(c) FID of stage-2 images (judge features)", "c_fid"),
        ("(c) Emo-A, alpha fixed", "c_fixed_alpha_emo_a"),
        ("(c) Emo-A, no condition loss", "c_no_condition_loss_emo_a"),
        ("(c) Emo-A, no implicit feedback", "c_no_implicit_feedback_emo_a"),
        ("(c) FID, alpha fixed", "c_fixed_alpha_fid"),
        ("(c) FID, no condition loss", "c_no_condition_loss_fid"),
        ("(c) FID, no implicit feedback", "c_no_implicit_feedback_fid"),
        ("(b) test top-1 after stage 2, no implicit feedback", "c_no_implicit_feedback_top1"),
        ("(d) + filtered feedback: test top-1", "d_filtered"),
        ("(d) + unfiltered feedback: test top-1", "d_unfiltered"),
        ("(d) + no feedback (real only, same steps): test top-1", "d_no_feedback"),
        ("(d) synthetic images kept, filtered", "d_filtered_kept"),
        ("(d) synthetic images kept, unfiltered", "d_unfiltered_kept"),
    ]
    seeds = sorted(results["runs"])
    lines = ["| check | " + " | ".join(seeds) + " | mean ± std |", "|---|" + "---:|" * (len(seeds) + 1)]
    for title, key in rows:
        values = [results["runs"][s].get(key) for s in seeds]
        nums = [v for v in values if isinstance(v, (int, float))]
        cells = [f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in values]
        if len(nums) >= 2:
            summary = f"{statistics.mean(nums):.3f} ± {statistics.stdev(nums):.3f}"
        elif nums:
            summary = f"{nums[0]:.3f}"
        else:
            summary = "-"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {summary} |")
    return "\n".join(lines)


def ablation_table(sweep_dir: Path) -> str:
    """The table of a finished ``configs/sweeps/ablations.yaml`` sweep: per point, the evaluated run's numbers."""
    lines = ["| point | evaluated run | test top-1 | test loss | Emo-A | FID (judge features) | kept (rounds) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for point in sorted(p for p in sweep_dir.iterdir() if (p / "pipeline.json").is_file()):
        state = json.loads((point / "pipeline.json").read_text())
        run = Path(state["stages"].get("evaluate", {}).get("result", {}).get("run", ""))
        if not (run / "metrics.json").is_file():
            lines.append(f"| {point.name.split(',')[0]} | not evaluated | - | - | - | - | - |")
            continue
        m = json.loads((run / "metrics.json").read_text())
        gen = m.get("generation") or {}
        kept = _kept(run) if (run / "rounds").is_dir() else "-"
        lines.append(
            f"| {point.name.split(',')[0]} | {run.name} | {m['understanding']['top1']:.3f} | "
            f"{m['understanding']['loss']:.3f} | {gen.get('emo_a', {}).get('top1', float('nan')):.3f} | "
            f"{gen.get('fid', {}).get('pooled', float('nan')):.2f} | {kept} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/science")
    parser.add_argument("--only-a", action="store_true", help="only check (a): stage 1 with and without queries")
    parser.add_argument("--early-steps", type=int, default=40,
                        help="stage-1 steps of check (a)'s before-convergence variant (default 40)")
    parser.add_argument("--ablations", metavar="DIR", help="print the table of a finished ablation sweep "
                        "(uniemo sweep configs/sweeps/ablations.yaml --backend local -> runs/ablations) and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. "
                        "'pipeline.stage1=[training.steps=40]'")
    args = parser.parse_args()
    if args.ablations:
        print(ablation_table(Path(args.ablations)))
        return 0
    results = run_checks(args.config, [int(s) for s in args.seeds.split(",")], Path(args.out), args.overrides,
                         args.only_a, args.early_steps)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
