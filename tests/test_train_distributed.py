"""Distributed training for real: Ray Train with 2 workers, DeepSpeed on gloo, tiny presets, the session's shards.

One Ray cluster serves the whole module (``ray_cluster`` of conftest.py; the driver uses a cluster it finds
initialised). One straight stage-1 run (ZeRO-2, 16 steps over an epoch boundary) is the
reference the other runs are compared with:

- its layout, metrics, validation over the whole split, and DeepSpeed's own ``zero_to_fp32`` on its checkpoint;
- resume equivalence: 8 steps, stop, ``--resume`` to 16 gives the same parameters and loss trajectory;
- a worker killed by pid mid-run: Ray Train restarts the group, the run resumes from ``latest`` and ends at
  exactly step 16 with the reference's losses;
- stage 2 at ZeRO-2 from that run (emotion space, sample grids, offline wandb), and stage 2 at ZeRO-3 in bf16.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from uniemo.config import load_config
from uniemo.logging import read_metrics
from uniemo.training.checkpoint import latest_checkpoint, read_trainer_state

pytestmark = pytest.mark.slow

STEPS = 16
STAGE1 = [
    "training.stage=1",
    f"training.steps={STEPS}",
    "training.checkpoint_every=4",
    "training.keep_checkpoints=2",
    "training.eval_every=8",
    "distributed.max_failures=1",
]


@pytest.fixture(scope="module")
def base(synth_shards, tmp_path_factory) -> list[str]:
    runs = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    return [
        f"run.output_dir={runs}",
        f"data.shards={synth_shards}",
        f"data.cache_dir={cache}",
        "data.image_size=32",
        "data.generator_image_size=32",
        "model.understanding.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "model.generator.sampling_steps=2",
        "distributed.num_workers=2",
        "distributed.zero_stage=2",
        "logging.every=1",
        "logging.wandb.mode=disabled",
    ]


def _train(base: list[str], name: str, *extra: str, resume: bool = False) -> dict:
    from uniemo.training.driver import run_training

    cfg = load_config(None, [*base, f"run.name={name}", *extra])
    started = time.perf_counter()
    summary = run_training(cfg, resume=resume)
    summary["wall_s"] = time.perf_counter() - started
    print(f"\n[{name}] {summary['wall_s']:.1f} s", file=sys.stderr)
    return summary


def _fp32(step_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir))


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def stage1_run(ray_cluster, base) -> Path:
    """The straight reference run: stage 1, ZeRO-2, 16 steps."""
    return Path(_train(base, "s1", *STAGE1)["run_dir"])


def test_stage1_zero2_run_layout(stage1_run, synth_shards):
    run = stage1_run
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one line per step
    assert all(r["samples_per_s"] > 0 and "loss/understanding/emotion" in r for r in records)
    assert records[-1]["samples"] == STEPS * 16 * 2
    assert records[-1]["epoch"] == 1  # 296 train samples / (2 x 16) = 9 batches per epoch: crossed once
    assert "lr/queries" in records[0] and records[0]["lr/queries"] > 0
    val = [r for r in records if "val/accuracy" in r]
    assert [r["step"] for r in val] == [8, 16]
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    val_samples = sum(s["samples"] for s in manifest["shards"] if s["split"] == "val")
    assert all(r["val/samples"] == val_samples for r in val)  # the whole split, each sample once over 2 ranks
    assert 0.0 <= val[-1]["val/accuracy"] <= 1.0
    # Checkpoints: the last two kept, `latest` names the newest, each complete with every rank's parts.
    step_dirs = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert step_dirs == ["step-000012", "step-000016"]
    latest = latest_checkpoint(run)
    assert latest.name == "step-000016" and (latest / "COMPLETE").is_file()
    state = read_trainer_state(latest)
    assert state["step"] == STEPS and state["world_size"] == 2 and state["stage"] == 1
    assert [p["rank"] for p in state["loader_positions"]] == [0, 1]
    assert state["compat"]["distributed.zero_stage"] == 2
    for rank in (0, 1):
        rng = torch.load(latest / "rng" / f"rank-{rank:05d}.pt", weights_only=True)
        assert set(rng) >= {"torch", "python", "numpy"}
    assert (run / "config.yaml").is_file() and (run / "workers" / "rank-1.pid").is_file()
    assert not (run / "wandb").exists()  # logging.wandb.mode=disabled


def test_deepspeed_zero_to_fp32_reads_the_checkpoint(stage1_run, tmp_path):
    step_dir = latest_checkpoint(stage1_run)
    state = _fp32(step_dir)
    assert state and all(k.startswith("understanding.") for k in state)
    assert "understanding.scene_queries.weight" in state
    assert "understanding.logit_scale_scene" not in state  # frozen: excluded from checkpoints
    # DeepSpeed's script, as a user would run it on the folder.
    out = tmp_path / "fp32"
    subprocess.run([sys.executable, str(step_dir / "zero_to_fp32.py"), str(step_dir), str(out)],
                   check=True, capture_output=True, timeout=300)
    files = list(out.iterdir())
    assert files and any(f.suffix in (".safetensors", ".bin") for f in files)


def test_resume_is_equivalent_to_a_straight_run(stage1_run, base):
    # Saved in the background (training.async_checkpoint): published on both ranks' "written" (a collective each
    # step), the same checkpoints and the same resumed run as the synchronous reference's.
    half = _train(base, "r", *STAGE1, f"training.stop_at_step={STEPS // 2}", "training.async_checkpoint=true")
    run = Path(half["run_dir"])
    assert half["step"] == STEPS // 2 and latest_checkpoint(run).name == "step-000008"
    full = _train(base, "r", *STAGE1, "training.async_checkpoint=true", resume=True)
    assert full["step"] == STEPS and full["resumed_from"].endswith("step-000008")
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert _losses(run) == pytest.approx(_losses(stage1_run), rel=1e-6, abs=1e-7)
    mine, reference = _fp32(latest_checkpoint(run)), _fp32(latest_checkpoint(stage1_run))
    assert mine.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-6, atol=1e-7)


def _kill_rank_mid_run(run_dir: Path, rank: int, final: str, timeout: float = 300.0) -> tuple[threading.Thread, dict]:
    """Kill ``rank``'s worker process (SIGKILL, by its pid file) as soon as a checkpoint before ``final`` is out."""
    result: dict = {}

    def watch() -> None:
        latest = run_dir / "checkpoints" / "latest"
        pid_file = run_dir / "workers" / f"rank-{rank}.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                name = latest.read_text().strip()
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            if name and name != final:
                os.kill(pid, signal.SIGKILL)
                result.update(pid=pid, after=name)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, result


