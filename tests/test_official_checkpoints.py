"""Official UniEmo checkpoints in and out: ``uniemo convert official`` and ``uniemo export --official``.

The official files are written here exactly as the official code writes them (``tests/_official_reference.py`` is
its model code, transcribed, at tiny sizes): ``best.pth`` as ``utils.epoch_saving`` (model, Emo_classifier,
optimizer, lr_scheduler, max_accuracy, epoch and the argparse ``config``), the stage-2 ``output_dir`` as
``fine_tune.py`` (``VIT_query.pth``, three ``MLP`` states, ``params.json``) and ``UniEmo_space/`` as
``cal_emotion_space``. The converted runs must compute what the official model computes, load in every command
that takes a run, and go back to files the official model loads with the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _official_reference as ref
import numpy as np
import pytest
import torch
import yaml

from uniemo.cli import main
from uniemo.config.schema import EMOTIONS

WIDTH, EMBED, QUERIES = 128, 32, 8
UNUSED = {"visual.proj", "visual_query_scene_last_proj", "visual_query_object_last_proj", "logit_scale_last",
          "logit_scale_object_last", "text_projection", "token_embedding.weight", "positional_embedding",
          "ln_final.weight", "ln_final.bias"}


def _perturbed(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the marker file shows that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    """The official files of one tiny run: stage 1, then stage 2 (queries and interactive blocks moved on)."""
    root = tmp_path_factory.mktemp("official")
    model1 = ref.tiny_official_clip(1)
    head = _perturbed(ref.Emotion_classifier(WIDTH, hidden=EMBED), 2)
    optimizer = torch.optim.AdamW(list(model1.parameters()) + list(head.parameters()), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=32)
    config = argparse.Namespace(learning_rate=1e-4, test_only=False, model_resume="", output_dir="runs/train_vit",
                                data_dir="EmoSet", model_arch="ViT-L/14", seed=500, num_train_epochs=15,
                                train_batch_size=64, weight_decay=1e-3, warmup_epochs=5, fix_text=True, query_len=8,
                                query_layer=31, cal_emotion_space=False, resume_from_checkpoint=None,
                                gradient_accumulation_steps=1, num_emotion_classes=8, report_to="tensorboard",
                                mixed_precision="fp16")
    best = root / "runs" / "train_vit" / "best.pth"
    best.parent.mkdir(parents=True)
    torch.save({"model": model1.state_dict(), "Emo_classifier": head.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "max_accuracy": 61.5, "epoch": 3, "config": config}, best)

    # Stage 2 trains the queries and interactive blocks only (METHOD §3.1).
    model2 = ref.tiny_official_clip(1)
    with torch.no_grad():
        torch.manual_seed(3)
        for name, p in model2.named_parameters():
            if "visual_query_scene." in name or "visual_query_object." in name or "visual_query_interact" in name:
                p.add_(0.1 * torch.randn_like(p))
    stage2 = root / "stage2_out"
    stage2.mkdir()
    torch.save({"model": model2.state_dict(), "Emo_classifier": head.state_dict()}, stage2 / "VIT_query.pth")
    mappers = {}
    for i, (name, file) in enumerate((("emotion", "mapper.pth"), ("scene", "mapper_scene.pth"),
                                      ("object", "mapper_object.pth"))):
        mappers[name] = _perturbed(ref.MLP(2, True, False, False, in_dim=WIDTH, out_dim=EMBED), 10 + i, 0.1)
        torch.save(mappers[name].state_dict(), stage2 / file)
    params = {"attr_rate": 0.01, "emo_rate": 0.001, "emotion": "all", "learnable_property": ["all"],
              "learning_rate": 0.001, "max_train_steps": None, "model": "MLP", "need_Dropout": False,
              "need_LN": False, "need_ReLU": True, "num_fc_layers": 2, "num_train_epochs": 1,
              "output_dir": "runs/stage2", "pretrained_model_name_or_path": "model/stable-diffusion-v1-5",
              "VIT_path": "runs/train_vit/best.pth", "seed": 520, "threshold": 0, "train_data_dir": "EmoSet",
              "project_name": "fine_tune.py"}
    (stage2 / "params.json").write_text(json.dumps(params))
    # cal_emotion_space: per emotion, mean and unbiased std of each feature over its images.
    space = stage2 / "UniEmo_space"
    space.mkdir()
    with torch.no_grad():
        for k, emotion in enumerate(EMOTIONS):
            cls, _, (scene, obj) = model2(_images(4, 100 + k))
            for infix, features in (("cls_fea", cls), ("scene", scene), ("object", obj)):
                torch.save(features.mean(dim=0), space / f"{emotion}_{infix}_mean.pt")
                torch.save(features.std(dim=0), space / f"{emotion}_{infix}_std.pt")
    return {"root": root, "best": best, "stage2": stage2, "model1": model1, "model2": model2, "head": head,
            "mappers": mappers}


def _config_file(folder: Path, synth_shards: Path) -> Path:
    """The uniemo config the tiny official model fits (width 128 -> 2 heads, 8 queries, 32 px, embedding 32)."""
    cfg = {
        "run": {"seed": 7},
        "data": {"shards": str(synth_shards), "cache_dir": str(folder / "cache"), "image_size": 32,
                 "generator_image_size": 32, "num_workers": 0, "batch_size": 8},
        "model": {"understanding": {"preset": "tiny", "width": WIDTH, "heads": 2, "image_size": 32},
                  "generator": {"sampling_steps": 2}},
        "training": {"stage": 2},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    path = folder / "official_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def converted(official, synth_shards, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    config = _config_file(folder, synth_shards)
    out = folder / "official-run"
    assert main(["convert", "official", "--stage1", str(official["best"]), "--stage2", str(official["stage2"]),
                 "--config", str(config), "--out", str(out)]) == 0
    return out


def _features(model, x):
    with torch.no_grad():
        out = model(x)
    return out.cls_feature, out.scene_feature, out.object_feature, out.emotion_logits


def test_stage1_run_computes_what_the_official_model_computes(official, converted):
    from uniemo.inference.runs import load_run
    from uniemo.training.checkpoint import latest_checkpoint, read_trainer_state

    run = load_run(converted / "stage1", device="cpu")
    assert run.stage == 1 and run.step == 0
    x = _images(3, 0)
    cls, scene, obj, logits = _features(run.understanding, x)
    with torch.no_grad():
        want_cls, _, (want_scene, want_obj) = official["model1"](x)
        want_logits = official["head"](want_cls)
    for got, want in ((cls, want_cls), (scene, want_scene), (obj, want_obj), (logits, want_logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The contrastive projections and logit scales are the official ones (transposed / renamed).
    torch.testing.assert_close(run.understanding.scene_projection.weight,
                               official["model1"].visual_query_scene_proj.t(), rtol=0, atol=0)
    assert torch.equal(run.understanding.logit_scale_object.detach(), official["model1"].logit_scale_object.detach())

    step = latest_checkpoint(converted / "stage1")
    state = read_trainer_state(step)
    assert state["stage"] == 1 and state["step"] == 0 and "converted" in state["compat"]
    record = json.loads((converted / "stage1" / "conversion.json").read_text())
    assert record["config"]["seed"] == 500 and record["official"]["max_accuracy"] == 61.5  # the argparse config
    assert {n.split(".")[0] for n in record["initialised_from_config"]} == {"scene_classifier", "object_classifier"}
    assert set(record["official_tensors_left_out"]) >= UNUSED
    assert record["sources"]["stage1"]["sha256"] and not (step / "ds").exists()


def test_stage2_run_generates_transfers_and_continues(official, converted, tmp_path, capsys):
    from uniemo.config import load_config
    from uniemo.data.loader import load_attribute_table
    from uniemo.feedback.loop import bundle_of_run, resolve_from_run
    from uniemo.inference.runs import generate_images, load_run
    from uniemo.training.checkpoint import consolidated_state_dict, latest_checkpoint, read_trainer_state
    from uniemo.training.run_weights import split_init
    from uniemo.training.stages import _build_task

    run = load_run(converted / "stage2", device="cpu")
    assert run.stage == 2 and run.step == 0
    x = _images(2, 1)
    cls, scene, obj, _ = _features(run.understanding, x)
    with torch.no_grad():
        want_cls, _, (want_scene, want_obj) = official["model2"](x)
        for name, feature, want_feature in (("emotion", cls, want_cls), ("scene", scene, want_scene),
                                            ("object", obj, want_obj)):
            torch.testing.assert_close(feature, want_feature, rtol=1e-4, atol=1e-5)
            mapper = getattr(run.conditioner, f"mapper_{name}")
            torch.testing.assert_close(mapper(want_feature), official["mappers"][name](want_feature), rtol=0, atol=0)
    # The emotion space: the official mean and std of every emotion and stream.
    space = official["stage2"] / "UniEmo_space"
    for k, emotion in enumerate(EMOTIONS):
        for stream, infix in (("cls", "cls_fea"), ("scene", "scene"), ("object", "object")):
            for stat, table in (("mean", run.emotion_space.mean(stream)), ("std", run.emotion_space.std(stream))):
                want = torch.load(space / f"{emotion}_{infix}_{stat}.pt", weights_only=True).double()
                torch.testing.assert_close(table[k], want, rtol=1e-6, atol=1e-7)
    stage1_step = latest_checkpoint(converted / "stage1")
    assert read_trainer_state(run.source)["init_from"] == str(stage1_step)

    # generate
    records = generate_images(run, "awe", 2, tmp_path / "gen", seed=0, steps=2)
    assert [r["file"] for r in records] == ["awe_0.png", "awe_1.png"]

    # transfer --official --emoset: the stage-1 ViT, the prompt "<...> bag", a source image drawn per output
    emoset = tmp_path / "EmoSet"
    (emoset / "image" / "awe").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(emoset / "image" / "awe" / f"awe_{i:05d}.jpg")
    out = tmp_path / "moved"
    assert main(["transfer", "--run", str(converted / "stage2"), "--emoset", str(emoset), "--emotion", "awe",
                 "--official", "--num", "3", "--seed", "5", "--steps", "2", "--out", str(out)]) == 0
    assert "ViT: stage 1" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in lines] == [5, 6, 7] and all(r["prompt"].endswith("> bag") for r in lines)
    import random

    files = sorted((emoset / "image" / "awe").iterdir())
    assert [Path(r["source_image"]).name for r in lines] == [files[random.Random(s).randrange(3)].name
                                                              for s in (5, 6, 7)]
    # c is the conditioner on the STAGE-1 model's features of the drawn image (not the stage-2 model's).
    from safetensors.torch import load_file

    from uniemo.inference.official import official_transfer_run
    from uniemo.inference.transfer import image_features

    stage1_run, _ = official_transfer_run(run)
    source = Path(lines[0]["source_image"])
    token = f"<{source.stem}-awe>"
    c = load_file(str(out / f"{token[1:-1]}.safetensors"))[token]
    labels = torch.tensor([1])
    with torch.no_grad():
        for model_run, same in ((stage1_run, True), (run, False)):
            f = image_features(model_run, source)
            expected = run.conditioner(f["cls"], f["scene"], f["object"], labels, run.attribute_embeddings,
                                       run.phi).condition[0]
            assert torch.allclose(c, expected, rtol=1e-5, atol=1e-6) == same

    # feedback: the loop's start checkpoint, its training init (split_init) and its pool models
    cfg = load_config(converted / "stage2" / "config.yaml", [f"feedback.from_run={converted / 'stage2'}"])
    start = resolve_from_run(cfg, tmp_path / "fb")
    assert split_init(start) == (stage1_step, start)
    task, _ = _build_task(cfg, load_attribute_table(cfg.data), start)
    own = task.state_dict()
    for key, value in consolidated_state_dict(start).items():
        assert torch.equal(own[key], value), key
    bundle = bundle_of_run(converted / "stage2", log=lambda m: pytest.fail(f"recomputed the space: {m}"))
    assert bundle.emotion_space is not None


def test_back_to_the_official_layout_and_again(official, converted, synth_shards, tmp_path):
    out = tmp_path / "back"
    assert main(["export", "--run", str(converted / "stage2"), "--official", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"VIT_query.pth", "mapper.pth", "mapper_scene.pth", "mapper_object.pth", "params.json",
                     "UniEmo_space", "best.pth"}
    # What the official loaders read, with weights_only (the files hold tensors and dicts only).
    vit = torch.load(out / "VIT_query.pth", weights_only=True)
    original = official["model2"].state_dict()
    assert set(original) - set(vit["model"]) == UNUSED | {f"transformer.resblocks.0.{k}" for k in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
        "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
        "ln_2.bias")}  # the text tower and the unused projections keep CLIP's weights (strict=False)
    assert not set(vit["model"]) - set(original)
    for key, value in vit["model"].items():
        want = original[key]
        if key.endswith("query_alpha"):
            want = torch.full_like(want, 1e-4)  # never used; written at its initial value
        assert torch.equal(value, want), key
    for key, value in official["head"].state_dict().items():
        assert torch.equal(vit["Emo_classifier"][key], value)
    # The official model loads them (strict=False, as inference.py) and computes the same features.
    fresh = ref.tiny_official_clip(99)
    result = fresh.load_state_dict(vit["model"], strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(original) - set(vit["model"])
    x = _images(2, 3)
    with torch.no_grad():
        got, want = fresh(x), official["model2"](x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2][1], want[2][1], rtol=1e-5, atol=1e-6)
    for name, file in (("emotion", "mapper.pth"), ("scene", "mapper_scene.pth"), ("object", "mapper_object.pth")):
        mlp = ref.MLP(2, True, False, False, in_dim=WIDTH, out_dim=EMBED)
        mlp.load_state_dict(torch.load(out / file, weights_only=True), strict=True)
        for key, value in official["mappers"][name].state_dict().items():
            assert torch.equal(mlp.state_dict()[key], value)
    params = json.loads((out / "params.json").read_text())
    assert (params["model"], params["num_fc_layers"], params["need_ReLU"], params["need_LN"],
            params["need_Dropout"]) == ("MLP", 2, True, False, False)
    assert params["output_dir"] == str(out.resolve()) and params["VIT_path"] == str((out / "best.pth").resolve())
    space = official["stage2"] / "UniEmo_space"
    assert sorted(p.name for p in (out / "UniEmo_space").iterdir()) == sorted(p.name for p in space.iterdir())
    for path in space.iterdir():
        torch.testing.assert_close(torch.load(out / "UniEmo_space" / path.name, weights_only=True),
                                   torch.load(path, weights_only=True), rtol=1e-6, atol=1e-7)
    best = torch.load(out / "best.pth", weights_only=True)  # the stage-1 checkpoint the run started from
    stage1 = official["model1"].state_dict()
    for key in ("visual.transformer.visual_query_interact.0.norm.weight", "visual.visual_query_scene.weight",
                "visual.transformer.resblocks.1.attn.in_proj_weight", "visual_query_object_proj"):
        assert torch.equal(best["model"][key], stage1[key]), key

    # ... and into uniemo again: the same weights.
    from uniemo.inference.runs import load_run

    again = tmp_path / "again"
    assert main(["convert", "official", "--stage1", str(out / "best.pth"), "--stage2", str(out), "--config",
                 str(_config_file(tmp_path, synth_shards)), "--out", str(again)]) == 0
    first, second = load_run(converted / "stage2", device="cpu"), load_run(again / "stage2", device="cpu")
    for a, b in ((first.understanding, second.understanding), (first.conditioner, second.conditioner)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_stage1_export_and_resume_refusal(converted, tmp_path):
    from uniemo.config import load_config
    from uniemo.training.checkpoint import (
        CheckpointError,
        check_compatible,
        compat_keys,
        latest_checkpoint,
        read_trainer_state,
    )

    out = tmp_path / "s1"
    assert main(["export", "--run", str(converted / "stage1"), "--official", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["best.pth"]
    assert set(torch.load(out / "best.pth", weights_only=True)) == {"model", "Emo_classifier"}
    step = latest_checkpoint(converted / "stage1")
    cfg = load_config(converted / "stage1" / "config.yaml")
    with pytest.raises(CheckpointError, match="converted"):
        check_compatible(read_trainer_state(step)["compat"], compat_keys(cfg, 1), step)


def _one_line(capsys) -> str:
    """The one error line (after any progress lines of the conversion)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if not line.startswith("uniemo official: reading")]
    assert len(errors) == 1 and errors[0].startswith("uniemo: error: ") and "Traceback" not in lines, lines
    return errors[0]


