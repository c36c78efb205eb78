"""The Stable Diffusion generator: frozen diffusers/transformers parts plus a differentiable condition splice.

What is unusual here:

- The condition token c enters the text encoder by a **splice** (METHOD D5): a forward hook on the token-embedding
  layer replaces the embedding at the placeholder position with c (``torch.where``), and the text encoder then
  runs its own unmodified forward. So dL/dc is exactly the diffusion gradient, with no gradient relay
  (METHOD §3.8, §9.12) and any batch size. The hook keeps us on the library's own forward (causal mask, attention
  implementation) across transformers versions.
- Everything loads from a local diffusers-format folder (``StableDiffusionPipeline.save_pretrained`` layout,
  plain or fp16-variant files, METHOD D3; a single-file checkpoint converts with ``uniemo convert``) or is built
  at random from the small presets below; random presets are saved through a real ``StableDiffusionPipeline`` so
  tests load them through the same code a real user does.
- VAE, text encoder and (unless ``train_unet``, D8) UNet are frozen: ``requires_grad_(False)`` and kept in eval
  mode even when the module is put in train mode.

Shape legend: B batch, L text length (77), Dt text-token width, C/H/W latent or pixel channels and sides.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import nn

from uniemo.errors import ConfigError, UserError
from uniemo.models.weight_files import (
    DIFFUSERS_STEM,
    TRANSFORMERS_STEM,
    find_safetensors,
    resave_command,
    single_file_generator_error,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    # diffusers' package namespace resolves to its dummy objects under a type checker: the real classes are
    # imported from their defining modules (here and at run time, where instances are built).
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

PLACEHOLDER_TOKEN = "<emotion>"
PLACEHOLDER_INIT = "cat"

# SD-1.5's scheduler config (runwayml/stable-diffusion-v1-5 ``scheduler/scheduler_config.json``): the training
# noise of METHOD §3.7 (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class GeneratorPreset:
    """Sizes of a random-initialised generator (tests and the CPU demo)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_head_dim: int
    norm_groups: int


GENERATOR_PRESETS: dict[str, GeneratorPreset] = {
    # Text width 32 pairs with the `tiny` understanding preset (embed_dim 32, uniemo.models.understanding.PRESETS). Three VAE blocks give a
    # latent 4x smaller than the image (16x16 at 64 px), enough to keep a stage-2 step fast on one CPU core.
    "tiny": GeneratorPreset(
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=64,
        vae_channels=(16, 32, 32),
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        unet_head_dim=8,
        norm_groups=8,
    ),
    # The CPU world's pretrained generator (METHOD D15, configs/tiny_generator.yaml): text width 32 pairs with the
    # `tiny` understanding preset; a VAE of 16/32/64 channels (4x down-sampling) and a UNet with cross-attention
    # at the 8x8 level and in the middle block, small enough to pretrain on 2 CPU cores.
    "cpu": GeneratorPreset(
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=128,
        vae_channels=(16, 32, 64),
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        unet_head_dim=8,
        norm_groups=8,
    ),
    "small": GeneratorPreset(
        text_hidden=64,
        text_layers=4,
        text_heads=4,
        text_intermediate=256,
        vae_channels=(32, 64, 64),
        unet_channels=(64, 128),
        unet_layers_per_block=2,
        unet_head_dim=16,
        norm_groups=16,
    ),
}


class DiffusionInputs(NamedTuple):
    """What one diffusion-loss step needs (METHOD §3.7); unpacks as a 4-tuple."""

    noisy_latents: torch.Tensor
    """z_t, [B,C,h,w]."""
    noise: torch.Tensor
    """epsilon, the regression target, [B,C,h,w]."""
    latents: torch.Tensor
    """z_0 = VAE.enc(x).sample * scaling_factor, [B,C,h,w]."""
    timesteps: torch.Tensor
    """t ~ U{0..T-1}, int64 [B]."""