def test_killed_worker_restarts_from_latest(stage1_run, base):
    from uniemo.run_layout import run_dir_of

    run = run_dir_of(load_config(None, [*base, "run.name=k"]))
    thread, killed = _kill_rank_mid_run(run, rank=1, final=f"step-{STEPS:06d}")
    summary = _train(base, "k", *STAGE1)
    thread.join(timeout=5)
    assert killed, "the run ended before a worker could be killed"
    assert summary["step"] == STEPS
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # really dead
    assert int((run / "workers" / "rank-1.pid").read_text()) != killed["pid"]  # a new worker group ran
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # exact final step, no step twice
    assert _losses(run) == pytest.approx(_losses(stage1_run), rel=1e-5, abs=1e-6)
    print(f"\n[k] killed rank 1 (pid {killed['pid']}) after {killed['after']}", file=sys.stderr)


def _trainable_only(state: dict[str, torch.Tensor]) -> None:
    assert state
    assert not any(k.startswith("generator.vae") or k.startswith("generator.text_encoder") for k in state)
    assert not any(k.startswith("understanding.encoder.") for k in state)  # the frozen backbone (METHOD §3.1)
    assert any(k.startswith("conditioner.mapper_emotion.") for k in state)
    assert "understanding.scene_queries.weight" in state


def test_stage2_zero2_from_the_stage1_run(stage1_run, base):
    from uniemo.models.emotion_space import EmotionSpace

    summary = _train(
        base, "j2", "training.stage=2", "training.steps=3", "training.eval_every=3", "training.checkpoint_every=0",
        f"training.init_from={stage1_run}", "logging.sample_images=1", "logging.wandb.mode=offline",
    )
    run = Path(summary["run_dir"])
    assert summary["step"] == 3 and summary["init_from"] == str(latest_checkpoint(stage1_run))
    from uniemo.training.run_weights import recorded_init

    assert recorded_init(latest_checkpoint(run)) == latest_checkpoint(stage1_run)  # the frozen parts come from it
    assert not Path(read_trainer_state(latest_checkpoint(run))["init_from"]).is_absolute()  # runs are movable
    assert (run / "initial_weights.safetensors").is_file()  # what no checkpoint holds: saved, not replayed
    records = read_metrics(run)
    assert {"loss/diffusion", "loss/condition/total", "loss/understanding/total"} <= set(records[-1])
    assert "val/loss/diffusion" in records[-1]
    space = EmotionSpace.load(run / "emotion_space.safetensors")
    assert int(space.counts().sum()) == 296  # every train image once, summed over both ranks (D9)
    assert sorted(p.name for p in (run / "samples").glob("*.png"))[:2] == ["amusement.png", "anger.png"]
    assert any(p.name.startswith("offline-run-") for p in (run / "wandb").iterdir())
    _trainable_only(_fp32(latest_checkpoint(run)))


