"""EmoSet scale: the data tools and the loader at 10K, 40K and 118K images, against a bare tar-writing loop.

One EmoSet-layout folder of 118,102 images (the synthetic world, ``uniemo data synth``, 128 px JPEG) is drawn once
into ``--work``; the smaller sizes are views of it (the same ``image/`` and ``annotation/`` folders, split files
holding the first rows of each emotion). For each size it measures:

- ``shards``: ``uniemo data shards`` (a fresh ``--out``) with each ``--workers`` count;
- ``bare``: the reference, a bare loop over the same files with the same workers: the split files are read,
  every row's annotation and image are read and written with ``tarfile`` as ``<key>.jpg``, ``<key>.cls``,
  ``<key>.json``, ``--shard-size`` rows a tar, whole tars dealt to the processes. Nothing else: no validation,
  no decoding, no shuffle, no hashing, no fsync, no manifest;
- ``build``: the manifest and attribute table of the shards folder, built again from its records in this process
  (the metadata pass, the plan, the attribute counts, the manifest file), with its phases;
- ``inspect``: ``uniemo data inspect`` of the shards;
- ``loader``: one training epoch of the uniemo loader (``build_loader``: ``ShardLoader`` over the shards written
  with one worker) on 2 ranks (2 processes) x 2 ``DataLoader`` workers, no model. Checked: every sample of the
  epoch is delivered at most once over both ranks, the epoch delivers ``world x batches x batch`` samples and
  leaves out fewer than ``world x batch``; a fresh loader restored from the position saved in the middle of the
  epoch delivers the same batches (keys and image tensors) as the uninterrupted epoch.

Each measurement runs as its own process tree: wall seconds, CPU seconds (user + system of the tree, robust to
other jobs on the machine), peak RSS of the whole tree (the sum over its processes, sampled every 50 ms), and the
1-minute load average at the start, end and highest during the run. Results are kept in ``--work/results.json``
(one entry per run, so noisy points can be measured again with ``--only``); the tables show, per point, the run
with the lowest wall time.

    python benchmarks/emoset_scale.py --work runs/bench/scale                   # everything (about an hour)
    python benchmarks/emoset_scale.py --work runs/bench/scale --sizes 10000 --only shards,bare
    python benchmarks/emoset_scale.py --work runs/bench/scale --report          # the tables of saved results

Writes only under ``--work`` (the dataset is about 1 GB on disk, the shards of each size and worker count as much
again while they exist; each is removed after its measurement unless ``--keep``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

SIZES = (10_000, 40_000, 118_102)
STEPS = ("bare", "shards", "build", "inspect", "loader")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------------------
def full_set(work: Path, images: int, size: int) -> Path:
    """The EmoSet-layout folder of ``images`` images, drawn once with ``uniemo data synth`` (2 workers)."""
    root = work / f"emoset-{images}"
    marker = root / ".uniemo-synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()).get("complete"):
        return root
    print(f"drawing {images} images of {size} px into {root} (once)", flush=True)
    subprocess.run(
        [*uniemo(), "data", "synth", "--out", str(root), "--images", str(images), "--size", str(size),
         "--workers", "2", "--no-progress"],
        check=True,
    )
    return root


def subset(full: Path, images: int, work: Path) -> Path:
    """A view of ``full`` with about ``images`` images: the same image and annotation folders (symlinks), split
    files holding the first rows of each emotion in each split, in proportion."""
    total = sum(len(json.loads((full / f"{s}.json").read_text())) for s in ("train", "val", "test"))
    if images >= total:
        return full
    root = work / f"emoset-{images}"
    done = root / ".subset-done"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in ("image", "annotation"):
        (root / name).symlink_to(full / name)
    shutil.copy(full / "info.json", root / "info.json")
    for split in ("train", "val", "test"):
        rows = json.loads((full / f"{split}.json").read_text())
        by_emotion: dict[str, list] = {}
        for row in rows:
            by_emotion.setdefault(row[0], []).append(row)
        kept = [row for group in by_emotion.values() for row in group[: round(len(group) * images / total)]]
        (root / f"{split}.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in kept) + "\n]\n")
    done.write_text("ok\n")
    return root


def count_images(root: Path) -> int:
    return sum(len(json.loads((root / f"{s}.json").read_text())) for s in ("train", "val", "test"))


def warm(root: Path) -> None:
    """Read every file of the set once, so every measurement starts from the same (warm) page cache."""
    for split in ("train", "val", "test"):
        for row in json.loads((root / f"{split}.json").read_text()):
            (root / row[-2]).read_bytes()
            (root / row[-1]).read_bytes()


def uniemo() -> list[str]:
    return [sys.executable, "-m", "uniemo"]


# ---------------------------------------------------------------------------------------------------------
# Measuring a process tree
# ---------------------------------------------------------------------------------------------------------
def measured(commands: list[list[str]], **popen: Any) -> dict[str, Any]:
    """Run ``commands`` side by side and wait for all: wall and CPU seconds, peak RSS of all their processes
    together, load averages. A failing command raises with its output."""
    import psutil

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for c in commands]
    peak = {"rss": 0, "load": load_start}
    stop = threading.Event()

    def sample() -> None:
        roots = [psutil.Process(p.pid) for p in procs]
        while not stop.is_set():
            total = 0
            for root in roots:
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for proc in tree:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
            peak["rss"] = max(peak["rss"], total)
            peak["load"] = max(peak["load"], os.getloadavg()[0])
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}")
    cpu = (after.ru_utime - children_before.ru_utime) + (after.ru_stime - children_before.ru_stime)
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(peak["rss"] / 2**20, 1),
        "load": [round(load_start, 1), round(os.getloadavg()[0], 1), round(peak["load"], 1)],
        "stdout": [o for o, _ in outputs],
    }


# ---------------------------------------------------------------------------------------------------------
# The reference: a bare tar-writing loop over the same files
# ---------------------------------------------------------------------------------------------------------
_EMOTIONS = ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")


def _bare_tar(task: tuple[str, str, list[list[str]]]) -> int:
    root_s, path, rows = task
    root = Path(root_s)
    with tarfile.open(path, "w|") as tar:
        for row in rows:
            emotion, image, annotation = row[0], row[-2], row[-1]
            key = Path(image).stem
            members = (
                ("jpg", (root / image).read_bytes()),
                ("cls", str(_EMOTIONS.index(emotion)).encode()),
                ("json", (root / annotation).read_bytes()),
            )
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(rows)


def bare_loop(root: Path, out: Path, workers: int, shard_size: int) -> int:
    """The reference loop (module docstring); returns the number of images written."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for split in ("train", "val", "test"):
        rows = json.loads((root / f"{split}.json").read_text())
        for i in range(0, len(rows), shard_size):
            tasks.append((str(root), str(out / f"{split}-{i // shard_size:06d}.tar"), rows[i : i + shard_size]))
    if workers == 1:
        return sum(_bare_tar(t) for t in tasks)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return sum(pool.imap_unordered(_bare_tar, tasks))


