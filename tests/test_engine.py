"""Fast tests of the training spine without Ray: the DeepSpeed config derivation, batch arithmetic, schedules,
checkpoint publication/rotation (a crash mid-save never becomes ``latest``), RNG states, resume compatibility,
the environment reader, metrics truncation, and one real single-process DeepSpeed engine at ZeRO-3 that keeps the
frozen sub-models out of partitioning.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from _child import run_gloo_child  # tests/_child.py

from uniemo.config import load_config
from uniemo.config.schema import Config
from uniemo.errors import ConfigError, UserError
from uniemo.training import checkpoint as ckpt
from uniemo.training.engine import (
    FrozenParts,
    check_batch_arithmetic,
    deepspeed_config,
    lr_factor,
    warmup_steps,
)


def _cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


# -- DeepSpeed config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_typed_config(zero):
    cfg = _cfg(f"distributed.zero_stage={zero}", "data.batch_size=4", "training.gradient_accumulation=3",
               "training.grad_clip=0.5")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == zero
    assert ds["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in ds and "scheduler" not in ds  # client AdamW + LambdaLR, never a DeepSpeed Adam
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "data_types" not in ds


def test_zero_buckets_are_capped_at_the_trainable_size():
    zero3 = deepspeed_config(_cfg("distributed.zero_stage=3"), world_size=2, trainable_params=1234)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == 1234 and zero3["stage3_prefetch_bucket_size"] == 1234
    zero2 = deepspeed_config(_cfg("distributed.zero_stage=2"), world_size=2, trainable_params=10**10)["zero_optimization"]
    assert zero2["reduce_bucket_size"] == 500_000_000 and "stage3_prefetch_bucket_size" not in zero2
    assert "reduce_bucket_size" not in deepspeed_config(_cfg("distributed.zero_stage=1"), 2, 1234)["zero_optimization"]
    assert "reduce_bucket_size" not in deepspeed_config(_cfg("distributed.zero_stage=3"), 2)["zero_optimization"]


def test_precision_maps_to_deepspeed_sections():
    bf16 = deepspeed_config(_cfg("training.precision=bf16"), world_size=1)
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    assert bf16["data_types"] == {"buffer_dtype": "bf16"}
    fp16 = deepspeed_config(_cfg("training.precision=fp16"), world_size=1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scale
    assert fp16["data_types"] == {"buffer_dtype": "fp16"}


def test_batch_arithmetic_mismatch_names_every_key():
    cfg = _cfg("data.batch_size=8", "training.gradient_accumulation=2", "training.global_batch_size=48")
    with pytest.raises(ConfigError) as err:
        check_batch_arithmetic(cfg, world_size=2)
    message = str(err.value)
    for key in ("training.global_batch_size", "data.batch_size", "training.gradient_accumulation",
                "distributed.num_workers"):
        assert key in message
    assert "\n" not in message
    assert "training.gradient_accumulation=3" in message  # the fix, since 48 = 8 x 3 x 2
    assert check_batch_arithmetic(_cfg("data.batch_size=8", "training.global_batch_size=32"), 4) == 32
    with pytest.raises(ConfigError):
        deepspeed_config(cfg, world_size=2)  # the one place that writes a DeepSpeed config checks it too


def test_cosine_schedule_with_warmup():
    cfg = _cfg("training.warmup_steps=4", "training.min_lr_ratio=0.1")
    f = lr_factor(cfg.training, total_steps=20)
    assert [round(f(s), 4) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(20) == pytest.approx(0.1) and f(25) == pytest.approx(0.1)
    assert warmup_steps(_cfg().training, 200) == 10  # default: 5 % of the run


def test_cyclic_cosine_is_the_official_closed_form():
    cfg = _cfg("training.lr_schedule=cyclic_cosine")
    f = lr_factor(cfg.training, total_steps=1000)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), T_max=32
    )
    for step in range(130):
        assert f(step) == pytest.approx(reference.get_last_lr()[0], abs=1e-9)
        reference.optimizer.step()
        reference.step()
    assert f(32) == pytest.approx(0.0) and f(64) == pytest.approx(1.0)  # METHOD §2.5: back every 64 steps


def test_steps_from_epochs():
    from uniemo.training.trainer import total_steps_for

    assert total_steps_for(_cfg("training.steps=7"), batches_per_epoch=9) == 7
    assert total_steps_for(_cfg("training.epochs=2"), batches_per_epoch=9) == 18
    assert total_steps_for(_cfg("training.epochs=2", "training.gradient_accumulation=4"), 9) == 5  # ceil(18/4)


def test_constant_schedule():
    f = lr_factor(_cfg("training.lr_schedule=constant", "training.warmup_steps=0").training, total_steps=10)
    assert [f(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]


# -- checkpoints: publication, rotation, crash mid-save --------------------------------------------------------------


def _fake_step(run_dir, step, complete=True):
    folder = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(step)
    (folder / ckpt.DS_TAG).mkdir(parents=True)
    (folder / ckpt.TRAINER_STATE_FILE).write_text(json.dumps({"version": ckpt.STATE_VERSION, "step": step}))
    if complete:
        ckpt.publish(run_dir, folder)
    return folder


def test_latest_only_moves_to_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert ckpt.latest_checkpoint(run) is None
    first = _fake_step(run, 4)
    assert ckpt.latest_checkpoint(run) == first
    # A crash in the middle of saving step 8: the folder exists, some shards written, no COMPLETE.
    crashed = _fake_step(run, 8, complete=False)
    assert ckpt.latest_checkpoint(run) == first
    assert (ckpt.checkpoints_dir(run) / ckpt.LATEST_FILE).read_text().strip() == "step-000004"
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve_checkpoint(crashed)  # not usable as a step folder either
    assert ckpt.resolve_checkpoint(run) == first
    # The next complete save (12) publishes and its rotation removes the older incomplete folder.
    third = _fake_step(run, 12)
    ckpt.rotate(run, keep=3)
    assert ckpt.latest_checkpoint(run) == third
    assert not crashed.exists() and first.exists()
    # No temporary files are left next to `latest`.
    assert sorted(p.name for p in ckpt.checkpoints_dir(run).iterdir()) == ["latest", "step-000004", "step-000012"]


def test_rotation_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        _fake_step(run, step)
    deleted = ckpt.rotate(run, keep=2)
    assert sorted(p.name for p in deleted) == ["step-000002", "step-000004"]
    assert ckpt.latest_checkpoint(run).name == "step-000008"
    assert ckpt.rotate(run, keep=1)[0].name == "step-000006"
    assert ckpt.latest_checkpoint(run).name == "step-000008"


def test_latest_naming_a_broken_folder_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    folder = _fake_step(run, 4)
    (folder / ckpt.COMPLETE_FILE).unlink()  # e.g. the folder was damaged by hand
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint folder"):
        ckpt.latest_checkpoint(run)


def test_rng_state_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = tmp_path / "rng.pt"
    torch.save(ckpt.rng_state(), path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_incompatible_resume_is_one_line():
    saved = ckpt.compat_keys(_cfg(), world_size=2)
    assert ckpt.compat_keys(_cfg("model.generator.sampling_steps=3"), 2) == saved  # inference-only: allowed
    for override, key in (
        ("training.stage=2", "training.stage"),
        ("model.understanding.preset=small", "model.understanding.preset"),
        ("distributed.zero_stage=3", "distributed.zero_stage"),
        ("training.precision=bf16", "training.precision"),
    ):
        with pytest.raises(UserError) as err:
            ckpt.check_compatible(saved, ckpt.compat_keys(_cfg(override), 2), ckpt.Path("ck"))
        assert key in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="distributed.num_workers"):
        ckpt.check_compatible(saved, ckpt.compat_keys(_cfg(), 4), ckpt.Path("ck"))


def test_a_model_key_newer_than_the_checkpoint_resumes_only_at_its_default():
    saved = ckpt.compat_keys(_cfg("training.stage=2"), world_size=2)
    del saved["model.conditioner.attribute_space"]  # a checkpoint written before the key existed
    ckpt.check_compatible(saved, ckpt.compat_keys(_cfg("training.stage=2"), 2), ckpt.Path("ck"))  # the old way
    newer = _cfg("training.stage=2", "model.conditioner.attribute_space=clip_text")
    with pytest.raises(UserError, match="model.conditioner.attribute_space"):
        ckpt.check_compatible(saved, ckpt.compat_keys(newer, 2), ckpt.Path("ck"))


def test_driver_refuses_fresh_run_over_checkpoints_and_bad_resume(tmp_path, synth_shards):
    from uniemo.training.driver import prepare_run

    cfg = _cfg(f"run.output_dir={tmp_path}", "run.name=r", f"data.shards={synth_shards}",
               "logging.wandb.mode=disabled")
    with pytest.raises(UserError, match="no checkpoint yet"):
        prepare_run(cfg, resume=True)
    folder = _fake_step(tmp_path / "r", 4)
    state = json.loads((folder / ckpt.TRAINER_STATE_FILE).read_text())
    state["compat"] = ckpt.compat_keys(cfg, 2)
    (folder / ckpt.TRAINER_STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(UserError, match="--resume"):
        prepare_run(cfg, resume=False)
    plan = prepare_run(cfg, resume=True)
    assert plan.resume_from == folder and (plan.run_dir / "config.yaml").is_file()
    changed = _cfg(f"run.output_dir={tmp_path}", "run.name=r", f"data.shards={synth_shards}",
                   "distributed.num_workers=4", "data.batch_size=4")
    with pytest.raises(UserError, match="distributed.num_workers was 2 there and is 4"):
        prepare_run(changed, resume=True)


def test_the_data_source_is_resolved_once_per_driver(tmp_path, synth_shards, monkeypatch):
    """``prepare_run`` checks the data in several places (the batch per rank, every split a run reads), and each
    reads the same shard folder: it is resolved (checked shard by shard, or mirrored from a URL) once."""
    from uniemo.data import source
    from uniemo.training.driver import prepare_run

    calls = []
    resolve = source.ensure_synthetic_shards
    monkeypatch.setattr(source, "_RESOLVED", {})
    monkeypatch.setattr(source, "ensure_synthetic_shards",
                        lambda data_cfg, progress=False: calls.append(data_cfg.shards) or resolve(data_cfg, progress))
    prepare_run(_cfg(f"run.output_dir={tmp_path}", "run.name=once", f"data.shards={synth_shards}",
                     "training.eval_every=5", "logging.wandb.mode=disabled"))
    assert calls == [str(synth_shards)]


def test_stage2_without_stage1_run_names_the_fix(tmp_path, synth_shards):
    from uniemo.training.driver import prepare_run

    cfg = _cfg(f"run.output_dir={tmp_path}", "run.name=s2", "training.stage=2", f"data.shards={synth_shards}")
    with pytest.raises(UserError, match="training.init_from"):
        prepare_run(cfg)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    from uniemo.config.paths import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(_cfg("data.cache_dir=.cache/x", "run.output_dir=runs"))
    assert cfg.data.cache_dir == str(tmp_path / ".cache/x") and cfg.run.output_dir == str(tmp_path / "runs")
    assert cfg.data.shards == ""  # empty stays empty (the synthetic set)


# -- environment, logging ---------------------------------------------------------------------------------------------


def test_env_reader_sources(monkeypatch):
    from uniemo.distributed.env import read_env

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    single = read_env()
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single") and single.is_main
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    monkeypatch.setenv("SLURM_NODEID", "1")
    slurm = read_env()
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size, slurm.node_rank) == (5, 8, 1, 4, 1)
    assert slurm.launcher == "slurm" and not slurm.is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    torchrun = read_env()  # torchrun variables win over SLURM's
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 4, 1, "torchrun")


def test_metrics_truncation_keeps_one_line_per_step(tmp_path):
    from uniemo.logging import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 9)] + ['{"step": 9, "lo']  # cut by a crash
    path.write_text("\n".join(lines) + "\n")
    assert truncate_metrics(path, 5) == 5
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]


def test_null_logger_has_the_run_logger_interface():
    from uniemo.logging import NullRunLogger, RunLogger

    public = {n for n in dir(RunLogger) if not n.startswith("_")}
    assert public <= {n for n in dir(NullRunLogger) if not n.startswith("_")}


def test_run_logger_writes_metrics_and_offline_wandb(tmp_path):
    from uniemo.logging import RunLogger, read_metrics

    cfg = _cfg("logging.wandb.mode=offline", "run.name=logtest")
    logger = RunLogger(cfg, tmp_path, resume_step=0)
    logger.log(1, {"loss": 2.0, "val/accuracy": 0.5})
    logger.log(2, {"loss": float("nan")})
    grids = logger.log_images(2, {"awe": np.zeros((2, 8, 8, 3), np.uint8)})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path)[1]["loss"] == "nan"
    assert (tmp_path / "samples" / "awe.png") in grids
    assert any(p.name.startswith("offline-run-") for p in (tmp_path / "wandb").iterdir())
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert run_id and run_id not in json.dumps(dict(os.environ))  # nothing of the environment is involved


# -- a real engine, one process ---------------------------------------------------------------------------------------

_ZERO3_CHILD = r"""
from uniemo.config import load_config
from uniemo.data.attributes import AttributeTable
from uniemo.data.loader import build_loader
from uniemo.data.transforms import build_sample_transform
from uniemo.training.engine import build_engine
from uniemo.training.task import build_stage2_task

