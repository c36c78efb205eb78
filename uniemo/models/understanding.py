"""The understanding model: a CLIP-style ViT with scene and object expert queries (METHOD §2, D2, D4, D13).

The backbone's modules carry the names of transformers' ``CLIPVisionTransformer`` (``embeddings``,
``pre_layrnorm`` -- sic, CLIP's spelling --, ``encoder.layers.i.{layer_norm1,self_attn,layer_norm2,mlp}``,
``post_layernorm``), so a ``CLIPModel`` / ``CLIPVisionModel`` checkpoint maps onto it by dropping the
``vision_model.`` prefix (:mod:`uniemo.models.weights`). With both query types switched off the model computes
exactly what that vision tower computes (D2), plus the emotion head.

Token flow (METHOD §2.1): scene queries are appended to the image tokens before block 1; after block L1 they
are refined by cross-attention to the image tokens (interactive block, §2.2) and read out as their mean; the
object queries join there; after block L2 the object queries are refined and read out the same way. All tokens
attend to each other in the ViT blocks (no mask), as in deep prompt tuning.

Shape legend: B batch, T image tokens (1 CLS + P patches), Q queries, D width, E embedding width, H heads,
K head width, C channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from uniemo.config.schema import NUM_EMOTIONS, UnderstandingConfig
from uniemo.errors import ConfigError
from uniemo.models.outputs import UnderstandingOutput

# ---------------------------------------------------------------------------------------------------------
# Presets: a small name -> dims registry (METHOD D2). L1 / L2 are not stored: they default to
# depth // 3 and 2 * depth // 3 (D2), which gives 8/16, 4/8, 2/5 and 2/4 for the four presets.
# ---------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, int]] = {
    "vit-l14": dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16, queries=32, embed_dim=768),
    "vit-b16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, queries=32, embed_dim=512),
    "small": dict(image_size=64, patch_size=8, width=128, depth=8, heads=4, queries=16, embed_dim=64),
    "tiny": dict(image_size=64, patch_size=8, width=64, depth=6, heads=4, queries=8, embed_dim=32),
}
"""Backbone presets. ``vit-l14`` / ``vit-b16`` are OpenAI CLIP's vision towers (quick_gelu, MLP 4x)."""

SCENE_LOGIT_SCALE = math.log(100.0)
"""CLIP's pretrained logit scale, used for the scene contrastive logits (METHOD §2.3)."""
OBJECT_LOGIT_SCALE = math.log(1 / 0.07)
"""The object contrastive logit scale (METHOD §2.1, §2.3)."""


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,
    "gelu_new": partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
}
"""Activations by the names transformers' CLIP configs use (``hidden_act``)."""


@dataclass(frozen=True)
class UnderstandingDims:
    """The resolved architecture of an understanding model (preset + config overrides)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    embed_dim: int
    num_scene_queries: int
    num_object_queries: int
    scene_layer: int
    """L1: the scene queries are refined and read out after this block (1-based)."""
    object_layer: int
    """L2: the object queries are refined and read out after this block (1-based)."""
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Image tokens: CLS + patches."""
        return self.grid * self.grid + 1


