"""The one typed config tree of uniemo.

Every field has a default and a comment. YAML files only override defaults; dotted ``key=value`` overrides on
the command line come last (see :mod:`uniemo.config.loader`). Cross-field checks live in ``validate`` methods
and raise :class:`uniemo.errors.ConfigError` naming the full key path.

Ownership: each section is one dataclass. A field holding a file system path is tagged ``metadata=PATH``: relative
paths resolve by the rule of :mod:`uniemo.config.paths` (a config file's folder, the repository for the shipped
configs, the current directory for the command line and defaults).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from uniemo.errors import ConfigError
from uniemo.run_layout import PIPELINE_STAGES

EMOTIONS: tuple[str, ...] = (
    "amusement",
    "awe",
    "contentment",
    "excitement",
    "anger",
    "disgust",
    "fear",
    "sadness",
)
"""The 8 Mikels emotions in EmoSet's index order (METHOD.md §1, D1). Used everywhere."""

NUM_EMOTIONS = len(EMOTIONS)

PATH_FIELD = "path"
PATH = {PATH_FIELD: True}
"""Field metadata of a file system path (:func:`uniemo.config.paths.path_keys` lists them)."""


NAME_CHARS = "A-Za-z0-9._=,+-"
"""The characters of a run name (``run.name``, sweep points): safe in a file name, a SLURM log pattern, a shell
word and a wandb run name."""
_RUN_NAME = re.compile(rf"[A-Za-z0-9][{NAME_CHARS}]{{0,99}}")


@dataclass
class RunConfig:
    name: str = "run"
    """Run directory name; the run lives in ``<output_dir>/<name>/``. A plain name: letters, digits and
    ``._=,+-``, starting with a letter or digit, at most 100 characters (no ``/``, no ``..``)."""
    output_dir: str = field(default="runs", metadata=PATH)
    """Parent folder of run directories."""
    seed: int = 0
    """Global seed (data order, initialisation, sampling)."""

    def validate(self) -> None:
        if not _RUN_NAME.fullmatch(self.name):
            raise ConfigError(
                f"run.name={self.name!r} is not a plain name; use letters, digits and ._=,+- (starting with a letter "
                "or digit, at most 100 characters), e.g. run.name=my-run"
            )


@dataclass
class SyntheticConfig:
    """The built-in synthetic emotion set, generated and sharded into ``data.cache_dir`` on first use."""

    images: int = 800
    """Number of images over all splits."""
    size: int = 64
    """Image side in pixels."""
    seed: int = 0
    """Seed of the synthetic set (same seed, same images)."""
    world: Literal["easy", "hard"] = "easy"
    """The world's generative tables (``uniemo/data/synthetic.py``, ``data/FORMAT.md``): ``easy``, where colour
    nearly decides the emotion; ``hard``, where emotions share palettes and scenes and objects decide."""
    shard_size: int = 20
    """Samples per shard when the synthetic set is sharded for a run (small, so that the val and test splits
    have at least ranks x loader workers shards: 800 images give 4 val and 6 test shards)."""


@dataclass
class SourceConfig:
    """One source of training shards, mixed with the others by weight."""

    name: str = "real"
    """Name of the source (``real``, ``synthetic``, ...), as recorded in each sample's ``json.source``."""
    path: str = field(default="", metadata=PATH)
    """Folder holding ``manifest.json`` and the shards (or a sub-folder per round), or a URL of one."""
    weight: float = 1.0
    """Relative sampling weight of this source in training streams."""
    keep_rounds: int = 0
    """A source of round sub-folders (``round-<r>/``, the feedback loop's): training reads only the newest this
    many rounds; 0: all. The feedback loop sets it from ``feedback.keep_rounds``."""
    keep_bytes: int = 0
    """A source of round sub-folders: training reads only the newest rounds whose shards add up to at most this
    many bytes (the newest round always); 0: no cap. The feedback loop sets it from ``feedback.keep_bytes``."""


@dataclass
class StorageConfig:
    """How URL shard sources are reached (``http(s)://``, ``s3://``, ``pipe:``; ``uniemo.data.remote``)."""

    endpoint_url: str = ""
    """S3-compatible endpoint for ``s3://`` sources (e.g. ``http://127.0.0.1:9000``); empty: botocore's own
    setting (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``), else AWS. Credentials are never
    read from the config: botocore finds them (``AWS_ACCESS_KEY_ID`` ..., config files, instance roles)."""
    timeout_s: float = 10.0
    """Timeout of the checks before training (a URL source's manifest, its shards' sizes), in seconds."""


@dataclass
class LimitsConfig:
    """Caps on what data from outside may make uniemo read, fetch or decode (``uniemo.data.limits``).

    A shard folder, a URL source or an image may come from someone else; none of them may exhaust the memory,
    disk or network of the machine. Going over a cap is one error line naming its key. Commands that take no config
    (``uniemo data shards``, ``uniemo data inspect``, the report) use these defaults."""

    max_manifest_bytes: int = 256 * 2**20
    """Size of a ``manifest.json`` or ``attributes.json``, read from disk or fetched from a URL (256 MiB: about a
    million shard entries)."""
    max_manifest_entries: int = 100_000
    """Shards one manifest may list (each is a size check, an HTTP HEAD for a URL source, before training)."""
    max_fetch_bytes: int = 64 * 2**30
    """Bytes read from one shard's file, URL or ``pipe:`` command, as stored (64 GiB). A shard listed with its
    size is also never read past that size."""
    max_shard_bytes: int = 64 * 2**30
    """Bytes of all members of one shard, after decompression (gzip, bzip2 or xz tars; 64 GiB)."""
    max_member_bytes: int = 256 * 2**20
    """Bytes of one tar member (an image or its metadata), after decompression; each is held in memory (256 MiB)."""
    max_image_pixels: int = 8192 * 8192
    """Pixels of one image to decode (width x height; PIL's ``Image.MAX_IMAGE_PIXELS``): 67 megapixels, about 200
    MB as RGB. Larger than 4096 x 4096 so that photos of today's cameras (24-50 megapixels) pass."""

    def validate(self) -> None:
        for name in ("max_manifest_bytes", "max_manifest_entries", "max_fetch_bytes", "max_shard_bytes",
                     "max_member_bytes", "max_image_pixels"):
            _positive(f"data.limits.{name}", getattr(self, name))


