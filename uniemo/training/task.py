"""Task modules: model plus losses as one ``nn.Module``, the one thing a DeepSpeed engine wraps (STYLE 8).

``forward(batch)`` takes a batch of data/FORMAT.md and returns a flat dict of named scalar tensors with
``total`` (the loss to backpropagate), each loss term by name, and detached diagnostics under ``metrics/``.

- :class:`Stage1Task`: the understanding ViT with expert queries and its loss ``L_U`` (METHOD §2).
- :class:`Stage2Task`: joint understanding + generation (METHOD §3): ``L_U'``, the mappers and the fused condition
  token ``c``, its differentiable splice into the prompt (D5), the diffusion loss and the condition loss.
- :func:`build_param_groups`: the AdamW groups of METHOD §2.5 / §3.1, checking that every trainable
  parameter lands in exactly one group.

Frozen vs trained in stage 2 (METHOD §3.1): the VAE, the text encoder and (unless ``train_unet``) the UNet are
frozen; so are the ViT backbone and the emotion head, which must still pass gradients: they get
``requires_grad=False`` on their weights, while the activations flowing through them keep carrying the gradient
to the expert queries (that is the "implicit feedback", §3.8). The contrastive projections and logit scales are
unused in stage 2 and frozen too. Frozen modules stay in eval mode when the task is put in train mode, except
the emotion head, which by default runs in train mode with dropout active as in the official code
(``training.stage2_head_dropout``). ``training.stage2_whole_understanding`` (a difference from METHOD §3.1, off
by default) lets the backbone and the emotion head train too.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from uniemo.errors import ConfigError
from uniemo.losses import (
    condition_loss,
    diffusion_loss,
    hard_negatives,
    joint_loss,
    understanding_loss,
)
from uniemo.models.conditioner import Conditioner, uses_attribute_branches
from uniemo.models.generator import build_generator
from uniemo.models.text_features import attribute_base_embeddings, attribute_text_features
from uniemo.models.weights import build_understanding

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config, LossConfig, TrainingConfig
    from uniemo.data.attributes import AttributeTable
    from uniemo.models.generator import Generator
    from uniemo.models.understanding import UnderstandingModel

__all__ = [
    "ROLE_UNET",
    "ROLE_MAPPERS",
    "Stage1Task",
    "Stage2Task",
    "Task",
    "build_param_groups",
    "build_stage1_task",
    "build_stage2_task",
    "left_out_note",
    "parts_left_out",
]

ROLE_MAPPERS = "mappers"
"""Parameter role of the conditioner's mapping networks (METHOD §3.1)."""
ROLE_UNET = "unet"
"""Parameter role of the UNet when it is fine-tuned (D8)."""
ROLE_FROZEN = "frozen"
"""Parameter role of modules that never train (VAE, text encoder)."""

# The understanding roles of ``UnderstandingModel.parameter_roles()`` that stay trainable in stage 2
# (METHOD §3.1: only queries + interactive blocks and the fresh attribute classifiers are stepped).
_STAGE2_TRAINABLE_UNDERSTANDING_ROLES = frozenset({"queries", "attribute_classifiers"})
# ``training.stage2_whole_understanding``: these train as well.
STAGE2_WHOLE_UNDERSTANDING_ROLES = frozenset({"backbone", "head"})