class Generator(nn.Module):
    """SD VAE + UNet + CLIP text encoder + tokenizer + DDPM training noise, with a placeholder token for c.

    Build with :meth:`from_pretrained` (a local diffusers folder) or :meth:`build_random` (a small preset).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: ConfigMixin,
        placeholder_token: str = PLACEHOLDER_TOKEN,
        placeholder_init: str = PLACEHOLDER_INIT,
        train_unet: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # The scheduler saved with the pipeline (PNDM for SD-1.5; any diffusers scheduler, only its config is
        # read); the training noise is a DDPM scheduler built from the same config, as in diffusers'
        # text-to-image training script. diffusers types a config as a plain dict: keys, not attributes.
        self.scheduler = scheduler
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        prediction_type = self.noise_scheduler.config["prediction_type"]
        if prediction_type != "epsilon":
            raise ConfigError(
                f"the generator's scheduler predicts {prediction_type!r}; uniemo's "
                "diffusion loss is epsilon-prediction (METHOD §3.7): use an SD-1.x folder"
            )
        cross_attention_dim = unet.config["cross_attention_dim"]
        if cross_attention_dim != text_encoder.config.hidden_size:
            raise ConfigError(
                f"UNet cross-attention width {cross_attention_dim} != text encoder width "
                f"{text_encoder.config.hidden_size}: the generator folder mixes incompatible parts"
            )
        self.train_unet = train_unet
        self._ids_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.fixed_batch: int | None = None
        """Generation pads every batch to this size (static shapes for CUDA graphs,
        :func:`uniemo.models.acceleration.compile_for_generation`); None: batches as they come."""
        from uniemo.models.acceleration import use_sdpa

        use_sdpa(unet)  # fused attention whatever processor a loaded folder came with (acceleration module)
        use_sdpa(vae)
        self.placeholder_token = placeholder_token
        self.placeholder_id = self._add_placeholder(placeholder_token, placeholder_init)
        self._freeze()

    # ----------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        placeholder_token: str = PLACEHOLDER_TOKEN,
        placeholder_init: str = PLACEHOLDER_INIT,
        train_unet: bool = False,
        torch_dtype: torch.dtype | None = None,
    ) -> Generator:
        """Load the parts from a local diffusers-format folder (``StableDiffusionPipeline.save_pretrained``).

        Only local files are read (METHOD D3). Each weighted part may hold the plain files or only one variant
        (``*.fp16.safetensors``); weights are cast to ``torch_dtype`` (None: float32). A placeholder token already in the saved tokenizer keeps its saved
        embedding row; otherwise it is added and initialised from ``placeholder_init``.
        """
        import diffusers
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(path).expanduser()
        variants = check_generator_folder(root)
        # A folder of fp16 variants is read in fp16 and cast: the parts live in `torch_dtype` (float32 unless
        # asked otherwise; DeepSpeed casts for a bf16/fp16 run), whatever the files hold.
        dtype = torch_dtype or torch.float32
        kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "torch_dtype": dtype}
        if importlib.util.find_spec("accelerate") is None:
            # Without accelerate diffusers falls back to this anyway; saying so silences its warning.
            kwargs["low_cpu_mem_usage"] = False
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", variant=variants["unet"], **kwargs)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", variant=variants["vae"], **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            root / "text_encoder",
            local_files_only=True,
            use_safetensors=True,
            dtype=dtype,
            variant=variants["text_encoder"],
        )
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        scheduler_config = diffusers.DDPMScheduler.load_config(
            root, subfolder="scheduler", local_files_only=True
        )
        scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "DDPMScheduler"), None)
        if scheduler_cls is None:
            scheduler_cls = diffusers.DDPMScheduler
        scheduler = scheduler_cls.from_config(scheduler_config)
        return cls(
            unet, vae, text_encoder, tokenizer, scheduler, placeholder_token, placeholder_init, train_unet
        )

    @classmethod
    def build_random(
        cls,
        preset: str = "tiny",
        image_size: int = 64,
        seed: int = 0,
        placeholder_token: str = PLACEHOLDER_TOKEN,
        placeholder_init: str = PLACEHOLDER_INIT,
        train_unet: bool = False,
    ) -> Generator:
        """Build a random-initialised generator of a small preset (``tiny``, ``small``); same seed, same weights.

        The tokenizer is the local character-level CLIP tokenizer (no hub). The global RNG is left untouched.
        """
        from uniemo.models.tokenizer import build_local_tokenizer

        # The placeholder is added (and initialised from `placeholder_init`) by the constructor.
        tokenizer = build_local_tokenizer()
        text_encoder, vae, unet, scheduler = build_random_parts(preset, tokenizer, image_size, seed)
        return cls(
            unet, vae, text_encoder, tokenizer, scheduler, placeholder_token, placeholder_init, train_unet
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Save through a real ``StableDiffusionPipeline`` (safetensors), so :meth:`from_pretrained` reloads it."""
        save_pipeline(path, self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler)

    def _add_placeholder(self, token: str, init_word: str) -> int:
        """Add the placeholder token (if new) and initialise its row from ``init_word`` (METHOD §3.1)."""
        if token not in self.tokenizer.get_vocab():
            self.tokenizer.add_tokens([token])
        token_id = cast(int, self.tokenizer.convert_tokens_to_ids(token))  # one token in, one id out
        embedding = token_embedding(self.text_encoder)
        if token_id >= embedding.num_embeddings:
            # The new row is overwritten below; the fork keeps resizing from consuming the global RNG.
            with torch.random.fork_rng(devices=[]):
                self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            embedding = token_embedding(self.text_encoder)
            init_ids = self._name_token_ids(init_word)
            with torch.no_grad():
                embedding.weight[token_id] = embedding.weight[init_ids].mean(dim=0)
        return int(token_id)

    def _freeze(self) -> None:
        # METHOD §3.1 / D8: VAE and text encoder never train; the UNet only with `train_unet`.
        for part in (self.vae, self.text_encoder):
            part.requires_grad_(False)
            part.eval()
        self.unet.requires_grad_(self.train_unet)
        if not self.train_unet:
            self.unet.eval()

    def train(self, mode: bool = True) -> Generator:
        """Switch train/eval mode; frozen parts stay in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        if not self.train_unet:
            self.unet.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------
    # sizes

    @property
    def token_dim(self) -> int:
        """Dt: width of the text-token embeddings (768 for SD-1.5)."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def max_length(self) -> int:
        """Text context length (77)."""
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def latent_scale(self) -> float:
        """VAE latent scaling factor (0.18215 for SD-1.5)."""
        return float(self.vae.config["scaling_factor"])

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side (8 for SD-1.5)."""
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config["in_channels"])

    @property
    def image_size(self) -> int:
        """Native image side: the UNet's sample size times the VAE factor (512 for SD-1.5)."""
        sample = self.unet.config["sample_size"]
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ----------------------------------------------------------------------------------------------------------
    # text side

    def _name_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS/padding."""
        special = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        ids = self.tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=self.max_length - 2
        ).input_ids
        ids = [i for i in ids if i not in special]
        if not ids:
            raise ValueError(f"{text!r} has no tokens")
        return ids

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> input ids [B,L], padded to the context length (METHOD §3.2 (c))."""
        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """Input ids [1,L] of one prompt on the current device, tokenized once (the tokenizer is fixed): the
        condition prompt is the same at every training step, and tokenizing it each time costs host time."""
        key = (prompt, str(self.device))
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = self._ids_cache[key] = self.tokenize([prompt])
        return ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder last hidden state of plain prompts, [B,L,Dt] (e.g. the empty prompt for guidance)."""
        return self.text_encoder(input_ids=self.tokenize(prompts)).last_hidden_state

    def encode_condition(self, condition_BD: torch.Tensor, prompt: str | None = None) -> torch.Tensor:
        """Splice c into the placeholder position and encode, [B,L,Dt]; differentiable w.r.t. c (METHOD D5).

        ``prompt`` defaults to the bare placeholder token (METHOD §3.6); it must contain the placeholder.
        """
        if condition_BD.dim() != 2 or condition_BD.shape[1] != self.token_dim:
            raise ValueError(f"condition must be [B,{self.token_dim}], got {list(condition_BD.shape)}")
        prompt = self.placeholder_token if prompt is None else prompt
        ids_BL = self._prompt_ids(prompt).expand(condition_BD.shape[0], -1)
        slot_BL1 = (ids_BL == self.placeholder_id).unsqueeze(-1)
        if not bool(slot_BL1.any()):
            raise ValueError(f"prompt {prompt!r} does not contain the placeholder {self.placeholder_token!r}")

        def splice(_module: nn.Module, _args: tuple, embeds_BLD: torch.Tensor) -> torch.Tensor:
            # The frozen table's row is never written: c replaces the looked-up embedding, so the gradient of
            # anything downstream reaches c directly (D5, no relay of §3.8).
            c_BLD = condition_BD.to(embeds_BLD.dtype).unsqueeze(1).expand_as(embeds_BLD)
            return torch.where(slot_BL1, c_BLD, embeds_BLD)

        handle = token_embedding(self.text_encoder).register_forward_hook(splice)
        try:
            return self.text_encoder(input_ids=ids_BL).last_hidden_state
        finally:
            handle.remove()

    @torch.no_grad()
    def embed_names(self, names: list[str]) -> torch.Tensor:
        """Attribute names in the text-token embedding space, [N,Dt] float32 (METHOD D6).

        Each name (underscores read as spaces) is the mean of the input embeddings of its tokens, BOS, EOS and
        padding excluded: the space the mapped vectors e_s, e_o live in.
        """
        weight = token_embedding(self.text_encoder).weight
        rows = [weight[self._name_token_ids(name.replace("_", " "))].float().mean(dim=0) for name in names]
        if not rows:
            return weight.new_zeros(0, self.token_dim, dtype=torch.float32)
        return torch.stack(rows)

    # ----------------------------------------------------------------------------------------------------------
    # image side

    @torch.no_grad()
    def latent_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the VAE's latent distribution of x in [-1, 1], unscaled, in the VAE's dtype, each
        [B,C,h,w]: what :mod:`uniemo.data.latents` stores so stage 2 need not run the encoder (METHOD §3.7)."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixel_values.to(self.device, vae_dtype)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z_0 = (mean + std * eps) * scaling_factor, float32 [B,C,h,w]: the VAE posterior's own ``sample`` (one
        ``randn_tensor`` draw of the moments' shape and dtype), so stored moments give the latents the encoder
        gives with the same random state."""
        from diffusers.utils.torch_utils import randn_tensor

        vae_dtype = next(self.vae.parameters()).dtype
        mean = mean.to(self.device, vae_dtype)
        std = std.to(self.device, vae_dtype)
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return ((mean + std * eps) * self.latent_scale).float()

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z_0 = VAE.enc(x).sample * scaling_factor, float32 [B,C,h,w] (METHOD §3.7); x in [-1, 1]."""
        return self.sample_latents(*self.latent_moments(pixel_values), generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], float32 [B,3,H,W] (1/scaling_factor, METHOD §4.2)."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / self.latent_scale).to(vae_dtype)).sample.float()

    def diffusion_inputs(
        self,
        pixel_values: torch.Tensor | None,
        generator: torch.Generator | None = None,
        moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> DiffusionInputs:
        """Encode (or sample the given latent ``moments``, :meth:`latent_moments`), draw noise and t ~ U{0..T-1},
        add the noise (METHOD §3.7). Random draws use ``generator``, in the same order either way."""
        if moments is None:
            if pixel_values is None:
                raise ValueError("diffusion_inputs needs pixel_values or latent moments")
            latents = self.encode_images(pixel_values, generator)
        else:
            with torch.no_grad():
                latents = self.sample_latents(*moments, generator=generator)
        rng_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=rng_device).to(latents.device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config["num_train_timesteps"],
            (latents.shape[0],),
            generator=generator,
            device=rng_device,
        ).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return DiffusionInputs(noisy, noise, latents, timesteps)

    def predict_noise(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """epsilon_theta(z_t, t, text), float32 [B,C,h,w]; gradients flow to ``hidden_states`` (and c)."""
        unet_dtype = next(self.unet.parameters()).dtype
        return self.unet(
            noisy_latents.to(unet_dtype), timesteps, encoder_hidden_states=hidden_states.to(unet_dtype)
        ).sample.float()


def token_embedding(text_encoder: CLIPTextModel) -> nn.Embedding:
    """The text encoder's token-embedding table (CLIP's ``token_embedding``, [vocab, Dt])."""
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"the text encoder's input embeddings are a {type(embedding).__name__}, not nn.Embedding")
    return embedding


def build_random_parts(
    preset: str, tokenizer: CLIPTokenizer, image_size: int = 64, seed: int = 0
) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel, ConfigMixin]:
    """``(text_encoder, vae, unet, scheduler)`` of a small preset, random-initialised with ``seed`` (the global RNG
    is left untouched); the text encoder's vocabulary is ``len(tokenizer)``."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from uniemo.models.tokenizer import MAX_LENGTH

    if preset not in GENERATOR_PRESETS:
        raise ConfigError(
            f"model.generator.preset {preset!r} is not a random preset; choose one of "
            f"{sorted(GENERATOR_PRESETS)} or set model.generator.path to an SD folder"
        )
    p = GENERATOR_PRESETS[preset]
    factor = 2 ** (len(p.vae_channels) - 1)
    down_factor = 2 ** (len(p.unet_channels) - 1)
    if image_size % (factor * down_factor) != 0:
        raise ConfigError(
            f"data.generator_image_size {image_size} must be a multiple of "
            f"{factor * down_factor} for generator preset {preset!r}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=p.text_hidden,
                intermediate_size=p.text_intermediate,
                num_hidden_layers=p.text_layers,
                num_attention_heads=p.text_heads,
                max_position_embeddings=MAX_LENGTH,
                projection_dim=p.text_hidden,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
            block_out_channels=p.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=p.norm_groups,
            sample_size=image_size,
        )
        n = len(p.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=image_size // factor,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            block_out_channels=p.unet_channels,
            layers_per_block=p.unet_layers_per_block,
            cross_attention_dim=p.text_hidden,
            attention_head_dim=p.unet_head_dim,
            norm_num_groups=p.norm_groups,
        )
    return text_encoder, vae, unet, PNDMScheduler(**SD15_SCHEDULER_CONFIG)


