"""``training.stage: generator``: pretraining the CPU world's small Stable-Diffusion-shaped generator (METHOD D15).

At full scale stage 2 starts from SD-1.5, which was pretrained on web images: it can draw scenes, objects and
colours but was never taught UniEmo's emotion conditioning. :class:`GeneratorPretrainTask` gives the CPU world the
same starting point: a small VAE + CLIP text encoder + UNet pretrained on the synthetic set with captions that
describe what is in an image and never its emotion (:mod:`uniemo.data.captions`). It runs through the same
trainer and DeepSpeed engine as stages 1 and 2 (checkpoints, exact resume, metrics, wandb).

Two phases in one run, one optimiser:

- steps ``[0, vae_steps)``: the ``AutoencoderKL`` (reconstruction MSE + ``kl_weight`` x KL, both per image);
- steps ``[vae_steps, steps)``: the UNet and the text encoder, on the epsilon loss of METHOD §3.7 with the VAE
  fixed, with offset noise (``noise_offset``) so that colour comes from the caption, not from the noisy latent.
  At the first step of this phase the latent scaling factor is set to 1 / std of the VAE latents of that batch
  (averaged over ranks), as SD's 0.18215 was chosen for its VAE; it is a persistent buffer, so it is
  checkpointed and exported as the VAE's ``scaling_factor``.

Each part's optimiser group has a learning rate only in its own phase (:meth:`role_phases`, read by the engine),
so the other phase's parts do not move, not even by weight decay. The end of the run (:func:`finish_generator`)
writes a diffusers folder (``StableDiffusionPipeline.save_pretrained`` layout, safetensors) that stage 2 takes
through ``model.generator.path``, exactly as it would take SD-1.5.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from uniemo.data.captions import batch_captions, caption_vocabulary
from uniemo.distributed.env import launch_dir
from uniemo.models.generator import SD15_SCHEDULER_CONFIG, build_random_parts, save_pipeline
from uniemo.models.tokenizer import build_local_tokenizer
from uniemo.run_layout import GENERATOR_DIR, PROVENANCE_FILE
from uniemo.training.task import Task, _move_batch

if TYPE_CHECKING:  # pragma: no cover - typing only
    # diffusers' classes come from their defining modules, here and at run time: a type checker reads
    # ``from diffusers import X`` as the package's torch-less placeholder class.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel

    from uniemo.config.schema import Config
    from uniemo.data.attributes import AttributeTable
    from uniemo.training.parts import FinishedTraining

ROLE_VAE = "generator_vae"
ROLE_UNET_PRETRAIN = "generator_unet"
ROLE_TEXT = "generator_text"


class GeneratorPretrainTask(Task):
    """VAE, then UNet + text encoder on emotion-free captions (module docstring).

    Args:
        vae, unet, text_encoder: the random-initialised parts of a generator preset.
        tokenizer: the local tokenizer with one single-word token per caption word.
        scenes, objects: the names ``batch["scene_idx"]`` and ``batch["objects_multi_hot"]`` index.
        settings: ``training.generator``.
    """

    stage = "generator"
    latent_scale: torch.Tensor
    """Persistent buffer (registered in __init__): the latent scaling factor, 0 until the UNet phase sets it."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer,
                 scenes: list[str], objects: list[str], settings: Any) -> None:
        super().__init__()
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scenes = list(scenes)
        self.objects = list(objects)
        self.settings = settings
        self.vae_steps = int(settings.vae_steps)
        self.noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
        self.register_buffer("latent_scale", torch.zeros(()), persistent=True)
        self.phase = "vae"
        for part in (self.vae, self.unet, self.text_encoder):
            part.requires_grad_(True)

    # -- the engine's view ------------------------------------------------------------------------------------
    def parameter_roles(self) -> dict[str, str]:
        roles = {f"vae.{n}": ROLE_VAE for n, _ in self.vae.named_parameters()}
        roles.update({f"unet.{n}": ROLE_UNET_PRETRAIN for n, _ in self.unet.named_parameters()})
        roles.update({f"text_encoder.{n}": ROLE_TEXT for n, _ in self.text_encoder.named_parameters()})
        return roles

    def role_hyperparameters(self, weight_decay: float) -> dict[str, tuple[float, float]]:
        """Role -> (learning rate, weight decay) of this task's own roles."""
        s = self.settings
        return {ROLE_VAE: (s.lr_vae, weight_decay), ROLE_UNET_PRETRAIN: (s.lr_unet, weight_decay),
                ROLE_TEXT: (s.lr_text, weight_decay)}

    def role_phases(self, total_steps: int) -> dict[str, tuple[int, int]] | None:
        """Role -> ``[start, end)`` optimizer steps in which its learning rate is non-zero."""
        unet_phase = (self.vae_steps, total_steps)
        return {ROLE_VAE: (0, self.vae_steps), ROLE_UNET_PRETRAIN: unet_phase, ROLE_TEXT: unet_phase}

    def set_step(self, step: int) -> None:
        """The trainer's step before a training forward: which phase this forward belongs to."""
        self.phase = "vae" if step < self.vae_steps else "unet"

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """``total``, ``vae/reconstruction``, ``vae/kl``, ``diffusion`` (the inactive phase's terms are 0) and
        ``metrics/phase`` (0 VAE, 1 UNet), ``metrics/latent_scale``."""
        device = self.latent_scale.device
        batch = _move_batch(batch, device)
        x = batch["pixel_values"]
        zero = x.new_zeros(())
        terms = {"vae/reconstruction": zero, "vae/kl": zero, "diffusion": zero}
        if self.phase == "vae":
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample()).sample
            per_image = x[0].numel()
            terms["vae/reconstruction"] = F.mse_loss(recon.float(), x.float())
            # LDM's weighting: reconstruction and KL both summed per image, KL x 1e-6; here per pixel.
            terms["vae/kl"] = posterior.kl().float().mean() / per_image
            total = terms["vae/reconstruction"] + self.settings.kl_weight * terms["vae/kl"]
        else:
            with torch.no_grad():
                raw = self.vae.encode(x).latent_dist.sample().float()
                if float(self.latent_scale) == 0.0:
                    self._set_latent_scale(raw)
                latents = raw * self.latent_scale
            # Caption drops draw from the torch RNG (checkpointed), so a resumed run drops the same captions.
            rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item())) if self.training else None
            captions = batch_captions(batch, self.scenes, self.objects, rng, self.settings.caption_drop,
                                      self.settings.part_drop)
            ids = self.tokenizer(captions, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            hidden = self.text_encoder(input_ids=ids.to(device)).last_hidden_state
            noise = torch.randn_like(latents)
            if self.settings.noise_offset > 0:  # offset noise (training.generator.noise_offset)
                noise = noise + self.settings.noise_offset * torch.randn(
                    latents.shape[0], latents.shape[1], 1, 1, device=device, dtype=noise.dtype)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            unet_dtype = next(self.unet.parameters()).dtype
            prediction = self.unet(noisy.to(unet_dtype), timesteps,
                                   encoder_hidden_states=hidden.to(unet_dtype)).sample.float()
            terms["diffusion"] = F.mse_loss(prediction, noise)
            total = terms["diffusion"]
        terms["total"] = total
        terms["metrics/phase"] = x.new_tensor(0.0 if self.phase == "vae" else 1.0)
        terms["metrics/latent_scale"] = self.latent_scale.detach().float()
        return terms

    def _set_latent_scale(self, raw_latents: torch.Tensor) -> None:
        """1 / std of the latents of this batch, averaged over ranks (same value everywhere)."""
        std = raw_latents.std().detach().double().cpu()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(std)
            std /= torch.distributed.get_world_size()
        self.latent_scale.fill_(float(1.0 / max(float(std), 1e-6)))


def build_generator_task(cfg: Config, attributes: AttributeTable) -> GeneratorPretrainTask:
    """The pretraining task of ``model.generator.preset`` with the caption vocabulary of ``attributes``."""
    words = caption_vocabulary(attributes.scenes, attributes.objects)
    tokenizer = build_local_tokenizer(words=words)
    text_encoder, vae, unet, _ = build_random_parts(
        cfg.model.generator.preset, tokenizer, cfg.data.generator_image_size, cfg.run.seed
    )
    return GeneratorPretrainTask(vae, unet, text_encoder, tokenizer, attributes.scenes, attributes.objects,
                                 cfg.training.generator)


def annotation_note(attributes: AttributeTable) -> str | None:
    """One line when the data lacks the annotations captions are built from, else None."""
    missing = attributes.unannotated_kinds
    if not missing:
        return None
    kept = "colour words only" if len(missing) == 2 else "colour words and the " + (
        "objects" if missing == ["scene"] else "scene")
    return f"the training data has no {' or '.join(missing)} annotations: captions hold {kept}"


def finish_generator(trainer: FinishedTraining) -> None:
    """Rank 0: the trained parts as a diffusers folder ``<run>/generator/`` plus ``provenance.json``."""
    from uniemo.config.loader import code_version, dump_config
    from uniemo.training.checkpoint import consolidated_state_dict

    env, cfg = trainer.env, trainer.cfg
    if env.is_main:
        task = trainer.parts.task
        assert isinstance(task, GeneratorPretrainTask), "finish_generator ends a generator-pretraining run"
        trained = consolidated_state_dict(trainer.final_checkpoint())
        out = Path(trainer.run_dir) / GENERATOR_DIR
        export_generator(task, trained, cfg, out)
        provenance = {
            "what": "uniemo's pretrained CPU-world generator (METHOD D15): VAE, CLIP text encoder and UNet trained "
                    "on the synthetic set with emotion-free captions",
            "code_version": code_version(),
            "preset": cfg.model.generator.preset,
            "steps": trainer.step,
            "vae_steps": cfg.training.generator.vae_steps,
            "global_batch": trainer.global_batch,
            "samples_seen": trainer.samples_seen,
            "data": {"synthetic_images": cfg.data.synthetic.images, "synthetic_seed": cfg.data.synthetic.seed,
                     "size": cfg.data.synthetic.size, "shards": cfg.data.shards},
            "latent_scale": float(trained["latent_scale"]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # Paths inside the launch directory are recorded relative to it: a shipped folder names no machine.
            "config": dump_config(cfg).replace(str(launch_dir()) + "/", ""),
        }
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        trainer.logger.info(f"pretrained generator (diffusers folder) -> {out}")
    if torch.distributed.is_initialized() and env.world_size > 1:
        torch.distributed.barrier()


def export_generator(task: GeneratorPretrainTask, trained: dict[str, torch.Tensor], cfg: Config,
                     out: Path) -> None:
    """Fresh fp32 parts with the consolidated weights ``trained``, saved as a diffusers folder at ``out``."""
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler

    text_encoder, vae, unet, _ = build_random_parts(
        cfg.model.generator.preset, task.tokenizer, cfg.data.generator_image_size, cfg.run.seed
    )
    for prefix, module in (("vae.", vae), ("unet.", unet), ("text_encoder.", text_encoder)):
        state = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    vae.register_to_config(scaling_factor=float(trained["latent_scale"]))
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_pipeline(tmp, unet, vae, text_encoder, task.tokenizer, PNDMScheduler(**SD15_SCHEDULER_CONFIG))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
