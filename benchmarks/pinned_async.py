"""What pinning the async feedback loop costs in wall time, and whether it makes the demo's numbers repeatable.

1. Builds the demo's start once (kept in ``--out``): ``uniemo run --config configs/demo.yaml`` with the stages data,
   stage1 and stage2, as the demo runs them.
2. For each of ``--repeats`` rounds of the comparison, in turn free async and pinned async
   (``feedback.pinned=true``): copies the start into a fresh pipeline folder and runs the rest of the demo in it
   (``--resume``: feedback, judge, evaluate, report), with the demo config as it is otherwise. Free and pinned runs
   alternate, so that a change of the machine's load hits both.
3. Per run: the feedback stage's wall time and the whole run's, the seconds the trainers waited for rounds
   (``rounds/mix.jsonl``), the steps each round generated from and entered the mix at, and the headline numbers
   (test top-1, Emo-A, FID). Then whether the runs of each mode gave the same numbers.

    .venv/bin/python benchmarks/pinned_async.py --repeats 2 --out runs/bench/pinned

Writes into ``--out`` only (``start/``, ``free-<i>/``, ``pinned-<i>/``, logs, ``pinned_async.json``);
``--report pinned_async.json`` prints a saved result again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from soak import DEMO, REPO, _uniemo  # the sibling benchmark (its folder is on sys.path)

HEADLINE = ("eval/test/top1", "eval/emo_a", "eval/fid")


def _env() -> dict[str, str]:
    """The environment of ``make demo`` (no thread limits: the numbers must be the demo's)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(out: Path, name: str, extra: list[str], log: Path) -> float:
    cmd = [*_uniemo(), "run", "--config", str(DEMO), f"run.output_dir={out}", f"run.name={name}",
           "logging.progress=false", *extra, "--resume"]
    started = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"pinned_async: {name} failed (rc {done.returncode}); see {log}")
    return time.monotonic() - started


def build_start(out: Path) -> Path:
    start = out / "start"
    state = start / "pipeline.json"
    if state.is_file() and json.loads(state.read_text())["stages"].get("stage2", {}).get("status") == "done":
        print(f"pinned_async: start found in {start}", file=sys.stderr)
        return start
    print("pinned_async: building the demo's start (data, stage1, stage2)", file=sys.stderr, flush=True)
    seconds = _run(out, "start", ["pipeline.stages=[data,stage1,stage2]"], out / "start.log")
    print(f"pinned_async: start built in {seconds:.0f} s", file=sys.stderr)
    return start


def one_run(out: Path, start: Path, name: str, pinned: bool) -> dict[str, Any]:
    """The rest of the demo in a copy of the start; what it took and what it measured."""
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(start, folder)
    seconds = _run(out, name, [f"feedback.pinned={str(pinned).lower()}"], out / f"{name}.log")
    state = json.loads((folder / "pipeline.json").read_text())
    feedback = state["stages"]["feedback"]
    evaluate = state["stages"]["evaluate"]["result"]
    mix = [json.loads(line) for line in (folder / "feedback" / "rounds" / "mix.jsonl").read_text().splitlines()]
    return {
        "name": name,
        "pinned": pinned,
        "feedback_s": feedback["seconds"],
        "rest_s": round(seconds, 1),
        "waited_s": round(sum(line.get("waited_s", 0.0) for line in mix), 1),
        "rounds": [(t["round"], t["generated_from_step"], t["entered_step"]) for t in feedback["result"]["rounds"]],
        "numbers": {k: evaluate.get(k) for k in HEADLINE},
    }


def table(runs: list[dict[str, Any]]) -> str:
    head = ["run", "feedback s", "feedback + judge + eval + report s", "trainers waited s",
            "rounds (round, from step, entered after step)", "test top-1", "Emo-A", "FID"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 3 + "---|" + "---:|" * 3]
    for r in runs:
        n = r["numbers"]
        cells = [r["name"], f"{r['feedback_s']:.0f}", f"{r['rest_s']:.0f}", f"{r['waited_s']:.0f}",
                 ", ".join(f"({a}, {b}, {c})" for a, b, c in r["rounds"]),
                 *(f"{n[k]:.3f}" if isinstance(n[k], (int, float)) else "-" for k in HEADLINE)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for pinned in (False, True):
        mine = [r for r in runs if r["pinned"] == pinned]
        if not mine:
            continue
        mode = "pinned" if pinned else "free"
        same = all(r["numbers"] == mine[0]["numbers"] and r["rounds"] == mine[0]["rounds"] for r in mine)
        lines.append(f"{mode}: feedback stage median {statistics.median(r['feedback_s'] for r in mine):.0f} s over "
                     f"{len(mine)} run(s); same rounds and numbers on every run: {'yes' if same else 'no'}")
    return lines


def measure(out: Path, repeats: int) -> dict[str, Any]:
    """The start, then ``repeats`` x (free, pinned) runs (module docstring); saved as ``pinned_async.json``."""
    out.mkdir(parents=True, exist_ok=True)
    start = build_start(out)
    runs = []
    for i in range(repeats):
        for pinned in (False, True):
            name = f"{'pinned' if pinned else 'free'}-{i}"
            print(f"pinned_async: {name}", file=sys.stderr, flush=True)
            runs.append(one_run(out, start, name, pinned))
            print(table(runs[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    result = {"runs": runs, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "python": platform.python_version(), "load_avg_end": os.getloadavg()}}
    (out / "pinned_async.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/pinned"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--report", type=Path, default=None, help="print the table of a saved pinned_async.json")
    args = ap.parse_args()
    result = json.loads(args.report.read_text()) if args.report else measure(args.out.resolve(), args.repeats)
    print(table(result["runs"]))
    for line in summary(result["runs"]):
        print(line)


if __name__ == "__main__":
    main()
