"""Shard writer, manifest and attribute table on real files (data/FORMAT.md, METHOD D6)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds

from uniemo.config.schema import EMOTIONS, DataConfig, SyntheticConfig
from uniemo.data.attributes import AttributeTable
from uniemo.data.emoset import read_emoset
from uniemo.data.shards import (
    ensure_synthetic_shards,
    read_manifest,
    sample_key,
    update_manifest,
    write_sample_shard,
    write_shards,
)
from uniemo.errors import DataError


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_shards_read_back_with_webdataset_and_tarfile(synth_root, synth_shards):
    manifest = read_manifest(synth_shards)
    records = {sample_key(r.source, r.id): r for r in read_emoset(synth_root)}
    assert sum(t["samples"] for t in manifest["totals"].values()) == len(records) == 400
    assert manifest["skipped"]["total"] == 0
    assert [e["name"] for e in manifest["shards"]][:2] == ["train-000000.tar", "train-000001.tar"]

    # plain tarfile: three members per sample, named <key>.<ext>; sha256 and size as listed
    for entry in manifest["shards"]:
        path = synth_shards / entry["name"]
        data = path.read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 3 * entry["samples"]
        assert {n.split(".", 1)[1] for n in names} == {"cls", "jpg", "json"}

    # plain webdataset: every sample once, image bytes exactly the source file, labels consistent
    urls = [str(synth_shards / e["name"]) for e in manifest["shards"]]
    seen = set()
    for sample in wds.WebDataset(urls, shardshuffle=False):
        key = sample["__key__"]
        assert key not in seen
        seen.add(key)
        record = records[key]
        meta = json.loads(sample["json"])
        assert meta["emotion"] == record.emotion and meta["id"] == record.id and meta["source"] == "real"
        assert set(meta) == {"emotion", "scene", "objects", "brightness", "colorfulness", "source", "id"}
        assert int(sample["cls"]) == EMOTIONS.index(record.emotion)
        assert sample["jpg"] == record.image_path.read_bytes()
    assert seen == set(records)
    # each split's shards hold only that split's records, and per-shard emotion counts add up
    for entry in manifest["shards"]:
        assert sum(entry["emotion_counts"]) == entry["samples"]


def test_attribute_table_matches_counts_of_train(synth_root, synth_shards):
    table = AttributeTable.load(synth_shards)
    train = [r for r in read_emoset(synth_root) if r.split == "train"]
    scene_n: dict[str, list[int]] = {}
    for r in train:
        if r.scene:
            scene_n.setdefault(r.scene, [0] * 8)[EMOTIONS.index(r.emotion)] += 1
    assert table.scene_counts == scene_n
    assert table.scenes == sorted(scene_n)
    assert table.objects == sorted({o for r in train for o in r.objects})
    # base: objects then scenes (METHOD §3.5), each sorted, only those seen >= m times (D6)
    kinds = table.base_kinds
    assert kinds == sorted(kinds, key=lambda k: k != "object")
    for name, kind, row in zip(table.base_names, kinds, table.phi.tolist(), strict=True):
        counts = (table.object_counts if kind == "object" else table.scene_counts)[name]
        assert sum(counts) >= table.min_count
        expected = [(n + table.beta) / (sum(counts) + 8 * table.beta) for n in counts]
        assert row == pytest.approx(expected, rel=1e-6)
        assert sum(row) == pytest.approx(1.0, rel=1e-5)
    assert table.phi.shape == (len(table.base_names), 8) and str(table.phi.dtype) == "torch.float32"
    assert table.scene_index("no_such_scene") == -1 and table.object_index(None) == -1
    assert table.scene_index(table.scenes[3]) == 3
    # another m re-derives the base from the stored counts
    strict = table.rebased(min_count=10**6, beta=1.0)
    assert strict.base_names == [] and tuple(strict.phi.shape) == (0, 8)


def test_interrupted_run_resumes_to_the_same_result(synth_root, synth_shards, tmp_path):
    """SIGKILL a writer mid-way, re-run: kept shards are not rewritten; the result equals an uninterrupted run."""
    out = tmp_path / "shards"
    script = (
        "import time, uniemo.data.shards as S\n"
        "load = S.load_image_bytes\n"
        "def slow(p, **kw):\n    time.sleep(0.02)\n    return load(p, **kw)\n"
        "S.load_image_bytes = slow\n"
        f"S.write_shards(source='emoset', root={str(synth_root)!r}, out={str(out)!r}, shard_size=25, workers=1,"
        " progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while len(list((out / ".progress").glob("*.json"))) < 3:
        assert proc.poll() is None, "the writer ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    kept = {
        p.name: p.stat().st_ino for p in out.glob("*.tar") if (out / ".progress" / f"{p.name}.json").exists()
    }
    assert len(kept) >= 3

    manifest = write_shards(
        source="emoset", root=synth_root, out=out, shard_size=25, workers=1, progress=False
    )
    assert manifest == _manifest(synth_shards)
    assert (out / "attributes.json").read_bytes() == (synth_shards / "attributes.json").read_bytes()
    for name, inode in kept.items():
        assert (out / name).stat().st_ino == inode, f"{name} was rewritten although complete"
    assert not list(out.glob(".*.tmp")) and not (out / ".progress").exists()
    # the same command again is a no-op
    assert write_shards(source="emoset", root=synth_root, out=out, shard_size=25, progress=False) == manifest


def test_leftover_temp_file_and_missing_manifest_are_redone(synth_root, synth_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    (out / "manifest.json").unlink()
    (out / "train-000003.tar").unlink()
    (out / "val-000001.tar").write_bytes(b"half a shard")
    (out / ".train-000004.tar.abc.tmp").write_bytes(b"partial")
    manifest = write_shards(
        source="emoset", root=synth_root, out=out, shard_size=25, workers=2, progress=False
    )
    assert manifest == _manifest(synth_shards)  # two workers, same bytes
    assert not list(out.glob(".*.tmp"))


def test_bad_images_are_skipped_and_counted_or_fail(synth_root, tmp_path):
    root = tmp_path / "folder"
    for emotion in ("awe", "fear"):
        (root / emotion).mkdir(parents=True)
        for src in sorted((synth_root / "image" / emotion).glob("*.jpg"))[:10]:
            shutil.copy(src, root / emotion / src.name)
    good = (root / "awe" / sorted(os.listdir(root / "awe"))[0]).read_bytes()
    (root / "awe" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "fear" / "empty.png").write_bytes(b"")
    (root / "fear" / "noise.jpg").write_bytes(b"not an image at all")

    manifest = write_shards(source="folder", root=root, out=tmp_path / "out", shard_size=4, progress=False)
    assert manifest["skipped"]["by_reason"] == {"undecodable_image": 2, "empty_image": 1}
    assert sum(t["samples"] for t in manifest["totals"].values()) == 20
    assert manifest["reader"] == "folder" and manifest["folder_seed"] == 0

    with pytest.raises(DataError, match=r"(broken|noise|empty)\.(jpg|png).*--on-error skip"):
        write_shards(
            source="folder", root=root, out=tmp_path / "out2", shard_size=4, on_error="fail", progress=False
        )
    assert not (tmp_path / "out2" / "manifest.json").exists()
    assert not list((tmp_path / "out2").glob(".*.tmp"))


def test_refuses_to_write_over_foreign_folders(synth_root, synth_shards, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_shards(source="emoset", root=synth_root, out=foreign, shard_size=25, progress=False)
    with pytest.raises(DataError, match="shard_size=25"):
        write_shards(source="emoset", root=synth_root, out=synth_shards, shard_size=50, progress=False)
    other = tmp_path / "other"
    shutil.copytree(synth_shards, other)
    with pytest.raises(DataError, match="root="):
        write_shards(source="emoset", root=tmp_path, out=other, shard_size=25, progress=False)


def test_sample_shards_and_manifest_updates_are_atomic(synth_root, tmp_path):
    images = sorted((synth_root / "image" / "fear").glob("*.jpg"))[:6]
    samples = [
        {
            "__key__": f"synthetic_r0_{i}",
            "jpg": p.read_bytes(),
            "cls": 6,
            "json": {"emotion": "fear", "source": "synthetic", "round": 0, "seed": i},
        }
        for i, p in enumerate(images)
    ]
    folder = tmp_path / "round-0"
    a = write_sample_shard(samples[:4], folder / "train-000000.tar")
    assert a["samples"] == 4 and a["source"] == "synthetic" and a["emotion_counts"][6] == 4
    m = update_manifest(folder, [a], round=0)
    assert (
        m["totals"]["train"] == {"shards": 1, "samples": 4, "emotion_counts": [0] * 6 + [4, 0]}
        and m["round"] == 0
    )
    b = write_sample_shard(samples[4:], folder / "train-000001.tar")
    m = update_manifest(folder, [b])
    assert [e["name"] for e in m["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert read_manifest(folder)["totals"]["train"]["samples"] == 6
    keys = [s["__key__"] for s in wds.WebDataset(str(folder / "train-00000{0..1}.tar"), shardshuffle=False)]
    assert keys == [s["__key__"] for s in samples]

    with pytest.raises(DataError, match="does not exist"):
        update_manifest(folder, [{**b, "name": "train-000009.tar"}])
    with pytest.raises(DataError, match="exactly one image"):
        write_sample_shard([{"__key__": "x", "cls": 1, "json": {}}], folder / "train-000002.tar")
    assert not (folder / "train-000002.tar").exists() and not list(folder.glob(".*.tmp"))


def test_ensure_synthetic_shards_makes_the_set_once(tmp_path):
    cfg = DataConfig(
        cache_dir=str(tmp_path / "cache"), synthetic=SyntheticConfig(images=48, size=16, seed=3, shard_size=8)
    )
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_synthetic_shards(cfg))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = tmp_path / "cache" / "synthetic-48-16-3" / "shards-8"
    assert results == [folder, folder]
    assert sum(t["samples"] for t in read_manifest(folder)["totals"].values()) == 48
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_shards(cfg) == folder and (folder / "manifest.json").stat().st_mtime_ns == stamp

    assert ensure_synthetic_shards(DataConfig(shards=str(folder))) == folder
    with pytest.raises(DataError, match="holds no manifest.json"):
        ensure_synthetic_shards(DataConfig(shards=str(tmp_path)))


def _subset_view(root: Path, out: Path, keep: int) -> Path:
    """``root`` (an EmoSet-layout folder) with the first ``keep`` rows of each split file; images shared."""
    out.mkdir()
    for name in ("image", "annotation"):
        (out / name).symlink_to(root / name)
    shutil.copy(root / "info.json", out / "info.json")
    for split in ("train", "val", "test"):
        rows = json.loads((root / f"{split}.json").read_text())
        (out / f"{split}.json").write_text(json.dumps(rows[: keep * len(rows) // 400]))
    return out


def test_planning_memory_does_not_grow_with_the_records(synth_root, tmp_path):
    """The writer's plan (read, check, spool, cut and digest every record) keeps no record in memory: twice the
    records add under 128 bytes each to the peak of Python allocations (a list of records costs about 1 KB each).
    What does grow: three 8-byte offsets per record (the split's list, its shuffled order, the shard's list) and
    one job object per shard (name, digest, array: about 600 bytes per 25 records)."""
    import tracemalloc

    from uniemo.data.shards import plan_dataset, plan_digest, read_job

    peaks = {}
    for n in (200, 400):
        root = _subset_view(synth_root, tmp_path / f"view-{n}", n)
        tracemalloc.start()
        plan = plan_dataset("emoset", root, tmp_path / f"records-{n}.tmp", on_error="skip", shard_size=25,
                            shuffle_seed=0)
        jobs = plan.jobs()
        plan_digest(jobs)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert plan.records == sum(j.size for j in jobs) == n
        assert len({key for j in jobs for key, *_ in read_job(j)}) == n  # every record once, read back
        plan.close()
        assert not (tmp_path / f"records-{n}.tmp").exists()
    assert peaks[400] - peaks[200] < 200 * 128, peaks


def test_shards_are_written_as_tarfile_writes_them(tmp_path):
    """The writer's own tar headers are the bytes tarfile writes (PAX format, our fixed fields), long names
    included, and the size estimate is exact."""
    import io

    from uniemo.data.shards import _TarWriter, tar_bytes

    for name in ("real_a.jpg", "k" * 96 + ".json", "k" * 120 + ".png"):
        for size in (0, 1, 511, 512, 70_000):
            data = bytes(range(256)) * (size // 256) + bytes(size % 256)
            expected = io.BytesIO()
            with tarfile.open(fileobj=expected, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for _ in range(2):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "uniemo", "uniemo"
                    tar.addfile(info, io.BytesIO(data))
            got, writer = io.BytesIO(), _TarWriter()
            for _ in range(2):
                writer.add(got, name, data)
            writer.close(got)
            assert got.getvalue() == expected.getvalue()
            assert writer.sha256.hexdigest() == hashlib.sha256(expected.getvalue()).hexdigest()
            if len(name) <= 100:
                assert tar_bytes([size, size]) == writer.size
