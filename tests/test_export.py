"""Checkpoint consolidation, ``uniemo export`` (safetensors + a diffusers pipeline), ``generate`` and ``classify``.

The runs are real DeepSpeed checkpoints in the trainer's layout (``runs/<name>/checkpoints/step-NNNNNN/ds``,
``latest``, ``config.yaml``), written without Ray by this file run as a script in a subprocess (so its gloo
process group does not leak into other tests): a stage-1 run at ZeRO 0 in bf16 (fp32 master copies in the
optimizer) and a stage-2 run at ZeRO 2 in fp32 that starts from it, one optimizer step each, both saved with
``exclude_frozen_parameters=True`` as the trainer does. Models are the ``tiny`` presets at 32 px over the session's
synthetic shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

STEP = "step-000001"


# ---------------------------------------------------------------------------------------------------------
# The subprocess: build both runs with DeepSpeed (run as `python tests/test_export.py SHARDS RUNS`)
# ---------------------------------------------------------------------------------------------------------
def _config(shards: str, stage: int, runs: Path):
    from uniemo.config.schema import Config

    cfg = Config()
    cfg.run.name = f"s{stage}"
    cfg.run.output_dir = str(runs)
    cfg.run.seed = 3
    cfg.data.shards = shards
    cfg.data.image_size = 32
    cfg.data.generator_image_size = 32
    cfg.data.batch_size = 4
    cfg.data.num_workers = 0
    cfg.model.understanding.image_size = 32
    cfg.model.generator.sampling_steps = 2
    cfg.training.stage = stage
    return cfg


def _train_one_step(task, cfg, batch, run_dir: Path, zero_stage: int, bf16: bool, init_from: str | None = None):
    import deepspeed

    from uniemo.config import save_resolved
    from uniemo.training.task import build_param_groups

    optimizer = torch.optim.AdamW(build_param_groups(task, cfg.training))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
    }
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    loss = engine(batch)["total"]
    engine.backward(loss)
    engine.step()
    step_dir = run_dir / "checkpoints" / STEP
    engine.save_checkpoint(str(step_dir), tag="ds", exclude_frozen_parameters=True)
    # The trainer's layout (uniemo.training.checkpoint): trainer_state.json, then COMPLETE, then `latest`.
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": 1, "version": 1, "init_from": init_from}))
    (step_dir / "COMPLETE").write_text("done\n")
    (run_dir / "checkpoints" / "latest").write_text(STEP + "\n")
    save_resolved(cfg, run_dir)
    return engine


def _build_runs(shards: str, runs: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    torch.set_num_threads(1)
    import torch.distributed as dist

    from uniemo.data.loader import build_loader_from_config, load_attribute_table
    from uniemo.models.weights import build_understanding
    from uniemo.training.checkpoint import consolidated_state_dict
    from uniemo.training.engine import prepare_deepspeed
    from uniemo.training.task import build_stage1_task, build_stage2_task

    prepare_deepspeed()  # the trainer's: no JIT shm op, 0-dim parameters broadcast (uniemo.training.engine)
    dist.init_process_group("gloo")

    # Stage 1, ZeRO 0, bf16: the engine keeps fp32 masters of the bf16 weights in its optimizer.
    cfg1 = _config(shards, 1, runs)
    attributes = load_attribute_table(cfg1.data)
    torch.manual_seed(cfg1.run.seed)
    task1 = build_stage1_task(cfg1, attributes, cache_dir=str(runs / "cache"))
    batch1 = next(iter(build_loader_from_config(cfg1.data, "train", stage=1, seed=0)))
    engine1 = _train_one_step(task1, cfg1, batch1, runs / "s1", zero_stage=0, bf16=True)
    names = {id(p): n for n, p in task1.named_parameters()}
    masters = {
        names[id(low)]: high.detach().clone()
        for low_group, high_group in zip(engine1.optimizer.fp16_groups, engine1.optimizer.fp32_groups, strict=True)
        for low, high in zip(low_group, high_group, strict=True)
    }
    torch.save(masters, runs / "s1_expected.pt")
    torch.save({n: p.detach().clone() for n, p in task1.named_parameters()}, runs / "s1_bf16.pt")

    # Stage 2, ZeRO 2, fp32, initialised from the stage-1 checkpoint as the trainer does.
    # As the trainer records it: training.init_from may be empty, trainer_state.json names the stage-1 folder.
    cfg2 = _config(shards, 2, runs)
    stage1_dir = runs / "s1" / "checkpoints" / STEP
    torch.manual_seed(cfg2.run.seed)
    fresh = build_understanding(cfg2.model.understanding, len(attributes.scenes), len(attributes.objects))
    stage1 = {k[len("understanding."):]: v for k, v in consolidated_state_dict(stage1_dir).items()}
    fresh.load_state_dict(stage1, strict=False)
    task2 = build_stage2_task(cfg2, attributes, understanding_state=fresh.state_dict())
    batch2 = next(iter(build_loader_from_config(cfg2.data, "train", stage=2, seed=0)))
    _train_one_step(task2, cfg2, batch2, runs / "s2", zero_stage=2, bf16=False, init_from=str(stage1_dir))
    torch.save({n: p.detach().clone() for n, p in task2.named_parameters()}, runs / "s2_params.pt")
    torch.save({n: p.requires_grad for n, p in task2.named_parameters()}, runs / "s2_trainable.pt")

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort at interpreter exit after all work is done (issue 4); nothing is left to run


if __name__ == "__main__":
    _build_runs(sys.argv[1], Path(sys.argv[2]))


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory) -> Path:
    """``runs/s1`` (stage 1, ZeRO 0 bf16) and ``runs/s2`` (stage 2, ZeRO 2) written by a DeepSpeed subprocess."""
    root = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, __file__, str(synth_shards), str(root)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def exported(runs) -> Path:
    from uniemo.inference.export import export_run

    return export_run(runs / "s2", runs / "export")


@pytest.fixture(scope="module")
def loaded_s2(runs, exported):
    from uniemo.inference.runs import load_run

    return load_run(runs / "s2")


# ---------------------------------------------------------------------------------------------------------
# Consolidation
# ---------------------------------------------------------------------------------------------------------
def test_consolidated_state_dict_equals_engine_weights(runs):
    from uniemo.training.checkpoint import consolidated_state_dict, require_checkpoint

    # ZeRO 2: exactly the trained parameters, equal to the engine's; frozen ones were not saved.
    step_dir = require_checkpoint(runs / "s2")
    assert step_dir == runs / "s2" / "checkpoints" / STEP
    state = consolidated_state_dict(step_dir)
    params = torch.load(runs / "s2_params.pt")
    trainable = {n for n, t in torch.load(runs / "s2_trainable.pt").items() if t}
    assert trainable and {k for k in state if k in params} == trainable
    for name in trainable:
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], params[name]), name
    assert not any(k.startswith(("understanding.encoder.", "generator.vae.")) for k in state)

    # ZeRO 0 in bf16: the fp32 master copies (not the bf16 module weights) under the right names.
    state1 = consolidated_state_dict(require_checkpoint(runs / "s1"))
    masters = torch.load(runs / "s1_expected.pt")
    low = torch.load(runs / "s1_bf16.pt")
    assert set(masters) <= set(state1) and len(masters) > 50
    for name, master in masters.items():
        assert torch.equal(state1[name], master), name
    assert any(not torch.equal(state1[n], low[n].float()) for n in masters)


def test_checkpoint_errors(runs, tmp_path):
    from uniemo.errors import UserError
    from uniemo.training.checkpoint import consolidated_state_dict, require_checkpoint, resolve_checkpoint

    with pytest.raises(UserError, match="not a checkpoint folder"):
        consolidated_state_dict(tmp_path)
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="train it first"):
        require_checkpoint(tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        require_checkpoint(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000009\n")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        require_checkpoint(tmp_path / "run")
    assert resolve_checkpoint(runs / "s1") == resolve_checkpoint(runs / "s1" / "checkpoints" / STEP)


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------
def test_export_layout_and_reload(runs, exported, loaded_s2):
    from safetensors.torch import load_file

    from uniemo.inference.runs import load_run

    info = json.loads((exported / "uniemo_export.json").read_text())
    assert info["stage"] == 2 and info["step"] == 1
    assert info["emotion_tokens"]["awe"] == "<awe>"
    assert info["config"]["data"]["image_size"] == 32
    for name in ("model.safetensors", "attributes.json", "attribute_base.safetensors", "emotion_space.safetensors"):
        assert (exported / name).is_file(), name
    assert (exported / "pipeline" / "model_index.json").is_file()
    assert not any(p.name.startswith(".export.") for p in runs.iterdir())  # no temp folders left behind

    # The weights are the trained ones plus the stage-1 backbone; the export reloads to the same models.
    weights = load_file(str(exported / "model.safetensors"))
    params = torch.load(runs / "s2_params.pt")
    for name, value in weights.items():
        assert torch.equal(value, params[name]), name
    assert any(k.startswith("understanding.encoder.") for k in weights)
    again = load_run(exported)
    for name, value in loaded_s2.trained_state_dict().items():
        assert torch.equal(again.trained_state_dict()[name], value), name
    for stream in loaded_s2.emotion_space.streams:
        assert torch.equal(again.emotion_space.mean(stream), loaded_s2.emotion_space.mean(stream))
    assert loaded_s2.emotion_space.counts().sum() > 0


def test_never_trained_parameters_come_from_the_run_not_from_a_seed(runs, tmp_path):
    """A run keeps what no checkpoint holds (here the frozen contrastive logit scales) in
    initial_weights.safetensors; loading reads them from there, whatever the config's seed now says. A run without
    the file (written by an older uniemo) still loads by replaying its training's random draws."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    from uniemo.inference.runs import load_run

    for stage in ("s1", "s2"):
        run = tmp_path / stage
        shutil.copytree(runs / stage, run)
        legacy = load_run(run, device="cpu", compute_missing_emotion_space=False).understanding
        roles = legacy.parameter_roles()
        frozen = {n: p for n, p in legacy.named_parameters() if roles[n] == "logit_scales" and not p.requires_grad}
        assert frozen, stage
        save_file({f"understanding.{n}": p.detach() + 1.0 for n, p in frozen.items()}, run / "initial_weights.safetensors")
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["run"]["seed"] += 17  # a replay would now draw other values
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        loaded = dict(load_run(run, device="cpu", compute_missing_emotion_space=False).understanding.named_parameters())
        for name, value in frozen.items():
            assert torch.equal(loaded[name], value + 1.0), (stage, name)


