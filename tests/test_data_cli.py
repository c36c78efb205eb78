"""``uniemo data synth|shards|inspect`` in-process: happy paths, resumption, one-line user errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from uniemo.cli import main


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("uniemo: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "synth"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--images",
                "48",
                "--size",
                "16",
                "--seed",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_synth_writes_a_set_and_refuses_to_overwrite(small_set, tmp_path, capsys):
    assert json.loads((small_set / "train.json").read_text())
    args = [
        "data",
        "synth",
        "--out",
        str(small_set),
        "--images",
        "48",
        "--size",
        "16",
        "--seed",
        "2",
        "--no-progress",
    ]
    capsys.readouterr()
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out

    assert main([*args[:-2], "3", "--no-progress"]) == 2  # another seed into the same folder
    assert "seed=2" in _error(capsys)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["data", "synth", "--out", str(foreign), "--images", "16", "--no-progress"]) == 2
    assert "not empty" in _error(capsys)
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--images", "3", "--no-progress"]) == 2
    assert "at least 8" in _error(capsys)


def test_shards_then_inspect(small_set, tmp_path, capsys):
    out = tmp_path / "shards"
    args = [
        "data",
        "shards",
        "--source",
        "emoset",
        "--root",
        str(small_set),
        "--out",
        str(out),
        "--shard-size",
        "8",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(args) == 0
    assert "train 32 in 4 shards" in capsys.readouterr().out
    assert main(args) == 0  # the same command again: nothing to redo
    capsys.readouterr()

    assert main(["data", "inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "train-000003.tar" in report and "skipped records: 0" in report
    header = next(line for line in report.splitlines() if line.startswith("split"))
    assert header.split() == [
        "split",
        "shards",
        "samples",
        "amusement",
        "awe",
        "contentment",
        "excitement",
        "anger",
        "disgust",
        "fear",
        "sadness",
    ]
    total = next(line for line in report.splitlines() if line.startswith("total")).split()
    assert total[:3] == ["total", "6", "48"]  # 32 train in 4 shards, 8 val in 1, 8 test in 1


def test_shards_user_errors_are_one_line(small_set, tmp_path, capsys):
    out = tmp_path / "shards"
    base = ["data", "shards", "--source", "emoset", "--root", str(small_set), "--no-progress"]
    assert main([*base, "--out", str(out), "--shard-size", "8"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--shard-size", "16"]) == 2
    assert "shard_size=8" in _error(capsys)
    assert (
        main(
            [
                "data",
                "shards",
                "--source",
                "folder",
                "--root",
                str(small_set / "image"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "reader='emoset'" in _error(capsys)
    assert main([*base, "--out", str(tmp_path / "o2"), "--shard-size", "0"]) == 2
    assert "shard size" in _error(capsys)
    assert (
        main(
            [
                "data",
                "shards",
                "--source",
                "emoset",
                "--root",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o3"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "does not exist" in _error(capsys)

    # a broken image: skipped by default, named with --on-error fail
    root = tmp_path / "folder" / "awe"
    root.mkdir(parents=True)
    for src in sorted((small_set / "image" / "awe").glob("*.jpg")):
        (root / src.name).write_bytes(src.read_bytes())
    (root / "zz_broken.jpg").write_bytes(b"\xff\xd8 nope")
    assert (
        main(
            [
                "data",
                "shards",
                "--source",
                "folder",
                "--root",
                str(root.parent),
                "--out",
                str(tmp_path / "f1"),
                "--shard-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "skipped 1" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "f1")]) == 0
    report = capsys.readouterr().out
    assert "undecodable_image: 1" in report and "zz_broken.jpg" in report
    assert (
        main(
            [
                "data",
                "shards",
                "--source",
                "folder",
                "--root",
                str(root.parent),
                "--out",
                str(tmp_path / "f2"),
                "--on-error",
                "fail",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "zz_broken.jpg" in _error(capsys)


def test_inspect_user_errors(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "not a folder" in _error(capsys)
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "manifest.json not found" in _error(capsys)


def test_inspect_a_folder_of_rounds(small_set, tmp_path, capsys):
    from uniemo.data.shards import update_manifest, write_sample_shard

    image = next((small_set / "image" / "fear").glob("*.jpg")).read_bytes()
    for rnd in range(2):
        entry = write_sample_shard(
            [
                {
                    "__key__": f"synthetic_r{rnd}_{i}",
                    "jpg": image,
                    "cls": 6,
                    "json": {"emotion": "fear", "source": "synthetic"},
                }
                for i in range(3)
            ],
            tmp_path / "pool" / f"round-{rnd}" / "train-000000.tar",
        )
        update_manifest(tmp_path / "pool" / f"round-{rnd}", [entry], round=rnd)
    assert main(["data", "inspect", str(tmp_path / "pool")]) == 0
    report = capsys.readouterr().out
    assert "round-0" in report and "round-1" in report and report.count("synthetic  train") == 2


def test_label_scarce_subset_and_inspect(tmp_path, capsys):
    """data.labelled_per_emotion: N train samples per emotion (deterministic), val and test whole, the rest left
    out; Phi over the labelled samples; the synthetic cache names the world; inspect prints world and regime."""
    from uniemo.config import load_config
    from uniemo.data.attributes import AttributeTable
    from uniemo.data.shards import ensure_synthetic_shards, left_out_shards, read_manifest, read_shard_samples

    def keys(folder, split):
        return sorted(s["__key__"] for e in read_manifest(folder)["shards"] if e["split"] == split
                      for s in read_shard_samples(folder / e["name"]))

    common = [f"data.cache_dir={tmp_path}", "data.synthetic.images=160", "data.synthetic.size=16",
              "data.synthetic.world=hard"]
    full = ensure_synthetic_shards(load_config(None, common).data)
    assert full.parent.name == "synthetic-hard-160-16-0"
    data = load_config(None, [*common, "data.labelled_per_emotion=3"]).data
    labelled, left_out = ensure_synthetic_shards(data), left_out_shards(data)
    totals = read_manifest(labelled)["totals"]
    assert totals["train"]["emotion_counts"] == [3] * 8
    assert {s: totals[s] for s in ("val", "test")} == {s: read_manifest(full)["totals"][s] for s in ("val", "test")}
    assert keys(labelled, "test") == keys(full, "test")
    assert sorted(keys(labelled, "train") + keys(left_out, "train")) == keys(full, "train")
    assert not set(keys(labelled, "train")) & set(keys(left_out, "train"))
    table = AttributeTable.load(labelled)
    assert sum(sum(c) for c in table.scene_counts.values()) == 24  # counted over the 24 labelled images only
    assert table.scenes == AttributeTable.load(full).scenes  # the full set's vocabulary: the heads keep their shapes
    # deterministic: written again elsewhere, the same samples are chosen
    again = ensure_synthetic_shards(load_config(None, [*common, "data.labelled_per_emotion=3",
                                                       f"data.cache_dir={tmp_path / 'again'}"]).data)
    assert keys(again, "train") == keys(labelled, "train")

    capsys.readouterr()
    assert main(["data", "inspect", str(labelled)]) == 0
    out = capsys.readouterr().out
    assert "synthetic world hard: a colour-only classifier reaches at most 0.474" in out
    assert "3 labelled train images per emotion" in out
    assert main(["data", "inspect", str(full)]) == 0
    assert "Bayes rate is 0.931" in capsys.readouterr().out
    from uniemo.errors import ConfigError

    with pytest.raises(ConfigError, match="more than the train samples"):
        ensure_synthetic_shards(load_config(None, [*common, "data.labelled_per_emotion=500"]).data)
    # A set drawn from an older version of the world's tables is not read silently.
    record = full.parent / "raw" / "world.json"
    record.write_text(record.read_text().replace('"bayes"', '"bayes_old"'))
    from uniemo.errors import DataError

    with pytest.raises(DataError, match="older version of the hard world"):
        ensure_synthetic_shards(load_config(None, common).data)
