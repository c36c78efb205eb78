"""Text features of attribute names for the stage-1 contrastive heads (METHOD §2.3).

Each name goes through a frozen CLIP text tower, untemplated: tokenised to 77 tokens, the final-LN hidden
state taken at the EOT token, multiplied by ``text_projection`` and L2-normalised. With
``model.understanding.clip_path`` set the tower (and tokenizer) come from that folder; otherwise a small random
tower is built with a fixed seed on the local tokenizer, so tests and the CPU demo need no download.

The features are cached on disk as safetensors, keyed by a hash of the tower's identity (path plus the size and
modification time of its config and weights, or the random tower's config and seed) and of the vocabulary.

:func:`attribute_base_embeddings` embeds stage 2's attribute base for alpha (METHOD §3.5) in the space
``model.conditioner.attribute_space`` names: the generator's token embeddings (D6) or, as the official code, the
same CLIP text features of the raw names (``get_text_features``, cached here too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from uniemo.atomic import atomic_path
from uniemo.config.schema import UnderstandingConfig
from uniemo.errors import ConfigError
from uniemo.models.tokenizer import MAX_LENGTH, build_local_tokenizer
from uniemo.models.understanding import resolve_dims
from uniemo.models.weights import WeightsError, read_clip_folder, read_safetensors, safetensors_files

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.models.generator import Generator

CACHE_VERSION = 1
"""Bump when the feature computation changes, so old cache files are not reused."""
RANDOM_TOWER_SEED = 0
"""Seed of the random text tower used when no CLIP folder is configured."""
_BATCH = 256


def random_text_config(embed_dim: int, vocab_size: int) -> CLIPTextConfig:
    """The small random CLIP text tower of the small presets: hidden = projection = ``embed_dim``, 2 layers, 77 positions."""
    heads = 4 if embed_dim % 4 == 0 else (2 if embed_dim % 2 == 0 else 1)
    tokenizer = build_local_tokenizer()  # only its special-token ids
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=embed_dim,
        intermediate_size=4 * embed_dim,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=embed_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _random_tower_config(cfg: UnderstandingConfig) -> tuple[CLIPTextConfig, dict]:
    """The random tower's config and its identity for the cache key (no weights built)."""
    config = random_text_config(resolve_dims(cfg).embed_dim, len(build_local_tokenizer()))
    described = config.to_dict()
    described.pop("transformers_version", None)
    identity = {
        "random_text_tower": described,
        "seed": RANDOM_TOWER_SEED,
        "torch": torch.__version__.split("+")[0],
    }
    return config, identity


def _random_tower(config: CLIPTextConfig) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    # A private RNG stream: the same tower every time, without disturbing the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TOWER_SEED)
        model = CLIPTextModelWithProjection(config)
    return model, build_local_tokenizer()


def _clip_identity(clip_dir: Path) -> dict:
    files = [clip_dir / "config.json", *safetensors_files(clip_dir)]
    stats = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    return {"clip_path": str(clip_dir.resolve()), "files": stats}


