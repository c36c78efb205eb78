"""GPU suite: every speed goal of the full-scale runs in one call and one table (BENCHMARKS.md, "GPU suite").

Parts (``--parts``, in this order; each gets what is left of ``--budget-s`` and a part that would start after the
budget is listed as skipped):

- ``joint``: the stage-2 joint step at SD-1.5 + CLIP ViT-L/14 shapes (random weights, as
  ``benchmarks/gpu_joint_step.py``), bf16, through the trainer's engine, in one process: the **baseline** (the path
  of BENCHMARKS.md's H200 table: ``pixel_values`` through the VAE encoder, eager, torch's default AdamW) and the
  **optimised** path (precomputed latent moments, ``training.compile``, ``training.channels_last``, fused AdamW).
  MFU is counted as today: the baseline's FLOPs per sample (``FlopCounterMode``, forward + backward, VAE encoder
  included) x samples/s over the card's peak; the optimised row also gives the FLOPs it executes.
- ``stage1``: the stage-1 step at ViT-L/14 (224 px, 32 + 32 expert queries, 254/409 attribute rows), bf16: eager
  and compiled (``training.compile``), both with the fused AdamW.
- ``data``: data wait. The real loader (``build_loader``: webdataset, DataLoader workers, RandomResizedCrop + flip
  at 224 px, pinned memory) over JPEG shards of the synthetic set drawn at ``--data-image-size`` px feeds the
  compiled stage-1 step; the share of the wall time the loop waits for ``next(batches)`` is the trainer's own
  ``data_wait_share``.
- ``checkpoint``: how long one ``Checkpointer.save`` blocks the loop, for the stage-2 and the stage-1 engine,
  synchronous and with ``training.async_checkpoint`` (then also how long until the files are on disk).
- ``pool``: the feedback pool (``FeedbackPool.process``: generator actors -> PNGs through Ray's object store -> a
  filter actor) at SD-1.5 shapes: 512 px, UniPC 50 steps, CFG 7.5, ``--pool-batch`` images per job, fp16, the
  UNet and VAE decoder compiled with CUDA graphs (``model.generator.compile``), scored by a ViT-L/14 filter actor;
  one generator actor per GPU and ``--pool-actors`` sharing it (fractional ``num_gpus``). images/s, MFU at the
  counted FLOPs per image, and the generator and filter busy shares.

``--tiny`` runs the same code on the CPU with the tiny presets and small sizes (fp32, no torch.compile unless
``--compile``): the check that the suite works, run by tests/test_gpu_suite.py. Without CUDA and without ``--tiny``
it prints one line and exits with status 2. Needs no network (every model is built at random, the SD-1.5-shaped
generator is saved to a temporary folder for the actors).

    python benchmarks/gpu_suite.py                      # on one H100/H200: <= 8 min
    python benchmarks/gpu_suite.py --tiny               # CPU check, a minute or two
    python benchmarks/gpu_suite.py --parts joint,pool --json suite.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_joint_step import (  # noqa: E402  (the sibling benchmark: SD-1.5 shapes, FLOP counting, timing, peaks)
    NUM_OBJECTS,
    NUM_SCENES,
    count_flops,
    cuda_or_say,
    init_group,
    peak_tflops,
    random_batch,
    sd15_generator,
    sync,
    timed_steps,
)

PARTS = ("joint", "stage1", "data", "checkpoint", "pool")


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class Suite:
    """Settings, the device, the rows of the table and the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self.card = torch.cuda.get_device_name(self.device)
            self.peak, self.peak_entry = peak_tflops(self.card)
        else:
            self.card, self.peak, self.peak_entry = f"CPU ({platform.processor() or platform.machine()})", None, "n/a"
        if args.peak_tflops > 0:
            self.peak, self.peak_entry = args.peak_tflops, "--peak-tflops"
        self.precision = "fp32" if args.tiny else "bf16"
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.tmp = Path(tempfile.mkdtemp(prefix="uniemo-gpu-suite-"))
        self.keep: dict[str, Any] = {}
        """What one part hands to a later one (engines for the data and checkpoint parts)."""

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def row(self, part: str, variant: str, batch: Any = "", time_s: str = "", rate: str = "", mfu: str = "",
            note: str = "", **data: Any) -> None:
        self.rows.append({"part": part, "variant": variant, "batch": batch, "time": time_s, "rate": rate,
                          "mfu": mfu, "note": note, **data})
        print(f"[{self.elapsed():6.0f} s] {part} / {variant}: {time_s} {rate} {mfu} {note}", file=sys.stderr,
              flush=True)

    def mfu(self, flops_per_s: float) -> str:
        return f"{100 * flops_per_s / (self.peak * 1e12):.1f} %" if self.peak else "n/a"

    def cfg(self, *overrides: str):
        from uniemo.config import load_config

        t = self.tiny
        return load_config(None, [
            f"model.understanding.preset={'tiny' if t else 'vit-l14'}",
            f"data.image_size={32 if t else 224}", f"model.understanding.image_size={32 if t else 224}",
            f"data.generator_image_size={32 if t else 512}",
            f"training.precision={self.precision}", f"distributed.zero_stage={self.args.zero_stage}",
            "distributed.num_workers=1", *overrides,
        ])


