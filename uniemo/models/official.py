"""The official UniEmo checkpoint format (JiuTian-VL/UniEmo), read safely and mapped onto uniemo's models.

The official scripts write (METHOD §2.5, §3.9, §4.1):

- stage 1, ``runs/train_vit/best.pth``: ``{model, Emo_classifier, optimizer, lr_scheduler, max_accuracy, epoch,
  config}``, ``model`` the state of ``Emotion_clip.CLIP`` (OpenAI CLIP names: the whole ViT under ``visual.``, the
  text tower, the four query projections and the logit scales), ``config`` an ``argparse.Namespace``;
- stage 2, ``output_dir/``: ``VIT_query.pth`` (``{model, Emo_classifier}``), ``mapper.pth``, ``mapper_scene.pth``,
  ``mapper_object.pth`` (``MLP`` states, ``mlp.<i>.*``) and ``params.json`` (the stage-2 config);
- the emotion space, ``UniEmo_space/<emotion>_{cls_fea,scene,object}_{mean,std}.pt``: one 1-D tensor each.

The ``.pth``/``.pt`` files are pickles. :func:`read_official_file` opens them with torch's restricted unpickler
(``weights_only=True``), which builds tensors and plain containers only; the one class the official files hold
besides, the ``argparse.Namespace`` of ``config``, is admitted as plain data (an object with a ``__dict__``, no
code) and returned as a dict. Anything else a file asks for is refused with one line, and nothing of it runs.

Name mapping (official -> uniemo, :func:`understanding_from_official`; :func:`understanding_to_official` is the
inverse):

=========================================================  ======================================================
``visual.conv1.weight``, ``class_embedding``,                ``embeddings.patch_embedding.weight``,
``positional_embedding``                                     ``class_embedding``, ``position_embedding.weight``
``visual.ln_pre`` / ``ln_post``                              ``pre_layrnorm`` / ``post_layernorm``
``visual.transformer.resblocks.i.attn.in_proj_*``            ``encoder.layers.i.self_attn.{q,k,v}_proj`` (split)
``...resblocks.i.{ln_1,ln_2,attn.out_proj,mlp.c_fc,          ``...layers.i.{layer_norm1,layer_norm2,
mlp.c_proj}``                                                self_attn.out_proj,mlp.fc1,mlp.fc2}``
``visual.visual_query_{scene,object}.weight``                ``{scene,object}_queries.weight``
``visual.transformer.visual_query_interact.{0,1}``           ``{scene,object}_interaction``: ``norm`` ->
                                                             ``visual_norm``, ``query_decoder.0.norm1`` ->
                                                             ``query_norm``, ``.norm3`` -> ``mlp_norm``,
                                                             ``.cross_attn.{q,k,v}_proj`` -> ``cross_attn.*``,
                                                             ``.cross_attn.proj`` -> ``cross_attn.out_proj``,
                                                             ``.mlp.0`` / ``.mlp.3`` -> ``mlp.fc1`` / ``mlp.fc2``
``visual_query_{scene,object}_proj`` [D, E]                  ``{scene,object}_projection.weight`` [E, D]
``logit_scale``, ``logit_scale_object``                      ``logit_scale_scene``, ``logit_scale_object``
``Emo_classifier.{fc0,fc1}``                                 ``emotion_head.{fc0,fc1}``
``mapper*.pth`` ``mlp.<i>.*``                                ``conditioner.mapper_{emotion,scene,object}.layers.<i>.*``
=========================================================  ======================================================

Left out when reading, because uniemo's model has no use for them (METHOD §2.1, §2.3): the text tower,
``visual.proj``, the two ``*_last_proj`` projections and their logit scales, and the interactive blocks'
``query_alpha``. Written back by :func:`understanding_to_official`: everything uniemo holds, plus ``query_alpha`` at
its initial value (never used); the official loaders read with ``strict=False``, so the rest keeps CLIP's weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError
from uniemo.models.emotion_space import EmotionSpace

STAGE1_FILE = "best.pth"
VIT_QUERY_FILE = "VIT_query.pth"
MAPPER_FILES: dict[str, str] = {"emotion": "mapper.pth", "scene": "mapper_scene.pth", "object": "mapper_object.pth"}
"""uniemo's mapper name (``conditioner.mapper_<name>``) -> the official file."""
PARAMS_FILE = "params.json"
SPACE_DIR = "UniEmo_space"
SPACE_STREAMS: dict[str, str] = {"cls": "cls_fea", "scene": "scene", "object": "object"}
"""uniemo's emotion-space stream -> the official file infix (``<emotion>_<infix>_{mean,std}.pt``)."""
QUERY_ALPHA_INIT = 1e-4
"""The official ``QueryPrompt.query_alpha`` initial value (ones x 1e-4); the parameter is never used."""
OFFICIAL_SPACE_COUNT = 2
"""Count stored per emotion for an emotion space read from official mean/std files, which do not record how many
images they came from: the smallest count whose sufficient statistics give the unbiased std back exactly."""