def resolve_dims(cfg: UnderstandingConfig, base: Mapping[str, Any] | None = None) -> UnderstandingDims:
    """Resolve the architecture from ``cfg.preset`` (or ``base``, e.g. read from a CLIP folder) and overrides.

    Raises :class:`ConfigError` for an unknown preset or inconsistent sizes, naming the key to change.
    """
    if base is None:
        if cfg.preset == "from_clip":
            raise ConfigError(
                "model.understanding.preset 'from_clip' needs the CLIP folder's config: set "
                "model.understanding.clip_path and build with uniemo.models.weights.build_understanding"
            )
        if cfg.preset not in PRESETS:
            raise ConfigError(
                f"model.understanding.preset: unknown preset '{cfg.preset}'; choose one of "
                f"{', '.join(sorted(PRESETS))} or from_clip"
            )
    spec: Mapping[str, Any] = PRESETS[cfg.preset] if base is None else base

    def pick(name: str, key: str | None = None) -> int:
        value = getattr(cfg, name)
        return spec[key or name] if value is None else value

    width = pick("width")
    depth = pick("depth")
    mlp_dim = spec.get("mlp_dim", 4 * width) if cfg.width is None else 4 * width
    dims = UnderstandingDims(
        image_size=pick("image_size"),
        patch_size=pick("patch_size"),
        width=width,
        depth=depth,
        heads=pick("heads"),
        mlp_dim=mlp_dim,
        embed_dim=pick("embed_dim"),
        num_scene_queries=pick("num_scene_queries", "queries"),
        num_object_queries=pick("num_object_queries", "queries"),
        scene_layer=depth // 3 if cfg.scene_layer is None else cfg.scene_layer,
        object_layer=2 * depth // 3 if cfg.object_layer is None else cfg.object_layer,
        activation=spec.get("activation", "quick_gelu"),
        layer_norm_eps=spec.get("layer_norm_eps", 1e-5),
    )
    _check_dims(dims)
    return dims


def _check_dims(d: UnderstandingDims) -> None:
    key = "model.understanding"
    for name in ("image_size", "patch_size", "width", "depth", "heads", "embed_dim"):
        if getattr(d, name) <= 0:
            raise ConfigError(f"{key}.{name} must be > 0, got {getattr(d, name)}")
    if d.image_size % d.patch_size:
        raise ConfigError(f"{key}.image_size {d.image_size} is not a multiple of patch_size {d.patch_size}")
    if d.width % d.heads:
        raise ConfigError(f"{key}.width {d.width} is not divisible by heads {d.heads}")
    if d.num_scene_queries <= 0 or d.num_object_queries <= 0:
        raise ConfigError(
            f"{key}.num_scene_queries / num_object_queries must be > 0 (use use_scene_queries / "
            "use_object_queries: false to switch them off)"
        )
    if not 1 <= d.scene_layer < d.object_layer <= d.depth:
        raise ConfigError(
            f"{key}: need 1 <= scene_layer < object_layer <= depth, got scene_layer={d.scene_layer}, "
            f"object_layer={d.object_layer}, depth={d.depth}"
        )
    if d.activation not in ACTIVATIONS:
        raise ConfigError(
            f"{key}: unsupported activation '{d.activation}'; supported: {', '.join(ACTIVATIONS)}"
        )


# ---------------------------------------------------------------------------------------------------------
# CLIP vision tower (parameter names as in transformers' CLIPVisionTransformer)
# ---------------------------------------------------------------------------------------------------------