class EngineStep:
    """One optimizer step through the trainer's engine: prepare_batch, forward, backward, step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        engine.set_train(True)

    def forward_backward(self, batch: dict) -> torch.Tensor:
        out = self.engine.ds_engine(self.engine.prepare_batch(batch))
        self.engine.ds_engine.backward(out["total"])
        return out["total"]

    def update(self) -> None:
        self.engine.ds_engine.step()


def time_steps(suite: Suite, step: EngineStep, batch: dict, warmup: int, steps: int) -> dict[str, float]:
    """The first step (compilation included) on its own, then :func:`gpu_joint_step.timed_steps`."""
    sync(suite.device)
    first = time.perf_counter()
    step.forward_backward(batch)
    step.update()
    sync(suite.device)
    first_s = time.perf_counter() - first
    return {**timed_steps(step, batch, warmup, steps, suite.device), "first_s": first_s}


def build_engine_for(suite: Suite, task: Any, cfg: Any, optimizer_options: dict | None = None) -> Any:
    from uniemo.training.engine import build_engine

    return build_engine(task, cfg, world_size=1, device=suite.device, total_steps=10_000,
                        optimizer_options=optimizer_options)


def free(suite: Suite, *names: str) -> None:
    for name in names:
        suite.keep.pop(name, None)
    import gc

    gc.collect()
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------
def stage2_task(suite: Suite, cfg: Any) -> Any:
    from gpu_joint_step import build_task

    return build_task(cfg, SimpleNamespace(tiny=suite.tiny, train_unet=False))


def part_joint(suite: Suite) -> None:
    args = suite.args
    b = args.batch
    base_cfg = suite.cfg("training.stage=2", f"data.batch_size={b}")
    fast_cfg = suite.cfg("training.stage=2", f"data.batch_size={b}", "training.channels_last=true",
                         f"training.compile={str(args.compile).lower()}")

    # Baseline: today's path (pixels through the VAE encoder, eager, torch's default AdamW).
    task = stage2_task(suite, base_cfg)
    engine = build_engine_for(suite, task, base_cfg, optimizer_options={})
    step = EngineStep(engine)
    pixels = random_batch(base_cfg, b, suite.device)
    with torch.no_grad():  # the latent moments the optimised path reads instead (as `uniemo data latents` stores)
        mean, std = task.generator.latent_moments(pixels["pixel_values"].to(engine.dtype))
    latents = {k: v for k, v in pixels.items() if k != "pixel_values"}
    latents.update(latent_mean=mean.to(torch.float16), latent_std=std.to(torch.float16))
    flops = count_flops(step, pixels)
    executed = count_flops(step, latents)  # the same model without the VAE encoder: what the fast path runs
    base = time_steps(suite, step, pixels, args.warmup, args.steps)
    del step, engine, task
    free(suite)
    per_sample = flops / b
    rate = b / base["step_s"]
    suite.row("joint step", "baseline: pixels + VAE encoder, eager, AdamW for-each", b, f"{base['step_s']:.3f} s/step",
              f"{rate:.1f} samples/s", suite.mfu(per_sample * rate),
              f"{per_sample / 1e9:.4g} GFLOP/sample; peak {gib(base['peak_mem'])}", samples_per_s=rate,
              flops_per_sample=per_sample, step_s=base["step_s"])

    task = stage2_task(suite, fast_cfg)
    engine = build_engine_for(suite, task, fast_cfg)
    step = EngineStep(engine)
    fast = time_steps(suite, step, latents, args.warmup, args.steps)
    fast_rate = b / fast["step_s"]
    suite.row("joint step", "optimised: latents, " + ("compiled, " if args.compile else "") +
              "channels_last, fused AdamW", b, f"{fast['step_s']:.3f} s/step", f"{fast_rate:.1f} samples/s",
              suite.mfu(per_sample * fast_rate),
              f"{fast_rate / rate:.2f}x; executes {executed / b / 1e9:.4g} GFLOP/sample = "
              f"{suite.mfu(executed / b * fast_rate)} MFU; first step {fast['first_s']:.0f} s; peak "
              f"{gib(fast['peak_mem'])}", samples_per_s=fast_rate, speedup=fast_rate / rate, step_s=fast["step_s"],
              executed_flops_per_sample=executed / b)
    suite.keep["stage2_engine"] = engine


def stage1_batch(cfg: Any, b: int, device: torch.device) -> dict:
    s = cfg.data.image_size
    return {
        "image": torch.randn(b, 3, s, s, device=device),
        "label": torch.randint(0, 8, (b,), device=device),
        "scene_idx": torch.randint(-1, NUM_SCENES, (b,), device=device),
        "object_idx": torch.randint(-1, NUM_OBJECTS, (b,), device=device),
        "objects_multi_hot": (torch.rand(b, NUM_OBJECTS, device=device) < 0.01).float(),
    }


def stage1_task(cfg: Any) -> Any:
    from uniemo.models.weights import build_understanding
    from uniemo.training.task import Stage1Task

    torch.manual_seed(0)
    understanding = build_understanding(cfg.model.understanding, NUM_SCENES, NUM_OBJECTS)
    e = understanding.embed_dim
    text = torch.nn.functional.normalize(torch.randn(NUM_SCENES + 1, e), dim=-1)
    objects = torch.nn.functional.normalize(torch.randn(NUM_OBJECTS + 1, e), dim=-1)
    return Stage1Task(understanding, text, objects, cfg.training.losses)


def part_stage1(suite: Suite) -> None:
    args = suite.args
    b = args.stage1_batch
    common = ("training.stage=1", f"data.batch_size={b}", "training.losses.unannotated_negatives=true")
    rate = flops = None
    variants = [("eager, fused AdamW", False)] + ([("compiled, fused AdamW", True)] if args.compile else [])
    for name, compiled in variants:
        cfg = suite.cfg(*common, f"training.compile={str(compiled).lower()}")
        engine = build_engine_for(suite, stage1_task(cfg), cfg)
        step = EngineStep(engine)
        batch = stage1_batch(cfg, b, suite.device)
        if flops is None:
            flops = count_flops(step, batch)
        r = time_steps(suite, step, batch, args.warmup, args.steps)
        now = b / r["step_s"]
        vs = f"{now / rate:.2f}x; " if rate else ""
        rate = rate or now
        suite.row("stage 1", f"ViT-L/14 224 px, {name}" if not suite.tiny else name, b, f"{r['step_s']:.3f} s/step",
                  f"{now:.1f} samples/s", suite.mfu(flops / b * now),
                  f"{vs}{flops / b / 1e9:.4g} GFLOP/sample; first step {r['first_s']:.0f} s; peak {gib(r['peak_mem'])}",
                  samples_per_s=now, step_s=r["step_s"], flops_per_sample=flops / b)
        suite.keep["stage1_engine"] = engine
        suite.keep["stage1_cfg"] = cfg
        del step


def synthetic_shards(suite: Suite) -> Path:
    """JPEG shards of the synthetic set at ``--data-image-size`` px (made once per suite run)."""
    from uniemo.data.shards import write_shards
    from uniemo.data.synthetic import generate_synthetic_set

    out = suite.tmp / "shards"
    if not (out / "manifest.json").is_file():
        workers = max(1, (os.cpu_count() or 2) - 1)
        generate_synthetic_set(suite.tmp / "raw", images=suite.args.data_images, size=suite.args.data_image_size,
                               seed=0, workers=workers, progress=False)
        write_shards(source="emoset", root=suite.tmp / "raw", out=out, shard_size=50 if suite.tiny else 100,
                     workers=workers, progress=False)
    return out


def part_data(suite: Suite) -> None:
    from uniemo.data.loader import build_loader
    from uniemo.data.transforms import build_sample_transform

    args = suite.args
    engine = suite.keep.get("stage1_engine")
    cfg = suite.keep.get("stage1_cfg")
    if engine is None or cfg is None:
        suite.row("data wait", "needs the stage1 part", note="skipped")
        return
    shards = synthetic_shards(suite)
    workers = args.loader_workers or max(1, min(8, (os.cpu_count() or 2) - 2))
    loader = build_loader(shards, "train", rank=0, world_size=1, batch_size=cfg.data.batch_size, num_workers=workers,
                          transform=build_sample_transform(cfg.data, stage=1, training=True), training=True,
                          seed=0, pin_memory=suite.device.type == "cuda")
    step = EngineStep(engine)
    batches = loader.batches()
    # The trainer's measure: wall time in next(batches); the first steps (worker start-up) are not counted.
    skip, n = 3, args.data_steps
    wait = 0.0
    for i in range(skip + n):
        if i == skip:
            sync(suite.device)
            start = time.perf_counter()
            wait = 0.0
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        loss = step.forward_backward(batch)
        step.update()
        float(loss.detach())  # the trainer's finite-loss check synchronises every step too
    sync(suite.device)
    wall = time.perf_counter() - start
    batches.close()
    b = cfg.data.batch_size
    suite.row("data wait", f"real loader, {args.data_image_size} px JPEG -> 224 px train transform, {workers} workers",
              b, f"{100 * wait / wall:.1f} % waiting", f"{n * b / wall:.1f} samples/s", "",
              f"stage-1 step fed by the loader ({n} steps)", wait_share=wait / wall, samples_per_s=n * b / wall)


def part_checkpoint(suite: Suite) -> None:
    from uniemo.distributed.env import DistEnv
    from uniemo.training.checkpoint import Checkpointer

    env = DistEnv(0, 1, 0, 1, 0, "single")
    for name in ("stage2_engine", "stage1_engine"):
        engine = suite.keep.get(name)
        if engine is None:
            continue
        for background in (False, True):
            run_dir = suite.tmp / f"ckpt-{name}-{background}"
            checkpointer = Checkpointer(run_dir, env, keep=2, background=background)
            times, published = [], []
            for step in (1, 2):  # the second save overwrites nothing and shows the steady state
                t0 = time.perf_counter()
                folder = checkpointer.save(engine.ds_engine, step, {"stage": 0}, {})
                times.append(checkpointer.blocking_seconds)
                checkpointer.wait()
                published.append(time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            label = "stage 2" if name == "stage2_engine" else "stage 1"
            mode = "async (training.async_checkpoint)" if background else "synchronous"
            suite.row("checkpoint", f"{label}, {mode}", "", f"{times[-1]:.2f} s blocking",
                      f"{size / 2**30 / published[-1]:.2f} GiB/s", "",
                      f"{gib(size)}; on disk after {published[-1]:.2f} s", blocking_s=times[-1],
                      on_disk_s=published[-1], bytes=size)
            shutil.rmtree(run_dir, ignore_errors=True)


def pool_generator_path(suite: Suite) -> str:
    """The SD-1.5-shaped random generator saved (fp16 weights) for the actors; '' for --tiny (a preset)."""
    if suite.tiny:
        return ""
    path = suite.tmp / "sd15-random"
    if not path.is_dir():
        generator = sd15_generator(train_unet=False).half()
        generator.save_pretrained(path)
        del generator
    return str(path)


def generation_flops(cfg: Any) -> float:
    """FLOPs of one image (CFG: the UNet at batch 2 per step, then one VAE decode), counted on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from uniemo.models.generator import build_generator

    generator = build_generator(cfg.model.generator, image_size=cfg.data.generator_image_size, seed=cfg.run.seed)
    h = cfg.data.generator_image_size // generator.vae_scale_factor
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        latents = torch.randn(2, generator.latent_channels, h, h)
        context = torch.randn(2, generator.max_length, generator.token_dim)
        generator.predict_noise(latents, torch.tensor(500), context)
    unet = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        generator.decode_latents(latents[:1])
    steps = cfg.feedback.sampling_steps or cfg.model.generator.sampling_steps
    return float(unet * steps + counter.get_total_flops())