@dataclass
class DataConfig:
    shards: str = field(default="", metadata=PATH)
    """Folder with ``manifest.json`` of the real shards, or a URL of one (``https://host/shards``,
    ``s3://bucket/shards``, ``pipe:CMD`` with ``{name}``). Empty: use the synthetic set (``data.synthetic``)."""
    cache_dir: str = field(default=".cache/uniemo", metadata=PATH)
    """Where the synthetic set and its shards are generated on first use."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    extra_sources: list[SourceConfig] = field(default_factory=list)
    """Further training sources (for example feedback shards), mixed with ``real`` by weight."""
    image_size: int = 64
    """Side of the understanding model's input images."""
    generator_image_size: int = 64
    """Side of the images given to the VAE in stage 2 (``pixel_values``)."""
    precomputed_latents: bool = False
    """Stage 2 reads each image's VAE latent distribution (both flips) from ``<shards>/latents-<G>/``, written once
    by ``uniemo data latents``, instead of running the VAE encoder every step (the same loss given the same noise;
    data/FORMAT.md). Sources without them (feedback rounds) are encoded in the step."""
    normalization: Literal["imagenet", "clip", "symmetric"] = "imagenet"
    """Normalisation of the understanding input: ImageNet mean/std (METHOD §2.6), CLIP's, or [-1, 1]."""
    train_augment: bool = True
    """Random resized crop and horizontal flip on training images (METHOD §2.6)."""
    crop_resize: int = 0
    """The shorter side is resized to this before the central ``image_size`` crop of every view without
    augmentation (evaluation, and training with ``train_augment`` off); 0: ``image_size``. The official stage-1
    test transform is Resize(224) + CenterCrop(224) (0 at 224 px); the official stage-2 ViT input is Resize(256) +
    CenterCrop(224) (256; METHOD §2.6, §3.2)."""
    batch_size: int = 16
    """Micro-batch per rank."""
    num_workers: int = 2
    """Data-loader worker processes per rank (0: load in the main process)."""
    shuffle_buffer: int = 256
    """Samples held in the shuffle buffer of training streams."""
    labelled_per_emotion: int = 0
    """The label-scarce regime: keep only this many labelled train images per emotion (chosen deterministically,
    ``uniemo/data/shards.py``); val and test stay whole, the other train images are kept apart for the control
    that adds real data (``feedback.control=real_extra``). 0: every train image."""
    min_attribute_count: int = 5
    """An attribute enters the attribute base and Phi when seen at least this often (METHOD D6, m)."""
    phi_beta: float = 1.0
    """Additive smoothing of Phi (METHOD D6, beta)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """How URL sources are reached (endpoint, timeout of the checks)."""
    attributes: Literal["counts", "emogen"] = "counts"
    """Attribute base and Phi of alpha (METHOD §3.5, D6): ``counts`` derives them from the training annotations
    (``attributes.json`` of the shards); ``emogen`` takes EmoGen's curated names and classifier-confidence Phi,
    the official tables, from ``data.attribute_base``."""
    attribute_base: str = field(default="", metadata=PATH)
    """``data.attributes=emogen``: the file written by ``uniemo data attributes --from-emogen DIR --out FILE``."""
    generator_resample: Literal["bicubic", "bilinear"] = "bicubic"
    """Filter of the whole-image resize to ``generator_image_size`` (the VAE input, METHOD §3.2): ``bicubic`` is what
    the official ``image.resize((512, 512))`` does (PIL's default filter, Pillow >= 7; EmoGen pins 9.4);
    ``bilinear`` is torchvision's default, used for the understanding views."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Caps on manifests, fetched and decompressed bytes and image pixels (a hostile or broken source)."""

    def validate(self) -> None:
        self.limits.validate()
        _positive("data.batch_size", self.batch_size)
        _positive("data.image_size", self.image_size)
        _positive("data.generator_image_size", self.generator_image_size)
        _non_negative("data.num_workers", self.num_workers)
        _positive("data.storage.timeout_s", self.storage.timeout_s)
        _non_negative("data.crop_resize", self.crop_resize)
        _non_negative("data.labelled_per_emotion", self.labelled_per_emotion)
        if self.crop_resize and self.crop_resize < self.image_size:
            raise ConfigError(
                f"data.crop_resize ({self.crop_resize}) must be 0 or at least data.image_size ({self.image_size}): "
                "the centre crop is taken from the resized image"
            )
        if self.attributes == "emogen" and not self.attribute_base:
            raise ConfigError(
                "data.attributes=emogen needs data.attribute_base=<file>; write it with "
                "`uniemo data attributes --from-emogen <EmoGen dataset_balance folder> --out <file>`"
            )
        _positive("data.synthetic.images", self.synthetic.images)
        _positive("data.synthetic.shard_size", self.synthetic.shard_size)
        if self.synthetic.size < 16:
            raise ConfigError(f"data.synthetic.size must be at least 16 px, got {self.synthetic.size}")
        for i, src in enumerate(self.extra_sources):
            if src.weight <= 0:
                raise ConfigError(f"data.extra_sources[{i}].weight must be > 0, got {src.weight}")
            _non_negative(f"data.extra_sources[{i}].keep_rounds", src.keep_rounds)
            _non_negative(f"data.extra_sources[{i}].keep_bytes", src.keep_bytes)


@dataclass
class UnderstandingConfig:
    """The understanding ViT with expert queries (METHOD §2, D2, D4)."""

    preset: str = "tiny"
    """Backbone preset: ``vit-l14`` (CLIP ViT-L/14, 224 px), ``vit-b16``, ``small``, ``tiny``, ``from_clip`` (clip_path's)."""
    clip_path: str = field(default="", metadata=PATH)
    """transformers-format CLIP folder (``CLIPModel.save_pretrained``) to load; empty: random init."""
    image_size: int | None = None
    """Overrides the preset's image size."""
    patch_size: int | None = None
    """Overrides the preset's patch size."""
    width: int | None = None
    """Overrides the preset's width."""
    depth: int | None = None
    """Overrides the preset's depth."""
    heads: int | None = None
    """Overrides the preset's attention heads."""
    num_scene_queries: int | None = None
    """Scene expert queries (METHOD §1: 32); None: the preset's."""
    num_object_queries: int | None = None
    """Object expert queries (METHOD §1: 32); None: the preset's."""
    scene_layer: int | None = None
    """L1: scene read-out after this block; None: depth // 3 (D2)."""
    object_layer: int | None = None
    """L2: object read-out after this block; None: 2 * depth // 3 (D2)."""
    use_scene_queries: bool = True
    """Ablation switch (D13): scene queries on/off."""
    use_object_queries: bool = True
    """Ablation switch (D13): object queries on/off."""
    freeze_query_projections: bool = False
    """True reproduces the official frozen random contrastive projections (METHOD §2.5, D4)."""
    head_dropout: float = 0.5
    """Dropout of the emotion head (METHOD §2.3)."""
    embed_dim: int | None = None
    """Projection width = emotion-head hidden width (= the generator's token width, §3.6); None: preset's."""
    query_init_std: float = 1.0
    """Std of the expert-query init (METHOD §2.1: N(0,1), the scale of ln_pre outputs)."""
    position_init_std: float = 0.02
    """Std of the ViT's position-embedding init; 0.02 is CLIP's (transformers' ``initializer_range``). Only a
    backbone trained from random weights sees it: at 0.02 the tiny ViT learns colour and never where things are
    (hard world: test top-1 at the colour cap even with every label), at 1.0, the scale of the patch tokens after
    ``ln_pre``, it learns the layouts (RESULTS.md)."""
    train_logit_scales: bool = False
    """Train the two contrastive logit scales; False reproduces the official frozen scales (METHOD §2.5)."""


@dataclass
class GeneratorConfig:
    """Stable Diffusion parts (METHOD §3.1, D3, D8)."""

    preset: str = "tiny"
    """Used when ``path`` is empty: ``tiny`` builds a small random UNet/VAE/text encoder."""
    path: str = field(default="", metadata=PATH)
    """diffusers-format folder (``StableDiffusionPipeline.save_pretrained`` layout); empty: random preset."""
    train_unet: bool = False
    """Fine-tune the UNet (D8); frozen by default as in the official run."""
    sampler: Literal["unipc", "ddim"] = "unipc"
    """Sampler used at generation time (D10)."""
    sampling_steps: int = 50
    """Denoising steps at generation time (D10; small presets use fewer)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale with the empty prompt (D10)."""
    placeholder_token: str = "<emotion>"
    """Token added to the tokenizer whose input embedding is replaced by the condition c (METHOD §3.6, D5)."""
    placeholder_init: str = "cat"
    """Word whose mean token embedding initialises the placeholder row (METHOD §3.1: ``cat``)."""
    generation_batch_size: int = 8
    """Images denoised together at generation time (images depend on it only up to float rounding)."""
    compile: bool = False
    """Generation: ``torch.compile`` the UNet and the VAE decoder; on CUDA in mode ``reduce-overhead`` (CUDA
    graphs), every batch denoised at ``generation_batch_size`` (a short last batch is padded, its extra images
    dropped) so the shapes stay static. Pays a compilation at the first batch; for long generation runs."""


@dataclass
class ConditionerConfig:
    """Mappers, alpha and fusion (METHOD §3.4-3.6, D5, D6)."""

    num_layers: int = 2
    """Linear layers per mapper (METHOD §3.1: 2)."""
    hidden: int | None = None
    """Hidden width of the mappers; None: the understanding width."""
    relu: bool = True
    layer_norm: bool = False
    dropout: float = 0.0
    fixed_alpha: bool = False
    """Ablation switch (D13): alpha_s = alpha_o = 1."""
    attribute_space: Literal["token_embeddings", "clip_text"] = "token_embeddings"
    """Space in which alpha retrieves the nearest attribute (METHOD §3.5, D6): ``token_embeddings``, each name as the
    mean of the generator's input token embeddings (D6, the space the mapped vectors live in); ``clip_text``, the
    official one: CLIP's projected text features (``get_text_features``) of the raw names, from
    ``attribute_clip_path``."""
    attribute_clip_path: str = field(default="", metadata=PATH)
    """``attribute_space=clip_text``: the transformers CLIP folder (``CLIPModel.save_pretrained``, text tower and
    tokenizer) whose text features embed the names; empty: ``model.understanding.clip_path``."""


@dataclass
class ModelConfig:
    understanding: UnderstandingConfig = field(default_factory=UnderstandingConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)


@dataclass
class LossConfig:
    """Loss weights (METHOD §2.4, §3.3, §3.6, §3.8, D7)."""

    scene_weight: float = 0.05
    """lambda1 (stage 1 InfoNCE scene) and the stage-2 scene CE weight."""
    object_weight: float = 0.05
    """lambda2 (stage 1 InfoNCE object) and the stage-2 object BCE weight."""
    emotion_weight: float = 0.9
    """lambda3: emotion CE weight."""
    understanding_weight: float = 0.5
    """gamma1: weight of L_U' in the joint loss."""
    diffusion_weight: float = 1.0
    """gamma3: weight of the diffusion loss."""
    condition_ce_weight: float = 1e-3
    condition_triplet_weight: float = 1e-6
    condition_margin: float = 0.5
    condition_negative: Literal["condition", "understanding"] = "condition"
    """Hard negative from the condition logits (D7 default) or the understanding logits (official)."""
    condition_loss: bool = True
    """Ablation switch (D13): condition loss on/off."""
    implicit_feedback: bool = True
    """Ablation switch (D13, the paper's "without implicit feedback"): False stops the gradient of generation at
    the mappers' inputs (f_cls, f_scene, f_object): the understanding model gets none (neither the diffusion nor
    the condition loss reaches it), while the mappers still learn from both."""
    diffusion_to_condition: bool = True
    """Ablation switch (D13): False stops the diffusion gradient at c, so neither the mappers nor the
    understanding model get it (the condition loss still reaches both). This is the switch that was called
    ``implicit_feedback`` before the paper's ablation was built; generation falls to chance without it."""
    unannotated_negatives: bool = False
    """Stage 1: images without a scene (object) annotation stay in the InfoNCE matrix as negatives, with the
    text of the placeholder ``scene`` (``object``), and only their own rows are skipped, as the official code
    (``ignore_index`` -1, METHOD §2.4); False drops their rows and columns."""


@dataclass
class GeneratorTrainingConfig:
    """``training.stage: generator``: pretraining the CPU world's small Stable-Diffusion-shaped generator (METHOD
    D15) on captions that describe scene, objects and colours but never the emotion (``uniemo/data/captions.py``).
    The VAE trains first (``vae_steps``), then the UNet and the text encoder together; each phase has its own
    warm-up and cosine schedule (``training.lr_schedule``), and a part's learning rate is 0 outside its phase."""

    vae_steps: int = 400
    """Optimizer steps of the VAE phase; the UNet + text-encoder phase takes the rest of ``training.steps``."""
    lr_vae: float = 1e-3
    lr_unet: float = 1e-3
    lr_text: float = 1e-3
    kl_weight: float = 1e-6
    """Weight of the VAE's KL term against the per-pixel reconstruction MSE, both summed per image (LDM's 1e-6)."""
    caption_drop: float = 0.1
    """Share of samples trained with the empty caption, so classifier-free guidance works."""
    part_drop: float = 0.25
    """Chance that each caption part (colours, scene, objects) is left out (at least one part stays)."""
    noise_offset: float = 0.1
    """Offset noise: ``noise_offset`` x one N(0,1) draw per image and latent channel is added to the diffusion
    noise of the UNet phase (as diffusers' ``--noise_offset``). Without it the UNet reads an image's colour from
    the per-channel mean that SD's schedule leaves in even the noisiest latents (sqrt(alpha_T) ~ 0.07), and
    sampling from pure noise then ignores colour words: the first CPU-world generator never drew blue or purple."""

    def validate(self) -> None:
        _positive("training.generator.vae_steps", self.vae_steps)
        for key in ("lr_vae", "lr_unet", "lr_text"):
            _positive(f"training.generator.{key}", getattr(self, key))
        _non_negative("training.generator.kl_weight", self.kl_weight)
        _non_negative("training.generator.noise_offset", self.noise_offset)
        for key in ("caption_drop", "part_drop"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"training.generator.{key} must be in [0, 1), got {value}")


@dataclass
class TrainingConfig:
    stage: Literal[1, 2, "generator"] = 1
    """1: understanding (METHOD §2); 2: joint understanding + generation (METHOD §3); ``generator``: pretrain the
    small generator of the CPU world (D15, ``training.generator``)."""
    steps: int = 100
    """Optimizer steps."""
    lr_backbone: float = 8e-6
    """Stage 1: ViT backbone (METHOD §2.5); the backbone is outside the optimiser in stage 2 (§3.1)."""
    lr_queries: float = 5e-4
    """Expert queries and interactive blocks (METHOD §2.5, §3.1); also the trainable projections (D4)."""
    lr_head: float = 1e-4
    """Emotion head (stage 1) and the scene/object attribute classifiers (METHOD §2.5, §3.1)."""
    lr_mappers: float = 1e-3
    """Stage 2: the three mapping networks (METHOD §3.1)."""
    lr_unet: float = 1e-5
    """Stage 2 with ``model.generator.train_unet``: the UNet (D8)."""
    weight_decay_backbone: float = 1e-3
    """Weight decay of the backbone group (METHOD §2.5); 1-D parameters and biases never decay."""
    weight_decay: float = 1e-2
    """Weight decay of every other group (METHOD §2.5, §3.1); 1-D parameters and biases never decay."""
    emotion_space_view: Literal["eval", "official"] = "eval"
    """The images the emotion space is computed from (METHOD §4.1, D9), one pass over the train split on all ranks:
    ``eval``, the evaluation view (Resize + CenterCrop, ``data.normalization``); ``official``, the official
    ``cal_emotion_space`` view, the stage-1 training transform: RandomResizedCrop + horizontal flip with ImageNet
    mean/std (seeded per sample)."""
    stage2_head_dropout: bool = True
    """Stage 2: run the frozen emotion head in train mode, dropout active, as the official code (METHOD §3.1);
    False keeps it in eval mode like the other frozen modules."""
    stage2_whole_understanding: bool = False
    """Stage 2 and the feedback rounds: the ViT backbone (``lr_backbone``) and the emotion head (``lr_head``) train
    too, not only the expert queries and the attribute classifiers. A difference from METHOD §3.1 (and the
    official code), made for the label-scarce science checks, where extra images can only move the emotion
    prediction through weights that train (docs/RECIPES.md)."""
    losses: LossConfig = field(default_factory=LossConfig)
    generator: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)
    init_from: str = field(default="", metadata=PATH)
    """Stage 2: checkpoint or run directory of stage 1; empty: the latest stage-1 run."""
    epochs: int = 0
    """When > 0, train this many epochs of the train split instead of ``training.steps`` (steps are derived)."""
    stop_at_step: int = 0
    """When > 0, this invocation stops (with a checkpoint) at this step; ``--resume`` continues to the end. The
    schedule always spans the whole run (time-sliced jobs, e.g. SLURM allocations shorter than the run)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """DeepSpeed precision: bf16/fp16 weights and activations with fp32 master weights; fp16 with a dynamic loss
    scale."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step on each rank."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0: derived. Else it must equal data.batch_size x
    training.gradient_accumulation x distributed.num_workers."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0: no clipping."""
    compile: bool = False
    """``torch.compile`` the UNet and each block of the understanding ViT (the same outputs to float tolerance;
    a compilation at the first steps). Needs distributed.zero_stage <= 2."""
    channels_last: bool = False
    """Keep the UNet and the VAE in the channels-last memory format (faster convolutions on GPUs; the same
    outputs to float tolerance)."""
    async_checkpoint: bool = False
    """Write checkpoints in a background thread: a save blocks only while the states are copied to host memory;
    the checkpoint becomes ``latest`` once every rank has written it (checked after each step, and before the
    run ends), so a crash still never leaves a partial ``latest``."""
    max_bad_steps: int = 0
    """Steps with a non-finite loss (on any rank) that are skipped (no update, counted as ``bad_steps`` in the
    metrics) before the run stops; the next one stops it with a clear error, saving nothing (``latest`` stays the
    last good checkpoint). 0: the first non-finite loss stops the run. > 0 needs gradient_accumulation 1."""
    lr_schedule: Literal["cosine", "cyclic_cosine", "constant"] = "cosine"
    """``cosine``: linear warm-up then cosine decay to ``min_lr_ratio`` over the run; ``cyclic_cosine``: the
    official ``CosineAnnealingLR(T_max=cyclic_period)`` stepped every step, which cycles (METHOD §2.5, §9.11);
    ``constant``: warm-up then constant."""
    warmup_steps: int | None = None
    """Linear warm-up steps of ``cosine`` and ``constant``; None: 5 % of the run's steps."""
    min_lr_ratio: float = 0.0
    """Floor of the ``cosine`` schedule as a fraction of each group's learning rate."""
    cyclic_period: int = 32
    """T_max of ``cyclic_cosine`` (METHOD §2.5: 32; the learning rate returns every 2 x T_max steps)."""
    cyclic_period_samples: int = 0
    """When > 0, T_max of ``cyclic_cosine`` counted in samples instead of steps: T_max = cyclic_period_samples /
    global batch optimizer steps, so the learning rate follows the same curve over the samples seen whatever
    the global batch (official: 2048 in stage 1, 32 x 4 scheduler steps of 256 images; 32 in stage 2, batch 1;
    docs/RECIPES.md). Replaces ``cyclic_period``."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and always at the end); 0: only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints of the run."""
    eval_every: int = 50
    """Validate on the full validation split every this many steps (and at the end); 0: never."""
    resume: Literal["", "latest"] = ""
    """``latest``: continue the run from ``checkpoints/latest`` (same as ``uniemo train --resume``)."""

    def validate(self) -> None:
        _positive("training.steps", self.steps)
        _non_negative("training.epochs", self.epochs)
        _non_negative("training.stop_at_step", self.stop_at_step)
        _positive("training.gradient_accumulation", self.gradient_accumulation)
        _non_negative("training.global_batch_size", self.global_batch_size)
        _non_negative("training.grad_clip", self.grad_clip)
        _non_negative("training.max_bad_steps", self.max_bad_steps)
        if self.max_bad_steps > 0 and self.gradient_accumulation > 1:
            raise ConfigError(
                "training.max_bad_steps > 0 needs training.gradient_accumulation=1 (a skipped step must not leave "
                "the gradients of its other micro-batches behind); set one of them back"
            )
        _non_negative("training.checkpoint_every", self.checkpoint_every)
        _positive("training.keep_checkpoints", self.keep_checkpoints)
        _non_negative("training.eval_every", self.eval_every)
        _positive("training.cyclic_period", self.cyclic_period)
        _non_negative("training.cyclic_period_samples", self.cyclic_period_samples)
        if self.warmup_steps is not None:
            _non_negative("training.warmup_steps", self.warmup_steps)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.stage == "generator":
            self.generator.validate()
            if self.epochs == 0 and self.generator.vae_steps >= self.steps:
                raise ConfigError(
                    f"training.generator.vae_steps ({self.generator.vae_steps}) must be below training.steps "
                    f"({self.steps}): the UNet trains in the steps after the VAE's"
                )


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "TPU", "memory", "object_store_memory")


