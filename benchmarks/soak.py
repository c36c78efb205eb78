"""Soak: memory, open files and threads of the demo pipeline's feedback loop, round after round.

1. Builds the start once (kept in ``--out``): ``uniemo run --config configs/demo.yaml`` with the stages data, stage1
   and stage2, cut down to a few steps (``--start-steps``).
2. Runs the same pipeline with the feedback stage added (``--resume``: data, stage1 and stage2 are done and skipped),
   ``feedback.rounds=--rounds`` in ``--mode`` (default sequential: every round builds an actor pool and ends it,
   then starts and ends a Ray Train job, so every round repeats all the set-up and tear-down the loop does).
3. While it runs, samples every ``--interval`` s the driver (the ``uniemo run`` process) and all its descendants
   (the embedded Ray cluster: GCS, raylet, workers, actors, trainers): resident memory (RSS), open file
   descriptors, threads, processes, and the use of ``/dev/shm`` (Ray's object store).

One row per round, sampled the moment the driver starts the round (its line ``round R: loading the models``: the
previous round's pool and trainers are gone, its models not yet loaded), plus ``end``, sampled the moment the
feedback stage is done (Ray still up); ``peak`` is the highest total RSS seen from that row to the next. The
verdict fits a least-squares slope per round over the rows from round 2 on, ``end`` included, and calls it growth
above a threshold (round 0 comes before the first pool and trainers ever ran, round 1 before the driver first loads
a feedback-run checkpoint and computes its emotion space: both are warm-up). ``--report soak.json`` prints the
table and the verdict of a saved result again.

    .venv/bin/python benchmarks/soak.py --rounds 5 --out /tmp/uniemo-soak

Writes into ``--out`` only (the pipeline dir ``soak/``, the logs, ``soak.json``). A second call reuses the start
and measures a fresh loop (it removes ``soak/feedback`` and the feedback stage's entry in ``pipeline.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
MB = 1024 * 1024
THRESHOLDS = {"driver_rss_mb": 5.0, "total_rss_mb": 25.0, "driver_fds": 1.0, "total_fds": 5.0,
              "driver_threads": 1.0, "total_threads": 5.0, "processes": 0.5, "shm_mb": 5.0}
"""Slope per round above which a quantity is called growing (noise of a shared 2-core machine below it)."""
_ROUND = re.compile(r"round (\d+): loading the models")


def _uniemo() -> list[str]:
    script = Path(sys.executable).with_name("uniemo")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "uniemo"]


def _overrides(out: Path, args: argparse.Namespace) -> list[str]:
    """The demo cut down: a small synthetic set, few steps, small rounds."""
    return [
        f"run.output_dir={out}",
        "run.name=soak",
        f"data.cache_dir={out / 'cache'}",
        f"data.synthetic.images={args.images}",
        "logging.progress=false",
        f"training.checkpoint_every={args.steps_per_round}",
        f"training.eval_every={args.steps_per_round}",
        f"feedback.mode={args.mode}",
        f"feedback.rounds={args.rounds}",
        f"feedback.steps_per_round={args.steps_per_round}",
        f"feedback.candidates_per_emotion={args.candidates}",
        "feedback.keep=4",
        "feedback.tau=0.0",
        f"pipeline.stage1=[training.steps={args.start_steps}]",
        f"pipeline.stage2=[training.steps={args.start_steps},data.batch_size=8]",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONUNBUFFERED": "1"}


def _shm_mb() -> float:
    try:
        return shutil.disk_usage("/dev/shm").used / MB
    except OSError:
        return float("nan")


def sample(pid: int) -> dict[str, float] | None:
    """RSS, fds and threads of process ``pid`` and of all its descendants (None when it is gone)."""
    try:
        driver = psutil.Process(pid)
        procs = [driver, *driver.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    row = {"driver_rss_mb": 0.0, "total_rss_mb": 0.0, "driver_fds": 0, "total_fds": 0, "driver_threads": 0,
           "total_threads": 0, "processes": 0}
    by_name: dict[str, list[float]] = {}  # process title -> [count, RSS MB, fds]
    for p in procs:
        try:
            with p.oneshot():
                rss, fds, threads = p.memory_info().rss / MB, p.num_fds(), p.num_threads()
                cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # ended between the listing and the look
        name = "driver" if p.pid == pid else _title(cmd)
        entry = by_name.setdefault(name, [0, 0.0, 0])
        entry[0] += 1
        entry[1] += rss
        entry[2] += fds
        if p.pid == pid:
            row.update(driver_rss_mb=rss, driver_fds=fds, driver_threads=threads)
        row["total_rss_mb"] += rss
        row["total_fds"] += fds
        row["total_threads"] += threads
        row["processes"] += 1
    row["shm_mb"] = _shm_mb()
    row["t"] = time.monotonic()
    row["by_process"] = {k: [v[0], round(v[1], 1), v[2]] for k, v in sorted(by_name.items())}
    return row


def _title(cmd: list[str]) -> str:
    """A short name of a process: Ray's ``ray::Class.method`` title, else the program (or Python script) name."""
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    words = [Path(c).name for c in cmd[:3] if not c.startswith("-")]
    script = next((w for w in words[1:] if w.endswith(".py")), None)
    return script or words[0] if words else "?"


