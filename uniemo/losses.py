"""Every loss of UniEmo, as pure functions of tensors (METHOD.md §2.4, §3.3, §3.6-§3.8, D7).

Nothing here owns parameters or touches devices, processes or files: the task modules
(:mod:`uniemo.training.task`) call these functions and return each term by name for logging.

Shape legend: B batch, E contrastive embedding width, K emotions (8), S scenes, O objects,
C/H/W latent channels and size.

Unusual points:

- A term that cannot be computed for a batch (no valid row) is a zero that still belongs to the autograd graph
  (``x.sum() * 0``), so every rank runs the same backward and no parameter's gradient goes missing. A branch
  whose head does not exist (ablated, or no annotations in the data) has no term at all.
- The stage-2 understanding loss is *not* the stage-1 one: the official code swaps the two InfoNCE terms for a
  254-way scene CE and a 409-way object BCE (METHOD §3.3, §9.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import LossConfig

__all__ = [
    "condition_loss",
    "diffusion_loss",
    "hard_negatives",
    "joint_loss",
    "symmetric_info_nce",
    "understanding_loss",
]


def _zero_like_graph(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A scalar 0 that depends on every given tensor, so it joins their autograd graph."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not present:
        return torch.zeros(())
    zero = present[0].sum() * 0
    for t in present[1:]:
        zero = zero + t.sum() * 0
    return zero


def symmetric_info_nce(
    features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    valid: torch.Tensor,
    invalid_as_negatives: bool = False,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between image-side and text-side embeddings (METHOD §2.4).

    ``L = ½·[CE(S, ℓ) + CE(Sᵀ, ℓ)]`` with ``S = logit_scale · F Tᵀ`` and ``ℓ_i = i``, over the rows AND columns
    where ``valid`` is true (an image without a scene annotation is neither a query nor a negative). The other
    images of the batch are the negatives, even when two share the same attribute string (as in the official
    code). With ``invalid_as_negatives`` the matrix keeps every row and column and only the invalid rows are
    skipped (``ℓ_i = -1`` with ``ignore_index`` -1, the official code): an image without the annotation is still a
    negative of the others, through its image embedding and through its text row (the placeholder's features).

    Args:
        features: ``[B,E]`` L2-normalised image-side embeddings (``z_s`` or ``z_o``).
        text_features: ``[B,E]`` L2-normalised text embeddings of each row's attribute.
        logit_scale: the (already exponentiated) temperature, a scalar tensor or float.
        valid: ``[B]`` bool, which rows take part.
        invalid_as_negatives: keep the invalid rows' columns as negatives (``training.losses.
            unannotated_negatives``).

    Returns:
        A scalar tensor; 0 (still attached to ``features``' graph) when no row is valid.
    """
    valid_B = valid.to(torch.bool)
    if not bool(valid_B.any()):
        return _zero_like_graph(features, logit_scale if isinstance(logit_scale, torch.Tensor) else None)
    if invalid_as_negatives:
        logits_BB = logit_scale * (features @ text_features.to(features.dtype).T)
        targets_B = torch.arange(features.shape[0], device=features.device)
        targets_B = torch.where(valid_B.to(features.device), targets_B, torch.full_like(targets_B, -1))
        return 0.5 * (
            F.cross_entropy(logits_BB, targets_B, ignore_index=-1)
            + F.cross_entropy(logits_BB.T, targets_B, ignore_index=-1)
        )
    f_NE = features[valid_B]
    t_NE = text_features[valid_B].to(f_NE.dtype)
    logits_NN = logit_scale * (f_NE @ t_NE.T)
    targets_N = torch.arange(f_NE.shape[0], device=f_NE.device)
    return 0.5 * (F.cross_entropy(logits_NN, targets_N) + F.cross_entropy(logits_NN.T, targets_N))


def _scene_ce(scene_logits_BS: torch.Tensor, scene_idx_B: torch.Tensor) -> torch.Tensor:
    """Stage-2 scene CE with ignore_index -1; 0 (attached) when no row has a scene (METHOD §3.3)."""
    if not bool((scene_idx_B >= 0).any()):
        return _zero_like_graph(scene_logits_BS)
    return F.cross_entropy(scene_logits_BS.float(), scene_idx_B.long(), ignore_index=-1)


