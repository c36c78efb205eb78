"""Trainer overhead: samples/s of ``uniemo train`` (1 worker, ZeRO-0) against a bare single-process PyTorch loop.

Both sides train the **same** stage-1 task (``uniemo.training.task.build_stage1_task``, same seed, same config)
on the **same** stream (``uniemo.data.loader.build_loader_from_config``: same shards, batch size, loader workers
and seed) with one torch thread each:

- ``uniemo train``: the real command in a subprocess (``python -m uniemo train --config ... overrides``): embedded
  Ray, Ray Train ``TorchTrainer`` with one worker, a DeepSpeed ZeRO-0 engine, the trainer loop with its logging
  (``metrics.jsonl``, progress bar). Its steady-state rate is read from ``metrics.jsonl``: every
  ``logging.every`` steps the trainer writes ``samples_per_s`` measured over the steps since the previous line.
- bare loop: in this process, ``torch.optim.AdamW`` over ``build_param_groups`` (same betas/eps), the same
  ``LambdaLR`` schedule, gradient clipping, ``loss.backward()``; nothing else. Timestamps per step.

Steady state: only the steps after ``--warmup`` (start-up, first batches, the loader's worker spawn) and before
the last logging window (the trainer saves its final checkpoint inside it) count, on both sides:
``rate = samples / seconds`` over exactly the same step range. The two sides alternate ``--repeats`` times;
the table shows every pass and the best of each side (other jobs on the machine only ever slow a pass down).

A second measure, robust to other jobs on the machine: **CPU milliseconds per sample** of the process that runs
the loop (user + system time of all its threads, loader workers excluded on both sides), over the same steps:
``time.process_time`` for the bare loop; for the trainer ``/proc/<pid>/stat`` of the Ray Train worker (pid from
``<run>/workers/rank-0.pid``), read when the metrics lines of the first and last timed step appear (polled every
20 ms). Ray's own daemons (raylet, GCS) are other processes and are not in it. ``--without-ray`` adds a third
side: the trainer's rank job (``uniemo.training.worker.run_worker``) in one process without Ray, to tell Ray's
share of the overhead from the loop's (DeepSpeed engine, logging).

    .venv/bin/python benchmarks/trainer_overhead.py --steps 300 --warmup 50 --repeats 2 --without-ray

Writes runs into a temporary folder (removed at exit); the synthetic shards are cached in ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace, output_dir: Path, name: str) -> list[str]:
    """The config overrides shared by both sides (the trainer gets all of them, the bare loop reads the config)."""
    return [
        f"run.name={name}",
        f"run.output_dir={output_dir}",
        f"data.cache_dir={Path(args.cache_dir).resolve()}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.loader_workers}",
        f"training.steps={args.steps}",
        "training.eval_every=0",
        "training.checkpoint_every=0",
        "training.gradient_accumulation=1",
        "distributed.num_workers=1",
        "distributed.cpus_per_worker=1",
        "distributed.zero_stage=0",
        f"logging.every={args.log_every}",
        "logging.wandb.mode=disabled",
    ]


def load_cfg(args: argparse.Namespace, output_dir: Path, name: str):
    from uniemo.config import load_config

    return load_config(args.config, overrides(args, output_dir, name))


def steady_range(args: argparse.Namespace) -> tuple[int, int]:
    """``(first, last)``: steps ``first+1 .. last`` are timed (log-window aligned)."""
    first = args.warmup
    last = args.steps - args.log_every  # the final window holds the final checkpoint save
    if first % args.log_every or args.steps % args.log_every or last <= first:
        raise SystemExit(
            f"--warmup ({args.warmup}) and --steps ({args.steps}) must be multiples of --log-every "
            f"({args.log_every}) with steps - log_every > warmup"
        )
    return first, last


# The trainer's rank job without Ray: ``prepare_run`` (as the driver) then ``run_worker`` in this one process
# (launcher "single": its own one-process gloo group). Separates Ray's share of the overhead from the loop's.
_SINGLE_WORKER = """
import os, sys
from uniemo.config import load_config
from uniemo.training.driver import prepare_run
from uniemo.training.worker import run_worker
plan = prepare_run(load_config(sys.argv[1], sys.argv[2:]))
run_worker(plan.config, plan.run_dir)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip interpreter teardown (gloo may abort there, issue 4 known facts)
"""


def run_trainer(args: argparse.Namespace, output_dir: Path, name: str, ray: bool = True) -> dict[str, float]:
    """One ``uniemo train`` run (or, ``ray=False``, the same rank job without Ray); its steady-state rate from
    ``metrics.jsonl`` and its wall time."""
    from uniemo.logging import read_metrics

    if ray:
        cmd = [sys.executable, "-m", "uniemo", "train", "--config", str(args.config)]
    else:
        cmd = [sys.executable, "-c", _SINGLE_WORKER, str(args.config)]
    cmd += overrides(args, output_dir, name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    first, last = steady_range(args)
    run_dir = output_dir / name
    start = time.perf_counter()
    log = open(output_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    # CPU time of the training process at the metrics lines of steps `first` and `last` (polled every 20 ms):
    # robust to other jobs on the machine, unlike the wall clock.
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        if len(cpu) < 2:
            steps = {int(r["step"]) for r in _read_lines(run_dir / "metrics.jsonl")}
            for mark in (first, last):
                if mark in steps and mark not in cpu:
                    cpu[mark] = _process_cpu(_worker_pid(run_dir, proc.pid, ray))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    log.close()
    if proc.returncode != 0:
        sys.stderr.write((output_dir / f"{name}.log").read_text()[-4000:])
        raise SystemExit(f"uniemo train failed with exit code {proc.returncode}")
    records = {int(r["step"]): r for r in read_metrics(run_dir)}
    seconds = 0.0
    samples = 0
    for end in range(first + args.log_every, last + 1, args.log_every):
        window = args.log_every * args.batch_size
        seconds += window / float(records[end]["samples_per_s"])
        samples += window
    cpu_s = cpu[last] - cpu[first] if len(cpu) == 2 else float("nan")
    return {"samples": samples, "seconds": seconds, "rate": samples / seconds, "wall": wall, "cpu": cpu_s}


def _read_lines(path: Path) -> list[dict]:
    import json

    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def _worker_pid(run_dir: Path, pid: int, ray: bool) -> int:
    """The process running the rank's loop: the Ray Train worker (its pid file), or the subprocess itself."""
    if not ray:
        return pid
    return int((run_dir / "workers" / "rank-0.pid").read_text())


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_bare(args: argparse.Namespace, output_dir: Path) -> dict[str, float]:
    """The bare loop over the same task, optimiser groups, schedule, clipping and loader."""
    from uniemo.data.loader import build_loader_from_config, load_attribute_table
    from uniemo.training.engine import lr_factor
    from uniemo.training.task import build_param_groups, build_stage1_task

    cfg = load_cfg(args, output_dir, "bare")
    torch.set_num_threads(1)
    start = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    task = build_stage1_task(cfg, load_attribute_table(cfg.data))
    task.train()
    groups = build_param_groups(task, cfg.training)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.training, cfg.training.steps))
    loader = build_loader_from_config(
        cfg.data, "train", rank=0, world_size=1, stage=1, training=True, seed=cfg.run.seed
    )
    batches = loader.batches()
    stamps = {}
    cpu = {}
    for step in range(1, cfg.training.steps + 1):
        batch = next(batches)
        out = task(batch)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        stamps[step] = time.perf_counter()
        cpu[step] = time.process_time()  # this process, all threads (the loader worker is a child, as there)
    wall = time.perf_counter() - start
    del batches  # ends the loader's worker
    first, last = steady_range(args)
    seconds = stamps[last] - stamps[first]
    samples = (last - first) * args.batch_size
    return {"samples": samples, "seconds": seconds, "rate": samples / seconds, "wall": wall,
            "cpu": cpu[last] - cpu[first]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_stage1.yaml"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded at the start (start-up)")
    parser.add_argument("--log-every", type=int, default=10, help="logging.every of the trainer run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of each side")
    parser.add_argument("--without-ray", action="store_true",
                        help="also run the trainer's rank job in one process without Ray (where the overhead is)")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "uniemo"), help="synthetic shards (kept)")
    args = parser.parse_args()
    steady_range(args)

    tmp = Path(tempfile.mkdtemp(prefix="uniemo-overhead-"))
    rows = []
    load_before = os.getloadavg()
    try:
        # Make the synthetic shards once, outside every timed region.
        from uniemo.data.shards import ensure_synthetic_shards

        ensure_synthetic_shards(load_cfg(args, tmp, "prepare").data)
        for i in range(args.repeats):
            rows.append(("bare PyTorch loop", i + 1, run_bare(args, tmp), os.getloadavg()[0]))
            rows.append(("uniemo train (Ray + DeepSpeed ZeRO-0)", i + 1, run_trainer(args, tmp, f"t{i}"),
                         os.getloadavg()[0]))
            if args.without_ray:
                rows.append(("trainer loop without Ray (run_worker, DeepSpeed ZeRO-0)", i + 1,
                             run_trainer(args, tmp, f"s{i}", ray=False), os.getloadavg()[0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import deepspeed
    import ray

    first, last = steady_range(args)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, deepspeed "
        f"{deepspeed.__version__}, ray {ray.__version__}, python {platform.python_version()}; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"task: stage 1, {Path(args.config).name}, batch {args.batch_size}, {args.loader_workers} loader worker(s), "
        f"1 torch thread; {args.steps} steps, timed steps {first + 1}-{last}\n"
    )
    print("| side | pass | timed samples | seconds | samples/s | CPU ms/sample | whole run (s) | load avg (1 min) after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, i, r, load in rows:
        print(
            f"| {side} | {i} | {r['samples']} | {r['seconds']:.2f} | {r['rate']:.1f} "
            f"| {1000 * r['cpu'] / r['samples']:.2f} | {r['wall']:.1f} | {load:.1f} |"
        )
    best_bare = max(r["rate"] for side, _, r, _ in rows if side.startswith("bare"))
    best_ours = max(r["rate"] for side, _, r, _ in rows if side.startswith("uniemo"))
    overhead = 100.0 * (best_bare - best_ours) / best_bare
    print(
        f"\nbest steady-state samples/s: bare {best_bare:.1f}, uniemo train {best_ours:.1f}; "
        f"overhead {overhead:+.1f} % (goal <= 5 %)"
    )
    single = [r["rate"] for side, _, r, _ in rows if side.startswith("trainer loop")]
    if single:
        print(f"trainer loop without Ray: best {max(single):.1f} samples/s, overhead "
              f"{100.0 * (best_bare - max(single)) / best_bare:+.1f} %")
    for prefix in ("uniemo", "trainer loop"):
        cpus = [r["cpu"] / r["samples"] for side, _, r, _ in rows if side.startswith(prefix)]
        bare = min(r["cpu"] / r["samples"] for side, _, r, _ in rows if side.startswith("bare"))
        if cpus:
            print(f"CPU per sample, best pass: {prefix}: {1000 * min(cpus):.2f} ms vs bare {1000 * bare:.2f} ms: "
                  f"overhead {100.0 * (min(cpus) - bare) / bare:+.1f} %")


if __name__ == "__main__":
    main()