def test_stage2_zero3_bf16(stage1_run, base):
    summary = _train(
        base, "j3", "training.stage=2", "training.steps=2", "training.eval_every=2", "training.checkpoint_every=0",
        f"training.init_from={stage1_run}", "distributed.zero_stage=3", "training.precision=bf16",
        "logging.sample_images=0",
    )
    run = Path(summary["run_dir"])
    assert summary["step"] == 2 and (run / "emotion_space.safetensors").is_file()
    records = read_metrics(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records) and "val/accuracy" in records[-1]
    ds_files = sorted(p.name for p in (latest_checkpoint(run) / "ds").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in ds_files  # partitioned: one model-states file per rank
    _trainable_only(_fp32(latest_checkpoint(run)))


def test_sigterm_checkpoints_at_the_next_step_and_resume_finishes(ray_cluster, base):
    """Preemption: SIGTERM to the driver makes every rank checkpoint at the next step and stop (no step lost);
    ``--resume`` then finishes with the exact step count and one metrics line per step."""
    from uniemo.run_layout import stop_request_path
    from uniemo.training.checkpoint import step_of

    name = "sigterm"
    output_dir = next(b.split("=", 1)[1] for b in base if b.startswith("run.output_dir="))
    run_dir = Path(output_dir) / name
    # Checkpoints only at the end: the one a stop leaves behind can only come from the stop request.
    extra = (*STAGE1, "training.checkpoint_every=0", "training.eval_every=0")

    def send_sigterm_after_step_3() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            if records and records[-1]["step"] >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    threading.Thread(target=send_sigterm_after_step_3, daemon=True).start()
    stopped = _train(base, name, *extra)
    assert stopped["stopped"] is True
    step = step_of(latest_checkpoint(run_dir))
    assert 3 <= step < STEPS
    assert read_metrics(run_dir)[-1]["step"] == step
    assert not stop_request_path(run_dir).exists()

    finished = _train(base, name, *extra, resume=True)
    assert finished["stopped"] is False
    assert step_of(latest_checkpoint(run_dir)) == STEPS
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))


GENERATOR = [
    "training.stage=generator",
    "model.generator.preset=cpu",
    "training.steps=4",
    "training.generator.vae_steps=2",
    "training.checkpoint_every=2",
    "training.eval_every=2",
    "logging.sample_images=0",
]


def test_generator_pretraining_resumes_exactly_and_stage2_loads_it(stage1_run, base):
    """METHOD D15: pretrain VAE then UNet + text encoder through the real command; a stop at the phase boundary
    and --resume give the straight run's weights; stage 2 takes the exported folder through model.generator.path."""
    from uniemo.models.generator import Generator

    straight = Path(_train(base, "g-straight", *GENERATOR)["run_dir"])
    records = read_metrics(straight)
    assert [r["phase"] for r in records] == [0.0, 0.0, 1.0, 1.0]
    assert records[0]["lr/generator_unet"] == 0.0 and records[0]["lr/generator_vae"] > 0  # one part per phase
    assert records[-1]["lr/generator_vae"] == 0.0 and records[-1]["lr/generator_text"] > 0
    assert records[-1]["loss/diffusion"] > 0 and records[1]["loss/vae/reconstruction"] > 0
    assert "val/loss/diffusion" in records[-1] and "val/accuracy" not in records[-1]

    _train(base, "g-resumed", *GENERATOR, "training.stop_at_step=2")
    resumed = Path(_train(base, "g-resumed", *GENERATOR, resume=True)["run_dir"])
    a, b = _fp32(latest_checkpoint(straight)), _fp32(latest_checkpoint(resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    scale = float(a["latent_scale"])
    assert scale > 0

    folder = straight / "generator"
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["steps"] == 4 and provenance["vae_steps"] == 2 and "code_version" in provenance
    generator = Generator.from_pretrained(folder)
    assert abs(generator.latent_scale - scale) < 1e-6
    assert generator.tokenize(["dark muted blue"])[0, 1:4].tolist() == [
        generator.tokenizer.convert_tokens_to_ids(w) for w in ("dark", "muted", "blue")
    ]
    summary = _train(
        base, "g-stage2", "training.stage=2", "training.steps=2", "training.eval_every=0",
        "training.checkpoint_every=0", f"training.init_from={stage1_run}", f"model.generator.path={folder}",
        "logging.sample_images=1",
    )
    assert summary["step"] == 2 and (Path(summary["run_dir"]) / "samples" / "awe.png").is_file()
