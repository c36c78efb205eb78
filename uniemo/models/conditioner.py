"""Mapping networks, the emotional correlation coefficient alpha, and the fused condition token c.

METHOD §3.4-§3.6 with D6: the three understanding features (f_cls, f_scene, f_object) are mapped into the
generator's text-token embedding space; each attribute branch retrieves its nearest attribute of the attribute base
(whose names are embedded in that same space, D6) and is weighted by alpha = Phi[attribute, emotion];
c = e_cls + alpha_s * e_s + alpha_o * e_o.

alpha and the retrieved index carry no gradient (argmax, table look-up); the gradient reaches the mappers through
e_cls, e_s and e_o, scaled by 1, alpha_s and alpha_o (METHOD §3.8).

Shape legend: B batch, Din understanding feature width, Dt text-token width, A attribute-base size, K = 8 emotions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class Mapper(nn.Module):
    """MLP from the understanding feature space to the text-token space (METHOD §3.1 ``model: MLP``).

    ``num_layers`` Linear layers; each but the last is followed by optional LayerNorm, ReLU and Dropout. Two layers
    give the official Linear(in->hidden) -> ReLU -> Linear(hidden->out) with hidden = in.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_layers: int = 2,
        hidden: int | None = None,
        relu: bool = True,
        layer_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a mapper needs at least one layer, got num_layers={num_layers}")
        hidden = in_dim if hidden is None else hidden
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden))
            if relu:
                layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.layers(x_BD)


