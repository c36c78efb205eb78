"""GPU joint step: samples/s and MFU of the stage-2 joint step at SD-1.5 + CLIP ViT-L/14 shapes (random init).

What runs: :class:`uniemo.training.task.Stage2Task` (METHOD §3: understanding branch + ``L_U'``, conditioner,
the condition token spliced into the prompt, VAE encode, UNet noise prediction, diffusion and condition losses)
built at the real sizes with random weights, nothing downloaded:

- generator: SD-1.5's UNet (320/640/1280/1280, cross-attention 768), VAE (128/256/512/512, 4 latent channels)
  and CLIP text encoder (12 layers, width 768, vocabulary 49408), from the configs written below, 512 px images;
- understanding: ``model.understanding.preset=vit-l14`` (CLIP ViT-L/14, 224 px, 32 + 32 expert queries);
- EmoSet-sized vocabularies: 254 scenes, 409 objects, a 655-name attribute base.

One step = forward + backward of ``total`` + the AdamW update, through one of two engines (``--engines``):

- ``deepspeed``: the trainer's own path: :func:`uniemo.training.engine.build_engine` (frozen parts detached,
  client AdamW over ``build_param_groups``, DeepSpeed ZeRO ``--zero-stage``, bf16 weights with fp32 masters) on a
  one-process group, then ``engine(batch)``, ``engine.backward``, ``engine.step``;
- ``torch``: a plain loop for comparison: fp32 weights, ``torch.autocast`` bf16, ``torch.optim.AdamW`` over the
  same groups, gradient clipping.

MFU = counted FLOPs per step x steps/s / the card's peak dense bf16 rate. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward (matrix multiplies, convolutions and
attention; element-wise work and the optimizer are not counted, as usual for MFU). Backward FLOPs are what is
actually computed: the frozen UNet (default, METHOD D8) still back-propagates to its input (dL/dc) but computes
no weight gradients. Peak rates used (dense, no sparsity) are in ``PEAK_BF16_TFLOPS``; ``--peak-tflops`` overrides.

    python benchmarks/gpu_joint_step.py --batch-sizes 1,2,4,8 --steps 10
    python benchmarks/gpu_joint_step.py --tiny            # CPU check of the code path: tiny presets, fp32
    python benchmarks/gpu_joint_step.py --tiny --precision bf16   # ... and of the bf16 path

Without CUDA (and without ``--tiny``) it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
import traceback

import torch

PEAK_BF16_TFLOPS = {
    # Dense bf16 tensor-core peaks from the vendors' data sheets.
    "H200": 989.4,
    "H100 SXM": 989.4,  # also "H100 80GB HBM3"
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}
NUM_SCENES, NUM_OBJECTS, NUM_ATTRIBUTES = 254, 409, 655


def peak_tflops(name: str) -> tuple[float | None, str]:
    """``(peak dense bf16 TFLOP/s, which entry)`` for a CUDA device name, or ``(None, "unknown")``."""
    upper = name.upper()
    if "H200" in upper:
        return PEAK_BF16_TFLOPS["H200"], "H200"
    if "H100" in upper:
        if "PCIE" in upper:
            return PEAK_BF16_TFLOPS["H100 PCIe"], "H100 PCIe"
        if "NVL" in upper:
            return PEAK_BF16_TFLOPS["H100 NVL"], "H100 NVL"
        return PEAK_BF16_TFLOPS["H100 SXM"], "H100 SXM"
    for key in ("A100", "L40S", "A10G", "L4"):
        if key in upper:
            return PEAK_BF16_TFLOPS[key], key
    return None, "unknown"


def sd15_generator(train_unet: bool):
    """SD-1.5-shaped generator at random init (runwayml/stable-diffusion-v1-5 component configs)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from uniemo.models.generator import SD15_SCHEDULER_CONFIG, Generator
    from uniemo.models.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer()  # local character-level CLIP tokenizer: ids fit the 49408 rows
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    return Generator(unet, vae, text_encoder, tokenizer, scheduler, train_unet=train_unet)


def build_config(args: argparse.Namespace, batch_size: int):
    from uniemo.config import load_config

    precision = args.precision
    return load_config(
        None,
        [
            f"model.understanding.preset={'tiny' if args.tiny else 'vit-l14'}",
            f"model.generator.train_unet={str(args.train_unet).lower()}",
            f"data.image_size={64 if args.tiny else 224}",
            f"data.generator_image_size={64 if args.tiny else 512}",
            f"data.batch_size={batch_size}",
            f"training.precision={precision}",
            f"distributed.zero_stage={args.zero_stage}",
            "distributed.num_workers=1",
        ],
    )