# ---------------------------------------------------------------------------------------------------------
# The manifest and attribute table, built again in this process
# ---------------------------------------------------------------------------------------------------------
def build_phases(root: Path, shards: Path, shard_size: int) -> dict[str, float]:
    """Seconds of each phase of building a shard folder's manifest and attribute table from the records, in this
    process, without writing shards: reading and checking every record into the spool, the plan (the shuffle,
    the cut and each shard's digest), the attribute counts over the train records and the table (the shard
    writer's processes count shard by shard), the manifest's totals and file."""
    from uniemo.data import shards as S
    from uniemo.data.attributes import AttributeTable, count_attributes

    out: dict[str, float] = {}
    manifest = S.read_manifest(shards)
    root = root.resolve()  # as the writer does: the records' image paths (in each shard's digest) start with it
    start = time.perf_counter()
    plan = S.plan_dataset("emoset", root, shards / ".bench-records.tmp", on_error="skip", shard_size=shard_size,
                          shuffle_seed=0)
    out["records"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        jobs = plan.jobs()
        digest = S.plan_digest(jobs)
        out["plan"] = time.perf_counter() - start
        if digest != manifest["plan_sha256"]:
            raise RuntimeError("the plan built again differs from the one in the manifest")
        start = time.perf_counter()
        scenes: dict[str, list[int]] = {}
        objects: dict[str, list[int]] = {}
        for job in jobs:
            if job.split == "train":
                for _, label, metadata, _ in S.read_job(job):
                    count_attributes(scenes, objects, label, metadata.get("scene"), metadata.get("objects") or [])
        AttributeTable.from_counts(scenes, objects).save(shards / ".bench-attributes.json")
        out["attributes"] = time.perf_counter() - start
        if (shards / ".bench-attributes.json").read_bytes() != (shards / "attributes.json").read_bytes():
            raise RuntimeError("the attribute table built again differs from the folder's")
        start = time.perf_counter()
        S.write_json_atomic(shards / ".bench-manifest.json",
                            {**manifest, "totals": S.compute_totals(manifest["shards"])})
        out["manifest"] = time.perf_counter() - start
    finally:
        plan.close()
        for name in (".bench-attributes.json", ".bench-manifest.json"):
            (shards / name).unlink(missing_ok=True)
    return {k: round(v, 3) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# One rank's loader epoch
# ---------------------------------------------------------------------------------------------------------
def loader_rank(shards: Path, rank: int, world: int, workers: int, batch: int, image_size: int, out: Path) -> None:
    """One uninterrupted training epoch, then the same epoch again from a fresh loader restored from the position
    saved after ``batches // 2 + 1`` batches; writes keys and image digests per batch, and the timings."""
    import torch  # noqa: F401  (imported before the loader's workers start)

    from uniemo.data.loader import build_loader
    from uniemo.data.transforms import SampleTransform

    transform = SampleTransform(image_size=image_size, augment=True)

    def make(position: dict | None = None):
        return build_loader(shards, "train", rank=rank, world_size=world, batch_size=batch, num_workers=workers,
                            transform=transform, training=True, seed=0, epoch=0, position=position)

    def record(b: dict) -> list:
        return [b["key"], hashlib.sha1(b["image"].numpy().tobytes()).hexdigest()]

    start = time.perf_counter()
    loader = make()
    full = [record(b) for b in loader]
    epoch_s = time.perf_counter() - start
    half = len(full) // 2 + 1
    start = time.perf_counter()
    first = make()
    before = []
    for b in first:
        before.append(record(b))
        if len(before) == half:
            break
    position = first.state_dict()
    del first
    resumed = make(position)
    after = [record(b) for b in resumed]
    resume_s = time.perf_counter() - start
    out.write_text(json.dumps({
        "rank": rank, "batches": len(full), "batches_per_epoch": loader.batches_per_epoch,
        "train_samples": loader.train_samples, "full": full, "before": before, "after": after,
        "epoch_s": round(epoch_s, 3), "interrupted_and_resumed_s": round(resume_s, 3),
    }))


def check_loader(parts: list[dict], world: int, batch: int) -> dict[str, Any]:
    """Exactly-once and exact-resume checks over the ranks' outputs (module docstring)."""
    keys = [k for p in parts for keys_, _ in p["full"] for k in keys_]
    n = parts[0]["train_samples"]
    bpe = parts[0]["batches_per_epoch"]
    distinct = len(set(keys))
    resumed_equal = all(p["before"] + p["after"] == p["full"] for p in parts)
    return {
        "samples": len(keys),
        "expected": world * bpe * batch,
        "distinct": distinct,
        "train_samples": n,
        "left_out": n - distinct,
        "exactly_once": distinct == len(keys) == world * bpe * batch and n - distinct < world * batch,
        "resume_equal": resumed_equal,
        "resumed_at_batch": len(parts[0]["before"]),
    }


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------
def run_point(step: str, n: int, workers: int, root: Path, work: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = work / f"out-{n}-{step}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    reference = work / f"shards-{n}"  # written with one worker, read by build, inspect and loader
    if step == "shards":
        result = measured([[*uniemo(), "data", "shards", "--source", "emoset", "--root", str(root), "--out",
                            str(out), "--shard-size", str(args.shard_size), "--workers", str(workers),
                            "--no-progress"]], env=env)
        if workers == 1 and not reference.exists():
            out.rename(reference)
    elif step == "bare":
        result = measured([[*me, "_bare", str(root), str(out), str(workers), str(args.shard_size)]], env=env)
    elif step == "build":
        result = measured([[*me, "_build", str(root), str(reference), str(args.shard_size)]], env=env)
        result["phases"] = json.loads(result["stdout"][0].strip().splitlines()[-1])
    elif step == "inspect":
        result = measured([[*uniemo(), "data", "inspect", str(reference)]], env=env)
    elif step == "loader":
        files = [work / f"loader-{n}-rank{r}.json" for r in range(args.ranks)]
        result = measured([[*me, "_loader", str(reference), str(r), str(args.ranks), str(workers),
                            str(args.batch_size), str(args.image_size), str(files[r])]
                           for r in range(args.ranks)], env=env)
        parts = [json.loads(f.read_text()) for f in files]
        for f in files:
            f.unlink()
        result["check"] = check_loader(parts, args.ranks, args.batch_size)
        result["epoch_s"] = max(p["epoch_s"] for p in parts)
        result["interrupted_and_resumed_s"] = max(p["interrupted_and_resumed_s"] for p in parts)
    else:
        raise SystemExit(f"unknown step {step}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    result.pop("stdout", None)
    return {"images": n, "step": step, "workers": workers, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}


def best_runs(results: list[dict]) -> dict[tuple, dict]:
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["images"], r["step"], r["workers"])
        if key not in best or r["wall_s"] < best[key]["wall_s"]:
            best[key] = r
    return best


def report(results: list[dict]) -> str:
    best = best_runs(results)
    lines = [
        "| images | step | workers | seconds | images/s | vs bare | CPU ms/image | vs bare (CPU) | peak RSS MB | "
        "load (start, end, max) | runs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    runs: dict[tuple, int] = {}
    for r in results:
        key = (r["images"], r["step"], r["workers"])
        runs[key] = runs.get(key, 0) + 1
    for key in sorted(best, key=lambda k: (k[0], STEPS.index(k[1]), k[2])):
        r = best[key]
        n, step, workers = key
        bare = best.get((n, "bare", workers))
        vs = vs_cpu = ""
        if step == "shards" and bare:
            vs = f"{bare['wall_s'] / r['wall_s']:.2f}x"
            vs_cpu = f"{bare['cpu_s'] / r['cpu_s']:.2f}x"
        lines.append(
            f"| {n} | {step} | {workers} | {r['wall_s']:.1f} | {n / r['wall_s']:.0f} | {vs} | "
            f"{1000 * r['cpu_s'] / n:.3f} | {vs_cpu} | {r['peak_rss_mb']:.0f} | "
            f"{r['load'][0]}, {r['load'][1]}, {r['load'][2]} | {runs[key]} |"
        )
    lines += ["", "Growth from the smallest size (time per image and peak RSS, relative):", ""]
    sizes = sorted({k[0] for k in best})
    head = "| step | workers | " + " | ".join(f"s per 10K at {n}" for n in sizes)
    lines.append(head + " | time/image, largest vs smallest | peak RSS, largest vs smallest |")
    lines.append("|---|---:|" + "---:|" * len(sizes) + "---:|---:|")
    for step in STEPS:
        for workers in sorted({k[2] for k in best if k[1] == step}):
            row = [best.get((n, step, workers)) for n in sizes]
            if not row[0] or not row[-1]:
                continue
            per = [f"{1e4 * r['wall_s'] / n:.1f}" if r else "-" for r, n in zip(row, sizes, strict=True)]
            growth = (row[-1]["wall_s"] / sizes[-1]) / (row[0]["wall_s"] / sizes[0])
            cpu_growth = (row[-1]["cpu_s"] / sizes[-1]) / (row[0]["cpu_s"] / sizes[0])
            rss = row[-1]["peak_rss_mb"] / row[0]["peak_rss_mb"]
            lines.append(f"| {step} | {workers} | " + " | ".join(per) +
                         f" | {growth:.2f}x (CPU {cpu_growth:.2f}x) | {rss:.2f}x |")
    checks = [r for r in best.values() if r["step"] == "loader"]
    if checks:
        lines += ["", "| images | epoch samples | distinct | train samples | left out | exactly once | "
                  "resumed at batch | resumed = uninterrupted | epoch s | interrupted + resumed s |",
                  "|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        for r in sorted(checks, key=lambda r: r["images"]):
            c = r["check"]
            lines.append(f"| {r['images']} | {c['samples']} | {c['distinct']} | {c['train_samples']} | "
                         f"{c['left_out']} | {c['exactly_once']} | {c['resumed_at_batch']} | {c['resume_equal']} | "
                         f"{r['epoch_s']:.1f} | {r['interrupted_and_resumed_s']:.1f} |")
    builds = [r for r in best.values() if r["step"] == "build"]
    if builds:
        phases = list(builds[0]["phases"])
        lines += ["", "| images | " + " | ".join(f"{p} s" for p in phases) + " |",
                  "|---:|" + "---:|" * len(phases)]
        for r in sorted(builds, key=lambda r: r["images"]):
            lines.append(f"| {r['images']} | " + " | ".join(str(r["phases"][p]) for p in phases) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.1f} GiB, Python {platform.python_version()}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # the measured child processes
        cmd, rest = sys.argv[1], sys.argv[2:]
        if cmd == "_bare":
            bare_loop(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        elif cmd == "_build":
            print(json.dumps(build_phases(Path(rest[0]), Path(rest[1]), int(rest[2]))))
        elif cmd == "_loader":
            loader_rank(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), int(rest[5]),
                        Path(rest[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for the dataset, shards and results")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="image counts (the largest is drawn)")
    parser.add_argument("--size", type=int, default=128, help="side of the drawn images (px)")
    parser.add_argument("--workers", default="1,2", help="worker counts of shards and bare")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--only", default=",".join(STEPS), help=f"steps to run, of {', '.join(STEPS)}")
    parser.add_argument("--ranks", type=int, default=2, help="loader: ranks (processes)")
    parser.add_argument("--loader-workers", type=int, default=2, help="loader: DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=32, help="loader: batch per rank")
    parser.add_argument("--image-size", type=int, default=64, help="loader: transform output side")
    parser.add_argument("--keep", action="store_true", help="keep each step's output folder")
    parser.add_argument("--report", action="store_true", help="print the tables of the saved results and stop")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "results.json"
    results: list[dict] = json.loads(saved.read_text()) if saved.is_file() else []
    if args.report:
        print(report(results))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    full = full_set(args.work, max(sizes), args.size)
    steps = [s for s in STEPS if s in args.only.split(",")]
    print(f"machine: {machine()}", flush=True)
    for n in sorted(sizes):
        root = subset(full, n, args.work)
        n_real = count_images(root)
        warm(root)
        for step in steps:
            counts = [int(w) for w in args.workers.split(",")] if step in ("shards", "bare") else [
                args.loader_workers if step == "loader" else 1]
            if step in ("build", "inspect", "loader") and not (args.work / f"shards-{n_real}").exists():
                run_point("shards", n_real, 1, root, args.work, args)  # the reference folder they read
            for workers in counts:
                result = run_point(step, n_real, workers, root, args.work, args)
                results.append(result)
                saved.write_text(json.dumps(results, indent=1) + "\n")
                extra = f" check {result['check']}" if "check" in result else ""
                extra += f" phases {result['phases']}" if "phases" in result else ""
                print(f"{n_real} {step} w{workers}: {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB, load {result['load']}{extra}", flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
