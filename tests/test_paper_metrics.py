"""EmoGen's evaluation protocol (``uniemo metrics``, uniemo/evaluation/paper_metrics.py) against the libraries.

The weight files are random but in each library's own format (tests/_metric_weights.py) and reach the metrics
through the config, as a user's downloads would. Each metric is checked against the library computing it on its
own: FID against torchmetrics' ``FrechetInceptionDistance`` fed the way EmoGen's ``metrics/FID.py`` feeds it,
LPIPS against ``lpips.LPIPS(net='alex')`` building its AlexNet the package's own way (torchvision's pretrained
weights, found in a TORCH_HOME cache the test fills), CLIP features against ``CLIPModel.get_image_features``.
Images are tiny and few: an Inception forward at 299 px is ~0.2 s on a CPU core.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from _metric_weights import PROBE_DIM, weight_overrides, write_image_folder, write_metric_weights
from PIL import Image

from uniemo.cli import main
from uniemo.config import load_config
from uniemo.config.schema import EMOTIONS, EvaluationConfig, MetricWeightsConfig
from uniemo.errors import UserError
from uniemo.evaluation import metrics, paper_metrics, paper_nets
from uniemo.evaluation.image_sets import read_image_folder, read_shard_split

GENERATED = {"amusement": 3, "fear": 3}
REAL = {"amusement": 3, "fear": 3, "sadness": 2}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    return write_metric_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    generated = write_image_folder(root / "generated", GENERATED, seed=1)
    real = write_image_folder(root / "real", REAL, seed=2, size=(36, 44), suffix=".jpg")
    return generated, real


def _ev(paths: dict[str, Path], *keys: str, **settings) -> EvaluationConfig:
    ev = EvaluationConfig(**settings)
    for key in keys:
        setattr(ev.weights, key, str(paths[key]))
    ev.metric_device = "cpu"
    return ev


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # six 2048 x 2048 eigendecompositions in torchmetrics (~4 s each on a core) and 36 Inception passes
def test_fid_equals_torchmetrics_own_computation(weights, folders):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchvision import transforms

    generated, real = folders
    result = paper_metrics.compute_paper_metrics(
        _ev(weights, "inception"), read_image_folder(generated, "g"), read_image_folder(real, "r"), progress=False
    )
    fid = result["metrics"]["fid"]

    # EmoGen's metrics/FID.py: one FrechetInceptionDistance(normalize=True) per emotion, images Resize((299, 299))
    # + ToTensor; here also one object fed every image of both emotions, which is the aggregate's definition.
    tfm = transforms.Compose([transforms.Resize((299, 299)), transforms.ToTensor()])

    def batch(folder: Path, emotion: str) -> torch.Tensor:
        return torch.stack([tfm(Image.open(p).convert("RGB")) for p in sorted((folder / emotion).iterdir())])

    def new_fid():
        return FrechetInceptionDistance(feature=2048, normalize=True,
                                        feature_extractor_weights_path=str(weights["inception"]))

    pooled = new_fid()
    for emotion in GENERATED:
        own = new_fid()
        for metric in (own, pooled):
            metric.update(batch(real, emotion), real=True)
            metric.update(batch(generated, emotion), real=False)
        assert fid["per_emotion"][emotion] == pytest.approx(float(own.compute()), abs=1e-3)
    assert fid["aggregated"] == pytest.approx(float(pooled.compute()), abs=1e-3)
    # The images differ, and so do the two emotions: the values are not a degenerate zero.
    assert fid["aggregated"] > 1.0 and abs(fid["per_emotion"]["amusement"] - fid["per_emotion"]["fear"]) > 1e-3
    assert set(fid["per_emotion"]) == set(GENERATED) and fid["emotions"] == ["amusement", "fear"]
    assert fid["images"] == 6 and fid["real_images"] == 6  # sadness has no generated images: not compared
    (w,) = fid["weights"]
    assert w["key"] == "evaluation.weights.inception" and w["sha256"] == _sha256(weights["inception"])
    assert w["file"] == "weights-inception-2015-12-05-6726825d.pth"
    assert set(result["left_out"]) == {"emo_a", "lpips", "sem_c", "sem_d"}


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------
# The reference builds AlexNet the package's way, through torchvision's deprecated `pretrained` argument.
@pytest.mark.filterwarnings("ignore:The parameter 'pretrained' is deprecated:UserWarning")
@pytest.mark.filterwarnings("ignore:Arguments other than a weight enum:UserWarning")
def test_lpips_equals_the_lpips_package(weights, folders, tmp_path, monkeypatch):
    import lpips
    from torchvision.transforms.functional import to_tensor

    generated, _ = folders
    images = read_image_folder(generated, "g")
    ev = _ev(weights, "lpips_alexnet", diversity_pairs=2, seed=5)
    block = paper_metrics.compute_paper_metrics(ev, images, None, progress=False)["metrics"]["lpips"]

    # The package on its own: LPIPS(net='alex') builds torchvision's pretrained AlexNet, which torch.hub finds in
    # TORCH_HOME's cache (the same random weights), and loads its linear layers from the package.
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(weights["lpips_alexnet"], cache / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = lpips.LPIPS(net="alex", verbose=False)
    means = []
    for emotion in GENERATED:
        files = sorted((generated / emotion).iterdir())
        pairs = metrics.sample_pairs(len(files), 2, 5 + EMOTIONS.index(emotion))
        assert len(pairs) == 2  # 3 images, 3 possible pairs, 2 drawn
        with torch.no_grad():  # EmoGen: ToTensor of each image, unbatched, [0, 1], no normalize flag
            d = [float(reference(to_tensor(Image.open(files[i])), to_tensor(Image.open(files[j])))) for i, j in pairs]
        assert block["per_emotion"][emotion]["lpips"] == pytest.approx(np.mean(d), rel=1e-5)
        assert block["per_emotion"][emotion]["pairs"] == 2
        means.append(np.mean(d))
    assert block["lpips"] == pytest.approx(np.mean(means), rel=1e-5) and block["lpips"] > 0
    assert block["images"] == 6 and block["resized_pairs"] == 0
    assert [w["key"] for w in block["weights"]] == ["evaluation.weights.lpips_alexnet", "lpips package"]


# ---------------------------------------------------------------------------------------------------------
# Sem-C
# ---------------------------------------------------------------------------------------------------------
def test_sem_c_formula_on_hand_made_logits():
    scene = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3]]))
    objects = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.8, 0.05, 0.05], [0.5, 0.5, 0.0, 0.0]]))
    scores = paper_metrics.semantic_clarity_scores(scene + 3.0, objects - 1.0)  # softmax ignores the shifts
    np.testing.assert_allclose(scores.numpy(), [0.7, 0.8, 0.5], rtol=1e-6)


def test_sem_c_networks_load_from_the_csail_and_torchvision_files(weights, folders):
    import torchvision

    scene, objects, files = paper_nets.load_resnets(
        MetricWeightsConfig(places365_resnet50=str(weights["places365_resnet50"]),
                            imagenet_resnet50=str(weights["imagenet_resnet50"])), CPU)
    saved = torch.load(weights["places365_resnet50"], weights_only=True)["state_dict"]
    for key, value in scene.state_dict().items():
        torch.testing.assert_close(value, saved[f"module.{key}"])  # the `module.` prefix stripped
    assert scene.fc.out_features == 365 and objects.fc.out_features == 1000
    assert [f.key for f in files] == ["evaluation.weights.places365_resnet50", "evaluation.weights.imagenet_resnet50"]

    # Sem-C of the images: the formula over both networks' logits of EmoGen's preprocessing, pooled over images.
    generated, _ = folders
    ev = _ev(weights, "places365_resnet50", "imagenet_resnet50")
    block = paper_metrics.compute_paper_metrics(ev, read_image_folder(generated, "g"), None, progress=False)
    sem_c = block["metrics"]["sem_c"]
    t = torchvision.transforms  # EmoGen's EmoDataset
    tfm = t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(),
                     t.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tfm(Image.open(p).convert("RGB")) for e in GENERATED for p in sorted((generated / e).iterdir())])
    with torch.no_grad():
        expected = torch.maximum(scene(x).softmax(1).max(1).values, objects(x).softmax(1).max(1).values)
    assert sem_c["sem_c"] == pytest.approx(float(expected.mean()), rel=1e-5) and sem_c["images"] == 6


# ---------------------------------------------------------------------------------------------------------
# CLIP: Emo-A probe and Sem-D
# ---------------------------------------------------------------------------------------------------------
def test_emo_a_probe_loads_from_a_state_dict_with_fc_weight_and_bias(weights, tmp_path):
    saved = torch.load(weights["emo_a_probe"], weights_only=True)
    assert set(saved) == {"fc.weight", "fc.bias"}
    assert tuple(saved["fc.weight"].shape) == (8, PROBE_DIM) and tuple(saved["fc.bias"].shape) == (8,)
    probe, file = paper_nets.load_emo_probe(MetricWeightsConfig(emo_a_probe=str(weights["emo_a_probe"])), 768, CPU)
    torch.testing.assert_close(probe.fc.weight, saved["fc.weight"])
    torch.testing.assert_close(probe.fc.bias, saved["fc.bias"])
    assert file.key == "evaluation.weights.emo_a_probe" and file.sha256 == _sha256(weights["emo_a_probe"])

    narrow = tmp_path / "narrow.pth"
    torch.save({"fc.weight": torch.zeros(8, 512), "fc.bias": torch.zeros(8)}, narrow)
    with pytest.raises(UserError, match=r"evaluation\.weights\.emo_a_probe: .*fc\.weight is \[8, 512\], not \[8, 768\]"):
        paper_nets.load_emo_probe(MetricWeightsConfig(emo_a_probe=str(narrow)), 768, CPU)
    bare = tmp_path / "bare.pth"
    torch.save({"weight": torch.zeros(8, 768), "bias": torch.zeros(8)}, bare)
    with pytest.raises(UserError, match=r"evaluation\.weights\.emo_a_probe: .*missing fc\.weight"):
        paper_nets.load_emo_probe(MetricWeightsConfig(emo_a_probe=str(bare)), 768, CPU)


def test_clip_features_are_get_image_features_and_sem_d_paper_rescales_twice(weights, folders):
    from torchvision.transforms.functional import to_tensor
    from transformers import CLIPModel

    encoder = paper_nets.load_clip(MetricWeightsConfig(clip=str(weights["clip"])), CPU)
    assert encoder.dim == PROBE_DIM and "defaults at 32 px" in encoder.processor_source
    generated, _ = folders
    images = [Image.open(p).convert("RGB") for p in sorted((generated / "fear").iterdir())]
    reference = CLIPModel.from_pretrained(str(weights["clip"]), local_files_only=True).eval()
    pixels = encoder.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        own = reference.get_image_features(pixel_values=pixels)
        own = own if isinstance(own, torch.Tensor) else own.pooler_output
        torch.testing.assert_close(encoder.features(images), own, rtol=1e-4, atol=1e-5)

    # EmoGen's Sem-D hands ToTensor outputs in [0, 1] to CLIPProcessor, which rescales by 1/255 once more: the
    # processor's input is the image's at 1/255 of its range, before the normalisation.
    mean = torch.tensor(encoder.processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.processor.image_std).view(1, 3, 1, 1)
    paper = encoder.processor(images=[to_tensor(i) for i in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(paper * std + mean, (pixels * std + mean) / 255.0, rtol=0, atol=2e-5)

    ev = _ev(weights, "clip", diversity_pairs=3)
    image_set = read_image_folder(generated, "g")
    paper_block = paper_metrics.compute_paper_metrics(ev, image_set, None, progress=False)
    ev.sem_d_variant = "corrected"
    corrected = paper_metrics.compute_paper_metrics(ev, image_set, None, progress=False)["metrics"]["sem_d"]
    sem_d = paper_block["metrics"]["sem_d"]
    assert sem_d["variant"] == "paper" and corrected["variant"] == "corrected"
    assert set(paper_block["left_out"]) == {"fid", "emo_a", "lpips", "sem_c"}
    # corrected by hand: all 3 pairs of each emotion's 3 images, MSE of the features, mean per emotion then over them
    per_emotion = []
    for emotion in GENERATED:
        feats = encoder.features([Image.open(p).convert("RGB") for p in sorted((generated / emotion).iterdir())])
        i, j = np.triu_indices(3, k=1)
        per_emotion.append(float(((feats[i] - feats[j]) ** 2).mean(dim=1).mean()))
        assert corrected["per_emotion"][emotion]["pairs"] == 3
    assert corrected["sem_d"] == pytest.approx(np.mean(per_emotion), rel=1e-4)
    assert 0 < sem_d["sem_d"] < corrected["sem_d"]  # near-black inputs: features close together


def test_emo_a_counts_the_folder_emotion_as_target(weights, folders):
    generated, _ = folders
    ev = _ev(weights, "clip", "emo_a_probe")
    block = paper_metrics.compute_paper_metrics(ev, read_image_folder(generated, "g"), None, progress=False)
    emo_a = block["metrics"]["emo_a"]
    encoder = paper_nets.load_clip(ev.weights, CPU)
    probe, _ = paper_nets.load_emo_probe(ev.weights, encoder.dim, CPU)
    correct = 0
    for emotion in GENERATED:
        feats = encoder.features([Image.open(p).convert("RGB") for p in sorted((generated / emotion).iterdir())])
        with torch.no_grad():
            correct += int((probe(feats).argmax(dim=1) == EMOTIONS.index(emotion)).sum())
    assert emo_a["top1"] == pytest.approx(correct / 6) and emo_a["images"] == 6
    assert set(emo_a["per_emotion"]) == set(GENERATED)
    assert [w["key"] for w in emo_a["weights"]] == ["evaluation.weights.clip", "evaluation.weights.emo_a_probe"]


# ---------------------------------------------------------------------------------------------------------
# Weight files: one line naming the key, exit 2; never unpickled freely
# ---------------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_missing_mismatched_or_unsafe_weight_file_is_one_line_naming_the_key(weights, folders, tmp_path, capsys):
    generated, real = folders
    marker = tmp_path / "unpickled"
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"fc.weight": _Payload(marker)}, unsafe)
    base = ["metrics", "--generated", str(generated), "--real", str(real), "--out", str(tmp_path / "m.json"),
            "logging.progress=false", "data.num_workers=0"]
    cases = [
        ("inception", tmp_path / "absent.pth", "does not exist"),
        ("inception", weights["imagenet_resnet50"], "missing key Conv2d_1a_3x3.conv.weight"),
        ("inception", unsafe, "weights_only=True"),
        ("lpips_alexnet", weights["imagenet_resnet50"], "does not fit"),
        ("lpips_alexnet", unsafe, "weights_only=True"),
        ("imagenet_resnet50", weights["places365_resnet50"], "not a state dict of tensors"),
        ("places365_resnet50", weights["imagenet_resnet50"], "no 'state_dict' entry"),
        ("clip", weights["inception"], "is not a folder"),
        ("clip", weights["inception"].parent, "has no config.json"),
        ("emo_a_probe", unsafe, "weights_only=True"),
    ]
    partner = {"imagenet_resnet50": "places365_resnet50", "places365_resnet50": "imagenet_resnet50",
               "emo_a_probe": "clip"}
    for key, path, needle in cases:
        extra = weight_overrides(weights, partner[key]) if key in partner else []
        assert main([*base, *extra, f"evaluation.weights.{key}={path}"]) == 2, key
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("uniemo: error:")]
        assert len(lines) == 1 and "Traceback" not in err, (key, err)
        assert f"evaluation.weights.{key}:" in lines[0] and needle in lines[0], (key, lines[0])
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------------------
# `uniemo metrics`, end to end
# ---------------------------------------------------------------------------------------------------------
def _judge_folder(path: Path) -> Path:
    """A judge folder as `uniemo train-judge` writes it (random weights)."""
    from safetensors.torch import save_file

    from uniemo.evaluation.judge import JudgeNet

    torch.manual_seed(0)
    path.mkdir(parents=True)
    save_file(JudgeNet(width=4).state_dict(), str(path / "model.safetensors"))
    (path / "judge.json").write_text(json.dumps({
        "format": 1, "name": "cnn4-w4-32px-test", "architecture": "cnn4", "width": 4, "dropout": 0.2,
        "image_size": 32, "normalization": "imagenet",
    }))
    return path


@pytest.mark.slow  # every network once, FID's three eigendecompositions included
def test_uniemo_metrics_end_to_end_without_network_or_cache(weights, folders, tmp_path, monkeypatch, capsys):
    generated, real = folders
    for var in ("TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tmp_path / "config.yaml").write_text(
        "evaluation:\n  weights:\n" + "".join(f"    {k}: {p}\n" for k, p in weights.items())
        + "  diversity_pairs: 2\n  metric_device: cpu\ndata:\n  num_workers: 0\nlogging:\n  progress: false\n"
    )
    out = tmp_path / "result" / "metrics.json"
    judge = _judge_folder(tmp_path / "judge")
    argv = ["metrics", "--generated", str(generated), "--real", str(real), "--config", str(tmp_path / "config.yaml"),
            "--judge", str(judge), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{out}: FID ") and "Sem-D" in captured.out and "(paper)" in captured.out
    assert "Traceback" not in captured.err and "Warning" not in captured.err
    for var in ("TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        assert not any((tmp_path / var).iterdir()), var  # nothing downloaded, nothing cached

    doc = json.loads(out.read_text())
    assert doc["command"] == "uniemo metrics" and doc["version"] == 1 and doc["left_out"] == {}
    assert doc["generated"]["images"] == 6 and doc["real"]["images"] == 8
    assert doc["generated"]["per_emotion"]["fear"] == 3 and doc["real"]["per_emotion"]["sadness"] == 2
    blocks = doc["metrics"]
    assert set(blocks) == {"fid", "emo_a", "emo_a_judge", "lpips", "sem_c", "sem_d"}
    files = {w["key"]: w for b in blocks.values() for w in b.get("weights", [])}
    for key, path in weights.items():
        if key != "clip":
            assert files[f"evaluation.weights.{key}"]["sha256"] == _sha256(path), key
    assert files["evaluation.weights.clip"]["file"] == "model.safetensors"
    for name, block in blocks.items():
        assert block["network"] and block["images"] == 6, name
    assert blocks["emo_a_judge"]["network"] == "judge:cnn4-w4-32px-test"
    assert blocks["sem_d"]["variant"] == "paper" and blocks["sem_d"]["pairs_per_emotion"] == 2
    assert doc["settings"]["sem_d_variant"] == "paper" and doc["settings"]["device"] == "cpu"
    assert doc["seconds"]["total"] > 0

    # The same numbers on a second run; a metric without weights is left out and says why.
    again = tmp_path / "again.json"
    assert main([*argv[:-2], "--out", str(again), "evaluation.weights.inception=", "evaluation.weights.clip=",
                 "evaluation.weights.places365_resnet50="]) == 0
    second = json.loads(again.read_text())
    assert second["left_out"] == {
        "fid": "evaluation.weights.inception is not set",
        "emo_a": "evaluation.weights.clip is not set",
        "sem_c": "evaluation.weights.places365_resnet50 is not set",
        "sem_d": "evaluation.weights.clip is not set",
    }
    assert second["metrics"]["lpips"] == blocks["lpips"]
    assert second["metrics"]["emo_a_judge"]["top1"] == blocks["emo_a_judge"]["top1"]


def test_bad_layouts_are_one_line_exit_2(tmp_path, folders, capsys):
    generated, _ = folders
    odd = tmp_path / "odd"
    shutil.copytree(generated, odd)
    (odd / "happy").mkdir()
    shutil.copy(next((generated / "fear").iterdir()), odd / "happy" / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    only_sadness = write_image_folder(tmp_path / "sad", {"sadness": 2}, seed=3)
    cases = [
        (["--generated", str(tmp_path / "absent")], "--generated: image folder"),
        (["--generated", str(odd)], "named after no emotion (happy)"),
        (["--generated", str(empty)], "no images found"),
        (["--generated", str(generated), "--real", str(only_sadness), "evaluation.weights.inception=x"],
         f"evaluation.weights.inception: {Path('x').resolve()} does not exist"),  # command-line paths: the cwd's
        (["--generated", str(generated), "--out", str(tmp_path)], "is a folder"),
    ]
    for argv, needle in cases:
        assert main(["metrics", *argv, "logging.progress=false"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("uniemo: error:") and needle in err, (argv, err)


def test_fid_needs_real_images_of_every_generated_emotion(weights, folders, tmp_path, capsys):
    generated, _ = folders
    only_sadness = write_image_folder(tmp_path / "sad", {"sadness": 2}, seed=3)
    argv = ["metrics", "--generated", str(generated), "--real", str(only_sadness), "logging.progress=false",
            "data.num_workers=0", *weight_overrides(weights, "inception")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("uniemo: error:") and "no images of amusement, fear" in err[-1]


# ---------------------------------------------------------------------------------------------------------
# Image sets, JPEG output, the moved config key
# ---------------------------------------------------------------------------------------------------------
def test_shard_split_image_set_matches_the_manifest(synth_shards):
    test = read_shard_split(synth_shards, "test")
    counts = json.loads((synth_shards / "manifest.json").read_text())["totals"]["test"]["emotion_counts"]
    assert [test.counts()[e] for e in EMOTIONS] == counts
    image = test.by_emotion[test.emotions[0]][0].open()
    assert image.mode == "RGB" and image.size == (32, 32)


def test_evaluation_images_as_jpeg_carry_their_record(tmp_path):
    from uniemo.inference.runs import save_generations

    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    records = [{"file": f"awe_{s}.jpg", "emotion": "awe", "seed": s} for s in (7, 8)]
    (tmp_path / "awe").mkdir()
    save_generations(tmp_path / "awe", images, records)
    with Image.open(tmp_path / "awe" / "awe_7.jpg") as image:
        assert image.format == "JPEG" and json.loads(image.info["comment"])["seed"] == 7
    image_set = read_image_folder(tmp_path, "g")
    assert image_set.counts()["awe"] == 2 and "generations.jsonl" in image_set.ignored
    assert load_config(None, ["evaluation.image_format=jpg"]).evaluation.image_format == "jpg"


def test_the_old_inception_key_moves_to_evaluation_weights(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("evaluation:\n  inception_weights: /models/inception.pth\n  judge: ''\n")
    assert load_config(old).evaluation.weights.inception == "/models/inception.pth"
    (tmp_path / "empty.yaml").write_text("evaluation:\n  inception_weights: ''\n")
    assert load_config(tmp_path / "empty.yaml").evaluation.weights.inception == ""
    with pytest.raises(UserError, match="moved to evaluation.weights.inception"):
        load_config(old, ["evaluation.weights.inception=/models/other.pth"])