def build_task(cfg, args: argparse.Namespace):
    """The Stage2Task at the benchmark's sizes (random weights, seeded)."""
    from uniemo.models.conditioner import Conditioner
    from uniemo.models.generator import Generator
    from uniemo.models.weights import build_understanding
    from uniemo.training.task import Stage2Task

    torch.manual_seed(0)
    if args.tiny:
        generator = Generator.build_random("tiny", image_size=64, seed=0, train_unet=args.train_unet)
    else:
        generator = sd15_generator(args.train_unet)
    understanding = build_understanding(cfg.model.understanding, NUM_SCENES, NUM_OBJECTS)
    conditioner = Conditioner(cfg.model.conditioner, in_dim=understanding.width, out_dim=generator.token_dim)
    names = [f"attribute {i}" for i in range(NUM_ATTRIBUTES)]
    with torch.no_grad():
        attribute_embeddings = generator.embed_names(names)
    phi = torch.softmax(torch.randn(NUM_ATTRIBUTES, 8), dim=1)
    return Stage2Task(understanding, generator, conditioner, attribute_embeddings, phi, cfg.training.losses)


def random_batch(cfg, batch_size: int, device: torch.device) -> dict:
    """A batch of the data/FORMAT.md contract (stage 2), random content."""
    s, g = cfg.data.image_size, cfg.data.generator_image_size
    objects = (torch.rand(batch_size, NUM_OBJECTS, device=device) < 0.01).float()
    return {
        "image": torch.randn(batch_size, 3, s, s, device=device),
        "pixel_values": torch.rand(batch_size, 3, g, g, device=device) * 2 - 1,
        "label": torch.randint(0, 8, (batch_size,), device=device),
        "scene_idx": torch.randint(-1, NUM_SCENES, (batch_size,), device=device),
        "object_idx": torch.randint(-1, NUM_OBJECTS, (batch_size,), device=device),
        "objects_multi_hot": objects,
    }


class DeepSpeedStep:
    """The trainer's engine (build_engine) on a one-process group."""

    name = "deepspeed"

    def __init__(self, task, cfg, device: torch.device, total_steps: int) -> None:
        from uniemo.training.engine import build_engine

        self.engine = build_engine(task, cfg, world_size=1, device=device, total_steps=total_steps)
        self.engine.set_train(True)

    def forward_backward(self, batch: dict) -> torch.Tensor:
        batch = self.engine.prepare_batch(batch)
        out = self.engine.ds_engine(batch)
        self.engine.ds_engine.backward(out["total"])
        return out["total"]

    def update(self) -> None:
        self.engine.ds_engine.step()