class VisionEmbeddings(nn.Module):
    """Patch conv (no bias), class embedding, learned positions (CLIP's ``embeddings``)."""

    def __init__(self, dims: UnderstandingDims):
        super().__init__()
        self.grid = dims.grid
        self.patch_size = dims.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(dims.width))
        self.patch_embedding = nn.Conv2d(3, dims.width, dims.patch_size, stride=dims.patch_size, bias=False)
        self.position_embedding = nn.Embedding(dims.num_positions, dims.width)
        # Looked up through the module (not .weight) so ZeRO-3 gathers the table, as transformers does.
        self.register_buffer("position_ids", torch.arange(dims.num_positions), persistent=False)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[T, D] position embeddings, bicubically resized when the input grid differs from the trained one."""
        pos_TD = self.position_embedding(self.position_ids)
        if (grid_h, grid_w) == (self.grid, self.grid):
            return pos_TD
        cls_pos, patch_pos = pos_TD[:1], pos_TD[1:]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches_BDhw = self.patch_embedding(images_BCHW.to(weight.dtype))
        grid_h, grid_w = patches_BDhw.shape[-2:]
        patches_BPD = patches_BDhw.flatten(2).transpose(1, 2)
        cls_B1D = self.class_embedding.to(patches_BPD.dtype).expand(patches_BPD.shape[0], 1, -1)
        tokens_BTD = torch.cat([cls_B1D, patches_BPD], dim=1)
        return tokens_BTD + self.positions(grid_h, grid_w).to(tokens_BTD.dtype)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (CLIP's layout).

    ``context`` None: self-attention. The interactive blocks use it as cross-attention without q/k/v bias
    (METHOD §2.2). Without a requested map it runs ``F.scaled_dot_product_attention`` (same 1/sqrt(K) scale).
    """

    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=qkv_bias)
        self.k_proj = nn.Linear(width, width, bias=qkv_bias)
        self.v_proj = nn.Linear(width, width, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width)

    def _split(self, x_BLD: torch.Tensor) -> torch.Tensor:
        b, n, _ = x_BLD.shape
        return x_BLD.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self, x_BLD: torch.Tensor, context_BTD: torch.Tensor | None = None, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context_BTD = x_BLD if context_BTD is None else context_BTD
        q_BHLK = self._split(self.q_proj(x_BLD))
        k_BHTK = self._split(self.k_proj(context_BTD))
        v_BHTK = self._split(self.v_proj(context_BTD))
        weights_BHLT = None
        if return_weights:
            scores = q_BHLK @ k_BHTK.transpose(-1, -2) * q_BHLK.shape[-1] ** -0.5
            weights_BHLT = scores.softmax(dim=-1)
            out_BHLK = weights_BHLT @ v_BHTK
        else:
            out_BHLK = F.scaled_dot_product_attention(q_BHLK, k_BHTK, v_BHTK)
        out_BLD = out_BHLK.transpose(1, 2).reshape(x_BLD.shape)
        return self.out_proj(out_BLD), weights_BHLT


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (CLIP's ``mlp``)."""

    def __init__(self, width: int, hidden: int, activation: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.activation_fn = activation
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class EncoderLayer(nn.Module):
    """A pre-LN CLIP residual block: x + attn(LN1 x), then x + MLP(LN2 x)."""

    def __init__(self, dims: UnderstandingDims):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dims.width, eps=dims.layer_norm_eps)
        self.self_attn = Attention(dims.width, dims.heads)
        self.layer_norm2 = nn.LayerNorm(dims.width, eps=dims.layer_norm_eps)
        self.mlp = MLP(dims.width, dims.mlp_dim, ACTIVATIONS[dims.activation]())

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.self_attn(self.layer_norm1(x_BLD))[0]
        return x_BLD + self.mlp(self.layer_norm2(x_BLD))


class Encoder(nn.Module):
    """The stack of residual blocks (CLIP's ``encoder``); the query logic lives in the model's forward."""

    def __init__(self, dims: UnderstandingDims):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dims) for _ in range(dims.depth))

    def blocks(self) -> list[EncoderLayer]:
        """The residual blocks in order (``layers``, typed: every entry is built as an :class:`EncoderLayer`)."""
        return [cast(EncoderLayer, layer) for layer in self.layers]


class InteractiveBlock(nn.Module):
    """Refines expert queries by cross-attention to the visual tokens (METHOD §2.2).

    q <- q + out(MHA(W_q LN1(q), W_k LN(v), W_v LN(v))), then q <- q + MLP(LN3(q)), MLP with QuickGELU.
    No self-attention among the queries; q/k/v without bias, out projection with bias. The official block's
    unused ``query_alpha`` parameter is left out.
    """

    def __init__(self, width: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.visual_norm = nn.LayerNorm(width, eps=eps)
        self.query_norm = nn.LayerNorm(width, eps=eps)
        self.cross_attn = Attention(width, heads, qkv_bias=False)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, 4 * width, QuickGELU())

    def forward(
        self, queries_BQD: torch.Tensor, visual_BTD: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights_BHQT = self.cross_attn(
            self.query_norm(queries_BQD), self.visual_norm(visual_BTD), return_weights=return_attention
        )
        queries_BQD = queries_BQD + attended
        return queries_BQD + self.mlp(self.mlp_norm(queries_BQD)), weights_BHQT


class EmotionHead(nn.Module):
    """Linear(D, E) -> ReLU -> Dropout -> ``fc1`` Linear(E, 8) (METHOD §2.3; ``fc1`` is reused in §3.6)."""

    def __init__(self, width: int, hidden: int, dropout: float, num_classes: int = NUM_EMOTIONS):
        super().__init__()
        self.fc0 = nn.Linear(width, hidden)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden, num_classes)

    def forward(self, features_BD: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.dropout(self.act(self.fc0(features_BD))))


