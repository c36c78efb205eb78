"""Bad input of every kind gives one clear line, exit code 2, no traceback, and changes nothing already written.

Each case (the table ``CASES``) builds its bad input under a fresh folder, runs the real ``uniemo`` console
script in a subprocess, and checks: exit code 2; exactly one line on stderr, ``uniemo: error: ...``, matching the
case's pattern (the line names the thing that is wrong); no ``Traceback``; every file that existed before the
command (the inputs, the session's shards, earlier runs) has the same bytes after it. The same command with
``--debug`` raises the same error with its traceback (checked in this process through :func:`uniemo.cli.main`,
and in a child for the full disk). No case starts Ray or DeepSpeed: each error is detected before (most by the
driver's checks in :func:`uniemo.training.driver.prepare_run`). RELIABILITY.md lists the cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cli import uniemo_command  # tests/reliability/_cli.py
from _photos import write_photo_folder  # tests/_photos.py

from uniemo.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_stage1.yaml")


@dataclass
class World:
    """What a case may use: its own folder, a small EmoSet-layout set and the session's shards (read-only)."""

    tmp: Path
    emoset: Path
    shards: Path

    def train(self, *overrides: str, resume: bool = False) -> list[str]:
        """``uniemo train`` on the tiny stage-1 config with this world's folders (valid unless overridden)."""
        args = [
            "train", "--config", TINY,
            f"run.output_dir={self.tmp / 'runs'}",
            f"data.shards={self.shards}",
            f"data.cache_dir={self.tmp / 'cache'}",
            "logging.wandb.mode=disabled",
            *overrides,
        ]
        return [*args, "--resume"] if resume else args

    def copy_emoset(self) -> Path:
        out = self.tmp / "emoset"
        shutil.copytree(self.emoset, out)
        return out

    def copy_shards(self) -> Path:
        out = self.tmp / "shards"
        shutil.copytree(self.shards, out)
        return out

    def first_image(self, root: Path) -> tuple[Path, dict]:
        """The image and annotation of the first train entry of an EmoSet folder."""
        emotion, image, annotation = json.loads((root / "train.json").read_text())[0][-3:]
        return root / image, {"emotion": emotion, "annotation": root / annotation}

    def fake_checkpoint(self, name: str, *overrides: str) -> Path:
        """A run directory whose ``checkpoints/latest`` is a complete step folder saved with ``overrides``, written
        by the checkpoint module's own functions (no tensors: every case here stops before loading them)."""
        from uniemo.config import load_config
        from uniemo.training.checkpoint import (
            STATE_VERSION,
            compat_keys,
            publish,
            step_dir_name,
        )
        from uniemo.training.checkpoint import (
            TRAINER_STATE_FILE as TRAINER_STATE,
        )

        cfg = load_config(TINY, [arg for arg in self.train(*overrides)[3:]])
        run_dir = self.tmp / "runs" / name
        step = run_dir / "checkpoints" / step_dir_name(4)
        step.mkdir(parents=True)
        state = {"version": STATE_VERSION, "step": 4, "compat": compat_keys(cfg, cfg.distributed.num_workers),
                 "loader_positions": [{}] * cfg.distributed.num_workers}
        (step / TRAINER_STATE).write_text(json.dumps(state))
        publish(run_dir, step)
        return run_dir


@dataclass
class Case:
    id: str
    build: Callable[[World], list[str]]
    """Makes the bad input in the world; returns the arguments of ``uniemo``."""
    names: str
    """Regular expression the error line must match (it names what is wrong)."""
    fsize: int | None = None
    """Limit on the size of any file the command writes (RLIMIT_FSIZE, bytes): a full disk."""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- config -----------------------------------------------------------------------------------------------------


def _clip_folder(w: World, name: str, vision: dict, files: dict[str, bytes]) -> Path:
    folder = w.tmp / name
    _write(folder / "config.json", json.dumps({"model_type": "clip_vision_model", **vision}))
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