def part_pool(suite: Suite) -> None:
    from uniemo.config.schema import DistributedConfig
    from uniemo.data.attributes import AttributeTable
    from uniemo.distributed.ray_session import ray_session
    from uniemo.feedback.actors import FeedbackPool, GenerationJob, ModelBundle

    args = suite.args
    free(suite, "stage2_engine", "stage1_engine", "stage1_cfg")
    gpu = suite.device.type == "cuda"
    path = pool_generator_path(suite)
    cfg = suite.cfg(
        f"model.generator.path={path}", f"model.generator.compile={str(args.compile).lower()}",
        f"model.generator.generation_batch_size={args.pool_batch}", "data.min_attribute_count=1",
        f"feedback.batch_size={args.pool_batch}", f"feedback.sampling_steps={args.pool_steps}",
        "feedback.sampler=unipc", "feedback.guidance_scale=7.5", f"feedback.precision={'fp16' if gpu else 'fp32'}",
        "feedback.threads_per_actor=1", "feedback.generator_cpus=1", "feedback.filter_cpus=1",
        "feedback.max_in_flight=0",
    )
    attributes = AttributeTable.load(synthetic_shards(suite))
    bundle = ModelBundle.random(cfg, attributes, checkpoint_id="gpu-suite")
    per_image = generation_flops(cfg)
    filter_share = 0.25 if gpu else 0.0
    layouts = sorted({1, args.pool_actors})
    with ray_session(DistributedConfig(num_workers=0), extra_cpus=max(layouts) + 1, extra_gpus=1.0 if gpu else 0):
        for actors in layouts:
            share = (1.0 - filter_share) / actors if gpu else 0.0
            fb = replace(cfg.feedback, generator_actors=actors, generator_gpus=share, filter_gpus=filter_share)
            n, batch, offset = args.pool_images, args.pool_batch, 0
            jobs = [GenerationJob(i, i % 8, tuple(range(offset + i * batch, offset + (i + 1) * batch)), 0,
                                  args.pool_steps, 7.5, "unipc") for i in range(max(1, n // batch))]
            warm = [GenerationJob(1000 + i, i % 8, tuple(range(10_000 + i * batch, 10_000 + (i + 1) * batch)), 0,
                                  args.pool_steps, 7.5, "unipc") for i in range(actors)]
            t_start = time.perf_counter()
            with FeedbackPool(bundle, fb) as pool:
                list(pool.process(warm))  # models built, compiled (CUDA graphs captured), first calls paid
                warm_s = time.perf_counter() - t_start
                gen0, score0 = pool.stats.generation_seconds, pool.stats.scoring_seconds
                start = time.perf_counter()
                images = sum(len(o.job.seeds) for o in pool.process(jobs) if hasattr(o, "scores"))
                wall = time.perf_counter() - start
                gen_busy = (pool.stats.generation_seconds - gen0) / (actors * wall)
                filter_busy = (pool.stats.scoring_seconds - score0) / wall
            rate = images / wall
            where = f"{actors} generator actor(s) x {share:.3g} GPU + filter x {filter_share:g}" if gpu else \
                f"{actors} generator actor(s), CPU"
            suite.row("pool", where, batch, f"{wall:.1f} s for {images} images", f"{rate:.2f} images/s",
                      suite.mfu(per_image * rate),
                      f"generators busy {100 * gen_busy:.0f} %, filter busy {100 * filter_busy:.0f} %; "
                      f"{per_image / 1e12:.4g} TFLOP/image; start + warm-up {warm_s:.0f} s",
                      images_per_s=rate, generators_busy=gen_busy, filter_busy=filter_busy,
                      flops_per_image=per_image)


# ---------------------------------------------------------------------------------------------------------
def print_table(suite: Suite) -> None:
    import deepspeed

    print(f"card: {suite.card}; peak bf16 {f'{suite.peak:.1f} TFLOP/s ({suite.peak_entry})' if suite.peak else 'n/a'}"
          f"; torch {torch.__version__}, deepspeed {deepspeed.__version__}, python {platform.python_version()}; "
          f"{os.cpu_count()} CPU cores; suite {suite.elapsed():.0f} s")
    sizes = "tiny presets on the CPU (a check of the code, not a measurement)" if suite.tiny else \
        "SD-1.5 UNet/VAE/text encoder + CLIP ViT-L/14 shapes, random weights, bf16"
    print(f"models: {sizes}; ZeRO-{suite.args.zero_stage}; {suite.args.warmup} warm-up + {suite.args.steps} timed steps")
    print()
    print("| part | variant | batch | time | rate | MFU | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in suite.rows:
        print(f"| {r['part']} | {r['variant']} | {r['batch']} | {r['time']} | {r['rate']} | {r['mfu']} | {r['note']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny presets on the CPU: a check of the code path")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--batch", type=int, default=0, help="joint-step batch (default 32; --tiny 2)")
    parser.add_argument("--stage1-batch", type=int, default=0, help="stage-1 batch (default 64; --tiny 4)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 8; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps after the first (default 2; --tiny 0)")
    parser.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage of the engines (one GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile in the optimised paths (default: on a GPU, off with --tiny)")
    parser.add_argument("--data-images", type=int, default=0, help="synthetic images (default 1600; --tiny 120)")
    parser.add_argument("--data-image-size", type=int, default=0, help="their side (default 512; --tiny 64)")
    parser.add_argument("--data-steps", type=int, default=0, help="timed loader-fed steps (default 20; --tiny 3)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers (default min(8, cores-2))")
    parser.add_argument("--pool-images", type=int, default=0, help="timed images per layout (default 48; --tiny 4)")
    parser.add_argument("--pool-batch", type=int, default=0, help="images per job (default 8; --tiny 2)")
    parser.add_argument("--pool-steps", type=int, default=0, help="UniPC steps (default 50; --tiny 2)")
    parser.add_argument("--pool-actors", type=int, default=2, help="generator actors sharing the GPU (and 1)")
    parser.add_argument("--budget-s", type=float, default=0, help="skip parts that would start later (default 480)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the card's peak bf16 TFLOP/s")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not args.tiny and not cuda_or_say("gpu_suite"):
        return 2
    t = args.tiny
    defaults = {"batch": (2, 32), "stage1_batch": (4, 64), "steps": (2, 8), "data_images": (120, 1600),
                "data_image_size": (64, 512), "data_steps": (3, 20), "pool_images": (4, 48), "pool_batch": (2, 8),
                "pool_steps": (2, 50), "budget_s": (600, 480)}
    for key, (tiny, full) in defaults.items():
        if not getattr(args, key):
            setattr(args, key, tiny if t else full)
    args.warmup = args.warmup if args.warmup >= 0 else (0 if t else 2)
    args.compile = (not t) if args.compile is None else args.compile
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if t:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    suite = Suite(args)
    init_group(suite.device)
    functions = {"joint": part_joint, "stage1": part_stage1, "data": part_data, "checkpoint": part_checkpoint,
                 "pool": part_pool}
    failed = False
    try:
        for part in PARTS:
            if part not in parts:
                continue
            if suite.elapsed() > args.budget_s:
                suite.row(part, "skipped: the time budget (--budget-s) was spent", note="skipped")
                continue
            try:
                functions[part](suite)
            except Exception as exc:  # noqa: BLE001 - report the part as failed, run the others
                traceback.print_exc()
                failed = True
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                suite.row(part, f"failed: {type(exc).__name__}: {first}", note="failed")
        print_table(suite)
        if args.json:
            Path(args.json).write_text(json.dumps({"card": suite.card, "peak_tflops": suite.peak,
                                                   "torch": torch.__version__, "seconds": suite.elapsed(),
                                                   "rows": suite.rows}, indent=1, default=str) + "\n")
    finally:
        suite.keep.clear()
        shutil.rmtree(suite.tmp, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
