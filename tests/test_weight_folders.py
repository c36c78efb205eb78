"""Weight folders as users have them (issue 15, part 6): fp16-variant diffusers and CLIP folders load; a single-file
CompVis SD checkpoint converts offline (``uniemo convert sd-single-file``); pickles (``*.bin``, ``*.ckpt``, OpenAI's
``ViT-L-14.pt``) give one line naming the conversion, exit 2, and are never unpickled.

The pickles here carry a canary: unpickling one would create a marker file, so each refusal also proves that
nothing was unpickled. The single file is written from a tiny random diffusers pipeline in the CompVis key layout
(the reverse of the mapping diffusers' converter reads), so converting it back must reproduce every tensor.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from uniemo import cli
from uniemo.config import load_config
from uniemo.errors import UserError
from uniemo.models.generator import Generator, build_generator, check_generator_folder
from uniemo.models.weights import build_understanding, build_understanding_reported, check_model_folders

STAGE1_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_stage1.yaml"
WEIGHTED_PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


class _Canary:
    """Unpickling this object touches ``marker``: the test fails if any refusal below unpickled a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write_pickle(path: Path, marker: Path, as_zip: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        torch.save(_Canary(marker), path)  # a zip holding data.pkl, like torch.save and TorchScript archives
    else:
        path.write_bytes(pickle.dumps(_Canary(marker)))
    return path


def _cli_error(argv: list[str], capsys) -> str:
    """Run the console script in-process; assert exit 2 and exactly one line on stderr; return that line."""
    capsys.readouterr()  # progress bars of earlier loads are not this command's output
    code = cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("uniemo: error: "), err
    return err[0]


def _train_error(overrides: list[str], tmp_path: Path, capsys) -> str:
    """``uniemo train`` with a model path: the driver's folder check fails before any data, Ray or DeepSpeed."""
    return _cli_error(
        ["train", "--config", str(STAGE1_CONFIG), f"run.output_dir={tmp_path / 'runs'}", *overrides], capsys
    )


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    Generator.build_random("tiny", seed=3).save_pretrained(path)
    return path


def _load_generator(path: Path) -> Generator:
    """Through the config path a user sets (``model.generator.path``)."""
    cfg = load_config(None, [f"model.generator.path={path}"])
    check_model_folders(cfg.model)
    return build_generator(cfg.model.generator)


def _assert_same_weights(got: Generator, expected: Generator, cast: torch.dtype | None = None) -> None:
    for part in ("unet", "vae", "text_encoder"):
        ours = getattr(got, part).state_dict()
        theirs = getattr(expected, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for key, tensor in theirs.items():
            want = tensor if cast is None else tensor.to(cast).float()
            assert ours[key].dtype == torch.float32, (part, key)
            assert torch.equal(ours[key], want), (part, key)


# ------------------------------------------------------------------------------------------------------------------
# variants and pickles in folders


def test_fp16_variant_diffusers_folder_loads_cast_to_float32(generator_dir, tmp_path):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    fp16 = tmp_path / "sd-fp16"
    StableDiffusionPipeline.from_pretrained(
        generator_dir, torch_dtype=torch.float16, local_files_only=True, safety_checker=None
    ).save_pretrained(fp16, variant="fp16")
    for part, stem in WEIGHTED_PARTS.items():  # the hub's fp16 layout: variant files only
        names = sorted(p.name for p in (fp16 / part).glob("*.safetensors"))
        assert names == [f"{stem}.fp16.safetensors"], names
    assert check_generator_folder(fp16) == dict.fromkeys(WEIGHTED_PARTS, "fp16")
    assert check_generator_folder(generator_dir) == dict.fromkeys(WEIGHTED_PARTS)
    _assert_same_weights(_load_generator(fp16), Generator.from_pretrained(generator_dir), cast=torch.float16)


@pytest.mark.parametrize("layout", ["vision", "full"])
def test_fp16_variant_clip_folder_loads(layout, tmp_path):
    """A ``CLIPVisionModel`` saved by transformers 5 (keys without ``vision_model.``) and a ``CLIPModel``, each as
    the hub's fp16 variant only."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    if layout == "vision":
        reference: torch.nn.Module = CLIPVisionModel(CLIPVisionConfig(**vision, projection_dim=16))
    else:
        text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        reference = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip = tmp_path / "clip-fp16"
    reference.half().save_pretrained(clip, variant="fp16")
    assert sorted(p.name for p in clip.glob("*.safetensors")) == ["model.fp16.safetensors"]
    cfg = load_config(None, ["model.understanding.preset=from_clip", f"model.understanding.clip_path={clip}"])
    check_model_folders(cfg.model)
    model, report = build_understanding_reported(cfg.model.understanding, num_scenes=3, num_objects=3)
    stored = load_file(str(clip / "model.fp16.safetensors"))
    towers = {k.removeprefix("vision_model."): t for k, t in stored.items() if layout == "vision" or
              k.startswith("vision_model.")}
    params = dict(model.named_parameters())
    assert report is not None and set(report.loaded) == set(towers) | ({"logit_scale_scene"} if layout == "full" else set())
    for name, tensor in towers.items():
        assert params[name].dtype == torch.float32 and torch.equal(params[name], tensor.float()), name


def test_several_variants_without_a_plain_file_name_them(generator_dir, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(generator_dir, both)
    unet = both / "unet"
    plain = unet / "diffusion_pytorch_model.safetensors"
    shutil.copy(plain, unet / "diffusion_pytorch_model.fp16.safetensors")
    shutil.copy(plain, unet / "diffusion_pytorch_model.bf16.safetensors")
    assert check_generator_folder(both)["unet"] is None  # the plain file wins when it is there
    plain.unlink()
    with pytest.raises(UserError, match=r"variants bf16, fp16 and no plain diffusion_pytorch_model.safetensors"):
        check_generator_folder(both)


def test_pickled_parts_are_one_line_never_unpickled(generator_dir, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "sd-bin"
    shutil.copytree(generator_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _write_pickle(pickled / "unet" / "diffusion_pytorch_model.bin", marker)
    line = _train_error([f"model.generator.path={pickled}"], tmp_path, capsys)
    assert "holds only pickled weights (diffusion_pytorch_model.bin)" in line
    assert f"StableDiffusionPipeline.from_pretrained('{pickled}').save_pretrained(" in line

    clip = tmp_path / "clip-bin"
    clip.mkdir()
    CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4).save_pretrained(clip)
    _write_pickle(clip / "pytorch_model.bin", marker)
    line = _train_error(["model.understanding.preset=from_clip", f"model.understanding.clip_path={clip}"],
                        tmp_path, capsys)
    assert "holds only pickled weights (pytorch_model.bin)" in line and "CLIPModel.from_pretrained" in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------------
# single files


def test_openai_clip_archive_is_one_line_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    scripted = tmp_path / "jit" / "ViT-L-14.pt"  # what OpenAI ships: a TorchScript archive
    scripted.parent.mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    canary = _write_pickle(tmp_path / "zip" / "ViT-L-14.pt", marker, as_zip=True)
    for archive in (scripted, canary):
        line = _train_error([f"model.understanding.clip_path={archive}"], tmp_path, capsys)
        assert f"{archive} is an OpenAI/PyTorch CLIP archive (a pickle), which uniemo never unpickles" in line
        assert f"convert_clip_original_pytorch_to_hf.py --checkpoint_path {archive}" in line
    with pytest.raises(UserError, match="convert_clip_original_pytorch_to_hf.py"):
        build_understanding(
            load_config(None, [f"model.understanding.clip_path={canary}"]).model.understanding, 3, 3
        )
    assert not marker.exists()


def _resnet_to_compvis(name: str) -> str:
    for ours, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                         ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        if name.startswith(ours + "."):
            return theirs + name[len(ours):]
    raise AssertionError(name)


def _unet_key_to_compvis(key: str, layers: int, blocks_with_attention: set[int]) -> str:
    """A diffusers UNet2DConditionModel key in the CompVis (LDM ``openaimodel``) layout of SD-1.x."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    parts = key.split(".")
    per = layers + 1  # CompVis numbers a down level's resnets and its downsampler in one sequence
    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + i * per + j}.0.{_resnet_to_compvis(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + i * per + j}.1.{rest}"
        return f"input_blocks.{(i + 1) * per}.0.op.{parts[-1]}"  # downsamplers.0.conv.*
    if parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{i * per + j}.0.{_resnet_to_compvis(rest)}"
        if kind == "attentions":
            return f"output_blocks.{i * per + j}.1.{rest}"
        slot = 2 if i in blocks_with_attention else 1
        return f"output_blocks.{i * per + layers}.{slot}.conv.{parts[-1]}"  # upsamplers.0.conv.*
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_to_compvis(rest)}"
    raise AssertionError(key)


def _vae_key_to_compvis(key: str, blocks: int) -> tuple[str, bool]:
    """A diffusers AutoencoderKL key in the CompVis layout, and whether it is a mid-attention linear weight (stored
    there as a 1x1 convolution)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key], False
    side, parts = key.split(".")[0], key.split(".")[1:]
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        renamed = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        layer, leaf = rest.rsplit(".", 1)
        return f"{side}.mid.attn_1.{renamed[layer]}.{leaf}", leaf == "weight" and layer != "group_norm"
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    level = i if side == "encoder" else blocks - 1 - i  # the decoder's up levels count from the bottom
    name = "down" if side == "encoder" else "up"
    if kind == "resnets":
        return f"{side}.{name}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
    sampler = "downsample" if side == "encoder" else "upsample"
    return f"{side}.{name}.{level}.{sampler}.{rest}", False


def _write_compvis_single_file(folder: Path, out: Path, ema_offset: float | None = None) -> Path:
    """The diffusers pipeline at ``folder`` as one CompVis-layout safetensors (SD-1.x key names); with
    ``ema_offset`` the file also holds an EMA copy of the UNet (``model_ema.*``, weights + offset), as
    ``v1-5-pruned.safetensors`` does."""
    import json

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    with_attention = {i for i, t in enumerate(unet_cfg["up_block_types"]) if "CrossAttn" in t}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items():
        name = _unet_key_to_compvis(key, unet_cfg["layers_per_block"], with_attention)
        tensors[f"model.diffusion_model.{name}"] = t
        if ema_offset is not None:
            tensors["model_ema." + "diffusion_model" + name.replace(".", "")] = t + ema_offset
    for key, t in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items():
        name, as_conv = _vae_key_to_compvis(key, len(vae_cfg["block_out_channels"]))
        tensors[f"first_stage_model.{name}"] = t[:, :, None, None].contiguous() if as_conv else t
    for key, t in load_file(str(folder / "text_encoder" / "model.safetensors")).items():
        # transformers 5 saves CLIPTextModel without its `text_model.` level; CompVis files always have it.
        tensors[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = t
    save_file(tensors, str(out))
    return out


def _config_only(folder: Path, out: Path) -> Path:
    """What ``hf download <repo> --include '*.json' '*.txt'`` gives: configs and tokenizer, no weights."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def test_single_file_checkpoint_converts_offline_and_loads(generator_dir, tmp_path, capsys):
    single = _write_compvis_single_file(generator_dir, tmp_path / "v1-5-pruned-emaonly.safetensors")
    config_dir = _config_only(generator_dir, tmp_path / "sd15-config")
    line = _train_error([f"model.generator.path={single}"], tmp_path, capsys)
    assert f"is a single-file Stable Diffusion checkpoint, not a diffusers folder; convert it once with " \
           f"`uniemo convert sd-single-file {single}" in line

    out = tmp_path / "converted"
    assert cli.main(["convert", "sd-single-file", str(single), str(out), "--config", str(config_dir)]) == 0
    assert f"set model.generator.path={out}" in capsys.readouterr().err
    assert not list(out.rglob("*.bin")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]
    _assert_same_weights(_load_generator(out), Generator.from_pretrained(generator_dir))

    # An existing output is never overwritten.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    line = _cli_error(["convert", "sd-single-file", str(single), str(out), "--config", str(config_dir)], capsys)
    assert "already exists" in line and sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_single_file_with_ema_takes_the_ema_unet(generator_dir, tmp_path, capsys):
    single = _write_compvis_single_file(generator_dir, tmp_path / "v1-5-pruned.safetensors", ema_offset=1.0)
    config_dir = _config_only(generator_dir, tmp_path / "sd15-config")
    expected = Generator.from_pretrained(generator_dir)
    for flag, offset in (([], 1.0), (["--no-ema"], 0.0)):
        out = tmp_path / f"converted{offset}"
        argv = ["convert", "sd-single-file", str(single), str(out), "--config", str(config_dir), *flag]
        assert cli.main(argv) == 0
        unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
        for key, tensor in expected.unet.state_dict().items():
            assert torch.equal(unet[key], tensor + offset), (flag, key)
    capsys.readouterr()


def test_conversion_refusals_are_one_line(generator_dir, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    ckpt = _write_pickle(tmp_path / "v1-5-pruned-emaonly.ckpt", marker, as_zip=True)
    config_dir = _config_only(generator_dir, tmp_path / "sd15-config")
    convert = ["convert", "sd-single-file"]
    line = _cli_error([*convert, str(ckpt), str(tmp_path / "a"), "--config", str(config_dir)], capsys)
    assert "is a pickled checkpoint, which uniemo never unpickles" in line
    assert f"convert_original_stable_diffusion_to_diffusers.py --checkpoint_path {ckpt}" in line
    line = _train_error([f"model.generator.path={ckpt}"], tmp_path, capsys)
    assert "convert_original_stable_diffusion_to_diffusers.py" in line
    assert not marker.exists()

    single = _write_compvis_single_file(generator_dir, tmp_path / "sd.safetensors")
    (tmp_path / "empty").mkdir()
    line = _cli_error([*convert, str(single), str(tmp_path / "b"), "--config", str(tmp_path / "empty")], capsys)
    assert "is not a diffusers Stable Diffusion config folder (missing model_index.json)" in line
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in line

    unet_only = tmp_path / "unet.safetensors"
    save_file(load_file(str(generator_dir / "unet" / "diffusion_pytorch_model.safetensors")), str(unet_only))
    line = _cli_error([*convert, str(unet_only), str(tmp_path / "c"), "--config", str(config_dir)], capsys)
    assert "is not a CompVis Stable Diffusion checkpoint (no model.diffusion_model.* tensors)" in line

    # Configs of another shape: diffusers' shape error, as one line.
    bigger = tmp_path / "bigger"
    Generator.build_random("small").save_pretrained(bigger)
    line = _cli_error([*convert, str(single), str(tmp_path / "d"), "--config", str(bigger)], capsys)
    assert f"{single} does not fit the configs in {bigger}" in line
    assert not any((tmp_path / n).exists() for n in "abcd")