def _check_resource_name(key: str, name: str) -> None:
    """A custom Ray resource name (the label a node is started with), or empty."""
    if name and (name in RAY_BUILTIN_RESOURCES or name.startswith("node:") or not name.strip() or name != name.strip()):
        raise ConfigError(
            f"{key} must name a custom Ray resource (as given to `ray start --resources`), not {name!r}"
        )


@dataclass
class DistributedConfig:
    num_workers: int = 2
    """Ray Train workers (ranks)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker; also its torch/OpenMP thread count (at least 1)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; > 0 trains on CUDA with NCCL."""
    ray_address: str = ""
    """Empty: an embedded local Ray started and stopped by the command; else the cluster to join."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; ``auto``: NCCL when workers have GPUs, else gloo."""
    max_failures: int = 1
    """Worker-group failures Ray Train recovers from (restart from ``checkpoints/latest``) before giving up."""
    node_timeout_s: float = 300.0
    """How long a node that held trainers may stay lost before the run stops: after a node's death the run waits
    this long for a new group of trainers to start (the node, or another with room, back in the cluster; Ray
    Train restarts the group from ``checkpoints/latest``), then ends with one line naming the node, the
    checkpoint and ``--resume`` (exit 2). 0: Ray Train's own policy (it retries the start every 60 s, without
    end for ``strict_*`` placements)."""
    bind_host: str = "127.0.0.1"
    """Address the embedded Ray binds its services (and dashboard) to."""
    dashboard: bool = False
    """Start the Ray dashboard of the embedded cluster (on ``bind_host``)."""
    ray_temp_dir: str = field(default="", metadata=PATH)
    """Session folder of the embedded Ray; empty: a fresh folder under the system temp dir, removed on success."""
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """How Ray places the workers on the cluster's nodes (Ray's placement-group strategies): ``pack`` as few nodes
    as possible, ``spread`` over as many as possible; ``strict_*`` waits rather than bend the rule (``strict_spread``:
    one worker per node)."""
    worker_resource: str = ""
    """A custom Ray resource every worker asks for (a tiny share): workers run only on nodes started with it
    (``ray start --resources '{"trainers": 1}'``); empty: any node."""

    def validate(self) -> None:
        _check_resource_name("distributed.worker_resource", self.worker_resource)
        _positive("distributed.num_workers", self.num_workers)
        _non_negative("distributed.max_failures", self.max_failures)
        _non_negative("distributed.node_timeout_s", self.node_timeout_s)
        _positive("distributed.cpus_per_worker", self.cpus_per_worker)
        _non_negative("distributed.gpus_per_worker", self.gpus_per_worker)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"distributed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class FeedbackConfig:
    """Explicit feedback (METHOD §5); every constant of the filter is a field."""

    rounds: int = 1
    """Feedback rounds; round r generates with the checkpoint trained on rounds < r (METHOD §5)."""
    candidates_per_emotion: int = 16
    """N: candidates generated per emotion and round (the per-emotion quota of the pool)."""
    tau: float = 0.6
    """Fidelity threshold: keep x only when argmax U(x) = k and p_k(x) >= tau (METHOD §5 step 1)."""
    delta: float = 0.95
    """Near-duplicate threshold: drop x when the f_cls cosine to a kept image of its emotion exceeds it (step 3)."""
    keep: int | None = None
    """K: images kept per emotion and round by score-proportional sampling (step 4); None: N // 4."""
    attribute_cap: float = 0.25
    """r: at most ceil(r * K) kept images per retrieved attribute (step 4)."""
    synthetic_fraction: float = 0.25
    """rho: share of synthetic samples in training streams after a round (step 6); source weight rho/(1-rho)."""
    mode: Literal["sequential", "async"] = "sequential"
    """``sequential``: generate, filter, then train (the paper); ``async``: the pool runs beside a training job."""
    generator_actors: int = 1
    """Generator actors (each holds the generator, conditioner and emotion space of the round's checkpoint)."""
    generator_cpus: float = 1.0
    """CPUs Ray reserves per generator actor (fractions allowed, e.g. to share cores with trainers)."""
    generator_gpus: float = 0.0
    """GPUs per generator actor (fractions allowed: several actors per GPU); > 0 generates on CUDA."""
    filter_actors: int = 1
    """Filter actors (each holds the understanding model and the mappers; METHOD §5 steps 1-2)."""
    filter_cpus: float = 1.0
    """CPUs Ray reserves per filter actor (fractions allowed)."""
    filter_gpus: float = 0.0
    """GPUs per filter actor (fractions allowed); > 0 scores on CUDA."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Weights and activations of the generator and filter actors on a GPU (fp16/bf16 halve memory and time;
    the latents and the sampler stay float32). Actors on the CPU always run fp32."""
    writer_cpus: float = 0.25
    """CPUs Ray reserves per shard-writer task."""
    threads_per_actor: int = 1
    """torch intra-op threads in each generator and filter actor."""
    batch_size: int = 4
    """Candidates per generation task: the unit of work, of back-pressure and of loss when an actor dies."""
    max_in_flight: int = 0
    """Generation batches submitted but not yet scored, over the pool (back-pressure); 0: 2 x generator_actors."""
    sampling_steps: int | None = None
    """Denoising steps of the candidates; None: model.generator.sampling_steps."""
    guidance_scale: float | None = None
    """Classifier-free guidance of the candidates; None: model.generator.guidance_scale."""
    sampler: Literal["unipc", "ddim"] | None = None
    """Sampler of the candidates; None: model.generator.sampler."""
    shard_size: int = 1000
    """Kept samples per synthetic shard (a round's kept images of all emotions, shuffled, then cut)."""
    max_restarts: int = 1
    """Times Ray restarts a dead generator or filter actor (Ray ``max_restarts``)."""
    max_task_retries: int = 1
    """Times a task of a dead actor is retried on its restarted actor; 0: its batch is lost (and counted)."""
    from_run: str = field(default="", metadata=PATH)
    """The finished stage-2 run the loop starts from (its latest checkpoint); empty: the newest stage-2 run under
    ``run.output_dir`` that is not itself a feedback run (no ``rounds/`` folder)."""
    steps_per_round: int = 50
    """Optimizer steps of continued training per round; the feedback run trains ``rounds x steps_per_round`` steps
    in all (one schedule over the whole run; ``training.steps`` is ignored)."""
    refresh_every: int = 0
    """Trainers look for newly listed round shards every this many steps and, when there are some, start a new
    epoch with them; 0: only at epoch boundaries (``feedback.mode=async``; also honoured by ``uniemo train``)."""
    trainer_cpus: float | None = None
    """``async`` mode: CPUs Ray reserves per trainer worker, fractions allowed so that trainers and pool share the
    cores; None: ``distributed.cpus_per_worker``."""
    control: Literal["", "wrong_labels", "real_extra"] = ""
    """A control run of the feedback check (``uniemo/feedback/controls.py``): instead of generating, round r takes
    what the feedback run ``feedback.control_of`` kept in its round r, ``wrong_labels``: the same images, each
    relabelled to another emotion (k -> k+1 mod 8); ``real_extra``: as many real labelled train images of the same
    emotions, from those ``data.labelled_per_emotion`` left out. Steps, rho and image count stay the loop's.
    Sequential mode only; empty: an ordinary feedback run."""
    control_of: str = ""
    """``feedback.control``: the finished feedback run (sequential, same rounds) whose rounds the control mirrors."""
    actor_resource: str = ""
    """A custom Ray resource every generator and filter actor asks for (a tiny share): the pool runs only on nodes
    started with it, e.g. other nodes than the trainers' (``distributed.worker_resource``); empty: any node."""
    pinned: bool = False
    """``async`` mode only: pin the loop's timing so that two runs of one config and seed train the same: round r
    generates from the feedback run's checkpoint at step ``r x steps_per_round`` (round 0: the start run's), and
    its shards enter the trainers' mix at step ``r x steps_per_round + pinned_delay``, where the trainers wait for
    the round when the pool is late (``refresh_every`` is not used). The pool still runs beside the trainers."""
    pinned_delay: int | None = None
    """Pinned mode: steps between the checkpoint a round generates from and the step its shards enter the mix
    (the pool's time to make the round while the trainers go on), 0 to ``steps_per_round``; None:
    ``steps_per_round // 2``."""
    keep_rounds: int = 0
    """Retention of synthetic rounds: the trainers read the newest this many rounds, and older round folders are
    deleted once no trainer and no kept checkpoint reads them (their reports stay); 0: keep every round."""
    keep_bytes: int = 0
    """Retention by size: the trainers read the newest rounds whose shards add up to at most this many bytes (the
    newest round always), and older round folders are deleted as with ``keep_rounds``; 0: no byte cap. With both
    set, a round must pass both."""

    def validate(self) -> None:
        _check_resource_name("feedback.actor_resource", self.actor_resource)
        _positive("feedback.rounds", self.rounds)
        _positive("feedback.candidates_per_emotion", self.candidates_per_emotion)
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"feedback.tau must lie in [0, 1], got {self.tau}")
        if not -1.0 <= self.delta <= 1.0:
            raise ConfigError(f"feedback.delta is a cosine similarity in [-1, 1], got {self.delta}")
        if self.keep is not None:
            _positive("feedback.keep", self.keep)
        elif self.candidates_per_emotion < 4:
            raise ConfigError(
                f"feedback.keep defaults to candidates_per_emotion // 4 = 0 with candidates_per_emotion="
                f"{self.candidates_per_emotion}; set feedback.keep or raise candidates_per_emotion"
            )
        if not 0.0 < self.attribute_cap <= 1.0:
            raise ConfigError(f"feedback.attribute_cap (r) must lie in (0, 1], got {self.attribute_cap}")
        if not 0.0 <= self.synthetic_fraction < 1.0:
            raise ConfigError(
                f"feedback.synthetic_fraction (rho) must lie in [0, 1), got {self.synthetic_fraction}"
            )
        for key in ("generator_actors", "filter_actors", "threads_per_actor", "batch_size", "shard_size"):
            _positive(f"feedback.{key}", getattr(self, key))
        for key in ("generator_cpus", "filter_cpus", "writer_cpus"):
            _positive(f"feedback.{key}", getattr(self, key))
        for key in ("generator_gpus", "filter_gpus", "max_in_flight", "max_restarts", "max_task_retries"):
            _non_negative(f"feedback.{key}", getattr(self, key))
        if self.sampling_steps is not None:
            _positive("feedback.sampling_steps", self.sampling_steps)
        _positive("feedback.steps_per_round", self.steps_per_round)
        _non_negative("feedback.refresh_every", self.refresh_every)
        if self.trainer_cpus is not None:
            _positive("feedback.trainer_cpus", self.trainer_cpus)
        if self.control and not self.control_of:
            raise ConfigError(f"feedback.control={self.control} needs feedback.control_of=<the feedback run it mirrors>")
        if self.control and self.mode != "sequential":
            raise ConfigError(f"feedback.control={self.control} runs in feedback.mode=sequential only")
        if self.pinned and self.mode != "async":
            raise ConfigError(
                f"feedback.pinned=true pins the async loop's timing, but feedback.mode is {self.mode!r} (the "
                "sequential mode is repeatable as it is); set feedback.mode=async or feedback.pinned=false"
            )
        if self.pinned_delay is not None and not 0 <= self.pinned_delay <= self.steps_per_round:
            raise ConfigError(
                f"feedback.pinned_delay must lie in [0, feedback.steps_per_round={self.steps_per_round}], got "
                f"{self.pinned_delay}"
            )
        _non_negative("feedback.keep_rounds", self.keep_rounds)
        _non_negative("feedback.keep_bytes", self.keep_bytes)

    @property
    def delay(self) -> int:
        """``pinned_delay`` resolved: the value, or ``steps_per_round // 2``."""
        return self.pinned_delay if self.pinned_delay is not None else self.steps_per_round // 2

    @property
    def keep_per_emotion(self) -> int:
        """K resolved: ``keep``, or N // 4 (METHOD §5 step 4)."""
        return self.keep if self.keep is not None else self.candidates_per_emotion // 4


