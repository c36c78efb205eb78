"""The feedback loop (issue 5): sequential rounds on a real stage-2 run, resume, and the async mode, with real Ray.

The start runs are real trainer runs without Ray: ``s1`` (stage 1) and ``s2`` (stage 2 from s1, with its emotion
space), two steps each, written by :func:`uniemo.training.worker.run_worker` in a subprocess (this file run as a
script, so the gloo process group does not leak into other tests). Each loop then runs as ``uniemo feedback``
does: its own embedded Ray session, Ray Train workers, the actor pool. Tiny presets at 32 px, the session's shards.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest


def _base(shards: str | Path, root: Path) -> list[str]:
    return [
        f"run.output_dir={root}",
        f"data.shards={shards}",
        f"data.cache_dir={root / 'cache'}",
        "data.image_size=32",
        "data.generator_image_size=32",
        "model.understanding.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "model.generator.sampling_steps=2",
        "training.eval_every=0",
        "training.checkpoint_every=0",
        "logging.every=1",
        "logging.progress=false",
        "logging.sample_images=0",
        "logging.wandb.mode=disabled",
    ]


# ---------------------------------------------------------------------------------------------------------
# The subprocess: a start run (run as `python tests/test_feedback_loop.py SHARDS ROOT STAGE`; one process per run,
# DeepSpeed keeps its process groups for the life of a process)
# ---------------------------------------------------------------------------------------------------------
def _build_start_run(shards: str, root: Path, stage: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from uniemo.config import load_config
    from uniemo.training.driver import prepare_run
    from uniemo.training.worker import run_worker

    cfg = load_config(None, [*_base(shards, root), f"run.name=s{stage}", f"training.stage={stage}",
                             "training.steps=2", "distributed.num_workers=1"])
    plan = prepare_run(cfg)
    run_worker(plan.config, plan.run_dir, init_from=str(plan.init_from) if plan.init_from else None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort at interpreter exit after all work is done (issue 4)


if __name__ == "__main__":
    _build_start_run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------
FEEDBACK = [
    "training.stage=2",
    "distributed.num_workers=2",
    "feedback.candidates_per_emotion=4",
    "feedback.batch_size=4",
    "feedback.keep=2",
    # Tiny models after two steps predict nearly one class for every generated image: no threshold, a
    # near-duplicate delta above their f_cls cosines, no attribute cap, so the predicted emotions keep images
    # (the filter's rules are tested on crafted inputs in test_filtering.py).
    "feedback.tau=0.0",
    "feedback.delta=0.9995",
    "feedback.attribute_cap=1.0",
    "feedback.sampling_steps=2",
    "feedback.shard_size=4",
    "feedback.filter_cpus=0.5",
]


def _config(start_runs: Path, synth_shards: Path, *extra: str):
    from uniemo.config import load_config

    return load_config(None, [*_base(synth_shards, start_runs), *FEEDBACK, *extra])


def _check_counts(report: dict) -> None:
    for row in [*report["emotions"].values(), report["totals"]]:
        assert row["candidates"] == row["kept"] + sum(row["rejections"].values()) + row["lost_in_flight"]


def _check_round(run_dir: Path, index: int, checkpoint: Path) -> dict:
    """The round folder is complete and listed, its report adds up and agrees with the manifest."""
    from uniemo.data.shards import read_manifest
    from uniemo.run_layout import path_from_run_file, round_dir, round_report_path

    folder = round_dir(run_dir, index)
    manifest = read_manifest(folder)
    report = json.loads(round_report_path(run_dir, index).read_text())
    later = ("entered_step", "retired")  # set in the report file after the round was published
    assert {k: v for k, v in manifest["report"].items() if k not in later} == {
        k: v for k, v in report.items() if k not in later}
    assert manifest["round"] == index
    assert not Path(report["checkpoint"]).is_absolute()  # run files name paths relative to their run folder
    assert path_from_run_file(report["checkpoint"], run_dir) == checkpoint
    _check_counts(report)
    assert report["totals"]["candidates"] == 8 * 4 and report["totals"]["lost_in_flight"] == 0
    kept = report["totals"]["kept"]
    assert kept > 0 and report["samples"] == kept == manifest["totals"]["train"]["samples"]
    assert {p.name for p in folder.glob("*.tar")} == {e["name"] for e in manifest["shards"]} == set(report["shards"])
    return report


def _metrics(run_dir: Path) -> list[dict]:
    from uniemo.logging import read_metrics

    return [r for r in read_metrics(run_dir) if "loss" in r]


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------
def test_listing_changed_starts_an_epoch_with_the_new_round(synth_shards, tmp_path):
    """What ``feedback.refresh_every`` does in the trainer: a newly listed round is seen mid-epoch."""
    from uniemo.data.loader import Source, build_loader
    from uniemo.data.shards import read_manifest, update_manifest, write_sample_shard
    from uniemo.data.transforms import SampleTransform

    synthetic = tmp_path / "shards" / "synthetic"
    with pytest.warns(UserWarning, match="no train shards yet"):  # before the first round
        loader = build_loader(
            [Source.of("real", synth_shards), Source.of("synthetic", synthetic, 1.0)], "train", rank=0,
            world_size=1, batch_size=8, num_workers=0, transform=SampleTransform(image_size=16), training=True,
        )
    batches = loader.batches()
    first = [next(batches) for _ in range(3)]
    assert {s for b in first for s in b["source"]} == {"real"} and not loader.listing_changed()
    # A round becomes visible: a shard of real samples relabelled as synthetic, then its manifest.
    import webdataset as wds

    name = next(e["name"] for e in read_manifest(synth_shards)["shards"] if e["split"] == "train")
    samples = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
               for s in wds.WebDataset(str(synth_shards / name), shardshuffle=False)]
    folder = synthetic / "round-0"
    folder.mkdir(parents=True)
    update_manifest(folder, [write_sample_shard(samples, folder / "train-000000.tar", source="synthetic")])
    assert loader.listing_changed()
    epoch = loader.epoch
    batches.close()
    loader.set_epoch(epoch + 1)
    after = [b for _, b in zip(range(4), loader.batches(), strict=False)]
    assert "synthetic" in {s for b in after for s in b["source"]} and not loader.listing_changed()


def test_cli_without_a_stage2_run_names_the_fix(synth_shards, tmp_path, capsys):
    from uniemo.cli import main

    root = tmp_path / "runs"
    code = main(["feedback", "--config", str(Path(__file__).parents[1] / "configs" / "tiny_feedback.yaml"),
                 f"run.output_dir={root}", f"data.shards={synth_shards}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "stage 2 first" in err[0] and "feedback.from_run" in err[0]
    assert not root.exists()  # nothing written


@pytest.mark.slow
def test_stage2_init_continues_every_trained_weight(start_runs):
    """``training.init_from`` = a stage-2 run: its trained weights on top of its own stage-1 backbone and head."""
    import torch

    from uniemo.config import load_config
    from uniemo.data.loader import load_attribute_table
    from uniemo.training.checkpoint import consolidated_state_dict, latest_checkpoint
    from uniemo.training.run_weights import recorded_init, split_init
    from uniemo.training.stages import _build_task

    s1, s2 = latest_checkpoint(start_runs / "s1"), latest_checkpoint(start_runs / "s2")
    assert split_init(s2) == (s1, s2) and split_init(s1) == (s1, None)
    cfg = load_config(start_runs / "s2" / "config.yaml")
    task, untrained = _build_task(cfg, load_attribute_table(cfg.data), s2)
    own = task.state_dict()
    trained = consolidated_state_dict(s2)
    assert any(k.startswith("conditioner.") for k in trained)
    for key, value in trained.items():
        torch.testing.assert_close(own[key], value.float(), rtol=0, atol=0)
    backbone = {k: v for k, v in consolidated_state_dict(s1).items() if k.startswith("understanding.encoder.")}
    assert backbone and all(torch.equal(own[k], v.float()) for k, v in backbone.items())
    assert recorded_init(s2) == s1
    # What no checkpoint holds (the frozen contrastive scales), and nothing the checkpoints or the generator give.
    assert untrained and not any(k in trained or k.startswith("generator.") for k in untrained)
    assert all(k.startswith("understanding.") for k in untrained)

    # Continued with training.stage2_whole_understanding (the backbone and head train now, not in s2's run): they
    # come from s1, everything s2 trained from s2. A checkpoint that holds part of a role is still refused.
    whole = load_config(start_runs / "s2" / "config.yaml", ["training.stage2_whole_understanding=true"])
    task, _ = _build_task(whole, load_attribute_table(whole.data), s2)
    own = task.state_dict()
    assert task.understanding.encoder.layers[0].mlp.fc1.weight.requires_grad
    assert all(torch.equal(own[k], v.float()) for k, v in trained.items())
    assert all(torch.equal(own[k], v.float()) for k, v in backbone.items())
    from uniemo.errors import UserError
    from uniemo.training.run_weights import load_stage2_weights

    partial = dict(trained, **dict(list(backbone.items())[:1]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("uniemo.training.run_weights.consolidated_state_dict", lambda _: partial)
        with pytest.raises(UserError, match=r"do not fit the model built from the config \(missing \['understanding"):
            load_stage2_weights(task, s2, "hint")


@pytest.fixture(scope="module")
def sequential_run(start_runs, synth_shards) -> tuple[dict, Path]:
    from uniemo.feedback.loop import run_feedback

    started = time.perf_counter()
    cfg = _config(start_runs, synth_shards, "run.name=seq", "feedback.rounds=1", "feedback.steps_per_round=2")
    summary = run_feedback(cfg)
    print(f"\n[sequential round] {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return summary, Path(summary["run_dir"])


@pytest.mark.slow
def test_sequential_round_end_to_end(sequential_run, start_runs):
    from uniemo.training.checkpoint import latest_checkpoint, read_trainer_state
    from uniemo.training.run_weights import recorded_init

    summary, run = sequential_run
    s1, s2 = latest_checkpoint(start_runs / "s1"), latest_checkpoint(start_runs / "s2")
    assert summary["from_run"] == str(s2) and summary["mode"] == "sequential"
    assert [r["round"] for r in summary["rounds"]] == [0] and not summary["rounds"][0]["skipped"]
    report = _check_round(run, 0, s2)  # round 0 generated with the start run's checkpoint
    assert summary["rounds"][0]["kept"] == report["totals"]["kept"]
    # the continued run: one curve, real + synthetic in every step's global batch (2 ranks x 16)
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2] and summary["step"] == 2
    assert all(r["data/samples/real"] + r["data/samples/synthetic"] == 32 for r in records)
    assert sum(r["data/samples/synthetic"] for r in records) > 0
    state = read_trainer_state(latest_checkpoint(run))
    assert recorded_init(latest_checkpoint(run)) == s1 and state["init_from"] == "../s1/checkpoints/" + s1.name
    assert state["continued_from"] == "../s2/checkpoints/" + s2.name  # backbone of s1, weights of s2
    assert (run / "emotion_space.safetensors").is_file()  # the end of the run's schedule: stage 2's finish
    loop = json.loads((run / "rounds" / "loop.json").read_text())
    assert loop["from_run"] == loop["rounds"]["0"]["checkpoint"] == "../s2/checkpoints/" + s2.name
    assert loop["rounds"]["0"]["kept"] == report["totals"]["kept"]


@pytest.mark.slow
def test_wrong_labels_control_feeds_the_trainers_wrong_labels(sequential_run, start_runs, synth_shards):
    """The wrong-labels control of the feedback check, in the label-scarce regime: one round that mirrors the
    sequential run's round 0 with every image relabelled k -> k+1, trained through the real shard and loader path.
    The labels the trainers counted from the synthetic source (their metrics lines) are the wrong ones, and every
    synthetic sample of the trainers' own loader carries the wrong label of the emotion it was generated for."""
    from collections import Counter

    from uniemo.config import load_config
    from uniemo.config.schema import EMOTIONS
    from uniemo.data.loader import build_loader_from_config
    from uniemo.feedback.controls import wrong_label
    from uniemo.feedback.loop import run_feedback

    _, mirrored_run = sequential_run
    cfg = _config(start_runs, synth_shards, "run.name=wrong-labels", "feedback.rounds=1", "feedback.steps_per_round=2",
                  "data.labelled_per_emotion=4", "feedback.control=wrong_labels", f"feedback.control_of={mirrored_run}")
    summary = run_feedback(cfg)
    run = Path(summary["run_dir"])
    mirrored = json.loads((mirrored_run / "rounds" / "round-0.json").read_text())
    from uniemo.run_layout import path_from_run_file

    report = _check_round(run, 0, path_from_run_file(mirrored["checkpoint"], mirrored_run))
    assert report["control"]["kind"] == "wrong_labels" and report["samples"] == mirrored["totals"]["kept"]
    generated_for = Counter({k: mirrored["emotions"][e]["kept"] for k, e in enumerate(EMOTIONS)})
    assert report["control"]["labels"] == {EMOTIONS[wrong_label(k)]: n for k, n in generated_for.items()}

    records = _metrics(run)
    seen = Counter({k: sum(r.get(f"data/labels/synthetic/{e}", 0) for r in records) for k, e in enumerate(EMOTIONS)})
    assert sum(seen.values()) == sum(r["data/samples/synthetic"] for r in records) > 0
    assert {k for k, n in seen.items() if n} <= {wrong_label(k) for k, n in generated_for.items() if n}

    # The trainers' loader (the run's own config): 4 labelled real images per emotion, wrong synthetic labels.
    train_cfg = load_config(run / "config.yaml")
    loader = build_loader_from_config(train_cfg.data, "train", batch_size=8, num_workers=0)
    assert [s.name for s in loader.sources] == ["real", "synthetic"]
    assert loader.train_samples == 8 * 4 + report["samples"]
    checked = 0
    for batch, _ in zip(loader.batches(), range(12), strict=False):
        for key, source, label in zip(batch["key"], batch["source"], batch["label"].tolist(), strict=True):
            if source == "synthetic":  # key synthetic_round-0_<emotion generated for>_<index>
                generated = EMOTIONS.index(key.split("_")[2])
                assert label == wrong_label(generated) != generated
                checked += 1
    assert checked > 0