def _tiny_vision() -> dict:
    """A CLIP vision config that fits the tiny preset at 64 px exactly (its architecture, no weights)."""
    from uniemo.config.schema import UnderstandingConfig
    from uniemo.models.understanding import resolve_dims

    d = resolve_dims(UnderstandingConfig(preset="tiny", image_size=64))
    return {"hidden_size": d.width, "num_hidden_layers": d.depth, "num_attention_heads": d.heads,
            "patch_size": d.patch_size, "image_size": d.image_size, "intermediate_size": d.mlp_dim,
            "hidden_act": d.activation, "layer_norm_eps": d.layer_norm_eps, "num_channels": 3}


def _wrong_architecture(w: World) -> list[str]:
    vit_b16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16,
               "image_size": 224, "intermediate_size": 3072}
    return w.train(f"model.understanding.clip_path={_clip_folder(w, 'clip-b16', vit_b16, {})}")


def _pickled_clip(w: World) -> list[str]:
    folder = _clip_folder(w, "clip-pickled", _tiny_vision(), {"pytorch_model.bin": b"\x80\x02}q\x00."})
    return w.train(f"model.understanding.clip_path={folder}", "data.image_size=64")


def _sweep_unknown_key(w: World) -> list[str]:
    sweep = _write(w.tmp / "sweep.yaml", f"name: bad\nbase: {TINY}\ngrid:\n  training.lr_querys: [1.0e-4, 1.0e-3]\n")
    return ["sweep", str(sweep), "--backend", "local", "--dry-run"]


def _yaml_syntax(w: World) -> list[str]:
    return ["train", "--config", str(_write(w.tmp / "broken.yaml", "training:\n  steps: [1,\n"))]


# -- data -------------------------------------------------------------------------------------------------------


def _shards_of(root: Path, w: World) -> list[str]:
    return ["data", "shards", "--source", "emoset", "--root", str(root), "--out", str(w.tmp / "out"),
            "--shard-size", "8", "--on-error", "fail", "--no-progress"]


def _empty_folder(w: World) -> list[str]:
    (w.tmp / "empty").mkdir()
    return ["data", "shards", "--source", "folder", "--root", str(w.tmp / "empty"), "--out", str(w.tmp / "out"),
            "--no-progress"]


def _not_an_image(w: World) -> list[str]:
    root = w.copy_emoset()
    image, _ = w.first_image(root)
    image.write_text("this is not an image\n")
    return _shards_of(root, w)


def _zero_byte_image(w: World) -> list[str]:
    root = w.copy_emoset()
    image, _ = w.first_image(root)
    image.write_bytes(b"")
    return _shards_of(root, w)


def _bad_split_row(w: World) -> list[str]:
    root = w.copy_emoset()
    rows = json.loads((root / "train.json").read_text())
    (root / "train.json").write_text(json.dumps([*rows, ["amusement", 42]]))
    return _shards_of(root, w)


def _unknown_emotion_in_split(w: World) -> list[str]:
    root = w.copy_emoset()
    rows = json.loads((root / "train.json").read_text())
    rows[0][0] = "joy"
    (root / "train.json").write_text(json.dumps(rows))
    return _shards_of(root, w)


def _unknown_emotion_in_annotation(w: World) -> list[str]:
    root = w.copy_emoset()
    _, info = w.first_image(root)
    ann = json.loads(info["annotation"].read_text())
    info["annotation"].write_text(json.dumps({**ann, "emotion": "joy"}))
    return _shards_of(root, w)


def _only_ignored_files(w: World) -> list[str]:
    root = w.tmp / "my_images"
    for name in ("awe/.DS_Store", "awe/notes.txt", "fear/IMG_0001.HEIC", "Thumbs.db"):
        _write(root / name, "not a picture\n")
    return ["data", "shards", "--source", "folder", "--root", str(root), "--out", str(w.tmp / "out"), "--no-progress"]


def _photo_shards(w: World, per_emotion: int) -> Path:
    """A folder of ``per_emotion`` photos per emotion written as shards (the folder reader's 80/10/10 split)."""
    from uniemo.data.shards import write_shards

    root, out = w.tmp / "my_images", w.tmp / "photo-shards"
    write_photo_folder(root, per_emotion=per_emotion, size=(24, 40))
    write_shards(source="folder", root=root, out=out, progress=False)
    return out


def _split_too_small(w: World) -> list[str]:
    # 3 photos per emotion: 8 train samples, fewer than 2 ranks x a batch of 16
    return w.train(f"data.shards={_photo_shards(w, 3)}")