def _query_tokens(table: nn.Embedding, like_BLD: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, Q, D] the query table repeated over the batch (looked up through the module, ZeRO-3 safe)."""
    index = torch.arange(table.num_embeddings, device=like_BLD.device)
    return table(index).to(like_BLD.dtype).expand(batch, -1, -1)


def _attention_map(weights_BHQT: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Heads mean, CLS key dropped, queries mean, reshaped to the patch grid (METHOD §2.2) -> [B, h, w]."""
    return weights_BHQT.mean(dim=1)[:, :, 1:].mean(dim=1).reshape(-1, grid_h, grid_w)


# Parameter-name prefixes -> roles for the optimiser's parameter groups (METHOD §2.5).
_ROLE_PREFIXES = (
    (("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."), "backbone"),
    (("scene_queries.", "object_queries.", "scene_interaction.", "object_interaction."), "queries"),
    (("emotion_head.",), "head"),
    (("scene_classifier.", "object_classifier."), "attribute_classifiers"),
    (("scene_projection.", "object_projection."), "projections"),
    (("logit_scale_scene", "logit_scale_object"), "logit_scales"),
)
ROLES = tuple(role for _, role in _ROLE_PREFIXES)
"""Every role :meth:`UnderstandingModel.parameter_roles` can return."""