def test_code_running_pickles_are_refused_and_never_run(official, synth_shards, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "best.pth"
    value = torch.load(official["best"], weights_only=False)  # our own file, written above
    value["config"] = _Payload(str(marker))
    torch.save(value, bad)
    config = _config_file(tmp_path, synth_shards)
    out = tmp_path / "out"
    assert main(["convert", "official", "--stage1", str(bad), "--config", str(config), "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "refusing to load" in err and "open" in err and "nothing of it was run" in err
    assert not marker.exists() and not out.exists()
    # A mapper file too.
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    for path in official["stage2"].iterdir():
        if path.is_file():
            (stage2 / path.name).write_bytes(path.read_bytes())
    torch.save({"mlp.0.weight": _Payload(str(marker))}, stage2 / "mapper_scene.pth")
    assert main(["convert", "official", "--stage2", str(stage2), "--config", str(config), "--out", str(out)]) == 2
    assert "mapper_scene.pth" in _one_line(capsys) and not marker.exists() and not out.exists()


@pytest.mark.parametrize("case", ["heads", "no_params", "out_not_empty", "nothing", "shape"])
def test_bad_input_is_one_line_and_writes_nothing(official, synth_shards, tmp_path, capsys, case):
    config = _config_file(tmp_path, synth_shards)
    out = tmp_path / "out"
    args = ["convert", "official", "--stage1", str(official["best"]), "--stage2", str(official["stage2"]),
            "--config", str(config), "--out", str(out)]
    want = {"heads": "model.understanding.heads", "no_params": "params.json", "out_not_empty": "not an empty folder",
            "nothing": "--stage1", "shape": "model.understanding"}[case]
    if case == "heads":
        args.append("model.understanding.heads=4")
    elif case == "shape":
        args.append("model.understanding.num_scene_queries=4")
    elif case == "no_params":
        stage2 = tmp_path / "stage2"
        stage2.mkdir()
        for name in ("VIT_query.pth", "mapper.pth", "mapper_scene.pth", "mapper_object.pth"):
            (stage2 / name).write_bytes((official["stage2"] / name).read_bytes())
        args[5] = str(stage2)
    elif case == "out_not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    else:
        args = ["convert", "official", "--config", str(config), "--out", str(out)]
    assert main(args) == 2
    assert want in _one_line(capsys)
    assert (out / "mine.txt").read_text() == "keep" if case == "out_not_empty" else not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_evaluate_accepts_the_converted_run(converted, synth_shards, tmp_path):
    from uniemo.config import load_config
    from uniemo.evaluation.evaluate import evaluate_run
    from uniemo.evaluation.judge import train_judge

    judge = train_judge(load_config(None, [f"data.shards={synth_shards}", "data.image_size=32",
                                           "data.num_workers=0", "logging.progress=false",
                                           "evaluation.judge_steps=20"]), tmp_path / "judge")
    result = evaluate_run(converted / "stage2", judge, ["distributed.num_workers=1",
                                                         "evaluation.images_per_emotion=2"])
    assert result["run"]["stage"] == 2 and result["run"]["step"] == 0
    assert result["understanding"]["samples"] > 0 and result["generation"]
    assert len(list((converted / "stage2" / "eval" / "generated" / "awe").glob("*.png"))) == 2


@pytest.mark.slow
def test_a_feedback_round_continues_the_converted_run(converted, synth_shards, tmp_path):
    """``uniemo feedback`` with ``feedback.from_run`` = the converted stage-2 run: one sequential round (Ray)."""
    from uniemo.config import load_config
    from uniemo.feedback.loop import run_feedback
    from uniemo.training.checkpoint import latest_checkpoint, read_trainer_state

    start = latest_checkpoint(converted / "stage2")
    cfg = load_config(converted / "stage2" / "config.yaml", [
        f"run.output_dir={tmp_path}", "run.name=fb", f"feedback.from_run={converted / 'stage2'}",
        "feedback.mode=sequential", "feedback.rounds=1", "feedback.steps_per_round=1", "distributed.num_workers=1",
        "feedback.candidates_per_emotion=2", "feedback.batch_size=2", "feedback.keep=1", "feedback.tau=0.0",
        "feedback.delta=0.9995", "feedback.attribute_cap=1.0", "feedback.sampling_steps=2", "feedback.shard_size=4",
        "feedback.filter_cpus=0.5", "training.eval_every=0", "training.checkpoint_every=0", "logging.every=1",
        "logging.sample_images=0",
    ])
    summary = run_feedback(cfg)
    assert summary["from_run"] == str(start) and summary["step"] == 1
    state = read_trainer_state(latest_checkpoint(tmp_path / "fb"))
    assert state["continued_from"] == str(start) and state["init_from"] == str(latest_checkpoint(converted / "stage1"))


def test_uniemo_export_and_classify_take_the_converted_run(converted, tmp_path, capsys):
    """The converted run is an ordinary run for ``export`` and ``classify``; ``transfer --official`` needs the run
    folder (an export does not hold the stage-1 ViT), and a missing EmoSet folder stops before any model loads."""
    from PIL import Image

    exported = tmp_path / "exp"
    assert main(["export", "--run", str(converted / "stage2"), "--out", str(exported)]) == 0
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photo)
    assert main(["classify", "--run", str(converted / "stage1"), str(photo)]) == 0
    capsys.readouterr()
    out = tmp_path / "t"
    assert main(["transfer", "--run", str(exported), "--image", str(photo), "--emotion", "awe", "--official",
                 "--steps", "2", "--out", str(out)]) == 2
    assert "stage-1 ViT" in _one_line(capsys) and not out.exists()
    assert main(["transfer", "--run", str(converted / "stage2"), "--emoset", str(tmp_path / "none"), "--emotion",
                 "awe", "--out", str(out)]) == 2
    assert "image/awe/" in _one_line(capsys) and not out.exists()