def build_start(out: Path, args: argparse.Namespace) -> None:
    state = out / "soak" / "pipeline.json"
    if state.is_file() and json.loads(state.read_text())["stages"].get("stage2", {}).get("status") == "done":
        print(f"soak: start found in {out / 'soak'}", file=sys.stderr)
        return
    print("soak: building the start (data, stage1, stage2)", file=sys.stderr, flush=True)
    started = time.monotonic()
    with open(out / "start.log", "w") as log:
        done = subprocess.run([*_uniemo(), "run", "--config", str(DEMO), *_overrides(out, args),
                               "pipeline.stages=[data,stage1,stage2]", "--resume"],
                              stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"soak: the start failed (rc {done.returncode}); see {out / 'start.log'}")
    print(f"soak: start built in {time.monotonic() - started:.0f} s", file=sys.stderr)


def soak(out: Path, args: argparse.Namespace) -> dict:
    """Run the feedback stage and sample it (module docstring). Returns the rows and the timeline."""
    feedback = out / "soak" / "feedback"
    if feedback.exists():
        shutil.rmtree(feedback)  # every soak measures a fresh loop
    state_file = out / "soak" / "pipeline.json"
    state = json.loads(state_file.read_text())
    state["stages"].pop("feedback", None)
    state_file.write_text(json.dumps(state, indent=1))
    log_path = out / "soak.log"
    log = open(log_path, "w")
    cmd = [*_uniemo(), "run", "--config", str(DEMO), *_overrides(out, args),
           "pipeline.stages=[data,stage1,stage2,feedback]", "--resume"]
    print("soak: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    marks: list[tuple[str, float, dict | None]] = []

    def read() -> None:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            found = _ROUND.search(line)
            name = found.group(1) if found else "end" if "feedback: done in" in line else None
            if name is not None:  # sampled at once: the driver has just printed the line
                marks.append((name, time.monotonic(), sample(proc.pid)))
                print(f"soak: {'round ' + name + ' starts' if found else 'feedback done'}", file=sys.stderr,
                      flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timeline: list[dict] = []
    started = time.monotonic()
    while proc.poll() is None:
        row = sample(proc.pid)
        if row is not None:
            timeline.append(row)
        time.sleep(args.interval)
    reader.join(timeout=10)
    log.close()
    if proc.returncode != 0:
        sys.exit(f"soak: the pipeline failed (rc {proc.returncode}); see {log_path}")

    rows = []
    for i, (name, at, row) in enumerate(marks):
        if row is None:
            continue
        until = marks[i + 1][1] if i + 1 < len(marks) else float("inf")
        during = [r["total_rss_mb"] for r in timeline if at <= r["t"] < until] + [row["total_rss_mb"]]
        rows.append({"round": name, **{k: v for k, v in row.items() if k != "t"},
                     "peak_total_rss_mb": max(during), "at_s": round(at - started, 1)})
    return {"rows": rows, "seconds": round(time.monotonic() - started, 1), "samples": len(timeline)}


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ..."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def verdict(rows: list[dict]) -> dict[str, dict]:
    # Warm-up: round 0 is sampled before the first pool and trainers ever ran, round 1 before the driver first
    # loads a checkpoint of the feedback run and computes its emotion space over the real train split.
    steady = rows[2:]
    out = {}
    for key, limit in THRESHOLDS.items():
        s = slope([r[key] for r in steady])
        out[key] = {"slope_per_round": round(s, 3), "limit": limit, "grows": s > limit}
    return out


def table(rows: list[dict]) -> str:
    head = ["round", "driver RSS MB", "total RSS MB", "peak total RSS MB", "processes", "driver fds", "total fds",
            "driver threads", "total threads", "/dev/shm MB"]
    keys = ["round", "driver_rss_mb", "total_rss_mb", "peak_total_rss_mb", "processes", "driver_fds", "total_fds",
            "driver_threads", "total_threads", "shm_mb"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [f"{r[k]:.0f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/uniemo-soak"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", choices=["sequential", "async"], default="sequential")
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=8, help="feedback.candidates_per_emotion")
    ap.add_argument("--images", type=int, default=400, help="data.synthetic.images")
    ap.add_argument("--start-steps", type=int, default=8, help="training.steps of stage 1 and of stage 2")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--report", type=Path, default=None, help="print the table and verdict of a saved soak.json")
    args = ap.parse_args()
    if args.report is not None:
        result = json.loads(args.report.read_text())
    else:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        build_start(out, args)
        result = soak(out, args)
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(),
                             "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1)}
        result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["verdict"] = verdict(result["rows"])
    if args.report is None:
        (out / "soak.json").write_text(json.dumps(result, indent=1))
    print(table(result["rows"]))
    print(f"\n{result['samples']} samples over {result['seconds']:.0f} s; slope per round from round 2 on:")
    for key, v in result["verdict"].items():
        print(f"  {key:15s} {v['slope_per_round']:+9.3f}  ({'GROWS' if v['grows'] else 'flat'}; limit {v['limit']})")
    grows = [k for k, v in result["verdict"].items() if v["grows"]]
    if grows and len(result["rows"]) > 3:  # where: per process kind, the first steady row against the last
        first, last = result["rows"][2]["by_process"], result["rows"][-1]["by_process"]
        print(f"\nper process kind, round {result['rows'][2]['round']} -> {result['rows'][-1]['round']} "
              "(processes, RSS MB, fds):")
        for name in sorted(set(first) | set(last)):
            a, b = first.get(name, [0, 0.0, 0]), last.get(name, [0, 0.0, 0])
            if a != b:
                print(f"  {name:40s} {a} -> {b}")
    print("verdict: " + (f"growth per round in {', '.join(grows)}" if grows else "no growth per round"))


if __name__ == "__main__":
    main()
