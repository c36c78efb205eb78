"""Named outputs of the understanding model (METHOD §2.1, §2.3, §3.3).

Shape legend: B batch, D backbone width, E contrastive embedding width (= emotion-head hidden width),
S scene classes, O object classes, h x w the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UnderstandingOutput:
    """What one forward of :class:`uniemo.models.understanding.UnderstandingModel` returns.

    Fields of a query type that is switched off (D13) are None.
    """

    cls_feature: torch.Tensor
    """[B, D] post-LN CLS token, no visual projection (METHOD §2.1 step 10)."""
    emotion_logits: torch.Tensor
    """[B, 8] emotion head on ``cls_feature`` (METHOD §2.3)."""
    scene_feature: torch.Tensor | None = None
    """[B, D] mean of the refined scene queries after block L1."""
    object_feature: torch.Tensor | None = None
    """[B, D] mean of the refined object queries after block L2."""
    scene_embedding: torch.Tensor | None = None
    """[B, E] L2-normalised scene projection (contrastive head, METHOD §2.3)."""
    object_embedding: torch.Tensor | None = None
    """[B, E] L2-normalised object projection."""
    scene_logits: torch.Tensor | None = None
    """[B, S] stage-2 scene classifier on ``scene_feature`` (METHOD §3.3)."""
    object_logits: torch.Tensor | None = None
    """[B, O] stage-2 object classifier on ``object_feature`` (multi-label logits, METHOD §3.3)."""
    logit_scale_scene: torch.Tensor | None = None
    """Scalar, exp of the scene logit scale (METHOD §2.3: 100)."""
    logit_scale_object: torch.Tensor | None = None
    """Scalar, exp of the object logit scale (METHOD §2.3: 1/0.07)."""
    scene_attention: torch.Tensor | None = None
    """[B, h, w] cross-attention of the scene queries over the patches (METHOD §2.2), when requested."""
    object_attention: torch.Tensor | None = None
    """[B, h, w] cross-attention of the object queries over the patches, when requested."""