def save_pipeline(path: str | Path, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                  tokenizer: CLIPTokenizer, scheduler: ConfigMixin) -> None:
    """Save the parts through a real ``StableDiffusionPipeline`` (safetensors, no safety checker), the layout
    :meth:`Generator.from_pretrained` and ``StableDiffusionPipeline.from_pretrained`` read."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # The name resolves to diffusers' dummy class under a type checker (no save_pretrained); the real class's
    # constructor types are narrower than what it accepts (scheduler, safety_checker=None), so it is not used.
    pipeline.save_pretrained(str(path), safe_serialization=True)  # type: ignore[attr-defined]


GENERATOR_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_STEMS = {"unet": DIFFUSERS_STEM, "vae": DIFFUSERS_STEM, "text_encoder": TRANSFORMERS_STEM}


def check_generator_folder(path: str | Path) -> dict[str, str | None]:
    """The weight variant of each weighted part (``unet``, ``vae``, ``text_encoder``: None for the plain layout,
    ``"fp16"`` for a folder holding only ``*.fp16.safetensors``), or a one-line :class:`UserError` unless ``path``
    is a diffusers Stable Diffusion folder with safetensors weights (``StableDiffusionPipeline.save_pretrained``
    layout). A single checkpoint file gets the conversion to run; pickled weights are never loaded."""
    root = Path(path).expanduser()
    if root.is_file():
        raise single_file_generator_error(root)
    if not root.is_dir():
        raise UserError(
            f"generator folder {str(root)!r} does not exist: set model.generator.path to a "
            "diffusers-format Stable Diffusion folder, or leave it empty for a random preset"
        )
    for sub in GENERATOR_PARTS:
        if not (root / sub).is_dir():
            raise UserError(
                f"generator folder {str(root)!r} has no {sub}/ sub-folder: expected the "
                "StableDiffusionPipeline.save_pretrained layout"
            )
    resave = resave_command(root, "diffusers.StableDiffusionPipeline")
    return {
        sub: find_safetensors(root / sub, stem, "generator part", resave).variant
        for sub, stem in _WEIGHT_STEMS.items()
    }


def build_generator(cfg, image_size: int = 64, seed: int = 0) -> Generator:
    """A :class:`Generator` from ``model.generator`` config: the folder at ``cfg.path``, else the random preset."""
    common = {
        "placeholder_token": cfg.placeholder_token,
        "placeholder_init": cfg.placeholder_init,
        "train_unet": cfg.train_unet,
    }
    if cfg.path:
        return Generator.from_pretrained(cfg.path, **common)
    return Generator.build_random(cfg.preset, image_size=image_size, seed=seed, **common)