shards = sys.argv[1]
cfg = load_config(None, ["data.image_size=32", "data.generator_image_size=32", "model.understanding.image_size=32",
                         "data.batch_size=4", "training.stage=2", "distributed.zero_stage=3",
                         "distributed.num_workers=1"])
torch.manual_seed(0)
task = build_stage2_task(cfg, AttributeTable.load(os.path.join(shards, "attributes.json")))
trainable = {n for n, p in task.named_parameters() if p.requires_grad}
frozen_names = {n for n, p in task.named_parameters() if not p.requires_grad}
engine = build_engine(task, cfg, world_size=1, device=torch.device("cpu"), total_steps=2)
# Everything frozen left the wrapped module; everything trainable stayed and is ZeRO-3 partitioned.
assert {n for n, _ in engine.task.named_parameters()} == trainable
assert {n for n, _ in engine.frozen.named_parameters()} == frozen_names
assert all(hasattr(p, "ds_id") for p in engine.task.parameters())
assert not any(hasattr(p, "ds_id") for _, p in engine.frozen.named_parameters())
assert "generator" in engine.frozen.names and "understanding.encoder" in engine.frozen.names
assert task.generator.vae.encoder.conv_in.weight.numel() > 0  # plain tensors, never partitioned
# Modes: frozen parts stay in eval, the stage-2 emotion head follows the task (dropout on, METHOD 3.1).
engine.set_train(True)
assert not task.generator.vae.training and task.understanding.emotion_head.training
loader = build_loader(shards, "train", rank=0, world_size=1, batch_size=4, num_workers=0,
                      transform=build_sample_transform(cfg.data, stage=2, training=True), training=True, seed=0)