@pytest.mark.slow
def test_resume_skips_the_completed_round(sequential_run, start_runs, synth_shards):
    from uniemo.errors import UserError
    from uniemo.feedback.loop import run_feedback
    from uniemo.run_layout import round_dir, round_report_path
    from uniemo.training.checkpoint import latest_checkpoint

    _, run = sequential_run
    s2 = latest_checkpoint(start_runs / "s2")
    step2 = latest_checkpoint(run)
    assert step2.name == "step-000002"
    with pytest.raises(UserError, match="--resume"):
        run_feedback(_config(start_runs, synth_shards, "run.name=seq", "feedback.rounds=1"))
    round0 = [round_report_path(run, 0), *sorted(round_dir(run, 0).iterdir())]
    before = {p: p.stat().st_mtime_ns for p in round0}
    # One more round: round 0 is complete (not generated again), round 1 uses the run's checkpoint at step 2.
    cfg = _config(start_runs, synth_shards, "run.name=seq", "feedback.rounds=2", "feedback.steps_per_round=2")
    summary = run_feedback(cfg, resume=True)
    assert [(r["round"], r["skipped"]) for r in summary["rounds"]] == [(0, True), (1, False)]
    assert {p: p.stat().st_mtime_ns for p in round0} == before
    _check_round(run, 0, s2)
    _check_round(run, 1, step2)
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and summary["step"] == 4
    assert sum(r["data/samples/synthetic"] for r in records[2:]) > 0