def _object_bce(object_logits_BO: torch.Tensor, multi_hot_BO: torch.Tensor) -> torch.Tensor:
    """Stage-2 object BCE on the multi-hot, averaged over the rows that have objects (METHOD §3.3)."""
    has_objects_B = multi_hot_BO.sum(dim=1) > 0
    if not bool(has_objects_B.any()):
        return _zero_like_graph(object_logits_BO)
    return F.binary_cross_entropy_with_logits(
        object_logits_BO[has_objects_B].float(), multi_hot_BO[has_objects_B].to(torch.float32)
    )


def understanding_loss(outputs: Any, batch: dict, weights: LossConfig, stage: int) -> dict[str, torch.Tensor]:
    """The understanding loss ``L_U`` (stage 1, METHOD §2.4) or ``L_U'`` (stage 2, METHOD §3.3).

    - stage 1: ``λ3·CE(emotion) + λ1·InfoNCE(scene) + λ2·InfoNCE(object)``; the text side of each row comes in
      ``batch["scene_text_features"]`` / ``batch["object_text_features"]`` (``[B,E]``), the row is valid when
      ``batch["scene_idx"] >= 0`` / ``batch["object_idx"] >= 0``.
    - stage 2: ``λ3·CE(emotion) + λ1·CE(scene classifier, ignore -1) + λ2·BCE(object classifier, multi-hot)``,
      the BCE over the rows with at least one object.

    A branch without its head (queries switched off, D13, or data without annotations of its kind) has no term:
    the key is absent and ``total`` is the weighted sum of the terms present (the weights are not renormalised).

    Args:
        outputs: an :class:`uniemo.models.outputs.UnderstandingOutput`.
        batch: a batch following data/FORMAT.md (plus the text features in stage 1).
        weights: the :class:`~uniemo.config.schema.LossConfig` (λ1 ``scene_weight``, λ2 ``object_weight``,
            λ3 ``emotion_weight``).
        stage: 1 or 2.

    Returns:
        ``{"emotion", "scene", "object", "total"}``, unweighted terms plus the weighted total; ``scene`` /
        ``object`` only for the branches that have a head.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    emotion_logits_BK = outputs.emotion_logits
    labels_B = batch["label"].to(emotion_logits_BK.device).long()
    emotion = F.cross_entropy(emotion_logits_BK.float(), labels_B)

    terms = {"emotion": emotion}
    if stage == 1:
        if outputs.scene_embedding is not None:
            terms["scene"] = symmetric_info_nce(
                outputs.scene_embedding,
                batch["scene_text_features"],
                outputs.logit_scale_scene,
                batch["scene_idx"].to(emotion_logits_BK.device) >= 0,
                invalid_as_negatives=weights.unannotated_negatives,
            )
        if outputs.object_embedding is not None:
            terms["object"] = symmetric_info_nce(
                outputs.object_embedding,
                batch["object_text_features"],
                outputs.logit_scale_object,
                batch["object_idx"].to(emotion_logits_BK.device) >= 0,
                invalid_as_negatives=weights.unannotated_negatives,
            )
    else:
        if outputs.scene_logits is not None:
            terms["scene"] = _scene_ce(outputs.scene_logits, batch["scene_idx"].to(outputs.scene_logits.device))
        if outputs.object_logits is not None:
            terms["object"] = _object_bce(
                outputs.object_logits, batch["objects_multi_hot"].to(outputs.object_logits.device)
            )

    total = weights.emotion_weight * emotion
    for name, weight in (("scene", weights.scene_weight), ("object", weights.object_weight)):
        if name in terms:
            total = total + weight * terms[name]
    return {**terms, "total": total}


def hard_negatives(logits_BK: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """The top-scoring wrong class of each row (METHOD §3.3 step 2, D7); no gradient."""
    masked_BK = logits_BK.detach().float().clone()
    masked_BK[torch.arange(masked_BK.shape[0], device=masked_BK.device), labels_B.long()] = float("-inf")
    return masked_BK.argmax(dim=1)


def condition_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.5,
    ce_weight: float = 1e-3,
    triplet_weight: float = 1e-6,
    negatives: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Emotional condition loss on ``z = fc1(c)`` (METHOD §3.6, D7).

    ``L_cond = ce_weight·CE(z, y) + triplet_weight·mean_b max(0, m + cos(z, onehot(y_neg)) − cos(z, onehot(y)))``.
    Since ``cos(z, onehot(k)) = z_k / ‖z‖`` the triplet is ``max(0, m + (z[y_neg] − z[y]) / ‖z‖)``.

    Args:
        logits: ``[B,K]`` condition logits ``z``.
        labels: ``[B]`` emotion indices ``y``.
        margin: ``m`` (0.5 in the official code).
        ce_weight: weight of the CE (official 1e-3).
        triplet_weight: weight of the triplet (official 1e-3 · emo_rate = 1e-6).
        negatives: ``[B]`` hard negatives; None takes the top wrong class of ``logits`` itself (D7 default).
            Pass :func:`hard_negatives` of the understanding logits for the official choice.

    Returns:
        ``{"ce", "triplet", "total"}`` (the first two unweighted).
    """
    z_BK = logits.float()
    labels_B = labels.to(z_BK.device).long()
    if negatives is None:
        negatives = hard_negatives(z_BK, labels_B)
    negatives_B = negatives.to(z_BK.device).long()
    ce = F.cross_entropy(z_BK, labels_B)
    rows_B = torch.arange(z_BK.shape[0], device=z_BK.device)
    norm_B = z_BK.norm(dim=1).clamp_min(1e-12)
    triplet = F.relu(margin + (z_BK[rows_B, negatives_B] - z_BK[rows_B, labels_B]) / norm_B).mean()
    return {"ce": ce, "triplet": triplet, "total": ce_weight * ce + triplet_weight * triplet}