@dataclass
class MetricWeightsConfig:
    """Local weight files of the networks of EmoGen's evaluation protocol (METHOD §6.2, D12), read by ``uniemo
    metrics`` and ``uniemo evaluate``. A metric whose weights are empty is left out (``metrics.json`` says so);
    nothing is ever downloaded, and every pickle is read with ``weights_only=True``."""

    inception: str = field(default="", metadata=PATH)
    """FID: torch-fidelity's Inception-v3 state dict (``weights-inception-2015-12-05-6726825d.pth``, what
    torchmetrics' ``FrechetInceptionDistance`` downloads)."""
    clip: str = field(default="", metadata=PATH)
    """Emo-A and Sem-D: a transformers CLIP folder (``CLIPModel.save_pretrained`` of
    ``openai/clip-vit-large-patch14``, safetensors)."""
    emo_a_probe: str = field(default="", metadata=PATH)
    """Emo-A: EmoGen's linear probe on CLIP image features, a state dict with ``fc.weight`` [8, 768] and
    ``fc.bias`` [8] (``weights/Clip_emotion_classifier/time_2023-11-12_03-29-best.pth``); needs ``clip``."""
    lpips_alexnet: str = field(default="", metadata=PATH)
    """LPIPS: torchvision's AlexNet state dict (``alexnet-owt-7be5be79.pth``); the linear layers ship in lpips."""
    places365_resnet50: str = field(default="", metadata=PATH)
    """Sem-C: the CSAIL Places365 ResNet-50 (``resnet50_places365.pth.tar``: ``state_dict`` with ``module.``
    prefixes); needs ``imagenet_resnet50`` too."""
    imagenet_resnet50: str = field(default="", metadata=PATH)
    """Sem-C: torchvision's ImageNet ResNet-50 state dict (``resnet50-0676ba61.pth``, IMAGENET1K_V1, what EmoGen's
    ``resnet50(pretrained=True)`` loads); needs ``places365_resnet50`` too."""