@pytest.mark.slow
def test_async_pool_delivers_rounds_to_the_running_training(start_runs, synth_shards):
    """Trainers and pool in one Ray session: round 0 from the start run, round 1 from a checkpoint of the running
    job; the job consumes synthetic samples only after a round's manifest is written, and goes on training."""
    from uniemo.feedback.loop import run_feedback
    from uniemo.run_layout import round_dir, run_dir_of, stop_request_path
    from uniemo.training.checkpoint import latest_checkpoint

    cfg = _config(
        start_runs, synth_shards, "run.name=async", "feedback.mode=async", "feedback.rounds=2",
        "feedback.steps_per_round=100", "feedback.refresh_every=2", "training.checkpoint_every=4",
        "training.keep_checkpoints=3", "feedback.trainer_cpus=0.5", "feedback.generator_cpus=0.5",
        "feedback.filter_cpus=0.25",
    )
    run = run_dir_of(cfg)
    published: dict = {}

    def stop_when_round_1_was_consumed() -> None:
        """Ask the trainers to stop once three metrics lines came after round 1 was published."""
        manifest = round_dir(run, 1) / "manifest.json"
        while not stop_request_path(run).exists():
            if manifest.is_file():
                published.setdefault(1, manifest.stat().st_mtime)
                if sum(1 for r in _metrics(run) if r["time"] > published[1]) >= 3:
                    stop_request_path(run).touch()
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_when_round_1_was_consumed, daemon=True)
    watcher.start()
    started = time.perf_counter()
    summary = run_feedback(cfg)
    print(f"\n[async] {time.perf_counter() - started:.1f} s", file=sys.stderr)
    watcher.join(timeout=5)

    assert summary["stopped"] and summary["mode"] == "async"  # stopped by the watcher, not at step 200
    records = _metrics(run)
    assert records[-1]["step"] < 200 and summary["step"] == records[-1]["step"]
    s2 = latest_checkpoint(start_runs / "s2")
    _check_round(run, 0, s2)
    report1 = json.loads((run / "rounds" / "round-1.json").read_text())
    step_dir = run / report1["checkpoint"]
    assert step_dir.parent == run / "checkpoints"  # a checkpoint the running job wrote
    _check_round(run, 1, step_dir)
    t0 = (round_dir(run, 0) / "manifest.json").stat().st_mtime
    t1 = (round_dir(run, 1) / "manifest.json").stat().st_mtime
    # synthetic samples only after round 0's manifest was written (the round's images are the only synthetic
    # samples there are), and the job trained before and after round 1 appeared
    consumed = [r for r in records if r["data/samples/synthetic"] > 0]
    assert consumed and all(r["time"] > t0 for r in consumed)
    assert all(r["data/samples/synthetic"] == 0 for r in records if r["time"] < t0)
    assert any(r["time"] < t1 for r in records) and sum(1 for r in records if r["time"] > t1) >= 3
    assert all(r["data/samples/real"] + r["data/samples/synthetic"] == 32 for r in records)
    loop = json.loads((run / "rounds" / "loop.json").read_text())
    assert loop["mode"] == "async" and loop["rounds"]["1"]["checkpoint_step"] > 0
    # What depended on timing is recorded: the step each round generated from, and when it entered the mix.
    from uniemo.training.checkpoint import step_of
    from uniemo.training.feedback_schedule import read_mix

    reports = [json.loads((run / "rounds" / f"round-{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["generated_from_step"] == 0 and reports[1]["generated_from_step"] == step_of(step_dir) > 0
    mix = read_mix(run)
    assert mix[-1]["rounds"] == [0, 1]
    for report in reports:
        entered = report["entered_step"]
        assert entered == next(line["step"] for line in mix if report["round"] in line["rounds"])
        assert loop["rounds"][str(report["round"])]["entered_step"] == entered
    assert reports[1]["entered_step"] >= reports[1]["generated_from_step"]
    assert all(r["data/samples/synthetic"] == 0 for r in records if r["step"] <= reports[0]["entered_step"])
    assert sum(r["data/samples/synthetic"] for r in records if r["step"] > reports[0]["entered_step"]) > 0
    assert [t["entered_step"] for t in summary["timing"]] == [reports[0]["entered_step"], reports[1]["entered_step"]]


def _stop_after_step(run: Path, step: int) -> None:
    """Ask the trainers of ``run`` to checkpoint and stop (what SIGTERM does) once ``step`` is logged."""
    from uniemo.run_layout import stop_request_path

    while not (run / "metrics.jsonl").is_file() or not any(r["step"] >= step for r in _metrics(run)):
        time.sleep(0.2)
    stop_request_path(run).touch()


def _comparable(run: Path) -> dict:
    """What two runs of one config and seed must agree on: every training metric but the clock, the mix record
    without its clock, and each round's funnel and timing."""
    from uniemo.training.feedback_schedule import read_mix

    clock = ("time", "samples_per_s", "data_wait_share")  # wall-clock shares
    rounds = {}
    for path in sorted((run / "rounds").glob("round-*.json")):
        report = json.loads(path.read_text())
        rounds[report["round"]] = {k: report[k] for k in ("emotions", "totals", "samples", "generated_from_step",
                                                          "entered_step")}
        rounds[report["round"]]["checkpoint"] = Path(report["checkpoint"]).name
    return {
        "metrics": [{k: v for k, v in r.items() if k not in clock} for r in _metrics(run)],
        "mix": [{k: v for k, v in line.items() if k not in ("time", "waited_s")} for line in read_mix(run)],
        "rounds": rounds,
    }


@pytest.mark.slow
def test_pinned_async_runs_twice_to_the_same_numbers(start_runs, synth_shards):
    """``feedback.pinned``: round r generates from the checkpoint of step 2r and enters the mix after step 2r + 1,
    the trainers waiting for it. Two runs of one config and seed, the second stopped (SIGTERM's path: checkpoint and
    stop) after its first step and resumed, give the same metrics, rounds and weights. With
    ``feedback.keep_rounds=1`` the mix reads the newest round only, and round 0's shards are deleted once no
    trainer and no kept checkpoint reads them (its report stays), without a single skipped shard."""
    import torch

    from uniemo.feedback.loop import run_feedback
    from uniemo.run_layout import round_dir
    from uniemo.training.checkpoint import consolidated_state_dict, latest_checkpoint

    pinned = ["feedback.mode=async", "feedback.pinned=true", "feedback.rounds=2", "feedback.steps_per_round=2",
              "feedback.pinned_delay=1", "feedback.keep_rounds=1", "training.checkpoint_every=2",
              "training.keep_checkpoints=1", "feedback.trainer_cpus=0.5", "feedback.generator_cpus=0.5",
              "feedback.filter_cpus=0.25"]
    runs = []
    for name in ("pinned-a", "pinned-b"):
        cfg = _config(start_runs, synth_shards, f"run.name={name}", *pinned)
        started = time.perf_counter()
        if name == "pinned-b":  # stopped once its first step is logged, then resumed
            watcher = threading.Thread(target=_stop_after_step, args=(start_runs / name, 1), daemon=True)
            watcher.start()
            first = run_feedback(cfg)
            watcher.join(timeout=5)
            assert first["stopped"] and first["step"] < 4, first
            summary = run_feedback(cfg, resume=True)
        else:
            summary = run_feedback(cfg)
        print(f"\n[pinned {name}] {time.perf_counter() - started:.1f} s", file=sys.stderr)
        runs.append(Path(summary["run_dir"]))
        assert summary["pinned"] and summary["step"] == 4 and not summary["stopped"]
        assert [(t["round"], t["generated_from_step"], t["entered_step"]) for t in summary["timing"]] == [
            (0, 0, 1), (1, 2, 3)]
    a, b = (_comparable(run) for run in runs)
    assert a == b
    assert [(line["step"], line["rounds"]) for line in a["mix"]] == [(0, []), (1, [0]), (3, [1])]
    assert [r["step"] for r in a["metrics"]] == [1, 2, 3, 4]
    assert a["metrics"][0]["data/samples/synthetic"] == 0  # round 0 enters after step 1
    assert sum(r["data/samples/synthetic"] for r in a["metrics"][1:]) > 0
    assert all(r["data/skipped"] == 0 for r in a["metrics"])  # retention never took a shard from a reader
    assert a["rounds"][1]["checkpoint"] == "step-000002"
    weights = [consolidated_state_dict(latest_checkpoint(run)) for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for run in runs:  # retention: round 0's shards are gone, its report stays; round 1 is what the last epoch read
        assert not round_dir(run, 0).exists() and round_dir(run, 1).is_dir()
        assert json.loads((run / "rounds" / "round-0.json").read_text())["retired"]["bytes"] > 0
        assert json.loads((run / "rounds" / "round-1.json").read_text())["retired"] is None