def _move_batch(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (other values, e.g. the ``key`` list, unchanged)."""
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def _gather_rows(table_NE: torch.Tensor, index_B: torch.Tensor, placeholder_last: bool = False) -> torch.Tensor:
    """``table[index]`` with -1 (no attribute) mapped to a zero row (the loss masks those rows), or, with
    ``placeholder_last``, to the table's last row: the placeholder text's features that
    :func:`build_stage1_task` appends for ``training.losses.unannotated_negatives`` (METHOD §2.4)."""
    if placeholder_last:
        return table_NE[torch.where(index_B >= 0, index_B, torch.full_like(index_B, table_NE.shape[0] - 1))]
    if table_NE.shape[0] == 0:
        return table_NE.new_zeros(index_B.shape[0], table_NE.shape[1])
    rows_BE = table_NE[index_B.clamp(min=0)]
    return torch.where((index_B >= 0)[:, None], rows_BE, torch.zeros_like(rows_BE))


def _latent_moments(generator: Generator, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE latent distribution of every sample when the batch carries precomputed moments
    (``latent_mean`` / ``latent_std``, data/FORMAT.md); the rows listed in ``pixel_rows`` came without them and
    are encoded here from their ``pixel_values``. None: the batch has only ``pixel_values`` (encode them all)."""
    if "latent_mean" not in batch:
        return None
    mean, std = batch["latent_mean"], batch["latent_std"]
    rows = batch.get("pixel_rows")
    if rows is not None and rows.numel():
        encoded_mean, encoded_std = generator.latent_moments(batch["pixel_values"])
        rows = rows.to(encoded_mean.device)
        mean = mean.to(encoded_mean.device, encoded_mean.dtype).index_copy(0, rows, encoded_mean)
        std = std.to(encoded_std.device, encoded_std.dtype).index_copy(0, rows, encoded_std)
    return mean, std


def _frozen_submodules(module: nn.Module, prefix: str = "") -> Iterator[str]:
    """Dotted names of the top-most sub-modules whose parameters are all frozen (and exist)."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        params = list(child.parameters())
        if not params:
            continue
        if not any(p.requires_grad for p in params):
            yield full
        else:
            yield from _frozen_submodules(child, prefix=f"{full}.")


class Task(nn.Module, metaclass=abc.ABCMeta):
    """What every task shares: parameter roles, frozen-module bookkeeping, eval mode for frozen modules, and the
    hooks the engine and the loop call (no-ops here; generator pretraining overrides them). Abstract: a task
    names the role of each of its parameters (:meth:`parameter_roles`), or it cannot be built."""

    stage: int | str = 0
    """``training.stage``: 1, 2 or ``"generator"``."""

    @abc.abstractmethod
    def parameter_roles(self) -> dict[str, str]:
        """``{parameter name: role}`` for every parameter (see :func:`build_param_groups`)."""

    def role_hyperparameters(self, weight_decay: float) -> dict[str, tuple[float, float]]:
        """Role -> (learning rate, weight decay) of roles of the task's own, beside the stages' roles."""
        return {}

    def role_phases(self, total_steps: int) -> dict[str, tuple[int, int]] | None:
        """Role -> ``[start, end)`` optimizer steps in which its learning rate is non-zero; None: every step."""
        return None

    def set_step(self, step: int) -> None:
        """The trainer's step before a training forward (for a forward that depends on it)."""

    def frozen_modules(self) -> list[str]:
        """Dotted names of the frozen sub-models (all parameters ``requires_grad=False``).

        For ZeRO-3 these stay out of partitioning; they are kept in eval mode in training (see :meth:`train`).
        """
        return list(_frozen_submodules(self))

    def _modules_in_train_mode_when_frozen(self) -> set[str]:
        return set()

    def frozen_modules_in_train_mode(self) -> set[str]:
        """Frozen sub-models that still follow the task's train mode (the engine keeps them so when it holds
        the frozen parts outside the module tree, :class:`uniemo.training.engine.FrozenParts`)."""
        return set(self._modules_in_train_mode_when_frozen())

    def train(self, mode: bool = True) -> Task:
        """Train/eval like any module, but frozen sub-models stay in eval mode (module docstring)."""
        super().train(mode)
        if mode:
            keep_training = self._modules_in_train_mode_when_frozen()
            for name in self.frozen_modules():
                if name not in keep_training:
                    self.get_submodule(name).eval()
        return self


class Stage1Task(Task):
    """Stage-1 understanding task: ``L_U = λ3·CE + λ1·InfoNCE_scene + λ2·InfoNCE_object`` (METHOD §2.4).

    Args:
        understanding: the :class:`uniemo.models.understanding.UnderstandingModel`.
        scene_text_features: ``[S,E]`` L2-normalised CLIP text features of the scene vocabulary (frozen text
            tower, METHOD §2.3), aligned with ``batch["scene_idx"]``.
        object_text_features: ``[O,E]`` the same for the object vocabulary, aligned with ``batch["object_idx"]``.
        losses: the loss weights.
    """

    stage = 1
    # Buffers (registered in __init__).
    scene_text_features: torch.Tensor
    object_text_features: torch.Tensor

    def __init__(
        self,
        understanding: UnderstandingModel,
        scene_text_features: torch.Tensor,
        object_text_features: torch.Tensor,
        losses: LossConfig,
    ) -> None:
        super().__init__()
        embed_dim = understanding.embed_dim
        for name, table in (
            ("scene_text_features", scene_text_features),
            ("object_text_features", object_text_features),
        ):
            if table.ndim != 2 or table.shape[1] != embed_dim:
                raise ValueError(
                    f"{name} must be [N, {embed_dim}] (the model's embed_dim), got {tuple(table.shape)}"
                )
        self.understanding = understanding
        self.losses = losses
        # Buffers: they follow .to(device) but are neither trained nor saved (derived from the frozen text tower).
        self.register_buffer(
            "scene_text_features", scene_text_features.detach().float().clone(), persistent=False
        )
        self.register_buffer(
            "object_text_features", object_text_features.detach().float().clone(), persistent=False
        )

    def parameter_roles(self) -> dict[str, str]:
        return {f"understanding.{n}": role for n, role in self.understanding.parameter_roles().items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """One stage-1 forward: ``{"understanding/emotion", "understanding/scene", "understanding/object",
        "understanding/total", "total", "metrics/accuracy"}``."""
        batch = _move_batch(batch, self.scene_text_features.device)
        out = self.understanding(batch["image"])
        placeholder = self.losses.unannotated_negatives
        batch["scene_text_features"] = _gather_rows(self.scene_text_features, batch["scene_idx"], placeholder)
        batch["object_text_features"] = _gather_rows(self.object_text_features, batch["object_idx"], placeholder)
        terms = understanding_loss(out, batch, self.losses, stage=1)
        result = {f"understanding/{k}": v for k, v in terms.items()}
        result["total"] = terms["total"]
        result["metrics/accuracy"] = (
            (out.emotion_logits.argmax(dim=1) == batch["label"]).float().mean().detach()
        )
        return result


class Stage2Task(Task):
    """Stage-2 joint task: ``L_joint = γ3·L(θ) + γ1·L_U' + L_cond`` (METHOD §3.3-§3.8).

    Args:
        understanding: the understanding model (stage-1 weights); backbone and emotion head are frozen here.
        generator: the :class:`uniemo.models.generator.Generator` (VAE, UNet, text encoder, scheduler).
        conditioner: the :class:`uniemo.models.conditioner.Conditioner` (mappers, alpha, fusion).
        attribute_embeddings: ``[A,Dt]`` attribute-base names in the generator's token-embedding space (D6).
        phi: ``[A,8]`` the correlation table Φ aligned with the base.
        losses: the loss weights and ablation switches (D13).
        head_dropout: keep the frozen emotion head in train mode (dropout on), as the official code.
        whole_understanding: train the backbone and the emotion head too (``training.stage2_whole_understanding``,
            a difference from METHOD §3.1).
    """

    stage = 2
    # Buffers (registered in __init__).
    attribute_embeddings: torch.Tensor
    phi: torch.Tensor

    def __init__(
        self,
        understanding: UnderstandingModel,
        generator: Generator,
        conditioner: Conditioner,
        attribute_embeddings: torch.Tensor,
        phi: torch.Tensor,
        losses: LossConfig,
        *,
        head_dropout: bool = True,
        whole_understanding: bool = False,
    ) -> None:
        super().__init__()
        if attribute_embeddings.ndim != 2 or phi.ndim != 2 or attribute_embeddings.shape[0] != phi.shape[0]:
            raise ValueError(
                f"attribute_embeddings [A,Dt] and phi [A,8] must have the same A, got "
                f"{tuple(attribute_embeddings.shape)} and {tuple(phi.shape)}"
            )
        self.understanding = understanding
        self.generator = generator
        self.conditioner = conditioner
        self.losses = losses
        # D8: whether the UNet trains is the generator's own setting (``model.generator.train_unet``).
        self.train_unet = bool(getattr(generator, "train_unet", False))
        self.head_dropout = head_dropout
        self.whole_understanding = whole_understanding
        self.register_buffer(
            "attribute_embeddings", attribute_embeddings.detach().float().clone(), persistent=False
        )
        self.register_buffer("phi", phi.detach().float().clone(), persistent=False)
        self._freeze()

    def _freeze(self) -> None:
        """METHOD §3.1: only queries + interactive blocks, the attribute classifiers, the mappers (and the UNet
        when fine-tuned, D8) train; everything else is frozen but still passes gradients. With
        ``whole_understanding`` the backbone and the emotion head train too."""
        roles = self.understanding.parameter_roles()
        trainable = _STAGE2_TRAINABLE_UNDERSTANDING_ROLES | (
            STAGE2_WHOLE_UNDERSTANDING_ROLES if self.whole_understanding else frozenset())
        for name, param in self.understanding.named_parameters():
            param.requires_grad_(roles[name] in trainable)
        for part in ("vae", "text_encoder"):
            getattr(self.generator, part).requires_grad_(False)
        self.generator.unet.requires_grad_(self.train_unet)
        self.conditioner.requires_grad_(True)

    def _modules_in_train_mode_when_frozen(self) -> set[str]:
        return {"understanding.emotion_head"} if self.head_dropout else set()

    def parameter_roles(self) -> dict[str, str]:
        roles = {f"understanding.{n}": role for n, role in self.understanding.parameter_roles().items()}
        roles.update({f"conditioner.{n}": ROLE_MAPPERS for n, _ in self.conditioner.named_parameters()})
        for name, _ in self.generator.named_parameters():
            roles[f"generator.{name}"] = ROLE_UNET if name.startswith("unet.") else ROLE_FROZEN
        return roles

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """One stage-2 forward: ``diffusion``, ``understanding/*``, ``condition/*``, ``total`` and detached
        ``metrics/accuracy``, ``metrics/alpha_scene``, ``metrics/alpha_object``."""
        batch = _move_batch(batch, self.phi.device)
        labels_B = batch["label"].long()

        # §3.3: the understanding branch and L_U' (attribute classifiers instead of InfoNCE).
        out = self.understanding(batch["image"])
        u_terms = understanding_loss(out, batch, self.losses, stage=2)

        # §3.4-3.6: map, weight by alpha (from the ground-truth emotion at training), fuse into c. The paper's
        # implicit-feedback ablation (D13) stops generation's gradient at the mappers' inputs: the mappers still
        # learn, the understanding model gets nothing from the diffusion or the condition loss.
        cls_f, scene_f, object_f = out.cls_feature, out.scene_feature, out.object_feature
        if not self.losses.implicit_feedback:
            cls_f, scene_f, object_f = (f.detach() if f is not None else None for f in (cls_f, scene_f, object_f))
        cond = self.conditioner(cls_f, scene_f, object_f, labels_B, self.attribute_embeddings, self.phi)
        condition_BD = cond.condition

        # §3.7-3.8, D5: c is spliced into the prompt embeddings, so dL(θ)/dc is exact. The switch
        # diffusion_to_condition (D13) stops the diffusion gradient at c; the condition loss still reaches the
        # mappers.
        diffusion_condition_BD = condition_BD if self.losses.diffusion_to_condition else condition_BD.detach()
        hidden_BLD = self.generator.encode_condition(diffusion_condition_BD)
        noisy_latents, noise, latents, timesteps = self.generator.diffusion_inputs(
            batch.get("pixel_values"), moments=_latent_moments(self.generator, batch)
        )
        prediction = self.generator.predict_noise(noisy_latents, timesteps, hidden_BLD)
        diffusion = diffusion_loss(prediction, noise, latents, timesteps, self.generator.noise_scheduler)

        # §3.6, D7: z = fc1(c) through the frozen last layer of the emotion head.
        z_BK = self.understanding.emotion_head.fc1(condition_BD)
        negatives = (
            hard_negatives(out.emotion_logits, labels_B)
            if self.losses.condition_negative == "understanding"
            else None
        )
        c_terms = condition_loss(
            z_BK,
            labels_B,
            margin=self.losses.condition_margin,
            ce_weight=self.losses.condition_ce_weight,
            triplet_weight=self.losses.condition_triplet_weight,
            negatives=negatives,
        )

        terms = joint_loss(u_terms, c_terms, diffusion, self.losses)
        terms["metrics/accuracy"] = (out.emotion_logits.argmax(dim=1) == labels_B).float().mean().detach()
        for name in ("alpha_scene", "alpha_object"):
            alpha = getattr(cond, name, None)
            if isinstance(alpha, torch.Tensor):
                terms[f"metrics/{name}"] = alpha.detach().float().mean()
        return terms


# -- what the data leaves out --------------------------------------------------------------------------------


def parts_left_out(cfg: Config, attributes: AttributeTable) -> list[str]:
    """The parts of the method this run leaves out because its data lacks annotations, as short phrases
    (empty: none). ``attributes`` is the run's table, re-based for ``data.min_attribute_count``.

    Stage 1: the InfoNCE term of a query type whose vocabulary is empty (no text rows). Stage 2: the attribute
    classifier of such a query type, and alpha with the scene and object mappers when the attribute base is
    empty (c = M_emo(f_cls)), unless alpha is fixed to 1 (D13). Query types switched off by config (D13) are
    not listed: they are the user's choice, not the data's.
    """

    und = cfg.model.understanding
    stage = cfg.training.stage
    parts = []
    for kind, used, vocabulary in (
        ("scene", und.use_scene_queries, attributes.scenes),
        ("object", und.use_object_queries, attributes.objects),
    ):
        if used and not vocabulary:
            parts.append(f"the {kind} InfoNCE term" if stage == 1 else f"the {kind} classifier")
    if stage == 2 and not uses_attribute_branches(cfg.model.conditioner, bool(attributes.base_names)):
        parts.append("alpha with the scene and object mappers (no attribute base: c = M_emo(f_cls))")
    return parts


def left_out_note(cfg: Config, attributes: AttributeTable) -> str | None:
    """One line for the user about :func:`parts_left_out`, or None when the run is the whole method."""
    parts = parts_left_out(cfg, attributes)
    if not parts:
        return None
    missing = attributes.unannotated_kinds
    lacking = (" or ".join(missing) + " annotations" if missing
               else f"attribute seen data.min_attribute_count={attributes.min_count} times")
    listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return (f"the data has no {lacking}, so stage {cfg.training.stage} leaves out {listed}; "
            "the other losses are the method's")


# -- parameter groups ---------------------------------------------------------------------------------------


def _role_hyperparameters(training_cfg: TrainingConfig) -> dict[str, tuple[float, float]]:
    """Role -> (learning rate, weight decay), METHOD §2.5 (stage 1) and §3.1 (stage 2)."""
    t = training_cfg
    return {
        "backbone": (t.lr_backbone, t.weight_decay_backbone),
        "queries": (t.lr_queries, t.weight_decay),
        "head": (t.lr_head, t.weight_decay),
        "attribute_classifiers": (t.lr_head, t.weight_decay),
        # D4: the contrastive projections are new random layers beside the queries; same lr as the queries.
        "projections": (t.lr_queries, t.weight_decay),
        "logit_scales": (t.lr_queries, 0.0),
        ROLE_MAPPERS: (t.lr_mappers, t.weight_decay),
        ROLE_UNET: (t.lr_unet, t.weight_decay),
    }


def _decays(name: str, param: torch.Tensor) -> bool:
    """METHOD §2.5: no weight decay on 1-D parameters (norms, embeddings of one vector, scales) and biases."""
    return param.ndim > 1 and not name.endswith(".bias")


def build_param_groups(task: Task, training_cfg: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups for a task (METHOD §2.5, §3.1).

    Groups by role, each split into a decaying and a ``/no_decay`` part: stage 1 ``backbone``
    (``lr_backbone``, ``weight_decay_backbone``), ``queries`` (``lr_queries``), ``head`` and
    ``attribute_classifiers`` (``lr_head``), ``projections`` and ``logit_scales`` when trainable (``lr_queries``);
    stage 2 ``queries``, ``attribute_classifiers``, ``mappers`` (``lr_mappers``) and ``unet`` (``lr_unet``, D8)
    when fine-tuned. Only parameters with ``requires_grad`` enter, so the frozen backbone and head of stage 2
    stay out of the optimiser. Empty groups are dropped.

    Returns:
        A list of ``{"name", "params", "lr", "weight_decay"}`` dicts for ``torch.optim.AdamW`` or DeepSpeed.

    Raises:
        ValueError: when a trainable parameter has no known role, or a parameter would land in no group or in
            two groups, or a frozen one in any group.
    """
    hyper = _role_hyperparameters(training_cfg)
    hyper.update(task.role_hyperparameters(training_cfg.weight_decay))  # a task's own roles (generator pretraining)
    roles = task.parameter_roles()
    groups: dict[str, dict[str, Any]] = {}
    placed: dict[int, str] = {}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        role = roles.get(name)
        if role not in hyper:
            raise ValueError(f"trainable parameter {name} has role {role!r}, which has no optimiser group")
        lr, weight_decay = hyper[role]
        decays = _decays(name, param)
        group_name = role if decays else f"{role}/no_decay"
        group = groups.setdefault(
            group_name,
            {"name": group_name, "params": [], "lr": lr, "weight_decay": weight_decay if decays else 0.0},
        )
        if id(param) in placed:
            raise ValueError(f"parameter {name} would be in both {placed[id(param)]} and {group_name}")
        placed[id(param)] = group_name
        group["params"].append(param)

    # Exactly once, nothing frozen (STYLE 13): recount from the result, independently of the loop above.
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    counted: dict[int, int] = {}
    for group in groups.values():
        for p in group["params"]:
            counted[id(p)] = counted.get(id(p), 0) + 1
    names = {id(p): n for n, p in task.named_parameters()}
    missing = [names[i] for i in trainable if i not in counted]
    repeated = [names[i] for i, n in counted.items() if n > 1]
    frozen = [names.get(i, "?") for i in counted if i not in trainable]
    if missing or repeated or frozen:
        raise ValueError(
            f"parameter groups are inconsistent: missing {missing[:5]}, repeated {repeated[:5]}, frozen {frozen[:5]}"
        )
    return list(groups.values())


# -- builders -----------------------------------------------------------------------------------------------


def build_stage1_task(cfg: Config, attributes: AttributeTable, cache_dir: str | None = None) -> Stage1Task:
    """The stage-1 task from config: the understanding model (loaded from ``model.understanding.clip_path`` when
    set) and the attribute text features of the scene/object vocabularies (cached in ``cache_dir``, default
    ``data.cache_dir``)."""

    und_cfg = cfg.model.understanding
    understanding = build_understanding(und_cfg, len(attributes.scenes), len(attributes.objects))
    cache = cache_dir if cache_dir is not None else cfg.data.cache_dir
    # The official loader gives an image without a scene (object) the text "scene" ("object"), and its column
    # stays in the InfoNCE matrix (METHOD §2.4): appended as the last row of each table, see _gather_rows.
    placeholders = cfg.training.losses.unannotated_negatives
    scene_text = attribute_text_features(und_cfg, [*attributes.scenes, *(["scene"] if placeholders else [])], cache)
    object_text = attribute_text_features(und_cfg, [*attributes.objects, *(["object"] if placeholders else [])], cache)
    if scene_text.shape[-1] != understanding.embed_dim:
        raise ConfigError(
            f"model.understanding.preset ({und_cfg.preset!r}, embed_dim {understanding.embed_dim}) and "
            f"model.understanding.clip_path text tower (projection {scene_text.shape[-1]}) disagree; "
            "use a CLIP folder that matches the preset"
        )
    return Stage1Task(understanding, scene_text, object_text, cfg.training.losses)


def _load_understanding_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a stage-1 understanding state dict (bare, or with the task's ``understanding.`` prefix)."""

    prefix = "understanding."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise ConfigError(
            f"the stage-1 weights do not fit model.understanding ({first}); "
            "use the same model.understanding settings as the stage-1 run (training.init_from)"
        ) from None


def build_stage2_task(
    cfg: Config,
    attributes: AttributeTable,
    understanding_state: dict[str, torch.Tensor] | None = None,
    cache_dir: str | None = None,
) -> Stage2Task:
    """The stage-2 task from config (METHOD §3): understanding model (+ stage-1 weights), generator (a
    diffusers folder at ``model.generator.path`` or a random preset), conditioner, and the attribute base
    embedded in ``model.conditioner.attribute_space`` (the generator's token space, D6, or CLIP's text features)
    with Φ (recomputed for ``data.min_attribute_count`` / ``data.phi_beta``)."""

    und_cfg, gen_cfg = cfg.model.understanding, cfg.model.generator
    attributes = attributes.rebased(cfg.data.min_attribute_count, cfg.data.phi_beta)
    understanding = build_understanding(und_cfg, len(attributes.scenes), len(attributes.objects))
    if understanding_state is not None:
        _load_understanding_state(understanding, understanding_state)
    generator = build_generator(gen_cfg, image_size=cfg.data.generator_image_size, seed=cfg.run.seed)
    if understanding.embed_dim != generator.token_dim:
        gen_key, gen_value = ("path", gen_cfg.path) if gen_cfg.path else ("preset", gen_cfg.preset)
        raise ConfigError(
            f"model.understanding.preset ({und_cfg.preset!r}: emotion-head hidden width {understanding.embed_dim}) "
            f"and model.generator.{gen_key} ({gen_value!r}: text-token width {generator.token_dim}) must match, "
            "because the condition loss applies the head's fc1 to the condition token (METHOD §3.6); "
            "pick paired presets"
        )
    conditioner = Conditioner(cfg.model.conditioner, in_dim=understanding.width, out_dim=generator.token_dim,
                              has_base=bool(attributes.base_names))
    with torch.no_grad():
        attribute_embeddings = attribute_base_embeddings(
            cfg, generator, list(attributes.base_names), cache_dir if cache_dir is not None else cfg.data.cache_dir
        )
    return Stage2Task(
        understanding,
        generator,
        conditioner,
        attribute_embeddings,
        attributes.phi,
        cfg.training.losses,
        head_dropout=cfg.training.stage2_head_dropout,
        whole_understanding=cfg.training.stage2_whole_understanding,
    )
