"""ZeRO memory per rank: the stage-2 joint task at 2 ranks under DeepSpeed ZeRO 0/1/2/3 (gloo, CPU or GPU-less).

Each ZeRO stage (and precision) runs as a fresh pair of processes (``torch.multiprocessing``, a gloo process
group, ``OMP_NUM_THREADS=1``) going through the trainer's own code path: ``build_stage2_task`` (seeded, same
weights on both ranks), ``uniemo.training.engine.build_engine`` (frozen parts detached, client AdamW over
``build_param_groups``, ``deepspeed.initialize``), each rank's slice of the stage-2 stream from
``build_loader_from_config``, and ``Trainer.forward_backward`` / ``Trainer.optimizer_step`` for ``--steps`` steps.
The UNet trains (``model.generator.train_unet=true``, METHOD D8) so that the model states ZeRO partitions are
the bulk of the model; with a frozen UNet only the queries, classifiers and mappers train.

Per rank, after the last backward and before its update (gradients and optimiser state both exist):

- **model states**: bytes of every distinct tensor storage reachable from Python (a ``gc`` scan, views counted
  once) minus the frozen parts (VAE, text encoder, ViT backbone, emotion head: never partitioned), the task's
  buffers and the batch. Split into the trainable parameters as the module holds them (ZeRO-3: its partition),
  AdamW's two moments, DeepSpeed's communication buckets (tensors held by attributes named ``*ipg*`` /
  ``*bucket*``: allocated at the configured bucket size, 5e8 elements by default, whatever the model size, and
  only touched as far as gradients fill them), and the rest (gradients and fp32 master copies). The goal ratio is
  computed on the model states without the buckets; the column with buckets is shown too.
- **peak RSS during training**: ``VmHWM`` of the process after resetting it (``/proc/self/clear_refs``) just
  before the first step, i.e. the peak of the training phase; plus the peak before it (``ru_maxrss`` read before
  the reset), which covers building the full model on every rank before ``deepspeed.initialize`` partitions it
  (the engine does not build under ``deepspeed.zero.Init``); and the RSS of the bare runtime (imports, process
  group) before the model is built.

On a CPU the RSS is dominated by the Python/torch/DeepSpeed runtime (about 0.5-0.7 GB per process here), so
the model-state column is the one that shows ZeRO's effect; ``--width-scale`` grows the UNet to make it larger.

    .venv/bin/python benchmarks/zero_memory.py --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cfg_overrides(args: argparse.Namespace, stage: int, precision: str, out_dir: Path) -> list[str]:
    return [
        "run.name=zero-memory",
        f"run.output_dir={out_dir}",
        f"data.cache_dir={Path(args.cache_dir).resolve()}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=1",
        f"model.understanding.preset={args.understanding}",
        f"model.generator.preset={args.generator}",
        "model.generator.train_unet=true",
        f"training.steps={args.steps}",
        f"training.precision={precision}",
        "training.gradient_accumulation=1",
        "training.eval_every=0",
        "distributed.num_workers=2",
        "distributed.cpus_per_worker=1",
        f"distributed.zero_stage={stage}",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
    ]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> nbytes of the distinct storages behind ``tensors``."""
    out: dict[int, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _live_storages() -> dict[int, int]:
    gc.collect()
    tensors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch.distributed aliases warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    tensors.append(obj)
            except Exception:  # noqa: BLE001 - some proxies raise on isinstance
                continue
    return _storages(tensors)


def _optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The moments of the torch AdamW inside DeepSpeed's wrapper (or the bare optimizer at ZeRO-0 fp32)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _attribute_storages(obj, name: str, depth: int, out: dict[int, str]) -> None:
    """Storage -> attribute path of the tensors an object holds (attributes, lists, dicts; a few levels)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.nbytes() > 0:
            out.setdefault(storage.data_ptr(), name)
        return
    if depth == 0:
        return
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        items = list(vars(obj).items())
    else:
        return
    for key, value in items:
        _attribute_storages(value, f"{name}.{key}", depth - 1, out)


def model_state_bytes(engine, exclude=()) -> dict[str, int]:
    """Model-state bytes on this rank (module docstring), by kind."""
    live = _live_storages()
    frozen = _storages(p for _, p in engine.frozen.named_parameters())
    for e in engine.frozen.entries:
        if isinstance(e.value, torch.nn.Module):
            frozen.update(_storages(e.value.buffers()))
    frozen.update(_storages(engine.task.buffers()))
    skip = set(frozen) | set(_storages(t for t in exclude if isinstance(t, torch.Tensor)))
    states = {k: v for k, v in live.items() if k not in skip}
    params = _storages(getattr(p, "ds_tensor", p) for p in engine.task.parameters())
    moments = _storages(_optimizer_state_tensors(engine.optimizer))
    named: dict[int, str] = {}
    _attribute_storages(engine.optimizer, "optimizer", 4, named)
    _attribute_storages(engine.ds_engine, "engine", 3, named)
    buckets = {k for k, n in named.items() if "ipg" in n.lower() or "bucket" in n.lower()}
    params_b = sum(v for k, v in states.items() if k in params)
    moments_b = sum(v for k, v in states.items() if k in moments and k not in params)
    buckets_b = sum(v for k, v in states.items() if k in buckets and k not in params and k not in moments)
    total = sum(states.values())
    return {
        "states": total,
        "states_no_buckets": total - buckets_b,
        "params": params_b,
        "moments": moments_b,
        "buckets": buckets_b,
        "other": total - params_b - moments_b - buckets_b,
        "frozen": sum(frozen.values()),
        "live": sum(live.values()),
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace, stage: int, precision: str, out: str) -> None:
    """One rank: build task and engine, train ``args.steps`` steps, write its measurements to ``out``."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
    )
    import torch.distributed as dist

    from uniemo.config import load_config
    from uniemo.data.loader import build_loader_from_config, load_attribute_table
    from uniemo.distributed.env import apply_worker_env, read_env
    from uniemo.training.engine import build_engine
    from uniemo.training.parts import StageParts
    from uniemo.training.task import build_stage2_task
    from uniemo.training.trainer import Trainer

    run_dir = Path(out).parent / f"run-{stage}-{precision}"
    cfg = load_config(args.config, cfg_overrides(args, stage, precision, run_dir.parent))
    if args.width_scale != 1:
        from uniemo.models import generator as gen

        p = gen.GENERATOR_PRESETS[cfg.model.generator.preset]
        gen.GENERATOR_PRESETS[cfg.model.generator.preset] = type(p)(
            **{**p.__dict__, "unet_channels": tuple(c * args.width_scale for c in p.unet_channels)}
        )
    apply_worker_env(cfg.distributed)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    env = read_env()
    rss_runtime = _status_kb("VmRSS")
    torch.manual_seed(cfg.run.seed)
    task = build_stage2_task(cfg, load_attribute_table(cfg.data))
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    loader = build_loader_from_config(
        cfg.data, "train", rank=rank, world_size=world, stage=2, training=True, seed=cfg.run.seed
    )
    engine = build_engine(task, cfg, world_size=world, device=torch.device("cpu"), total_steps=args.steps)
    trainer = Trainer(cfg, env, run_dir, engine, StageParts(engine.task, loader, None), args.steps,
                      torch.device("cpu"))
    trainer.restore()
    engine.set_train(True)
    batches = loader.batches()
    first = next(batches)
    gc.collect()
    maxrss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the reset (which also resets it)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the training phase from here
    start = time.perf_counter()
    batch = first
    states: dict[str, int] = {}
    for step in range(args.steps):
        if step:
            batch = next(batches)
        trainer.forward_backward(batch)
        if step == args.steps - 1:
            # After the last backward, before the update: gradients and optimiser state both exist (the peak of
            # the model states; ZeRO-0 frees its gradients after the step).
            states = model_state_bytes(engine, exclude=[batch, *trainer._last_batch.values()])
        trainer.optimizer_step()
    seconds = time.perf_counter() - start
    del batches, batch, first
    result = {
        "rank": rank,
        "trainable": trainable,
        "rss_runtime_kb": rss_runtime,
        "hwm_train_kb": _status_kb("VmHWM"),
        "maxrss_build_kb": maxrss_build,
        "seconds_per_step": seconds / args.steps,
        **states,
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo can abort there (issue 4, known facts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(args: argparse.Namespace, stage: int, precision: str, tmp: Path) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp / f"zero{stage}-{precision}"
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, args, stage, precision, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=args.timeout)
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
        path = Path(f"{out}.rank{r}.json")
        if not path.is_file():
            raise SystemExit(f"ZeRO-{stage} {precision}: rank {r} wrote no result (exit code {p.exitcode})")
        results.append(json.loads(path.read_text()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_stage2.yaml"))
    parser.add_argument("--understanding", default="small", help="model.understanding.preset")
    parser.add_argument("--generator", default="small", help="model.generator.preset (its UNet trains)")
    parser.add_argument("--width-scale", type=int, default=1, help="multiply the UNet's channel widths")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps (>= 2: AdamW makes its moments at the 1st update)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "uniemo"), help="synthetic shards (kept)")
    args = parser.parse_args()

    from uniemo.config import load_config
    from uniemo.data.shards import ensure_synthetic_shards

    tmp = Path(tempfile.mkdtemp(prefix="uniemo-zero-"))
    ensure_synthetic_shards(load_config(args.config, cfg_overrides(args, 0, "fp32", tmp)).data)
    load_before = os.getloadavg()[0]
    rows = []
    try:
        for precision in args.precisions.split(","):
            for stage in (int(s) for s in args.stages.split(",")):
                rows.append((precision, stage, run_stage(args, stage, precision, tmp), os.getloadavg()[0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import deepspeed

    mib = 1024 * 1024
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, deepspeed "
        f"{deepspeed.__version__}, python {platform.python_version()}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    trainable = rows[0][2][0]["trainable"]
    print(
        f"task: stage 2, understanding {args.understanding!r}, generator {args.generator!r} "
        f"(UNet x{args.width_scale}, trained), {trainable / 1e6:.2f} M trainable parameters, 2 ranks (gloo), "
        f"micro-batch {args.batch_size}, {args.steps} steps; figures are the max over the 2 ranks\n"
    )
    print(
        "| precision | ZeRO | model states MiB | vs ZeRO-0 | params | grads + fp32 masters | AdamW moments "
        "| comm buckets MiB | all incl. buckets MiB | vs ZeRO-0 | frozen parts MiB | peak RSS in training MiB "
        "| vs ZeRO-0 | peak RSS while building MiB | RSS of runtime MiB | s/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base: dict[str, dict] = {}
    for precision, stage, results, _load in rows:
        worst = {k: max(r[k] for r in results) for k in results[0] if k != "rank"}
        if stage == 0:
            base[precision] = worst
        b = base.get(precision)
        ratio = f"{worst['states_no_buckets'] / b['states_no_buckets']:.2f}x" if b else "-"
        ratio_all = f"{worst['states'] / b['states']:.2f}x" if b else "-"
        ratio_rss = f"{worst['hwm_train_kb'] / b['hwm_train_kb']:.2f}x" if b else "-"
        print(
            f"| {precision} | {stage} | {worst['states_no_buckets'] / mib:.1f} | {ratio} | {worst['params'] / mib:.1f} "
            f"| {worst['other'] / mib:.1f} | {worst['moments'] / mib:.1f} | {worst['buckets'] / mib:.1f} "
            f"| {worst['states'] / mib:.1f} | {ratio_all} | {worst['frozen'] / mib:.1f} "
            f"| {worst['hwm_train_kb'] / 1024:.0f} | {ratio_rss} | {worst['maxrss_build_kb'] / 1024:.0f} "
            f"| {worst['rss_runtime_kb'] / 1024:.0f} | {worst['seconds_per_step']:.2f} |"
        )


if __name__ == "__main__":
    main()
