"""The feedback pool's Ray parts: the model bundle, generator and filter actors, the shard writer, scheduling.

- :class:`ModelBundle` is what a round needs from a checkpoint (trained states, emotion space, attribute base),
  picklable and put once in the Ray object store. Built from a finished run (:func:`load_bundle`, through
  :func:`uniemo.inference.runs.load_run`) or at random from config (:meth:`ModelBundle.random`, tests). The
  generator's frozen Stable Diffusion parts are not in it: each generator actor rebuilds them from
  ``model.generator.path`` or the seeded random preset, as training did.
- :class:`GeneratorWorker` (generator + conditioner + emotion space) turns a :class:`GenerationJob` (an emotion
  and one seed per candidate) into PNG-encoded images (METHOD §4.2, D10). :class:`FilterWorker` (understanding
  model + mappers) scores them for METHOD §5 steps 1-3: emotion probabilities, f_cls, and the similarity of the
  expert-query features to the attribute base. The selection itself is :mod:`uniemo.feedback.filtering`.
- :func:`gather_samples` and :func:`write_shard` are the writer: stateless Ray tasks that cut kept candidates out
  of their batches and write shards through :func:`uniemo.data.shards.write_sample_shard` (atomic); both are safe
  to retry.
- :class:`FeedbackPool` starts the actors (resources from ``feedback.*``, ``max_restarts``,
  ``max_task_retries``) and runs jobs through generate -> score with bounded work in flight: at most one
  generation task per generator actor (so a killed actor loses at most its in-flight batch) and at most
  ``max_in_flight`` batches generated but not yet scored (back-pressure when the filter lags). A task lost with
  its actor, after Ray's retries, comes back as a :class:`LostBatch`; any other task error aborts. The
  scheduling is a small state machine: each job has a :class:`JobState`, each actor an :class:`ActorState`,
  and one method of ``_Schedule`` per transition.

Images travel between actors through the object store (the driver holds only references and scores).

Shape legend: B candidates of a batch, K = 8 emotions, D understanding width, Dt token width, A attribute base.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from uniemo.config.schema import EMOTIONS, Config, FeedbackConfig
from uniemo.data.shards import write_sample_shard
from uniemo.data.transforms import build_sample_transform
from uniemo.distributed.env import ray_node_record
from uniemo.distributed.placement import RESOURCE_SHARE, check_custom_resource
from uniemo.errors import UserError
from uniemo.inference.runs import load_run
from uniemo.models.acceleration import compile_for_generation
from uniemo.models.conditioner import Conditioner
from uniemo.models.emotion_space import EmotionSpace
from uniemo.models.generation import generate
from uniemo.models.generator import build_generator
from uniemo.models.understanding import UnderstandingModel, resolve_dims

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.data.attributes import AttributeTable
    from uniemo.models.emotion_space import EmotionSpace
    from uniemo.models.understanding import UnderstandingDims

__all__ = [
    "ActorState",
    "FeedbackError",
    "FeedbackPool",
    "FilterWorker",
    "GeneratedMeta",
    "GenerationJob",
    "GeneratorWorker",
    "JobState",
    "LostBatch",
    "ModelBundle",
    "ScoredBatch",
    "BatchScores",
    "gather_samples",
    "load_bundle",
    "write_shard",
]


class FeedbackError(UserError):
    """The feedback pool cannot go on (every generator actor is dead, a checkpoint lacks what a round needs)."""


# ---------------------------------------------------------------------------------------------------------
# The model bundle
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    """What the pool needs from one checkpoint; plain tensors and dataclasses, so it pickles (Ray object store)."""

    config: Config
    checkpoint_id: str
    """Recorded with every kept image (METHOD §5 step 5)."""
    understanding_dims: UnderstandingDims
    """Architecture of the understanding model (no CLIP folder is read to rebuild it)."""
    understanding_state: dict[str, torch.Tensor]
    conditioner_state: dict[str, torch.Tensor]
    emotion_space: EmotionSpace
    attributes: AttributeTable
    attribute_embeddings: torch.Tensor
    """[A,Dt] the attribute base in the generator's token space (D6)."""
    phi: torch.Tensor
    """[A,8] Phi aligned with the base."""
    unet_state: dict[str, torch.Tensor] | None = None
    """The UNet when it was fine-tuned (``model.generator.train_unet``, D8); None: the frozen UNet."""

    @property
    def has_base(self) -> bool:
        """Whether the attribute base has entries (else the conditioner has no attribute branches)."""
        return self.attribute_embeddings.shape[0] > 0

    @property
    def num_scenes(self) -> int:
        w = self.understanding_state.get("scene_classifier.weight")
        return int(w.shape[0]) if w is not None else len(self.attributes.scenes)

    @property
    def num_objects(self) -> int:
        w = self.understanding_state.get("object_classifier.weight")
        return int(w.shape[0]) if w is not None else len(self.attributes.objects)

    @classmethod
    def from_loaded_run(cls, run: Any, checkpoint_id: str | None = None) -> ModelBundle:
        """From a stage-2 :class:`uniemo.inference.runs.LoadedRun` (its models moved to CPU copies)."""
        if getattr(run, "stage", None) != 2 or run.conditioner is None or run.generator is None:
            raise FeedbackError(
                f"{run.source} is not a stage-2 checkpoint: the feedback pool needs the generator side; "
                "run stage 2 (joint training) first"
            )
        if run.emotion_space is None:
            raise FeedbackError(f"{run.source} has no emotion space; finish stage 2 or export the run")
        cfg = run.config
        unet = None
        if cfg.model.generator.train_unet:
            unet = _cpu_state(run.generator.unet)
        return cls(
            config=cfg,
            checkpoint_id=checkpoint_id or str(run.source),
            understanding_dims=run.understanding.dims,
            understanding_state=_cpu_state(run.understanding),
            conditioner_state=_cpu_state(run.conditioner),
            emotion_space=run.emotion_space,
            attributes=run.attributes,
            attribute_embeddings=run.attribute_embeddings.detach().float().cpu().clone(),
            phi=run.phi.detach().float().cpu().clone(),
            unet_state=unet,
        )

    @classmethod
    def random(
        cls,
        cfg: Config,
        attributes: AttributeTable,
        checkpoint_id: str = "random",
        seed: int = 0,
        space_samples: int = 16,
    ) -> ModelBundle:
        """A bundle of random models built from config (tests, benchmarks): same arguments, same bundle.

        The emotion space holds ``space_samples`` Gaussian features per emotion, shifted per emotion so that the
        emotions differ. The generator is built once here (seeded by ``run.seed``, as every actor rebuilds it)
        to embed the attribute base.
        """

        attributes = attributes.rebased(cfg.data.min_attribute_count, cfg.data.phi_beta)
        und_cfg = cfg.model.understanding
        dims = resolve_dims(und_cfg)
        generator = build_generator(
            cfg.model.generator, image_size=cfg.data.generator_image_size, seed=cfg.run.seed
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            understanding = UnderstandingModel(
                und_cfg, len(attributes.scenes), len(attributes.objects), dims=dims
            )
            conditioner = Conditioner(cfg.model.conditioner, in_dim=dims.width, out_dim=generator.token_dim,
                                      has_base=bool(attributes.base_names))
        streams = {"cls": dims.width}
        if und_cfg.use_scene_queries:
            streams["scene"] = dims.width
        if und_cfg.use_object_queries:
            streams["object"] = dims.width
        space = EmotionSpace(streams)
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(len(EMOTIONS)).repeat_interleave(space_samples)
        offsets = torch.randn(len(EMOTIONS), dims.width, generator=g)
        space.update(
            {s: torch.randn(len(labels), dims.width, generator=g) + offsets[labels] for s in streams}, labels
        )
        with torch.no_grad():
            embeddings = generator.embed_names(list(attributes.base_names))
        return cls(
            config=cfg,
            checkpoint_id=checkpoint_id,
            understanding_dims=dims,
            understanding_state=_cpu_state(understanding),
            conditioner_state=_cpu_state(conditioner),
            emotion_space=space,
            attributes=attributes,
            attribute_embeddings=embeddings.float(),
            phi=attributes.phi,
        )


def load_bundle(run_dir: str | Path, checkpoint_id: str | None = None) -> ModelBundle:
    """The bundle of a finished stage-2 run (its latest checkpoint) or of an export folder."""

    run = load_run(run_dir, device="cpu")
    return ModelBundle.from_loaded_run(run, checkpoint_id)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def actor_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of an actor's models: ``feedback.precision`` on a GPU, float32 on the CPU."""
    return _PRECISIONS[precision] if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Work items
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationJob:
    """One batch of candidates of one emotion: the unit of generation, back-pressure and loss."""

    job_id: int
    emotion: int
    seeds: tuple[int, ...]
    """One seed per candidate: (checkpoint, emotion, seed, steps, guidance, sampler) regenerates it (D10)."""
    first_index: int
    """Pool index of the first candidate in its emotion's pool (candidate i of the job is first_index + i)."""
    steps: int
    guidance_scale: float
    sampler: str


@dataclass
class GeneratedMeta:
    """What a generator actor reports about a finished job (the images travel separately)."""

    job_id: int
    emotion: int
    seeds: list[int]
    checkpoint_id: str
    pid: int
    """The generator actor's process id (changes when Ray restarts it)."""
    seconds: float
    scene_attribute: list[int]
    object_attribute: list[int]
    alpha_scene: list[float]
    alpha_object: list[float]


@dataclass
class BatchScores:
    """A filter actor's scores of one batch (METHOD §5 steps 1-3)."""

    job_id: int
    probs: np.ndarray
    """softmax of the understanding model, float32 [B,8]."""
    features: np.ndarray
    """f_cls, float32 [B,D]."""
    similarity: np.ndarray
    """cosine of the mapped expert-query features to each attribute of the base, NaN where not comparable, [B,A]."""
    seconds: float
    pid: int


@dataclass
class ScoredBatch:
    """A job that went through generation and scoring."""

    job: GenerationJob
    meta: GeneratedMeta
    images: Any
    """ObjectRef of the list of PNG bytes (stays in the object store)."""
    scores: BatchScores


@dataclass
class LostBatch:
    """A job lost with a dead actor (after Ray's retries); its candidates are counted as lost in flight."""

    job: GenerationJob
    stage: str
    """``generate`` or ``score``."""
    error: str


# ---------------------------------------------------------------------------------------------------------
# Actors (plain classes; the pool wraps them with ray.remote and their resources)
# ---------------------------------------------------------------------------------------------------------
class GeneratorWorker:
    """Holds the generator, the conditioner and the emotion space of one checkpoint (METHOD §4.2)."""

    def __init__(self, bundle: ModelBundle, threads: int = 1, use_gpu: bool = False) -> None:

        torch.set_num_threads(max(1, threads))
        cfg = bundle.config
        self.device = _device(use_gpu)
        self.checkpoint_id = bundle.checkpoint_id
        self.generator = build_generator(
            cfg.model.generator, image_size=cfg.data.generator_image_size, seed=cfg.run.seed
        )
        if bundle.unet_state is not None:
            self.generator.unet.load_state_dict(bundle.unet_state, strict=True)
        self.conditioner = Conditioner(
            cfg.model.conditioner, in_dim=bundle.understanding_dims.width, out_dim=self.generator.token_dim,
            has_base=bundle.has_base,
        )
        self.conditioner.load_state_dict(bundle.conditioner_state, strict=True)
        # feedback.precision: the SD parts in fp16/bf16 on a GPU (the sampler's latents stay float32).
        self.generator.to(self.device, actor_dtype(cfg.feedback.precision, self.device)).eval()
        self.conditioner.to(self.device).eval()
        self.emotion_space = bundle.emotion_space
        self.attribute_embeddings = bundle.attribute_embeddings.to(self.device)
        self.phi = bundle.phi.to(self.device)
        self.batch_size = cfg.model.generator.generation_batch_size
        if cfg.model.generator.compile:  # CUDA graphs at a fixed batch of generation_batch_size on a GPU
            compile_for_generation(self.generator, self.batch_size)

    def pid(self) -> int:
        """This actor's process id (for monitoring, and for the test that kills it)."""
        return os.getpid()

    def generate(self, job: GenerationJob) -> tuple[GeneratedMeta, list[bytes]]:
        """Generate the job's candidates; returns the report and the PNG bytes (two Ray return values)."""

        start = time.perf_counter()
        result = generate(
            self.generator,
            self.conditioner,
            self.emotion_space,
            self.attribute_embeddings,
            self.phi,
            job.emotion,
            len(job.seeds),
            seeds=list(job.seeds),
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            sampler=job.sampler,
            batch_size=max(1, min(self.batch_size, len(job.seeds))),
        )
        images = [_encode_png(image) for image in result.images]
        meta = GeneratedMeta(
            job_id=job.job_id,
            emotion=job.emotion,
            seeds=list(result.seeds),
            checkpoint_id=self.checkpoint_id,
            pid=os.getpid(),
            seconds=time.perf_counter() - start,
            scene_attribute=[int(x) for x in result.scene_attribute],
            object_attribute=[int(x) for x in result.object_attribute],
            alpha_scene=[float(x) for x in result.alpha_scene],
            alpha_object=[float(x) for x in result.alpha_object],
        )
        return meta, images


class FilterWorker:
    """Holds the understanding model and the mappers of one checkpoint; scores candidates (METHOD §5 steps 1-3)."""

    def __init__(self, bundle: ModelBundle, threads: int = 1, use_gpu: bool = False) -> None:

        torch.set_num_threads(max(1, threads))
        cfg = bundle.config
        self.device = _device(use_gpu)
        self.understanding = UnderstandingModel(
            cfg.model.understanding, bundle.num_scenes, bundle.num_objects, dims=bundle.understanding_dims
        )
        self.understanding.load_state_dict(bundle.understanding_state, strict=True)
        # Only the scene and object mappers are used here (step 2); the generator is not needed for their width.
        self.conditioner = Conditioner(
            cfg.model.conditioner,
            in_dim=bundle.understanding_dims.width,
            out_dim=_token_dim(bundle.conditioner_state),
            has_base=bundle.has_base,
        )
        self.conditioner.load_state_dict(bundle.conditioner_state, strict=True)
        self.dtype = actor_dtype(cfg.feedback.precision, self.device)
        self.understanding.to(self.device, self.dtype).eval()
        self.conditioner.to(self.device, self.dtype).eval()
        # The understanding input of evaluation: Resize + CenterCrop, data.normalization (as the test split).
        self.transform = build_sample_transform(cfg.data, stage=1, training=False)
        embeddings = bundle.attribute_embeddings.float()
        self.base_AD = torch.nn.functional.normalize(embeddings, dim=-1).to(self.device)
        kinds = list(bundle.attributes.base_kinds)
        if len(kinds) != embeddings.shape[0]:
            kinds = ["any"] * embeddings.shape[0]
        self.kinds = np.asarray(kinds)

    def pid(self) -> int:
        return os.getpid()

    @torch.no_grad()
    def score(self, job_id: int, images: list[bytes]) -> BatchScores:
        """Probabilities, f_cls and attribute similarities of PNG-encoded candidates."""
        from PIL import Image

        start = time.perf_counter()
        rng = random.Random(0)  # evaluation transforms draw nothing; the argument is part of their signature
        tensors = [self.transform(Image.open(io.BytesIO(data)), rng)["image"] for data in images]
        images_BCHW = torch.stack(tensors).to(self.device, self.dtype)
        out = self.understanding(images_BCHW)
        probs_BK = out.emotion_logits.float().softmax(dim=-1)
        similarity_BA = self._similarity(out.scene_feature, out.object_feature, len(images))
        return BatchScores(
            job_id=job_id,
            probs=probs_BK.cpu().numpy().astype(np.float32),
            features=out.cls_feature.float().cpu().numpy().astype(np.float32),
            similarity=similarity_BA,
            seconds=time.perf_counter() - start,
            pid=os.getpid(),
        )

    def _similarity(
        self, scene_BD: torch.Tensor | None, object_BD: torch.Tensor | None, batch: int
    ) -> np.ndarray:
        """METHOD §5 step 2: each expert-query feature, mapped into the attribute space by its mapper (D6), against
        the base entries of its kind (scene queries -> scene names, object queries -> object names)."""
        num_attributes = self.base_AD.shape[0]
        sim = np.full((batch, num_attributes), np.nan, dtype=np.float32)
        for feature, mapper, kind in (
            (scene_BD, self.conditioner.mapper_scene, "scene"),
            (object_BD, self.conditioner.mapper_object, "object"),
        ):
            if feature is None or mapper is None or num_attributes == 0:
                continue  # a switched-off query branch (D13), or no base (no mappers): nothing to retrieve
            mapped_BD = torch.nn.functional.normalize(mapper(feature).float(), dim=-1)
            cos = (mapped_BD @ self.base_AD.T).cpu().numpy()
            columns = (self.kinds == kind) | (self.kinds == "any")
            sim[:, columns] = np.fmax(sim[:, columns], cos[:, columns])
        return sim


def _token_dim(conditioner_state: dict[str, torch.Tensor]) -> int:
    """Output width of the conditioner's mappers (the last Linear of ``mapper_emotion``)."""
    weights = [k for k in conditioner_state if k.startswith("mapper_emotion.") and k.endswith(".weight")]
    last = max(weights, key=lambda k: int(k.split(".")[2]))
    return int(conditioner_state[last].shape[0])


def _encode_png(image_HW3: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_HW3).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The writer (stateless tasks: safe to retry)
# ---------------------------------------------------------------------------------------------------------
def gather_samples(
    picks: list[tuple[int, int, dict[str, Any]]], *batches: list[bytes]
) -> list[dict[str, Any]]:
    """Kept candidates as shard samples: ``picks`` = ``(batch position, index in batch, sample fields)``.

    ``batches`` are the PNG lists of the batches (resolved from the object store by Ray). Each sample gets its
    ``png`` member; ``sample fields`` hold ``__key__``, ``cls`` and ``json``.
    """
    samples = []
    for position, index, fields in picks:
        sample = dict(fields)
        sample["png"] = batches[position][index]
        samples.append(sample)
    return samples


def write_shard(path: str, order: list[tuple[int, int]], *groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one shard at ``path`` (atomically) from samples ``groups[g][i]`` for ``(g, i)`` in ``order``.

    Returns its manifest entry (:func:`uniemo.data.shards.write_sample_shard`).
    """

    samples = (groups[g][i] for g, i in order)
    return write_sample_shard(samples, path, split="train", source="synthetic")


# ---------------------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------------------
Observer = Callable[[str, dict[str, Any]], None]
"""Called in the driver on pool events: ``(event, info)``; events ``submitted``, ``generated``, ``scored``,
``lost``, ``restarted``, ``dead``. ``submitted`` carries ``actor``, ``pid``, ``job_id``, ``emotion``."""


_RECHECK_SECONDS = 0.5
"""How long the pool waits before asking a restarting actor again whether it is back."""


class ActorState(Enum):
    """Where one actor of the pool stands. An actor runs at most one task, so a dead one loses one batch."""

    IDLE = "idle"
    """Alive and free: takes the next task (the least-served idle actor of its kind goes first)."""
    BUSY = "busy"
    """Runs one task (a generation or a scoring)."""
    CHECKING = "checking"
    """Lost its task; its pid is asked: answered once Ray has restarted it, an error once it is dead for good."""
    RESTARTING = "restarting"
    """Answered that it is still restarting: asked again at ``recheck_at``."""
    DEAD = "dead"
    """Out of restarts (``feedback.max_restarts``): takes nothing more."""


class JobState(Enum):
    """Where one job of :meth:`FeedbackPool.process` stands; SCORED and LOST are final (the job is yielded)."""

    QUEUED = "queued"
    GENERATING = "generating"
    GENERATED = "generated"
    """Its images are in the object store; no filter actor was free yet."""
    SCORING = "scoring"
    SCORED = "scored"
    LOST = "lost"
    """Its actor died with it in flight (after Ray's retries)."""


@dataclass
class _Actor:
    handle: Any
    pid: int = -1
    state: ActorState = ActorState.IDLE
    served: int = 0
    recheck_at: float = 0.0
    """When a RESTARTING actor is asked again (``time.monotonic``)."""

    @property
    def alive(self) -> bool:
        return self.state is not ActorState.DEAD


@dataclass
class _Item:
    """One job on its way through the pool."""

    job: GenerationJob
    state: JobState = JobState.QUEUED
    meta: GeneratedMeta | None = None
    images: Any = None
    """ObjectRef of the PNG list, from the moment its generation is submitted."""


@dataclass
class PoolStats:
    """Counters of one pool over its life."""

    generated_batches: int = 0
    scored_batches: int = 0
    lost_batches: int = 0
    generation_seconds: float = 0.0
    """Sum over batches of the generator actors' own time."""
    scoring_seconds: float = 0.0
    """Sum over batches of the filter actors' own time."""
    restarts: int = 0
    dead_actors: int = 0
    lost_jobs: list[int] = field(default_factory=list)


def _where(actor: object, role: str, index: int) -> dict[str, Any]:
    """Run inside an actor (``__ray_call__``): the node it runs on."""
    return ray_node_record(role=role, index=index)


class FeedbackPool:
    """Generator and filter actors of one checkpoint, and the scheduling of jobs through them.

    Needs a connected Ray (``ray.init`` done). Use as a context manager, or call :meth:`shutdown`.
    """

    def __init__(self, bundle: ModelBundle, cfg: FeedbackConfig, observer: Observer | None = None) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("FeedbackPool needs a connected Ray: call ray.init first")
        self.cfg = cfg
        self.observer = observer
        self.stats = PoolStats()
        self.checkpoint_id = bundle.checkpoint_id
        self.bundle_ref = ray.put(bundle)  # once; every actor (and every restart) reads it from the store
        common: dict[str, Any] = {"max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_task_retries}
        if cfg.actor_resource:  # only on the nodes started with it (e.g. not the trainers')
            check_custom_resource(cfg.actor_resource, "feedback.actor_resource")
            common["resources"] = {cfg.actor_resource: RESOURCE_SHARE}
        generator_cls = ray.remote(GeneratorWorker).options(
            num_cpus=cfg.generator_cpus, num_gpus=cfg.generator_gpus, **common
        )
        filter_cls = ray.remote(FilterWorker).options(
            num_cpus=cfg.filter_cpus, num_gpus=cfg.filter_gpus, **common
        )
        self.generators = [
            _Actor(generator_cls.remote(self.bundle_ref, cfg.threads_per_actor, cfg.generator_gpus > 0))
            for _ in range(cfg.generator_actors)
        ]
        self.filters = [
            _Actor(filter_cls.remote(self.bundle_ref, cfg.threads_per_actor, cfg.filter_gpus > 0))
            for _ in range(cfg.filter_actors)
        ]
        try:
            pids = ray.get([a.handle.pid.remote() for a in self.generators + self.filters])
        except Exception as exc:
            self.shutdown()  # never leave the actors that did start behind
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, UserError):
                raise cause from None
            raise FeedbackError(
                f"the feedback actors could not start: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
            ) from exc
        for actor, pid in zip(self.generators + self.filters, pids, strict=True):
            actor.pid = int(pid)
        roles = [("generator", i) for i in range(len(self.generators))] + [
            ("filter", i) for i in range(len(self.filters))]
        self.placement: list[dict[str, Any]] = ray.get([
            a.handle.__ray_call__.remote(_where, role, index)
            for a, (role, index) in zip(self.generators + self.filters, roles, strict=True)])
        """Where each actor started (:func:`uniemo.distributed.env.ray_node_record`); also the ``started`` event."""
        self._emit("started", actors=self.placement)
        self.max_in_flight = cfg.max_in_flight or 2 * cfg.generator_actors

    # -- life ---------------------------------------------------------------------------------------------
    def __enter__(self) -> FeedbackPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Kill the actors (no restart). Object references the caller holds stay valid."""
        import ray

        for actor in self.generators + self.filters:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # already gone: nothing to stop
                pass
        self.generators, self.filters = [], []

    def generator_pids(self) -> list[int]:
        """The process id each generator actor reported last (-1 for a dead one)."""
        return [a.pid if a.alive else -1 for a in self.generators]

    def filter_pids(self) -> list[int]:
        return [a.pid if a.alive else -1 for a in self.filters]

    def _emit(self, event: str, **info: Any) -> None:
        if self.observer is not None:
            self.observer(event, info)

    # -- scheduling ---------------------------------------------------------------------------------------
    def process(self, jobs: Iterable[GenerationJob]) -> Iterator[ScoredBatch | LostBatch]:
        """Run every job through a generator and a filter actor; yield each as it ends (scored or lost).

        Jobs start in the given order. Raises :class:`FeedbackError` when no generator (or filter) actor is
        left alive with work remaining, and re-raises a task's own exception (a bug or a user error).
        """
        schedule = _Schedule(self, jobs)
        while schedule.has_work():
            schedule.start_work()
            ref = schedule.wait_for_one()
            if ref is None:
                continue
            outcome = schedule.finish(ref)
            if outcome is not None:
                yield outcome


def _lost_with_actor(exc: BaseException) -> bool:
    """Whether a task's error means its actor died (after Ray's retries), not that the task itself raised."""
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

    return isinstance(exc, (RayActorError, ObjectLostError)) and not isinstance(exc, RayTaskError)


def _least_served(actors: list[_Actor]) -> _Actor | None:
    """The idle actor that has run the fewest tasks (the first such in the list), or None."""
    idle = [a for a in actors if a.state is ActorState.IDLE]
    return min(idle, key=lambda a: a.served) if idle else None


class _Schedule:
    """The state of one :meth:`FeedbackPool.process` call: each job's :class:`JobState`, each actor's
    :class:`ActorState`, and one short method per transition.

    Every turn starts what can start (due re-checks, scoring of generated batches, generation within the
    in-flight bound), then waits for one Ray result and applies it. Results are taken generation first, then
    scoring, then actor checks, each in submission order.
    """

    def __init__(self, pool: FeedbackPool, jobs: Iterable[GenerationJob]) -> None:
        self.pool = pool
        self.queued: deque[_Item] = deque(_Item(job) for job in jobs)
        self.generated: deque[_Item] = deque()
        """GENERATED jobs, in the order their generation ended."""
        self.running: dict[Any, tuple[_Item, _Actor]] = {}
        """GENERATING and SCORING jobs, and the actor of each, by the ref of their task's result."""
        self.checks: dict[Any, _Actor] = {}
        """CHECKING actors by the ref of their pid."""

    # -- the turn -----------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.queued or self.running or self.generated or self.checks or self._restarting())

    def start_work(self) -> None:
        now = time.monotonic()
        for actor in self._restarting():
            if actor.recheck_at <= now:
                self._check(actor)
        self._start_scoring()
        self._start_generation()
        self._fail_without_actors()

    def wait_for_one(self) -> Any:
        """The ref of one finished task or check; None when none finished before the next re-check is due."""
        import ray

        running = [ref for state in (JobState.GENERATING, JobState.SCORING)
                   for ref, (item, _) in self.running.items() if item.state is state]
        pending = running + list(self.checks)
        restarting = self._restarting()
        timeout = None
        if restarting:
            timeout = max(0.0, restarting[0].recheck_at - time.monotonic())
        if not pending:
            time.sleep(timeout or 0.0)
            return None
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def finish(self, ref: Any) -> ScoredBatch | LostBatch | None:
        """Apply one result: an actor check's, a generation's or a scoring's. Returns a job that ended."""
        if ref in self.checks:
            self._checked(self.checks.pop(ref), ref)
            return None
        item, actor = self.running.pop(ref)
        actor.state = ActorState.IDLE
        if item.state is JobState.GENERATING:
            return self._generated(item, actor, ref)
        return self._scored(item, actor, ref)

    # -- starting tasks -----------------------------------------------------------------------------------
    def _start_scoring(self) -> None:
        """GENERATED -> SCORING on free filter actors."""
        while self.generated:
            actor = _least_served(self.pool.filters)
            if actor is None:
                return
            item = self.generated.popleft()
            self._submit(item, actor, JobState.SCORING, actor.handle.score.remote(item.job.job_id, item.images))

    def _start_generation(self) -> None:
        """QUEUED -> GENERATING on free generator actors, while fewer than ``max_in_flight`` batches are
        generating, generated or scoring (back-pressure when the filter lags)."""
        while self.queued and len(self.running) + len(self.generated) < self.pool.max_in_flight:
            actor = _least_served(self.pool.generators)
            if actor is None:
                return
            item = self.queued.popleft()
            meta_ref, item.images = actor.handle.generate.options(num_returns=2).remote(item.job)
            self._submit(item, actor, JobState.GENERATING, meta_ref)
            self.pool._emit("submitted", actor=self.pool.generators.index(actor), pid=actor.pid,
                            job_id=item.job.job_id, emotion=item.job.emotion)

    def _submit(self, item: _Item, actor: _Actor, state: JobState, ref: Any) -> None:
        actor.state = ActorState.BUSY
        actor.served += 1
        item.state = state
        self.running[ref] = (item, actor)

    def _fail_without_actors(self) -> None:
        if self.queued and not any(a.alive for a in self.pool.generators):
            raise FeedbackError(
                "every generator actor died (more failures than feedback.max_restarts); see the Ray logs "
                "of the dead actors, raise feedback.max_restarts or give the actors more memory"
            )
        if self.generated and not any(a.alive for a in self.pool.filters):
            raise FeedbackError(
                "every filter actor died (more failures than feedback.max_restarts); see the Ray logs"
            )

    # -- results --------------------------------------------------------------------------------------------
    def _generated(self, item: _Item, actor: _Actor, ref: Any) -> LostBatch | None:
        """GENERATING -> GENERATED, or LOST with its actor."""
        import ray

        try:
            meta: GeneratedMeta = ray.get(ref)
        except Exception as exc:
            if not _lost_with_actor(exc):
                raise
            return self._lose(item, actor, "generate", exc)
        if meta.pid != actor.pid:  # Ray restarted the actor and retried the task on it
            self._restarted(actor, meta.pid)
        stats = self.pool.stats
        stats.generated_batches += 1
        stats.generation_seconds += meta.seconds
        self.pool._emit("generated", job_id=item.job.job_id, pid=meta.pid, seconds=meta.seconds)
        item.state, item.meta = JobState.GENERATED, meta
        self.generated.append(item)
        return None

    def _scored(self, item: _Item, actor: _Actor, ref: Any) -> ScoredBatch | LostBatch:
        """SCORING -> SCORED, or LOST with its actor."""
        import ray

        try:
            scores: BatchScores = ray.get(ref)
        except Exception as exc:
            if not _lost_with_actor(exc):
                raise
            return self._lose(item, actor, "score", exc)
        actor.pid = scores.pid
        stats = self.pool.stats
        stats.scored_batches += 1
        stats.scoring_seconds += scores.seconds
        self.pool._emit("scored", job_id=item.job.job_id, pid=scores.pid, seconds=scores.seconds)
        item.state = JobState.SCORED
        assert item.meta is not None  # set when its generation ended
        return ScoredBatch(item.job, item.meta, item.images, scores)

    def _lose(self, item: _Item, actor: _Actor, stage: str, exc: BaseException) -> LostBatch:
        """-> LOST: the actor died with this batch in flight; count it, check the actor, report the batch."""
        stats = self.pool.stats
        stats.lost_batches += 1
        stats.lost_jobs.append(item.job.job_id)
        self.pool._emit("lost", job_id=item.job.job_id, stage=stage, pid=actor.pid)
        self._check(actor)
        item.state = JobState.LOST
        return LostBatch(item.job, stage, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    # -- actor checks ---------------------------------------------------------------------------------------
    def _restarting(self) -> list[_Actor]:
        """RESTARTING actors, the one due first first."""
        actors = [a for a in self.pool.generators + self.pool.filters if a.state is ActorState.RESTARTING]
        return sorted(actors, key=lambda a: a.recheck_at)

    def _check(self, actor: _Actor) -> None:
        """-> CHECKING: ask for its pid; it answers once restarted, or fails when dead for good."""
        actor.state = ActorState.CHECKING
        self.checks[actor.handle.pid.remote()] = actor

    def _checked(self, actor: _Actor, ref: Any) -> None:
        """CHECKING -> IDLE (back, maybe restarted), RESTARTING (ask again later) or DEAD."""
        import ray
        from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

        try:
            pid = int(ray.get(ref))
        except ActorUnavailableError:  # a RayActorError: caught first
            actor.state, actor.recheck_at = ActorState.RESTARTING, time.monotonic() + _RECHECK_SECONDS
            return
        except (RayActorError, ObjectLostError):
            actor.state = ActorState.DEAD
            self.pool.stats.dead_actors += 1
            self.pool._emit("dead", pid=actor.pid)
            return
        if pid != actor.pid:
            self._restarted(actor, pid)
        actor.state = ActorState.IDLE

    def _restarted(self, actor: _Actor, pid: int) -> None:
        self.pool.stats.restarts += 1
        self.pool._emit("restarted", old_pid=actor.pid, pid=pid)
        actor.pid = pid