class TorchStep:
    """A plain loop: fp32 weights, autocast (bf16 on CUDA), AdamW over the same groups, clipping."""

    name = "torch"

    def __init__(self, task, cfg, device: torch.device, total_steps: int) -> None:
        from uniemo.training.task import build_param_groups

        self.task = task.to(device)
        self.task.train()
        self.cfg = cfg
        self.device = device
        groups = build_param_groups(task, cfg.training)
        self.params = [p for g in groups for p in g["params"]]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=fused)
        self.autocast = cfg.training.precision == "bf16"

    def forward_backward(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.task(batch)
        out["total"].backward()
        return out["total"]

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step, batch: dict) -> int:
    """FLOPs of one forward + backward (FlopCounterMode); the update is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.forward_backward(batch)
    step.update()
    return int(counter.get_total_flops())


def timed_steps(step, batch: dict, warmup: int, steps: int, device: torch.device) -> dict:
    """``warmup`` untimed steps, then ``steps`` timed ones: seconds per step and peak GPU memory of the timed ones."""
    for _ in range(warmup):
        step.forward_backward(batch)
        step.update()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step.forward_backward(batch)
        step.update()
    sync(device)
    seconds = time.perf_counter() - start
    if loss is not None and not torch.isfinite(loss.detach().float()).item():
        raise RuntimeError(f"non-finite loss {float(loss)}")
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"step_s": seconds / steps, "peak_mem": peak_mem}


def measure(step, cfg, batch_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    batch = random_batch(cfg, batch_size, device)
    flops = count_flops(step, batch)
    timed = timed_steps(step, batch, args.warmup, args.steps, device)
    return {**timed, "samples_per_s": batch_size / timed["step_s"], "flops": flops}


def cuda_or_say(script: str) -> bool:
    """Whether CUDA is there; else one line on stderr saying what to do (the caller exits with status 2)."""
    if torch.cuda.is_available():
        return True
    print(f"{script}: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or pass --tiny "
          "to check the code path on the CPU", file=sys.stderr)
    return False


def init_group(device: torch.device) -> None:
    """A one-process group (DeepSpeed needs one): NCCL on a GPU, gloo on the CPU."""
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="", help="comma list (default 1,2,4,8; --tiny: 2,4)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per batch size (default 10; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps first (default 3; --tiny: 1)")
    parser.add_argument("--engines", default="deepspeed,torch", help="comma list of deepspeed, torch")
    parser.add_argument("--precision", default="", choices=("", "bf16", "fp32"), help="default bf16 (--tiny: fp32)")
    parser.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage of the deepspeed engine (1 GPU)")
    parser.add_argument("--train-unet", action="store_true", help="fine-tune the UNet too (METHOD D8)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the card's peak bf16 TFLOP/s")
    parser.add_argument("--tiny", action="store_true", help="tiny presets, fp32, on the CPU: a code-path check")
    args = parser.parse_args()
    if not args.tiny and not cuda_or_say("gpu_joint_step"):
        return 2
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2,4" if args.tiny else "1,2,4,8")).split(",")]
    args.steps = args.steps or (2 if args.tiny else 10)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    args.warmup = args.warmup if args.warmup >= 0 else (1 if args.tiny else 3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
        peak, peak_entry = peak_tflops(card)
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        card, peak, peak_entry = f"CPU ({platform.processor() or platform.machine()})", None, "n/a"
    if args.peak_tflops > 0:
        peak, peak_entry = args.peak_tflops, "--peak-tflops"
    init_group(device)

    rows = []
    for engine_name in args.engines.split(","):
        cfg = build_config(args, batch_sizes[0])
        start = time.perf_counter()
        try:
            task = build_task(cfg, args)
            trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
            total = sum(p.numel() for p in task.parameters())
            maker = {"deepspeed": DeepSpeedStep, "torch": TorchStep}[engine_name]
            step = maker(task, cfg, device, total_steps=10_000)
        except Exception as exc:  # noqa: BLE001 - report the engine as failed, try the next one
            traceback.print_exc()
            rows.append((engine_name, "-", f"build failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            continue
        build_s = time.perf_counter() - start
        print(f"{engine_name}: built in {build_s:.0f} s; {total / 1e6:.0f} M parameters, "
              f"{trainable / 1e6:.1f} M trainable", file=sys.stderr)
        for b in batch_sizes:
            try:
                rows.append((engine_name, b, measure(step, cfg, b, args, device)))
            except torch.cuda.OutOfMemoryError:
                rows.append((engine_name, b, "out of memory"))
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - keep the other rows
                traceback.print_exc()
                rows.append((engine_name, b, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
        del step, task
        if device.type == "cuda":
            torch.cuda.empty_cache()

    import deepspeed

    sizes = "tiny presets (CPU check)" if args.tiny else "SD-1.5 UNet/VAE/text encoder + CLIP ViT-L/14, random init"
    print(
        f"machine: {card}; peak bf16 {f'{peak:.1f} TFLOP/s ({peak_entry})' if peak else 'n/a'}; torch "
        f"{torch.__version__}, deepspeed {deepspeed.__version__}, python {platform.python_version()}"
    )
    print(
        f"task: stage-2 joint step, {sizes}; {cfg.data.image_size} px understanding, {cfg.data.generator_image_size} "
        f"px generator; {args.precision}; UNet {'trained' if args.train_unet else 'frozen'}; "
        f"ZeRO-{args.zero_stage} (deepspeed engine); {args.warmup} warm-up + {args.steps} timed steps\n"
    )
    print("| engine | batch | s/step | samples/s | GFLOP/sample (fwd+bwd) | achieved TFLOP/s | MFU | peak GPU mem GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for engine_name, b, r in rows:
        if isinstance(r, str):
            print(f"| {engine_name} | {b} | {r} | | | | | |")
            continue
        achieved = r["flops"] / r["step_s"] / 1e12
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "n/a"
        per_sample = r["flops"] / (b * 1e9)
        mem = f"{r['peak_mem'] / 2**30:.1f}" if r["peak_mem"] else "-"
        print(f"| {engine_name} | {b} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {per_sample:.1f} "
              f"| {achieved:.2f} | {mfu} | {mem} |")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    failed = any(isinstance(r, str) and r != "out of memory" for _, _, r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