@dataclass
class EvaluationConfig:
    """``uniemo train-judge``, ``uniemo evaluate`` and ``uniemo metrics`` (METHOD §6, D12)."""

    images_per_emotion: int = 8
    """M: generated images per emotion for generation metrics."""
    judge: str = field(default="", metadata=PATH)
    """Folder of the evaluation classifier (``uniemo train-judge``); empty: ``<run>/../judge`` when it exists."""
    weights: MetricWeightsConfig = field(default_factory=MetricWeightsConfig)
    """Weights of EmoGen's metrics (FID, CLIP Emo-A, LPIPS, Sem-C, Sem-D); each empty one leaves its metric out."""
    real_images: str = field(default="", metadata=PATH)
    """``uniemo evaluate``: the real set of the Inception FID, a folder ``<emotion>/<images>`` (EmoSet's ``image/``,
    all splits, as in the paper); empty: the run's real test split."""
    image_format: Literal["png", "jpg"] = "png"
    """Format of the evaluation images: ``png`` (the seed in a text chunk) or ``jpg`` (PIL's default quality 75,
    as EmoGen saves them; its scripts read only ``*.jpg``)."""
    sem_d_variant: Literal["paper", "corrected"] = "paper"
    """Sem-D preprocessing: ``paper`` reproduces EmoGen's script, which hands [0, 1] tensors to ``CLIPProcessor``
    so they are rescaled by 1/255 twice; ``corrected`` rescales once (METHOD §6.2)."""
    lpips_image_size: int = 0
    """Side LPIPS images are resized to; 0: their own size, as EmoGen (a pair of unequal sizes: the second image
    is resized to the first's)."""
    metric_batch_size: int = 16
    """Images per forward of the metric networks."""
    metric_device: str = ""
    """Device of the metric networks (``cpu``, ``cuda``, ``cuda:1``); empty: CUDA when available, else CPU."""
    sampling_steps: int | None = None
    """Denoising steps of the evaluation images; None: model.generator.sampling_steps."""
    seed: int = 0
    """Seeds of the evaluation images (image i of emotion k: seed + k*M + i) and of the diversity pairs."""
    diversity_pairs: int = 1000
    """Random pairs per emotion for the diversity metrics (the judge's Sem-D and mean distance, LPIPS, CLIP Sem-D);
    all pairs when an emotion has fewer; fixed count and seed (METHOD §6.2; EmoGen's script draws 10)."""
    judge_steps: int = 300
    """Optimizer steps of the judge's training."""
    judge_batch_size: int = 32
    """Judge training batch."""
    judge_lr: float = 3e-3
    """AdamW learning rate of the judge (cosine decay)."""
    judge_width: int = 16
    """Channels of the judge CNN's first block (doubled per block)."""
    judge_seed: int = 0
    """Seed of the judge's initialisation and data order."""

    def validate(self) -> None:
        for key in ("images_per_emotion", "diversity_pairs", "judge_steps", "judge_batch_size", "judge_width",
                    "metric_batch_size"):
            _positive(f"evaluation.{key}", getattr(self, key))
        _non_negative("evaluation.lpips_image_size", self.lpips_image_size)
        _positive("evaluation.judge_lr", self.judge_lr)
        _non_negative("evaluation.seed", self.seed)
        if self.sampling_steps is not None:
            _positive("evaluation.sampling_steps", self.sampling_steps)


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "uniemo"
    group: str = ""
    """wandb group of the run; ``uniemo sweep`` sets it to the sweep's name (empty: no group)."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Log every this many steps."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    """Progress bar (loss, samples/s) on rank 0."""
    sample_images: int = 2
    """Stage 2: images per emotion in the sample grids made at the end of the run; 0: none."""


@dataclass
class PipelineConfig:
    """``uniemo run``: the whole loop in one command. Each stage's job is this config plus the stage's own dotted
    overrides (the same ``key=value`` strings the command line takes), applied in the order given."""

    stages: list[str] = field(default_factory=lambda: list(PIPELINE_STAGES))
    """Stages to run, a subset of data, stage1, stage2, feedback, judge, evaluate, report (kept in that order)."""
    stage1: list[str] = field(default_factory=list)
    """Overrides of the stage-1 training run (``<pipeline>/stage1``), e.g. ``[training.steps=100]``."""
    stage2: list[str] = field(default_factory=list)
    """Overrides of the stage-2 training run (``<pipeline>/stage2``, initialised from stage 1)."""
    feedback: list[str] = field(default_factory=list)
    """Overrides of the feedback loop's continued training (``<pipeline>/feedback``, starting from stage 2)."""
    judge: list[str] = field(default_factory=list)
    """Overrides of the evaluation classifier's training (``<pipeline>/judge``)."""
    evaluate: list[str] = field(default_factory=list)
    """Overrides of the evaluation of the final run."""

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in PIPELINE_STAGES]
        if unknown:
            raise ConfigError(
                f"pipeline.stages has unknown stage(s) {', '.join(unknown)}; choose from {', '.join(PIPELINE_STAGES)}"
            )
        if not self.stages:
            raise ConfigError("pipeline.stages is empty; name at least one of " + ", ".join(PIPELINE_STAGES))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self) -> None:
        """Cross-field checks of every section that has them."""
        sections = (self.run, self.data, self.training, self.distributed, self.feedback, self.evaluation, self.pipeline)
        for section in sections:
            section.validate()
        _positive("model.understanding.position_init_std", self.model.understanding.position_init_std)
        if self.training.compile and self.distributed.zero_stage == 3:
            raise ConfigError(
                "training.compile needs distributed.zero_stage <= 2 (ZeRO-3 gathers parameters in hooks that "
                "torch.compile does not trace); set one of them back"
            )
        if self.data.precomputed_latents and self.training.stage == "generator":
            raise ConfigError(
                "data.precomputed_latents is for stage 2; generator pretraining trains the VAE, so its latents "
                "cannot be stored: set data.precomputed_latents=false"
            )


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