_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
_INTERACT = re.compile(r"^visual\.transformer\.visual_query_interact\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_QUERY_TYPES = ("scene", "object")
_FLAT: dict[str, str] = {
    "visual.conv1.weight": "embeddings.patch_embedding.weight",
    "visual.class_embedding": "embeddings.class_embedding",
    "visual.positional_embedding": "embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "pre_layrnorm.weight",
    "visual.ln_pre.bias": "pre_layrnorm.bias",
    "visual.ln_post.weight": "post_layernorm.weight",
    "visual.ln_post.bias": "post_layernorm.bias",
    "visual.visual_query_scene.weight": "scene_queries.weight",
    "visual.visual_query_object.weight": "object_queries.weight",
    "logit_scale": "logit_scale_scene",
    "logit_scale_object": "logit_scale_object",
}
_TRANSPOSED: dict[str, str] = {
    "visual_query_scene_proj": "scene_projection.weight",
    "visual_query_object_proj": "object_projection.weight",
}
_BLOCK_PARTS: dict[str, str] = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_INTERACT_PARTS: dict[str, str] = {
    "norm.": "visual_norm.",
    "query_decoder.0.norm1.": "query_norm.",
    "query_decoder.0.norm3.": "mlp_norm.",
    "query_decoder.0.cross_attn.q_proj.": "cross_attn.q_proj.",
    "query_decoder.0.cross_attn.k_proj.": "cross_attn.k_proj.",
    "query_decoder.0.cross_attn.v_proj.": "cross_attn.v_proj.",
    "query_decoder.0.cross_attn.proj.": "cross_attn.out_proj.",
    "query_decoder.0.mlp.0.": "mlp.fc1.",
    "query_decoder.0.mlp.3.": "mlp.fc2.",
}
_UNUSED = re.compile(
    r"^(visual\.proj|visual_query_(scene|object)_last_proj|logit_scale(_object)?_last|text_projection"
    r"|token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|transformer\.resblocks\..+"
    r"|input_resolution|context_length|vocab_size"
    r"|visual\.transformer\.visual_query_interact\.\d+\.query_alpha)$"
)
"""Official tensors uniemo's model has no place for (module docstring): listed as left out, never an error."""


class OfficialFileError(UserError):
    """An official UniEmo file that is missing, unreadable, or not in the official layout."""


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------
def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_official_file(path: str | Path) -> Any:
    """The content of an official ``.pth`` / ``.pt`` file, read with torch's restricted unpickler.

    Tensors and plain containers load as they are; an ``argparse.Namespace`` (the ``config`` of ``best.pth``) comes
    back as a plain dict. Nothing else is admitted.

    Raises:
        OfficialFileError: the file is missing, is not a torch file, or asks for anything else (a class, a function:
            the pickle of a code-running object); nothing of such a file is run.
    """
    path = Path(path)
    if not path.is_file():
        raise OfficialFileError(f"{path} does not exist; give the file the official UniEmo code wrote")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|Unsupported operand \d+|(\w+) opcode", str(e))
        what = found.group(0) if found else "a forbidden pickle instruction"
        raise OfficialFileError(
            f"refusing to load {path}: it asks for {what.rstrip('.')}, which an official UniEmo file does not hold "
            "(only tensors, plain containers and the argparse config); nothing of it was run"
        ) from None
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise OfficialFileError(f"cannot read {path} ({reason}); give the file the official UniEmo code wrote") from None
    return _plain(value)


def _plain(value: Any) -> Any:
    """``value`` with every ``argparse.Namespace`` turned into a dict (recursively)."""
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):  # an OrderedDict state too: a plain dict keeps its order
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from an official file: the whole file, or its entry ``key`` (``model``, ``Emo_classifier``);
    a ``module.`` prefix (a DDP-wrapped save) is dropped."""
    value = read_official_file(path)
    if key is not None:
        if not isinstance(value, Mapping) or key not in value:
            have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise OfficialFileError(f"{path} has no {key!r} entry (it holds {have}); is it an official UniEmo file?")
        value = value[key]
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise OfficialFileError(f"{path}{f' [{key!r}]' if key else ''} is not a state dict of tensors")
    state = dict(value)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------------------
# The understanding model
# ---------------------------------------------------------------------------------------------------------
def understanding_from_official(
    model_state: Mapping[str, torch.Tensor], head_state: Mapping[str, torch.Tensor], source: str | Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """uniemo ``UnderstandingModel`` names of an official ``model`` + ``Emo_classifier`` pair (module docstring).

    Returns:
        The mapped state (fp32 CPU tensors) and the official keys left out (text tower, unused projections, ...).

    Raises:
        OfficialFileError: a key that is neither mapped nor known to be unused (another architecture).
    """
    out: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for key, value in model_state.items():
        value = value.detach().float().cpu()
        if key in _FLAT:
            out[_FLAT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (m := _BLOCK.match(key)) is not None:
            _map_block(out, int(m.group(1)), m.group(2), value, key, source)
        elif (m := _INTERACT.match(key)) is not None and m.group(2) != "query_alpha":
            index, rest = int(m.group(1)), m.group(2)
            part = next((p for p in _INTERACT_PARTS if rest.startswith(p)), None)
            if index >= len(_QUERY_TYPES) or part is None:
                raise _unknown(key, source)
            out[f"{_QUERY_TYPES[index]}_interaction.{_INTERACT_PARTS[part]}{rest[len(part):]}"] = value
        elif _UNUSED.match(key):
            left_out.append(key)
        else:
            raise _unknown(key, source)
    for key, value in head_state.items():
        if not re.fullmatch(r"fc[01]\.(weight|bias)", key):
            raise OfficialFileError(
                f"{source}: Emo_classifier entry {key!r} is not the official Linear -> ReLU -> Dropout -> Linear head"
            )
        out[f"emotion_head.{key}"] = value.detach().float().cpu()
    return out, sorted(left_out)


def _map_block(out: dict[str, torch.Tensor], i: int, rest: str, value: torch.Tensor, key: str, source) -> None:
    prefix = f"encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]  # weight / bias
        if value.shape[0] % 3:
            raise OfficialFileError(f"{source}: {key} has {value.shape[0]} rows, not 3 x width (q, k, v)")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
            out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
        return
    found = next((p for p in _BLOCK_PARTS if rest.startswith(p)), None)
    if found is None:
        raise _unknown(key, source)
    out[f"{prefix}{_BLOCK_PARTS[found]}{rest[len(found):]}"] = value


def _unknown(key: str, source: str | Path) -> OfficialFileError:
    return OfficialFileError(
        f"{source}: {key!r} is not a tensor of the official UniEmo model (Emotion_clip ViT with expert queries); "
        "give a checkpoint of the official code"
    )


def understanding_to_official(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """The official ``model`` and ``Emo_classifier`` states of a uniemo understanding state (bare names).

    Returns:
        ``(model_state, head_state, left_out)``: ``left_out`` lists uniemo tensors the official files have no place
        for (the stage-2 attribute classifiers, which the official code does not save either).
    """
    inverse_flat = {v: k for k, v in _FLAT.items()}
    inverse_transposed = {v: k for k, v in _TRANSPOSED.items()}
    inverse_block = {v: k for k, v in _BLOCK_PARTS.items()}
    inverse_interact = {v: k for k, v in _INTERACT_PARTS.items()}
    model: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        value = value.detach().float().cpu().contiguous()
        if key in inverse_flat:
            model[inverse_flat[key]] = value
        elif key in inverse_transposed:
            model[inverse_transposed[key]] = value.t().contiguous()
        elif key.startswith("emotion_head."):
            head[key[len("emotion_head."):]] = value
        elif (m := _LAYER.match(key)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            if (q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)) is not None:
                qkv.setdefault((i, q.group(2)), {})[q.group(1)] = value
                continue
            part = next((p for p in inverse_block if rest.startswith(p)), None)
            if part is None:
                raise ValueError(f"no official name for {key}")
            model[f"visual.transformer.resblocks.{i}.{inverse_block[part]}{rest[len(part):]}"] = value
        elif key.startswith(("scene_interaction.", "object_interaction.")):
            kind, rest = key.split(".", 1)
            index = _QUERY_TYPES.index(kind.split("_")[0])
            part = next((p for p in inverse_interact if rest.startswith(p)), None)
            if part is None:
                raise ValueError(f"no official name for {key}")
            model[f"visual.transformer.visual_query_interact.{index}.{inverse_interact[part]}{rest[len(part):]}"] = value
        else:
            left_out.append(key)
    for (i, kind), parts in qkv.items():
        model[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    for index in range(len(_QUERY_TYPES)):
        norm = model.get(f"visual.transformer.visual_query_interact.{index}.norm.weight")
        if norm is not None:
            model[f"visual.transformer.visual_query_interact.{index}.query_alpha"] = torch.full_like(
                norm, QUERY_ALPHA_INIT
            )
    return model, head, sorted(left_out)


def official_name(key: str) -> str:
    """The official name of a uniemo understanding key (for messages); the key itself when it has none."""
    m = _LAYER.match(key)
    if m is not None and (q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m.group(2))) is not None:
        return f"visual.transformer.resblocks.{m.group(1)}.attn.in_proj_{q.group(2)} ({q.group(1)} rows)"
    model, head, _ = understanding_to_official({key: torch.zeros(1)})
    names = [k for k in model if not k.endswith("query_alpha")] + [f"Emo_classifier.{k}" for k in head]
    return names[0] if names else key


# ---------------------------------------------------------------------------------------------------------
# Mappers and params.json
# ---------------------------------------------------------------------------------------------------------
def mapper_from_official(state: Mapping[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """An official ``MLP`` state (``mlp.<i>.*``) with uniemo's :class:`Mapper` names (``layers.<i>.*``)."""
    out = {}
    for key, value in state.items():
        if not re.fullmatch(r"mlp\.\d+\.(weight|bias)", key):
            raise OfficialFileError(
                f"{source}: {key!r} is not a tensor of the official mapper (model: MLP, mlp.<i>.weight/bias)"
            )
        out["layers." + key[len("mlp."):]] = value.detach().float().cpu()
    return out