@torch.no_grad()
def correlation_coefficient(
    mapped: torch.Tensor,
    attribute_embeddings: torch.Tensor,
    phi: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = Phi[argmax_j cos(E_A[j], e), k] per sample (METHOD §3.5); no gradient.

    Args:
        mapped: e_s or e_o, [B,Dt].
        attribute_embeddings: E_A, [A,Dt], in the same space as ``mapped`` (D6).
        phi: [A,K], Phi[a][k] the correlation of attribute a with emotion k.
        labels: emotion k per sample, int [B] (the ground truth at training, the target at inference).

    Returns:
        alpha [B] (dtype of ``mapped``) and the retrieved attribute index [B] (int64). An empty base gives
        alpha 0 and index -1.
    """
    batch = mapped.shape[0]
    if attribute_embeddings.shape[0] == 0:
        return mapped.new_zeros(batch), torch.full((batch,), -1, dtype=torch.long, device=mapped.device)
    if attribute_embeddings.shape[0] != phi.shape[0]:
        raise ValueError(
            f"attribute base has {attribute_embeddings.shape[0]} embeddings but Phi has {phi.shape[0]} rows"
        )
    mapped_BD = F.normalize(mapped.detach().float(), dim=-1)
    base_AD = F.normalize(attribute_embeddings.detach().float().to(mapped.device), dim=-1)
    index_B = (mapped_BD @ base_AD.T).argmax(dim=-1)
    phi = phi.to(mapped.device)
    alpha_B = phi[index_B, labels.to(device=mapped.device, dtype=torch.long)]
    return alpha_B.to(mapped.dtype), index_B


def uses_attribute_branches(cfg, has_base: bool) -> bool:
    """Whether c has its alpha-weighted scene and object branches: with an attribute base to compute alpha from,
    or with alpha fixed to 1 (D13)."""
    return bool(has_base or cfg.fixed_alpha)


@dataclass
class ConditionOutput:
    """The conditioner's outputs (METHOD §3.4-§3.6)."""

    condition: torch.Tensor
    """c = e_cls + alpha_s e_s + alpha_o e_o, [B,Dt]."""
    alpha_scene: torch.Tensor
    """alpha_s [B] (0 when the scene branch is off; 1 with ``fixed_alpha``)."""
    alpha_object: torch.Tensor
    """alpha_o [B]."""
    scene_attribute: torch.Tensor
    """Index in the attribute base retrieved for the scene branch, int64 [B]; -1 when none."""
    object_attribute: torch.Tensor
    """Index retrieved for the object branch, int64 [B]; -1 when none."""
    mapped_emotion: torch.Tensor
    """e_cls = M_emo(f_cls), [B,Dt]."""
    mapped_scene: torch.Tensor | None
    """e_s = M_scene(f_scene), [B,Dt]; None when the scene feature is absent."""
    mapped_object: torch.Tensor | None
    """e_o = M_obj(f_object), [B,Dt]; None when the object feature is absent."""


class Conditioner(nn.Module):
    """Three mappers (M_emo, M_scene, M_obj), alpha retrieval and fusion into the condition token c.

    ``has_base=False`` (the attribute base is empty, e.g. data without scene or object annotations): alpha has
    nothing to be computed from, so unless ``fixed_alpha`` the attribute branches are left out: M_scene and M_obj
    are not built and c = e_cls.
    """

    def __init__(self, cfg, in_dim: int, out_dim: int, *, has_base: bool = True) -> None:
        super().__init__()
        kwargs = {
            "num_layers": cfg.num_layers,
            "hidden": cfg.hidden,
            "relu": cfg.relu,
            "layer_norm": cfg.layer_norm,
            "dropout": cfg.dropout,
        }
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fixed_alpha = bool(cfg.fixed_alpha)
        self.mapper_emotion = Mapper(in_dim, out_dim, **kwargs)
        self.mapper_scene = self.mapper_object = None
        if uses_attribute_branches(cfg, has_base):
            self.mapper_scene = Mapper(in_dim, out_dim, **kwargs)
            self.mapper_object = Mapper(in_dim, out_dim, **kwargs)

    def _branch(
        self,
        mapper: Mapper | None,
        feature_BD: torch.Tensor | None,
        labels_B: torch.Tensor,
        attribute_embeddings: torch.Tensor,
        phi: torch.Tensor,
        like: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        batch = like.shape[0]
        if feature_BD is None or mapper is None:
            # A switched-off query branch (D13), or no attribute base to weight it by, contributes nothing to c.
            return None, like.new_zeros(batch), torch.full((batch,), -1, dtype=torch.long, device=like.device)
        mapped_BD = mapper(feature_BD)
        alpha_B, index_B = correlation_coefficient(mapped_BD, attribute_embeddings, phi, labels_B)
        if self.fixed_alpha:
            # Ablation "alpha fixed to 1" (D13); the retrieved attribute is still reported.
            alpha_B = torch.ones_like(alpha_B)
        return mapped_BD, alpha_B, index_B

    def forward(
        self,
        cls_feature: torch.Tensor,
        scene_feature: torch.Tensor | None,
        object_feature: torch.Tensor | None,
        labels: torch.Tensor,
        attribute_embeddings: torch.Tensor,
        phi: torch.Tensor,
    ) -> ConditionOutput:
        """Map the three features, compute alpha for emotion ``labels`` and fuse (METHOD §3.4-§3.6)."""
        e_cls_BD = self.mapper_emotion(cls_feature)
        e_s_BD, alpha_s_B, index_s_B = self._branch(
            self.mapper_scene, scene_feature, labels, attribute_embeddings, phi, e_cls_BD
        )
        e_o_BD, alpha_o_B, index_o_B = self._branch(
            self.mapper_object, object_feature, labels, attribute_embeddings, phi, e_cls_BD
        )
        condition_BD = e_cls_BD
        if e_s_BD is not None:
            condition_BD = condition_BD + alpha_s_B.unsqueeze(-1) * e_s_BD
        if e_o_BD is not None:
            condition_BD = condition_BD + alpha_o_B.unsqueeze(-1) * e_o_BD
        return ConditionOutput(
            condition=condition_BD,
            alpha_scene=alpha_s_B,
            alpha_object=alpha_o_B,
            scene_attribute=index_s_B,
            object_attribute=index_o_B,
            mapped_emotion=e_cls_BD,
            mapped_scene=e_s_BD,
            mapped_object=e_o_BD,
        )
