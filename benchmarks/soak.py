"""Soak: memory, open files, Ray's object store and the synthetic shards' disk of the demo pipeline's feedback loop,
round after round.

1. Builds the start once (kept in ``--out``): ``uniemo run --config configs/demo.yaml`` with the stages data, stage1
   and stage2, cut down to a few steps (``--start-steps``).
2. Runs the same pipeline with the feedback stage added (``--resume``: data, stage1 and stage2 are done and skipped),
   ``feedback.rounds=--rounds`` in ``--mode``. ``sequential``: every round builds an actor pool and ends it, then
   starts and ends a Ray Train job, so every round repeats all the set-up and tear-down the loop does. ``async``:
   one Ray Train job for the whole run and a pool per round beside it; ``--pinned`` pins its timing (the trainers
   wait for each round at its step), so that all ``--rounds`` rounds run however slow the pool is. ``--keep-rounds``
   and ``--keep-bytes`` set the retention of old rounds' shards (``feedback.keep_rounds``, ``keep_bytes``).
3. While it runs, samples every ``--interval`` s the driver (the ``uniemo run`` process) and all its descendants
   (the embedded Ray cluster: GCS, raylet, workers, actors, trainers): resident memory (RSS), open file
   descriptors, threads, processes; Ray's object store (the resident pages of the raylet's plasma mapping, this
   cluster's own, unlike ``/dev/shm`` which every Ray on the machine shares); and the bytes and round folders
   under the feedback run's ``shards/``.

One row per round, sampled the moment the driver starts the round (its line ``round R: loading the models``), plus
``end``, sampled the moment the feedback stage is done (Ray still up). ``peak`` is the highest total RSS seen from
that row to the next, ``actor RSS`` the highest RSS of the round's generator and filter actors together (they live
between the rows), ``trainer RSS`` the Ray Train workers' at the row. In the sequential mode the previous round's
pool and trainers are gone at a row; in the async mode the trainers run on.

Verdict (the goal of RELIABILITY.md, "Soak"): every series flat after round 3, that is, the median of the last three
rounds' values at most ``--tolerance`` (10 %) above round 3's (rounds 0-2 are warm-up: the first pool, the first
feedback-run checkpoint and its emotion space, the first retention; the median, because a row sampled while the
previous round's actors are still exiting has one process more), and the disk bounded: never more round folders
on disk than ``keep_rounds + keep_checkpoints + 1`` (``uniemo.feedback.retention``: the window, the rounds of the
kept checkpoints' listings, the newest round not yet in the mix). The highest value after round 3 and the
least-squares slope per round are printed too. ``--report soak.json`` prints the table and the verdict of a saved
result again.

    .venv/bin/python benchmarks/soak.py --rounds 20 --mode async --pinned --keep-rounds 2 --out runs/bench/soak

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
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
MB = 1024 * 1024
SERIES = ("driver_rss_mb", "actor_rss_mb", "trainer_rss_mb", "total_rss_mb", "driver_fds", "total_fds",
          "log_monitor_fds", "driver_threads", "total_threads", "processes", "object_store_mb", "shards_kb")
"""The series the verdict checks for growth after round 3."""
STEADY_FROM = 3
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
        f"feedback.pinned={str(args.pinned).lower()}",
        f"feedback.keep_rounds={args.keep_rounds}",
        f"feedback.keep_bytes={args.keep_bytes}",
        f"training.keep_checkpoints={args.keep_checkpoints}",
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


def _plasma_pss_mb(pid: int) -> float:
    """This process's proportional share (Pss) of the resident pages of Ray's object store, the plasma file in
    ``/dev/shm`` that the raylet, the driver and the workers map: summed over every process that maps it, each
    resident page counts once. (Plasma reuses freed memory, so this is the store's high-water mark; objects below
    100 KB live in their owner's heap instead, and count in its RSS.)"""
    total_kb, in_plasma = 0, False
    try:
        with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line[0].isupper() or ":" not in line.split()[0]:  # a mapping's header line
                    in_plasma = "/plasma" in line
                elif in_plasma and line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
    except OSError:
        return 0.0
    return total_kb / 1024


ACTORS = ("ray::GeneratorWorker", "ray::FilterWorker")
TRAINERS = "RayTrainWorker"


def sample(pid: int, store: bool = False) -> dict[str, Any] | None:
    """RSS, fds and threads of process ``pid`` and of all its descendants (None when it is gone), the RSS of the
    pool's actors and of the trainers, the fds of Ray's log monitor, and with ``store`` the object store's
    resident MB (reading every process's memory map: at the rows only)."""
    try:
        driver = psutil.Process(pid)
        procs = [driver, *driver.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    row: dict[str, Any] = {"driver_rss_mb": 0.0, "total_rss_mb": 0.0, "actor_rss_mb": 0.0, "trainer_rss_mb": 0.0,
                           "driver_fds": 0, "total_fds": 0, "driver_threads": 0, "total_threads": 0, "processes": 0,
                           "log_monitor_fds": 0, "object_store_mb": 0.0 if store else float("nan")}
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
        if name in ACTORS:
            row["actor_rss_mb"] += rss
        if TRAINERS in name:
            row["trainer_rss_mb"] += rss
        if name == "log_monitor.py":
            row["log_monitor_fds"] += fds
        if store:
            row["object_store_mb"] += _plasma_pss_mb(p.pid)
        row["total_rss_mb"] += rss
        row["total_fds"] += fds
        row["total_threads"] += threads
        row["processes"] += 1
    row["shm_mb"] = _shm_mb()
    row["t"] = time.monotonic()
    row["by_process"] = {k: [v[0], round(v[1], 1), v[2]] for k, v in sorted(by_name.items())}
    return row


def shards_on_disk(run_dir: Path) -> dict[str, float]:
    """KB under the feedback run's ``shards/`` (synthetic rounds, staging, retired) and the round folders."""
    from uniemo.feedback.retention import folder_bytes

    synthetic = run_dir / "shards" / "synthetic"
    rounds = [p for p in synthetic.iterdir() if p.name.startswith("round-")] if synthetic.is_dir() else []
    return {"shards_kb": folder_bytes(run_dir / "shards") / 1024, "rounds_on_disk": len(rounds)}


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
                row = sample(proc.pid, store=True)
                if row is not None:
                    row.update(shards_on_disk(feedback))
                marks.append((name, time.monotonic(), row))
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
        during = [r for r in timeline if at <= r["t"] < until] + [row]
        rows.append({"round": name, **{k: v for k, v in row.items() if k != "t"},
                     "actor_rss_mb": max(r["actor_rss_mb"] for r in during),  # the round's actors live in between
                     "peak_total_rss_mb": max(r["total_rss_mb"] for r in during), "at_s": round(at - started, 1)})
    return {"rows": rows, "seconds": round(time.monotonic() - started, 1), "samples": len(timeline)}


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ..."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def verdict(rows: list[dict], tolerance: float, disk_rounds: int | None) -> dict[str, dict]:
    """Per series: round 3's value, the median of the last three rounds' values, and whether that is more than
    ``tolerance`` above round 3's (module docstring); the highest value after round 3 and the slope per round, for
    the reader; and whether the round folders on disk stayed within ``disk_rounds`` (None: no retention)."""
    rounds = [r for r in rows if r["round"] != "end"]
    steady = [r for r in rounds if int(r["round"]) >= STEADY_FROM]
    out: dict[str, dict] = {}
    for key in SERIES:
        if len(steady) < 2 or not all(key in r for r in steady):
            continue
        values = [float(r[key]) for r in steady]
        base, last = values[0], statistics.median(values[-3:])
        out[key] = {"round3": round(base, 1), "last": round(last, 1), "max_after": round(max(values), 1),
                    "slope_per_round": round(slope(values), 3), "grows": last > base * (1 + tolerance) + 1e-9}
    on_disk = max((int(r.get("rounds_on_disk", 0)) for r in rows), default=0)
    out["disk"] = {"max_rounds_on_disk": on_disk, "bound": disk_rounds, "rounds_seen": len(rounds),
                   "grows": disk_rounds is not None and on_disk > disk_rounds}
    return out


def table(rows: list[dict]) -> str:
    head = ["round", "driver RSS MB", "actor RSS MB", "trainer RSS MB", "total RSS MB", "peak total RSS MB",
            "processes", "driver fds", "total fds", "Ray log monitor fds", "object store MB", "shards KB",
            "round folders"]
    keys = ["round", "driver_rss_mb", "actor_rss_mb", "trainer_rss_mb", "total_rss_mb", "peak_total_rss_mb",
            "processes", "driver_fds", "total_fds", "log_monitor_fds", "object_store_mb", "shards_kb",
            "rounds_on_disk"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, float("nan"))
            cells.append(f"{v:.{1 if k == 'object_store_mb' else 0}f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/soak"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--mode", choices=["sequential", "async"], default="async")
    ap.add_argument("--pinned", action="store_true", help="feedback.pinned (async mode): every round runs")
    ap.add_argument("--keep-rounds", type=int, default=0, help="feedback.keep_rounds (retention)")
    ap.add_argument("--keep-bytes", type=int, default=0, help="feedback.keep_bytes (retention)")
    ap.add_argument("--keep-checkpoints", type=int, default=2, help="training.keep_checkpoints")
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=8, help="feedback.candidates_per_emotion")
    ap.add_argument("--images", type=int, default=400, help="data.synthetic.images")
    ap.add_argument("--start-steps", type=int, default=8, help="training.steps of stage 1 and of stage 2")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--tolerance", type=float, default=0.10, help="growth allowed after round 3 (fraction)")
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
                             "python": platform.python_version(), "load_avg_end": os.getloadavg(),
                             "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1)}
        result["args"] = {k: str(v) for k, v in vars(args).items()}
    saved = result["args"]
    keep_rounds = int(saved.get("keep_rounds", 0))
    tolerance = float(saved.get("tolerance", 0.1))
    bound = keep_rounds + int(saved.get("keep_checkpoints", 2)) + 1 if keep_rounds else None
    result["verdict"] = verdict(result["rows"], tolerance, bound)
    if args.report is None:
        (out / "soak.json").write_text(json.dumps(result, indent=1))
    print(table(result["rows"]))
    print(f"\n{result['samples']} samples over {result['seconds']:.0f} s; after round {STEADY_FROM} "
          f"(tolerance {tolerance:.0%}):")
    for key, v in result["verdict"].items():
        if key == "disk":
            limit = f"bound {v['bound']}" if v["bound"] is not None else "no retention, no bound"
            print(f"  {'round folders':15s} max {v['max_rounds_on_disk']} on disk over {v['rounds_seen']} rounds "
                  f"({limit}; {'EXCEEDED' if v['grows'] else 'ok'})")
            continue
        print(f"  {key:15s} round 3 {v['round3']:9.1f}  last 3 {v['last']:9.1f}  max after {v['max_after']:9.1f}  "
              f"slope {v['slope_per_round']:+8.3f}/round  ({'GROWS' if v['grows'] else 'flat'})")
    grows = [k for k, v in result["verdict"].items() if v["grows"]]
    rows = result["rows"]
    if grows and len(rows) > STEADY_FROM + 1:  # where: per process kind, round 3 against the last row
        first, last = rows[STEADY_FROM]["by_process"], rows[-1]["by_process"]
        print(f"\nper process kind, round {rows[STEADY_FROM]['round']} -> {rows[-1]['round']} "
              "(processes, RSS MB, fds):")
        for name in sorted(set(first) | set(last)):
            a, b = first.get(name, [0, 0.0, 0]), last.get(name, [0, 0.0, 0])
            if a != b:
                print(f"  {name:40s} {a} -> {b}")
    print("verdict: " + (f"growth after round {STEADY_FROM} in {', '.join(grows)}" if grows
                         else f"every series flat after round {STEADY_FROM}, disk bounded"))


if __name__ == "__main__":
    main()