class UnderstandingModel(nn.Module):
    """CLIP-style ViT + scene/object expert queries + emotion head + attribute heads (METHOD §2, §3.3).

    Args:
        cfg: the understanding config; its preset and overrides give the architecture.
        num_scenes / num_objects: classes of the stage-2 attribute classifiers (METHOD §3.3).
        dims: an already resolved architecture (e.g. read from a CLIP folder); None: ``resolve_dims(cfg)``.

    A query type switched off (``use_scene_queries`` / ``use_object_queries`` false, D13) has no queries,
    interactive block, projection, classifier or logit scale at all; its output fields are None. A query type
    whose data has no annotations (``num_scenes`` / ``num_objects`` 0, e.g. an image folder) keeps its queries
    and interactive block (they still shape ``f_cls`` and feed the conditioner) but has no projection,
    classifier or logit scale (nothing to learn them from: a zero-class classifier would be a zero-element
    parameter, which ZeRO-1/2 cannot partition); its ``*_embedding``, ``*_logits`` and ``logit_scale_*`` are None. Set
    ``gradient_checkpointing = True`` to recompute the ViT blocks in the backward pass.
    """

    def __init__(
        self,
        cfg: UnderstandingConfig,
        num_scenes: int,
        num_objects: int,
        dims: UnderstandingDims | None = None,
    ):
        super().__init__()
        if num_scenes < 0 or num_objects < 0:
            raise ValueError(f"num_scenes / num_objects must be >= 0, got {num_scenes} / {num_objects}")
        dims = resolve_dims(cfg) if dims is None else dims
        self.dims = dims
        self.width = dims.width
        self.embed_dim = dims.embed_dim
        self.use_scene_queries = cfg.use_scene_queries
        self.use_object_queries = cfg.use_object_queries
        self.gradient_checkpointing = False

        d, eps = dims.width, dims.layer_norm_eps
        self.embeddings = VisionEmbeddings(dims)
        self.pre_layrnorm = nn.LayerNorm(d, eps=eps)
        self.encoder = Encoder(dims)
        self.post_layernorm = nn.LayerNorm(d, eps=eps)

        # A switched-off query type, or one without annotations, leaves these None (class docstring).
        self.scene_queries: nn.Embedding | None = None
        self.scene_interaction: InteractiveBlock | None = None
        self.scene_projection: nn.Linear | None = None
        self.scene_classifier: nn.Linear | None = None
        self.logit_scale_scene: nn.Parameter | None = None
        if cfg.use_scene_queries:
            self.scene_queries = nn.Embedding(dims.num_scene_queries, d)
            self.scene_interaction = InteractiveBlock(d, dims.heads, eps)
            if num_scenes > 0:  # the heads that learn from scene annotations; without any they are not built
                self.scene_projection = nn.Linear(d, dims.embed_dim, bias=False)
                self.scene_classifier = nn.Linear(d, num_scenes)
                self.logit_scale_scene = nn.Parameter(torch.tensor(SCENE_LOGIT_SCALE))
        self.object_queries: nn.Embedding | None = None
        self.object_interaction: InteractiveBlock | None = None
        self.object_projection: nn.Linear | None = None
        self.object_classifier: nn.Linear | None = None
        self.logit_scale_object: nn.Parameter | None = None
        if cfg.use_object_queries:
            self.object_queries = nn.Embedding(dims.num_object_queries, d)
            self.object_interaction = InteractiveBlock(d, dims.heads, eps)
            if num_objects > 0:
                self.object_projection = nn.Linear(d, dims.embed_dim, bias=False)
                self.object_classifier = nn.Linear(d, num_objects)
                self.logit_scale_object = nn.Parameter(torch.tensor(OBJECT_LOGIT_SCALE))
        self.emotion_head = EmotionHead(d, dims.embed_dim, cfg.head_dropout)

        self._init_weights(cfg.query_init_std, cfg.position_init_std)
        for projection in (self.scene_projection, self.object_projection):
            if projection is not None:
                # D4: trainable by default; frozen reproduces the official fix_text behaviour (METHOD §2.5).
                projection.weight.requires_grad_(not cfg.freeze_query_projections)
        for scale in (self.logit_scale_scene, self.logit_scale_object):
            if scale is not None:
                scale.requires_grad_(cfg.train_logit_scales)

    @torch.no_grad()
    def _init_weights(self, query_std: float, position_std: float) -> None:
        """CLIP's init for the backbone (as transformers' CLIPPreTrainedModel; the positions' std is
        ``model.understanding.position_init_std``, CLIP's 0.02 by default), METHOD §2.1 for the rest."""
        d, depth = self.width, self.dims.depth
        nn.init.normal_(self.embeddings.class_embedding, std=d**-0.5)
        nn.init.normal_(self.embeddings.patch_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=position_std)
        in_std = d**-0.5 * (2 * depth) ** -0.5
        for layer in self.encoder.blocks():
            attn, mlp = layer.self_attn, layer.mlp
            for proj, std in (
                (attn.q_proj, in_std),
                (attn.k_proj, in_std),
                (attn.v_proj, in_std),
                (attn.out_proj, d**-0.5),
                (mlp.fc1, (2 * d) ** -0.5),
                (mlp.fc2, in_std),
            ):
                nn.init.normal_(proj.weight, std=std)
                nn.init.zeros_(proj.bias)
        for queries in (self.scene_queries, self.object_queries):
            if queries is not None:
                # METHOD §2.1: N(0, 1), the scale of the ln_pre outputs the queries sit beside.
                nn.init.normal_(queries.weight, std=query_std)
        for block in (self.scene_interaction, self.object_interaction):
            if block is None:
                continue
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for projection in (self.scene_projection, self.object_projection):
            if projection is not None:
                # METHOD §2.1: plain randn (the output is L2-normalised, so only the direction matters).
                nn.init.normal_(projection.weight, std=1.0)

    def parameter_roles(self) -> dict[str, str]:
        """Map every parameter name to its role: backbone, queries, head, attribute_classifiers, projections,
        logit_scales (the optimiser's parameter groups, METHOD §2.5 / §3.1)."""
        roles: dict[str, str] = {}
        for name, _ in self.named_parameters():
            for prefixes, role in _ROLE_PREFIXES:
                if name.startswith(prefixes):
                    roles[name] = role
                    break
            else:
                raise RuntimeError(f"parameter {name} has no role; add its prefix to _ROLE_PREFIXES")
        return roles

    def _run_layer(self, layer: EncoderLayer, x_BLD: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x_BLD, use_reentrant=False)
        return layer(x_BLD)

    def forward(self, images_BCHW: torch.Tensor, return_attention: bool = False) -> UnderstandingOutput:
        """Run the hierarchical chain (METHOD §2.1) and all heads; attention maps only when requested."""
        x_BLD = self.pre_layrnorm(self.embeddings(images_BCHW))
        batch, num_tokens = x_BLD.shape[:2]
        grid_h = images_BCHW.shape[-2] // self.dims.patch_size
        grid_w = images_BCHW.shape[-1] // self.dims.patch_size
        num_scene = 0
        if self.scene_queries is not None:
            # Step 3-4: queries enter without ln_pre, before block 1.
            scene_BQD = _query_tokens(self.scene_queries, x_BLD, batch)
            x_BLD = torch.cat([x_BLD, scene_BQD], dim=1)
            num_scene = scene_BQD.shape[1]

        scene_feature = object_feature = scene_attention = object_attention = None
        for index, layer in enumerate(self.encoder.blocks()):
            x_BLD = self._run_layer(layer, x_BLD)
            block = index + 1
            if block == self.dims.scene_layer and (num_scene or self.object_queries is not None):
                # Step 6: refine + read out the scene queries against the image tokens, then add objects.
                parts = [x_BLD[:, :num_tokens]]
                if self.scene_interaction is not None:  # scene queries present (num_scene > 0)
                    scene_BQD, weights = self.scene_interaction(
                        x_BLD[:, num_tokens:], parts[0], return_attention
                    )
                    scene_feature = scene_BQD.mean(dim=1)
                    if weights is not None:
                        scene_attention = _attention_map(weights, grid_h, grid_w)
                    parts.append(scene_BQD)
                if self.object_queries is not None:
                    parts.append(_query_tokens(self.object_queries, x_BLD, batch))
                x_BLD = torch.cat(parts, dim=1)
            if block == self.dims.object_layer and self.object_interaction is not None:
                # Step 8: refine + read out the object queries.
                image_BTD = x_BLD[:, :num_tokens]
                start = num_tokens + num_scene
                object_BQD, weights = self.object_interaction(x_BLD[:, start:], image_BTD, return_attention)
                object_feature = object_BQD.mean(dim=1)
                if weights is not None:
                    object_attention = _attention_map(weights, grid_h, grid_w)
                x_BLD = torch.cat([x_BLD[:, :start], object_BQD], dim=1)

        # Step 10: post-LN CLS, no visual projection.
        cls_feature = self.post_layernorm(x_BLD[:, 0])
        out = UnderstandingOutput(
            cls_feature=cls_feature,
            emotion_logits=self.emotion_head(cls_feature),
            scene_feature=scene_feature,
            object_feature=object_feature,
            scene_attention=scene_attention,
            object_attention=object_attention,
        )
        # Projection, classifier and logit scale of a query type are built together (class docstring).
        if (
            scene_feature is not None
            and self.scene_projection is not None
            and self.scene_classifier is not None
            and self.logit_scale_scene is not None
        ):
            out.scene_embedding = F.normalize(self.scene_projection(scene_feature), dim=-1)
            out.scene_logits = self.scene_classifier(scene_feature)
            out.logit_scale_scene = self.logit_scale_scene.clamp(max=SCENE_LOGIT_SCALE).exp()
        if (
            object_feature is not None
            and self.object_projection is not None
            and self.object_classifier is not None
            and self.logit_scale_object is not None
        ):
            out.object_embedding = F.normalize(self.object_projection(object_feature), dim=-1)
            out.object_logits = self.object_classifier(object_feature)
            # Both scales are capped at CLIP's 100 in case they are trained (train_logit_scales).
            out.logit_scale_object = self.logit_scale_object.clamp(max=SCENE_LOGIT_SCALE).exp()
        return out