def _empty_val_split(w: World) -> list[str]:
    # 2 photos per emotion: all 16 go to train, none to val, and the config validates every 40 steps
    return w.train(f"data.shards={_photo_shards(w, 2)}", "data.batch_size=4")


def _truncated_tar(w: World) -> list[str]:
    shards = w.copy_shards()
    tar = sorted(shards.glob("train-*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return w.train(f"data.shards={shards}")


def _missing_shard(w: World) -> list[str]:
    shards = w.copy_shards()
    sorted(shards.glob("train-*.tar"))[-1].unlink()
    return w.train(f"data.shards={shards}")


def _zero_byte_manifest(w: World) -> list[str]:
    shards = w.copy_shards()
    (shards / "manifest.json").write_bytes(b"")
    return w.train(f"data.shards={shards}")


# -- runtime ----------------------------------------------------------------------------------------------------


def _output_not_writable(w: World) -> list[str]:
    # A regular file where a folder must be: not writable for root too (chmod does not stop root).
    blocker = _write(w.tmp / "blocker", "a file, not a folder\n")
    return w.train(f"run.output_dir={blocker / 'runs'}")


def _resume_incompatible(w: World) -> list[str]:
    w.fake_checkpoint("old", "run.name=old", "distributed.zero_stage=3")
    return w.train("run.name=old", "distributed.zero_stage=2", resume=True)


def _fresh_over_checkpoints(w: World) -> list[str]:
    w.fake_checkpoint("done", "run.name=done")
    return w.train("run.name=done")


CASES = [
    # config
    Case("unknown-key", lambda w: w.train("training.stepz=3"), r"unknown config key training\.stepz; did you mean training\.steps\?"),
    Case("wrong-type", lambda w: w.train("data.batch_size=many"), r"data\.batch_size must be an integer, got 'many'"),
    Case("negative-batch", lambda w: w.train("data.batch_size=-4"), r"data\.batch_size must be > 0, got -4"),
    Case("zero-stage-5", lambda w: w.train("distributed.zero_stage=5"), r"distributed\.zero_stage must be 0, 1, 2 or 3, got 5"),
    Case("global-batch-not-divisible", lambda w: w.train("training.global_batch_size=30"),
         r"training\.global_batch_size=30 but data\.batch_size .* = 16 x 1 x 2 = 32"),
    Case("missing-clip-folder", lambda w: w.train(f"model.understanding.clip_path={w.tmp / 'no-such-clip'}"),
         r"model\.understanding\.clip_path \S*no-such-clip does not exist"),
    Case("missing-generator-folder",
         lambda w: w.train("training.stage=2", f"model.generator.path={w.tmp / 'no-such-sd'}"),
         r"generator folder '\S*no-such-sd' does not exist"),
    Case("wrong-architecture-weights", _wrong_architecture,
         r"CLIP folder \S*clip-b16 does not fit model\.understanding: width \d+ vs checkpoint hidden_size=768"),
    Case("pickled-weights-only", _pickled_clip, r"clip-pickled holds only pickled weights \(pytorch_model\.bin\), which uniemo never unpickles; convert"),
    Case("unknown-emotion-name",
         lambda w: ["generate", "--run", str(w.tmp / "runs" / "x"), "--emotion", "joy", "--out", str(w.tmp / "gen")],
         r"unknown emotion 'joy'; choose one of amusement, awe"),
    Case("sweep-unknown-key", _sweep_unknown_key, r"sweep \S*sweep\.yaml: .*unknown config key training\.lr_querys"),
    Case("yaml-syntax", _yaml_syntax, r"config file \S*broken\.yaml is not valid YAML at line \d+"),
    Case("missing-config-file", lambda w: ["train", "--config", str(w.tmp / "nope.yaml")],
         r"config file \S*nope\.yaml does not exist"),
    # data
    Case("empty-folder", _empty_folder, r"no images found under \S*empty"),
    Case("not-an-image", _not_an_image, r"image/\w+/\S+\.jpg: image does not decode \(not an image PIL can identify\)"),
    Case("zero-byte-file", _zero_byte_image, r"image/\w+/\S+\.jpg: image file is empty \(0 bytes\)"),
    Case("split-file-bad-row", _bad_split_row, r"train\.json entry \d+: expected \[emotion, id, image, annotation\]"),
    Case("unknown-emotion-in-split", _unknown_emotion_in_split, r"train\.json entry 0: unknown emotion 'joy'"),
    Case("unknown-emotion-in-annotation", _unknown_emotion_in_annotation, r"annotation/\S+\.json says 'joy'"),
    Case("truncated-tar", _truncated_tar, r"shard \S*train-\S+\.tar has \d+ bytes, the manifest says \d+: it is truncated"),
    Case("manifest-lists-missing-shard", _missing_shard, r"manifest\.json lists shard train-\S+\.tar, which is missing"),
    Case("zero-byte-manifest", _zero_byte_manifest, r"manifest\.json: unreadable manifest"),
    Case("inspect-not-a-folder", lambda w: ["data", "inspect", str(w.tmp / "no-shards")], r"no-shards is not a folder"),
    Case("folder-of-only-ignored-files", _only_ignored_files,
         r"no images found under \S*my_images \(ignored 4 files: .*fear/IMG_0001\.HEIC.*\); expected one sub-folder"),
    Case("split-too-small-for-world-size", _split_too_small,
         r"train split of \S*photo-shards has 8 samples, fewer than distributed\.num_workers x data\.batch_size = "
         r"2 x 16 = 32, so no rank gets a full batch; lower data\.batch_size to at most 4"),
    Case("empty-val-split", _empty_val_split,
         r"val split of \S*photo-shards has no samples, but training\.eval_every=40 validates on it"),
    # runtime
    Case("output-dir-not-writable", _output_not_writable, r"cannot write the run directory \S*blocker/runs/\S+"),
    Case("disk-full", lambda w: _shards_of(w.emoset, w), r"cannot write shard \S*out/train-\d+\.tar \((File too large|No space left on device)\)", fsize=16_384),
    Case("resume-incompatible-config", _resume_incompatible,
         r"cannot resume from \S*step-000004: distributed\.zero_stage was 3 there and is 2 now"),
    Case("resume-without-checkpoint", lambda w: w.train("run.name=never", resume=True),
         r"cannot resume: \S*never has no checkpoint yet"),
    Case("fresh-run-over-checkpoints", _fresh_over_checkpoints, r"\S*done already has checkpoints \(latest: step-000004\)"),
]


@pytest.fixture(scope="module")
def small_emoset(tmp_path_factory) -> Path:
    """A 48-image EmoSet-layout set of 16 px (the data cases copy and break it)."""
    from uniemo.data.synthetic import generate_synthetic_set

    root = tmp_path_factory.mktemp("small-emoset")
    generate_synthetic_set(root, images=48, size=16, seed=1, workers=1, progress=False)
    return root


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run(args: list[str], fsize: int | None, cwd: Path) -> subprocess.CompletedProcess:
    def limit() -> None:  # in the child: a full disk (writes past fsize fail with EFBIG instead of killing it)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*uniemo_command(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
        preexec_fn=limit if fsize else None,
    )


def test_at_least_twenty_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_clear_line(case: Case, tmp_path, small_emoset, synth_shards):
    world = World(tmp=tmp_path, emoset=small_emoset, shards=synth_shards)
    args = case.build(world)
    before = _hashes(tmp_path, small_emoset, synth_shards)

    out = _run(args, case.fsize, tmp_path)
    lines = out.stderr.splitlines()
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("uniemo: error: ")
    assert re.search(case.names, lines[0]), lines[0]

    after = _hashes(tmp_path, small_emoset, synth_shards)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"overwritten or deleted: {changed}"

    # --debug: the same error escapes with its traceback. In this process (the imports are paid once), except for
    # the full disk, whose file-size limit only a child may have.
    if case.fsize:
        debug = _run([*args, "--debug"], case.fsize, tmp_path)
        assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr, debug.stderr[-2000:]
        return
    from uniemo.cli import main

    with pytest.raises((UserError, OSError)) as raised:
        main([*args, "--debug"])
    assert raised.traceback and str(raised.value).splitlines()[0] in lines[0]
