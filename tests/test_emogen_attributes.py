"""``uniemo data attributes --from-emogen DIR``: EmoGen's ``dataset_balance/`` pickles (METHOD §3.5, §8.2) become
uniemo's attribute base, which ``data.attributes=emogen`` puts in place of the counted base and Phi.

The fixture is written here in EmoGen's format: pickled dicts ``attr_<emotion> -> [names]`` and ``name ->
np.float32[8]`` (pickle protocol 4, as EmoGen's Python 3.9 writes it), also with numpy 1.x's module path."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from uniemo.cli import main
from uniemo.config.schema import Config
from uniemo.data.attributes import AttributeTable, resolve_attribute_table

OBJECT_ATTR = {"attr_amusement": ["balloon", "tower"], "attr_fear": ["spider", "carousel"]}
SCENE_ATTR = {"attr_awe": ["tower", "glacier"], "attr_sadness": ["cemetery"]}
SCENE_PHI = {"glacier": [0, 0.9, 0.1, 0, 0, 0, 0, 0], "cemetery": [0, 0, 0, 0, 0, 0, 0.03, 0.97],
             "tower": [0.5, 0.5, 0, 0, 0, 0, 0, 0], "bakery/shop": [0.2, 0, 0.8, 0, 0, 0, 0, 0]}
OBJECT_PHI = {"balloon": [0.7, 0, 0.1, 0.2, 0, 0, 0, 0], "spider": [0, 0, 0, 0, 0, 0.3, 0.7, 0],
              "tower": [0, 1, 0, 0, 0, 0, 0, 0]}  # overwrites the scene entry of the same name


def _write(path, value, numpy1_paths=False):
    data = pickle.dumps(value, protocol=4)
    if numpy1_paths:  # what numpy 1.x (EmoGen's 1.25) writes: numpy.core, not numpy._core
        data = data.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray")
        assert b"numpy._core" not in data and data[2:3] == b"\x95"  # one FRAME: fix its length
        data = data[:3] + (len(data) - 11).to_bytes(8, "little") + data[11:]
    path.write_bytes(data)


@pytest.fixture(params=[False, True], ids=["numpy2", "numpy1"])
def emogen(tmp_path, request):
    folder = tmp_path / "dataset_balance"
    folder.mkdir()
    _write(folder / "object_attr.pkl", OBJECT_ATTR)
    _write(folder / "scene_attr.pkl", SCENE_ATTR)
    for name, table in (("attr_coefficient_emotion_scene.pkl", SCENE_PHI),
                        ("attr_coefficient_emotion_object.pkl", OBJECT_PHI)):
        _write(folder / name, {k: np.asarray(v, dtype=np.float32) for k, v in table.items()}, request.param)
    _write(folder / "all_attribute_object_scene.pkl", sorted({*SCENE_PHI, *OBJECT_PHI}))
    return folder


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("uniemo: error: ") and "\n" not in err, err
    return err


def test_import_keeps_the_official_order_and_phi(emogen, tmp_path, capsys):
    out = tmp_path / "emogen_attributes.json"
    assert main(["data", "attributes", "--from-emogen", str(emogen), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7 names (4 object, 3 scene; 6 distinct), Phi over 6 names" in printed and "carousel" in printed
    base = json.loads(out.read_text())
    # objects then scenes, each in the file's order, the duplicate "tower" kept (official read_attr)
    names = [b["name"] for b in base["base"]]
    assert names == ["balloon", "tower", "spider", "carousel", "tower", "glacier", "cemetery"]
    assert [b["kind"] for b in base["base"]] == ["object"] * 4 + ["scene"] * 3
    phi = np.asarray(base["phi"], dtype=np.float32)
    expected = {**SCENE_PHI, **OBJECT_PHI}  # object entries overwrite scene entries (official get_coefficient)
    for row, name in zip(phi, names, strict=True):
        want = np.asarray(expected.get(name, [0.0] * 8), dtype=np.float32)  # no entry: alpha 0
        assert np.array_equal(row, want), name
    assert base["without_phi"] == ["carousel"] and len(base["phi_table"]) == 6
    assert base["all_names"] == sorted({*SCENE_PHI, *OBJECT_PHI})


def test_emogen_base_replaces_the_counted_one(emogen, tmp_path):
    out = tmp_path / "base.json"
    assert main(["data", "attributes", "--from-emogen", str(emogen), "--out", str(out)]) == 0
    counted = AttributeTable.from_counts({"beach": [3] * 8}, {"Tree": [5] * 8}, min_count=1)
    cfg = Config()
    cfg.data.attributes, cfg.data.attribute_base = "emogen", str(out)
    table = resolve_attribute_table(counted, cfg.data)
    assert table.scenes == ["beach"] and table.objects == ["Tree"]  # batch vocabularies stay the shards'
    assert table.base_names[:2] == ["balloon", "tower"] and table.base_source == "emogen"
    assert table.rebased(7, 0.5) is table  # re-basing applies to counts only
    assert torch.equal(table.phi[1], torch.tensor(OBJECT_PHI["tower"]))
    saved = tmp_path / "attributes.json"
    table.save(saved)
    assert AttributeTable.load(saved).base_source == "emogen"  # an export keeps what the run used
    cfg.data.attributes = "counts"
    assert resolve_attribute_table(counted, cfg.data).base_names == ["Tree", "beach"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_foreign_pickle_is_refused_and_never_run(emogen, tmp_path, capsys):
    marker = tmp_path / "ran"
    _write(emogen / "scene_attr.pkl", {"attr_awe": [_Payload(str(marker))]})
    out = tmp_path / "base.json"
    assert main(["data", "attributes", "--from-emogen", str(emogen), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "scene_attr.pkl" in err and ".open, which" in err, err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("case", ["missing", "exists", "bad_row"])
def test_bad_input_is_one_line_and_writes_nothing(emogen, tmp_path, capsys, case):
    out = tmp_path / "base.json"
    if case == "missing":
        (emogen / "attr_coefficient_emotion_object.pkl").unlink()
    elif case == "exists":
        out.write_text("mine")
    else:
        _write(emogen / "attr_coefficient_emotion_scene.pkl", {"glacier": np.ones(7, dtype=np.float32)})
    assert main(["data", "attributes", "--from-emogen", str(emogen), "--out", str(out)]) == 2
    err = _error(capsys)
    want = {"missing": "attr_coefficient_emotion_object.pkl not found", "exists": "exists",
            "bad_row": "'glacier' is not 8 non-negative confidences"}[case]
    assert want in err, err
    assert (out.read_text() == "mine") if case == "exists" else not out.exists()


def test_config_needs_the_base_file():
    cfg = Config()
    cfg.data.attributes = "emogen"
    with pytest.raises(Exception, match="data.attribute_base"):
        cfg.validate()