batch = engine.prepare_batch(next(iter(loader)))
out = engine.ds_engine(batch)
engine.ds_engine.backward(out["total"])
engine.ds_engine.step()
assert math.isfinite(float(out["total"]))
engine.frozen.reattach()
assert {n for n, _ in task.named_parameters()} == trainable | frozen_names
print("CHILD-OK", flush=True)
"""


def test_zero3_keeps_frozen_submodels_out_of_partitioning(synth_shards):
    proc = run_gloo_child(_ZERO3_CHILD, str(synth_shards))  # tests/_child.py: a one-rank gloo group in a child
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _tiny_cfg(*overrides: str) -> Config:
    return _cfg("data.image_size=32", "data.generator_image_size=32", "model.understanding.image_size=32",
                "data.batch_size=4", *overrides)


def test_trained_unet_stays_in_the_engine_module(synth_shards):
    from uniemo.data.attributes import AttributeTable
    from uniemo.training.task import build_stage2_task

    cfg = _tiny_cfg("training.stage=2", "model.generator.train_unet=true")
    task = build_stage2_task(cfg, AttributeTable.load(synth_shards / "attributes.json"))
    frozen = FrozenParts.detach(task)
    assert {"generator.vae", "generator.text_encoder"} <= set(frozen.names)
    assert not any(n.startswith("generator.unet") for n in frozen.names)
    assert any(n.startswith("generator.unet.") for n, _ in task.named_parameters())


def test_frozen_parts_detach_and_reattach_restore_the_tree():
    from torch import nn

    class Task(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen_block = nn.Linear(2, 2).requires_grad_(False)
            self.head = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)

        def frozen_modules(self):
            return ["frozen_block"]

        def forward(self, x):
            return self.head(self.frozen_block(x)) * self.scale

    task = Task()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    frozen = FrozenParts.detach(task)
    assert [n for n, _ in task.named_parameters()] == ["head.weight", "head.bias"]
    assert sorted(frozen.names) == ["frozen_block", "scale"]
    task(torch.ones(1, 2))  # attribute access still works
    frozen.to(torch.device("cpu"), torch.bfloat16)
    assert task.frozen_block.weight.dtype == torch.bfloat16 and task.scale.dtype == torch.bfloat16
    frozen.to(torch.device("cpu"), torch.float32)
    frozen.reattach()
    assert list(task.state_dict()) == list(before)