def mapper_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`mapper_from_official`."""
    return {"mlp." + k[len("layers."):]: v.detach().float().cpu().contiguous() for k, v in state.items()}


def conditioner_settings(params: Mapping[str, Any], mapper_state: Mapping[str, torch.Tensor], source) -> dict:
    """``model.conditioner`` values of an official ``params.json`` (``model: MLP``, ``num_fc_layers``,
    ``need_ReLU``, ``need_LN``, ``need_Dropout``) and the hidden width of its mapper weights."""
    model = params.get("model", "MLP")
    if model != "MLP":
        raise OfficialFileError(
            f"{source}: params.json model {model!r}; uniemo's mappers are the official MLP (model: MLP), not {model}"
        )
    layers = int(params.get("num_fc_layers", 2))
    first = mapper_state.get("layers.0.weight")
    if first is None or layers < 1:
        raise OfficialFileError(f"{source}: the mapper has no first layer (mlp.0.weight)")
    return {
        "num_layers": layers,
        "relu": bool(params.get("need_ReLU", False)),
        "layer_norm": bool(params.get("need_LN", False)),
        "dropout": 0.5 if params.get("need_Dropout", False) else 0.0,
        "hidden": int(first.shape[0]) if first.shape[0] != first.shape[1] else None,
    }


def official_params(cfg: Any, width: int, output_dir: str | Path, stage1_file: str | Path | None) -> dict[str, Any]:
    """An official ``params.json`` for a uniemo stage-2 config (understanding width ``width``): the keys of the
    official ``config/config.yaml``, of which ``inference.py`` reads ``model``, ``num_fc_layers``, ``need_*`` and
    ``output_dir``, with the run's values.

    Raises:
        UserError: mappers the official MLP cannot express (a hidden width other than the input's, dropout other
            than 0 or 0.5).
    """
    cond = cfg.model.conditioner
    if cond.hidden is not None and cond.hidden != width:
        raise UserError(
            f"model.conditioner.hidden={cond.hidden}: the official MLP's hidden width is its input width; this run's "
            "mappers cannot be written in the official layout"
        )
    if cond.dropout not in (0.0, 0.5):
        raise UserError(
            f"model.conditioner.dropout={cond.dropout}: the official MLP has Dropout(0.5) or none; this run's mappers "
            "cannot be written in the official layout"
        )
    return {
        "attr_rate": 0.01,
        # L_cond = 1e-3 CE + 1e-3 emo_rate triplet in the official code (METHOD §3.6)
        "emo_rate": cfg.training.losses.condition_triplet_weight / 1e-3,
        "emotion": "all",
        "learnable_property": ["all"],
        "learning_rate": cfg.training.lr_mappers,
        "max_train_steps": None,
        "model": "MLP",
        "need_Dropout": cond.dropout > 0,
        "need_LN": bool(cond.layer_norm),
        "need_ReLU": bool(cond.relu),
        "num_fc_layers": int(cond.num_layers),
        "num_train_epochs": max(int(cfg.training.epochs), 1),
        "output_dir": str(Path(output_dir).resolve()),
        "pretrained_model_name_or_path": cfg.model.generator.path,
        "VIT_path": str(Path(stage1_file).resolve()) if stage1_file else "",
        "seed": int(cfg.run.seed),
        "threshold": 0,
        "train_data_dir": cfg.data.shards,
        "project_name": "fine_tune.py",
        "exported_by": "uniemo export --official",
    }


# ---------------------------------------------------------------------------------------------------------
# The emotion space
# ---------------------------------------------------------------------------------------------------------
def space_file(folder: str | Path, emotion: str, stream: str, stat: str) -> Path:
    """``UniEmo_space/<emotion>_<cls_fea|scene|object>_<mean|std>.pt`` inside ``folder`` (the space folder)."""
    return Path(folder) / f"{emotion}_{SPACE_STREAMS[stream]}_{stat}.pt"


def read_official_space(folder: str | Path, dims: Mapping[str, int]) -> tuple[EmotionSpace, list[str]]:
    """An :class:`EmotionSpace` from official mean/std files (METHOD §4.1), with the count of each emotion set to
    :data:`OFFICIAL_SPACE_COUNT` (the files do not record it; mean and std come back exactly).

    Returns:
        The space and the emotions that have no files (their count stays 0: generation refuses them).

    Raises:
        OfficialFileError: a file that is not a 1-D tensor of the stream's width, or a mean without its std.
    """
    folder = Path(folder)
    space = EmotionSpace(dims)
    missing = []
    n = float(OFFICIAL_SPACE_COUNT)
    for k, emotion in enumerate(EMOTIONS):
        if not space_file(folder, emotion, "cls", "mean").is_file():
            missing.append(emotion)
            continue
        for stream, width in space.dims.items():
            values = []
            for stat in ("mean", "std"):
                path = space_file(folder, emotion, stream, stat)
                tensor = read_official_file(path)
                if not isinstance(tensor, torch.Tensor) or tensor.reshape(-1).shape != (width,):
                    shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise OfficialFileError(f"{path} holds {shape}, not the {width} {stream} values of the model")
                values.append(tensor.reshape(-1).to(torch.float64))
            mean, std = values
            space.count[stream][k] = n
            space.sum[stream][k] = n * mean
            space.sumsq[stream][k] = (n - 1) * std * std + n * mean * mean
    return space, missing


def write_official_space(space: EmotionSpace, folder: str | Path) -> list[Path]:
    """The official ``<emotion>_<stream>_{mean,std}.pt`` files of ``space`` (emotions with samples) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    counts = space.counts("cls")
    for stream in space.streams:
        mean, std = space.mean(stream).float(), space.std(stream).float()
        for k, emotion in enumerate(EMOTIONS):
            if counts[k] < 1:
                continue
            for stat, table in (("mean", mean), ("std", std)):
                path = space_file(folder, emotion, stream, stat)
                torch.save(table[k].clone(), path)
                written.append(path)
    return written


def read_params(path: str | Path) -> dict[str, Any]:
    """An official ``params.json`` (the stage-2 config the inference script reads)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OfficialFileError(f"{path} does not exist; the official stage-2 output_dir holds params.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OfficialFileError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise OfficialFileError(f"{path} is not the official params.json (a JSON object)")
    return data