def diffusion_loss(
    model_output: torch.Tensor,
    noise: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
) -> torch.Tensor:
    """The diffusion MSE ``L(θ)`` (METHOD §3.7), in float32.

    The target follows ``scheduler.config.prediction_type``: ``epsilon`` -> the noise (SD-1.5),
    ``v_prediction`` -> ``scheduler.get_velocity(latents, noise, timesteps)``.

    Raises:
        ValueError: for any other prediction type.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(
            f"unsupported noise-scheduler prediction_type {prediction_type!r}: "
            "use a scheduler with 'epsilon' or 'v_prediction'"
        )
    return F.mse_loss(model_output.float(), target.float(), reduction="mean")


def joint_loss(
    understanding_terms: dict[str, torch.Tensor],
    condition_terms: dict[str, torch.Tensor] | None,
    diffusion: torch.Tensor,
    weights: LossConfig,
) -> dict[str, torch.Tensor]:
    """The stage-2 joint loss ``γ3·L(θ) + γ1·L_U' + L_cond`` (METHOD §3.8; γ2 is folded into L_cond's weights).

    Args:
        understanding_terms: the dict of :func:`understanding_loss` (stage 2).
        condition_terms: the dict of :func:`condition_loss`, or None.
        diffusion: the scalar of :func:`diffusion_loss`.
        weights: the :class:`~uniemo.config.schema.LossConfig` (γ1 ``understanding_weight``,
            γ3 ``diffusion_weight``, ``condition_loss`` ablation switch, D13).

    Returns:
        A flat dict: ``diffusion``, ``understanding/<term>``, ``condition/<term>`` and ``total``. With
        ``weights.condition_loss`` false the condition terms are still reported (detached, for logging) but
        left out of ``total``.
    """
    total = weights.diffusion_weight * diffusion + weights.understanding_weight * understanding_terms["total"]
    terms: dict[str, torch.Tensor] = {"diffusion": diffusion}
    terms.update({f"understanding/{name}": value for name, value in understanding_terms.items()})
    if condition_terms is not None:
        if weights.condition_loss:
            total = total + condition_terms["total"]
            terms.update({f"condition/{name}": value for name, value in condition_terms.items()})
        else:
            terms.update({f"condition/{name}": value.detach() for name, value in condition_terms.items()})
    terms["total"] = total
    return terms