def _clip_tower(clip_dir: Path) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    folder = read_clip_folder(clip_dir)
    if not folder.has_text:
        raise WeightsError(
            f"{folder.path} holds only a CLIP vision tower; attribute text features need a full CLIPModel "
            "folder (text tower and text_projection) in model.understanding.clip_path"
        )
    tokenizer_dir = next(
        (
            d
            for d in (folder.path, folder.path / "tokenizer")
            if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()
        ),
        None,
    )
    if tokenizer_dir is None:
        raise WeightsError(
            f"{folder.path} has no CLIP tokenizer files (tokenizer.json or vocab.json + merges.txt); save the "
            "CLIP tokenizer into the folder (CLIPTokenizer.save_pretrained)"
        )
    text = dict(folder.raw.get("text_config") or {})
    text.pop("model_type", None)
    text.pop("transformers_version", None)
    # The joint width is the top-level projection_dim of a CLIPModel config, not the text sub-config's.
    config = CLIPTextConfig(**{**text, "projection_dim": folder.projection_dim})
    model = CLIPTextModelWithProjection(config)
    state = read_safetensors(
        folder.path, keep=lambda k: k.startswith("text_model.") or k == "text_projection.weight"
    )
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise WeightsError(
            f"{folder.path} lacks text-tower tensors (first: {missing[0]}); re-save the CLIPModel"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    return model, CLIPTokenizer.from_pretrained(str(tokenizer_dir))


@torch.no_grad()
def encode_texts(
    model: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, names: list[str]
) -> torch.Tensor:
    """[N, E] L2-normalised projected CLIP text features at the EOT token (METHOD §2.3), in float32."""
    model.eval()
    chunks = []
    for start in range(0, len(names), _BATCH):
        batch = tokenizer(
            names[start : start + _BATCH],
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        hidden_BLD = model.text_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        # The first EOT of each row (padding may repeat the same id after it).
        eot_B = (batch.input_ids == tokenizer.eos_token_id).int().argmax(dim=1)
        pooled_BD = hidden_BLD[torch.arange(hidden_BLD.shape[0]), eot_B]
        chunks.append(F.normalize(model.text_projection(pooled_BD).float(), dim=-1))
    return torch.cat(chunks)


def _cache_key(identity: dict, names: list[str]) -> str:
    payload = json.dumps({"version": CACHE_VERSION, "model": identity, "names": names}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def _identity(cfg: UnderstandingConfig) -> dict:
    if cfg.clip_path:
        return _clip_identity(Path(cfg.clip_path).expanduser())
    return _random_tower_config(cfg)[1]


def attribute_text_features_path(cfg: UnderstandingConfig, names: list[str], cache_dir: str | Path) -> Path:
    """The cache file :func:`attribute_text_features` reads or writes for this tower and vocabulary."""
    return Path(cache_dir) / f"attribute_text_{_cache_key(_identity(cfg), list(names))}.safetensors"


def attribute_text_features(
    cfg: UnderstandingConfig, names: list[str], cache_dir: str | Path
) -> torch.Tensor:
    """[N, E] frozen CLIP text features of ``names`` (METHOD §2.3), computed once and cached in ``cache_dir``.

    ``cfg.clip_path`` set: that folder's text tower and tokenizer; empty: the seeded random tiny tower with the
    local tokenizer. Rows follow ``names``; the cache key covers the tower and the vocabulary.
    """
    names = list(names)
    path = attribute_text_features_path(cfg, names, cache_dir)
    if path.is_file():
        return load_file(str(path))["features"]
    if cfg.clip_path:
        model, tokenizer = _clip_tower(Path(cfg.clip_path).expanduser())
    else:
        model, tokenizer = _random_tower(_random_tower_config(cfg)[0])
    if names:
        features_NE = encode_texts(model, tokenizer, names)
    else:
        features_NE = torch.zeros(0, model.text_projection.out_features)  # E: the projection width
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: ranks that race on the same cache file each write a whole file.
    with atomic_path(path) as tmp:
        save_file({"features": features_NE.contiguous()}, str(tmp), metadata={"names": json.dumps(names)})
    return features_NE


def attribute_base_embeddings(
    cfg: Config, generator: Generator, names: list[str], cache_dir: str | Path
) -> torch.Tensor:
    """E_A, the attribute base embedded for alpha's retrieval (METHOD §3.5), [A, Dt] float32.

    ``model.conditioner.attribute_space``: ``token_embeddings`` (D6), each name as the mean input embedding of its
    tokens (:meth:`Generator.embed_names`); ``clip_text`` (the official ``generate_attr``), each raw name's
    projected CLIP text feature from ``attribute_clip_path`` (else ``model.understanding.clip_path``). Retrieval
    is by cosine, so the CLIP features' L2 normalisation here changes no retrieved index.

    Raises:
        ConfigError: ``clip_text`` without a CLIP folder, or one whose projection width is not the generator's
            token width (the mapped vectors are compared with these features).
    """
    cond = cfg.model.conditioner
    names = list(names)
    if cond.attribute_space == "token_embeddings":
        return generator.embed_names(names)
    clip_dir = cond.attribute_clip_path or cfg.model.understanding.clip_path
    if not clip_dir:
        raise ConfigError(
            "model.conditioner.attribute_space=clip_text embeds the attribute names with a CLIP text tower: set "
            "model.conditioner.attribute_clip_path (or model.understanding.clip_path) to a transformers CLIP folder"
        )
    tower = dataclasses.replace(cfg.model.understanding, clip_path=clip_dir)
    features_AE = attribute_text_features(tower, names, cache_dir)
    if features_AE.shape[-1] != generator.token_dim:
        raise ConfigError(
            f"model.conditioner.attribute_space=clip_text: the CLIP folder {clip_dir} projects names to "
            f"{features_AE.shape[-1]} dimensions, but the mapped vectors they are compared with have the generator's "
            f"token width {generator.token_dim}; use a CLIP whose projection_dim is {generator.token_dim}"
        )
    return features_AE