def test_export_pipeline_with_plain_diffusers(exported, loaded_s2):
    from diffusers import StableDiffusionPipeline

    from uniemo.config.schema import EMOTIONS
    from uniemo.inference.runs import mean_conditions

    pipe = StableDiffusionPipeline.from_pretrained(
        str(exported / "pipeline"), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    ids = pipe.tokenizer("<awe>").input_ids
    assert len(ids) == 3 and ids[1] == pipe.tokenizer.convert_tokens_to_ids("<awe>")

    # Each emotion token's row is the fused condition of that emotion's mean, as uniemo computes it ...
    conditions = mean_conditions(loaded_s2)
    # ... which is M_emo(mu_cls) + alpha_s M_scene(mu_s) + alpha_o M_obj(mu_o), alpha = Phi[nearest attribute, k].
    space, cond, run = loaded_s2.emotion_space, loaded_s2.conditioner, loaded_s2
    base = torch.nn.functional.normalize(run.attribute_embeddings, dim=-1)
    with torch.no_grad():
        for k in range(len(EMOTIONS)):
            expected = cond.mapper_emotion(space.mean("cls")[k].float())
            for stream, mapper in (("scene", cond.mapper_scene), ("object", cond.mapper_object)):
                mapped = mapper(space.mean(stream)[k].float())
                nearest = int((base @ torch.nn.functional.normalize(mapped, dim=-1)).argmax())
                expected = expected + run.phi[nearest, k] * mapped
            torch.testing.assert_close(conditions[k], expected, rtol=1e-5, atol=1e-6)
    table = pipe.text_encoder.get_input_embeddings().weight
    for k, emotion in enumerate(EMOTIONS):
        row = table[pipe.tokenizer.convert_tokens_to_ids(f"<{emotion}>")]
        torch.testing.assert_close(row, conditions[k], rtol=0, atol=0)
    # Plain diffusers encodes "<awe>" as uniemo's splice of c into the placeholder (D5) does.
    with torch.no_grad():
        plain, _ = pipe.encode_prompt("<awe>", "cpu", 1, False)
        spliced = loaded_s2.generator.encode_condition(conditions[EMOTIONS.index("awe")][None])
    torch.testing.assert_close(plain, spliced, rtol=1e-5, atol=1e-5)

    images = pipe("<awe>", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_export_refuses_foreign_folder_and_replaces_export(runs, exported, tmp_path):
    from uniemo.errors import UserError
    from uniemo.inference.export import export_run

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a uniemo export"):
        export_run(runs / "s2", foreign)
    assert (foreign / "notes.txt").read_text() == "mine"

    # An export re-exported over an earlier export: replaced in place, same weights.
    target = tmp_path / "again"
    export_run(exported, target)
    (target / "stale.txt").write_text("old")
    export_run(exported, target)
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# CLI: generate, classify, errors
# ---------------------------------------------------------------------------------------------------------
def test_cli_generate(exported, tmp_path, capsys):
    from PIL import Image

    from uniemo.cli import main

    out = tmp_path / "gen"
    argv = ["generate", "--run", str(exported), "--emotion", "awe", "--num", "2", "--out", str(out),
            "--seed", "5", "--steps", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["awe_5.png", "awe_6.png"]
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in lines] == [5, 6] and all(r["emotion"] == "awe" and r["steps"] == 2 for r in lines)
    assert all(0.0 <= r["alpha_scene"] <= 1.0 for r in lines)
    assert json.loads(Image.open(out / "awe_6.png").text["uniemo"])["seed"] == 6
    first = np.array(Image.open(out / "awe_5.png"))
    assert first.shape == (32, 32, 3)

    # D10: (emotion, seed) regenerates the image, alone or in a batch.
    again = tmp_path / "again"
    assert main(["generate", "--run", str(exported), "--emotion", "awe", "--num", "1", "--out", str(again),
                 "--seed", "5", "--steps", "2"]) == 0
    diff = np.abs(np.array(Image.open(again / "awe_5.png")).astype(int) - first.astype(int))
    assert diff.max() <= 2
    assert "awe" in capsys.readouterr().out


def test_cli_classify(runs, exported, tmp_path, capsys):
    from PIL import Image

    from uniemo.cli import main
    from uniemo.inference.runs import classify_images, load_run

    paths = []
    for i, color in enumerate([(200, 40, 40), (30, 120, 220)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (48, 40), color).save(path)
        paths.append(str(path))
    report = tmp_path / "out" / "classes.json"
    assert main(["classify", "--run", str(runs / "s1"), *paths, "--json", str(report)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and printed[0].startswith(paths[0])
    results = json.loads(report.read_text())
    assert [r["image"] for r in results] == paths
    for r in results:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["emotion"] == max(r["probabilities"], key=r["probabilities"].get)

    # The export classifies as the run it came from (stage-2 understanding = stage-1 backbone + trained queries).
    from_export = classify_images(load_run(exported), paths)
    assert main(["classify", "--run", str(runs / "s2"), *paths, "--json", "-"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    for a, b in zip(from_export, from_run, strict=True):
        assert a["emotion"] == b["emotion"]
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-6)


def test_cli_errors_are_one_line(runs, exported, tmp_path, capsys):
    from uniemo.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    (tmp_path / "norun").mkdir()
    (tmp_path / "norun" / "config.yaml").write_text((runs / "s1" / "config.yaml").read_text())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    cases = [
        (["generate", "--run", str(exported), "--emotion", "joy", "--out", str(tmp_path / "g")], "amusement, awe"),
        (["generate", "--run", str(tmp_path / "missing"), "--emotion", "awe", "--out", str(tmp_path / "g")],
         "does not exist"),
        (["generate", "--run", str(runs / "s1"), "--emotion", "awe", "--out", str(tmp_path / "g")], "stage-2"),
        (["classify", "--run", str(runs / "s1"), str(bad)], "bad.png"),
        (["classify", "--run", str(runs / "s1"), str(bad), "--device", "warp-drive"], "not a torch device"),
        (["classify", "--run", str(runs / "s1"), str(tmp_path / "nope.png")], "nope.png"),
        (["classify", "--run", str(tmp_path / "norun"), str(bad)], "train it first"),
        (["classify", "--run", str(tmp_path / "norun"), str(tmp_path / "nope.png")], "nope.png"),
        (["export", "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "e")], "train it first"),
        (["export", "--run", str(exported), "--out", str(foreign)], "not a uniemo export"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("uniemo: error:") and needle in err, (argv, err)


# ---------------------------------------------------------------------------------------------------------
# Emotion transfer (the official inference_transfer.py): a real image's own features, alpha at the target
# ---------------------------------------------------------------------------------------------------------
def _photo(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_transfer_and_textual_inversion_in_diffusers(exported, loaded_s2, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from uniemo.cli import main
    from uniemo.inference.transfer import image_features

    photo = _photo(tmp_path / "my photo.png", 0)
    out = tmp_path / "t"
    argv = ["transfer", "--run", str(exported), "--image", str(photo), "--emotion", "awe", "--object", "bag",
            "--num", "2", "--seed", "3", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "load_textual_inversion" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["my_photo-awe_3.png", "my_photo-awe_4.png"]
    records = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [3, 4]
    assert {r["prompt"] for r in records} == {"<my_photo-awe> bag"} and records[0]["source_image"] == str(photo)
    assert json.loads(Image.open(out / "my_photo-awe_4.png").text["uniemo"])["object"] == "bag"

    # The embedding is c of THIS image at the target emotion: the conditioner on the image's own features.
    c = load_file(str(out / "my_photo-awe.safetensors"))["<my_photo-awe>"]
    feats = image_features(loaded_s2, photo)
    labels = torch.tensor([1])  # awe
    with torch.no_grad():
        expected = loaded_s2.conditioner(feats["cls"], feats.get("scene"), feats.get("object"), labels,
                                         loaded_s2.attribute_embeddings, loaded_s2.phi).condition[0]
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-6)
    # Another image (or another target emotion) gives another condition.
    other = tmp_path / "o"
    assert main(["transfer", "--run", str(exported), "--image", str(_photo(tmp_path / "b.png", 1)), "--emotion",
                 "awe", "--seed", "3", "--steps", "2", "--out", str(other)]) == 0
    assert not torch.allclose(load_file(str(other / "b-awe.safetensors"))["<b-awe>"], c)
    assert main(["transfer", "--run", str(exported), "--image", str(photo), "--emotion", "fear", "--seed", "3",
                 "--steps", "2", "--out", str(other)]) == 0
    fear = load_file(str(other / "my_photo-fear.safetensors"))["<my_photo-fear>"]
    with torch.no_grad():
        fear_expected = loaded_s2.conditioner(feats["cls"], feats.get("scene"), feats.get("object"),
                                              torch.tensor([6]), loaded_s2.attribute_embeddings,
                                              loaded_s2.phi).condition[0]
    torch.testing.assert_close(fear, fear_expected, rtol=1e-5, atol=1e-6)

    # Same image, emotion and seed: the same picture again (D10).
    again = tmp_path / "again"
    assert main(["transfer", "--run", str(exported), "--image", str(photo), "--emotion", "awe", "--object", "bag",
                 "--seed", "4", "--steps", "2", "--out", str(again)]) == 0
    diff = np.abs(np.array(Image.open(again / "my_photo-awe_4.png")).astype(int)
                  - np.array(Image.open(out / "my_photo-awe_4.png")).astype(int))
    assert diff.max() <= 2

    # Plain diffusers: the exported pipeline plus the textual-inversion file encodes the prompt as uniemo does.
    pipe = StableDiffusionPipeline.from_pretrained(
        str(exported / "pipeline"), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.load_textual_inversion(str(out / "my_photo-awe.safetensors"))
    with torch.no_grad():
        plain, _ = pipe.encode_prompt("<my_photo-awe> bag", "cpu", 1, False)
        generator = loaded_s2.generator
        spliced = generator.encode_condition(c[None], f"{generator.placeholder_token} bag")
    torch.testing.assert_close(plain, spliced, rtol=1e-5, atol=1e-5)


def test_cli_transfer_errors_are_one_line(runs, exported, tmp_path, capsys):
    from uniemo.cli import main

    photo = _photo(tmp_path / "p.png", 0)
    out = tmp_path / "t"
    base = ["transfer", "--image", str(photo), "--out", str(out)]
    cases = [
        ([*base, "--run", str(exported), "--emotion", "joy"], "amusement, awe"),
        ([*base, "--run", str(runs / "s1"), "--emotion", "awe"], "stage-2"),
        ([*base, "--run", str(exported), "--emotion", "awe", "--object", "bag; rm"], "plain word"),
        ([*base, "--run", str(exported), "--emotion", "awe", "--num", "0"], "--num"),
        (["transfer", "--run", str(exported), "--image", str(tmp_path / "nope.png"), "--emotion", "awe",
          "--out", str(out)], "nope.png"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("uniemo: error:") and needle in err, (argv, err)
    assert not out.exists()  # nothing written on a refused transfer


def test_official_export_refuses_what_the_official_model_cannot_build(runs, tmp_path, capsys):
    """The tiny preset has 4 heads at width 64; the official Emotion_clip builds width // 64 = 1: its forward would
    differ, so ``export --official`` refuses (tests/test_official_checkpoints.py exports official-shaped runs)."""
    from uniemo.cli import main

    out = tmp_path / "official"
    assert main(["export", "--run", str(runs / "s2"), "--official", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.understanding.heads" in err and "width // 64" in err, err
    assert not out.exists()
