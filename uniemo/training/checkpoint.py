"""Checkpoints of a run: complete, rotated, resumable, and written so a crash never corrupts ``latest`` (STYLE 12).

Layout (ARCHITECTURE.md)::

    runs/<name>/checkpoints/
      latest                      text file naming the newest complete folder, e.g. "step-000040"
      step-000040/
        ds/ ...                   DeepSpeed's checkpoint of every rank (tag "ds"), frozen parameters excluded
        latest                    DeepSpeed's own tag file ("ds"), so DeepSpeed's zero_to_fp32 works on the folder
        zero_to_fp32.py           copied by DeepSpeed
        rng/rank-00000.pt ...     per-rank RNG states (torch, CUDA, Python, NumPy), plain tensors and lists
        trainer_state.json        step, loader position of every rank, config digest, resume-compatibility keys
        COMPLETE                  written last, after every rank finished and a barrier

Saving (:meth:`Checkpointer.save`, collective): rank 0 clears a stale folder of the same step; barrier; every
rank writes its DeepSpeed shard and RNG file; loader positions are gathered to rank 0, which writes
``trainer_state.json``; barrier; rank 0 writes ``COMPLETE``, then replaces ``latest`` atomically (write a
temporary file, fsync, ``os.replace``) and deletes all but the newest ``training.keep_checkpoints`` folders.
A crash at any point before the ``os.replace`` leaves the previous ``latest`` and its folder intact; a folder
without ``COMPLETE`` never becomes ``latest`` and is removed by the next rotation.

Reading (the one owner of it; file names in :mod:`uniemo.run_layout`): :func:`latest_checkpoint` (None when the
run has none yet), :func:`require_checkpoint` (the same, but a run without a checkpoint is a user error),
:func:`resolve_checkpoint` (a run, its ``checkpoints/`` or a step folder), :func:`read_trainer_state`, and
:func:`consolidated_state_dict`, which turns one step folder into fp32 tensors: ZeRO 1-3 through DeepSpeed's own
``zero_to_fp32``, ZeRO 0 from the model-states file (with the fp32 master copies when the run was bf16/fp16).
Checkpoints are saved with ``exclude_frozen_parameters=True``, so one holds only what its stage trains (plus
persistent buffers); :func:`uniemo.inference.runs.load_run` puts the frozen pieces back.

Every file of a step folder is unpickled with torch's restricted unpickler, DeepSpeed's loads included, and a
step folder may hold no symbolic link that leaves it (:mod:`uniemo.training.safe_pickle`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uniemo.atomic import atomic_write
from uniemo.errors import UserError
from uniemo.run_layout import (
    CHECKPOINTS_DIR,
    COMPLETE_FILE,
    CONSOLIDATED_FILE,
    DS_TAG,
    LATEST_FILE,
    RNG_DIR,
    TRAINER_STATE_FILE,
    checkpoints_dir,
    step_dir_name,
)
from uniemo.training.safe_pickle import (
    check_step_folder,
    install_safe_engine,
    refused_file_in,
    safe_load,
    weights_only_loads,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.distributed.env import DistEnv

STATE_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{6,})$")


class CheckpointError(UserError):
    """A checkpoint cannot be used: missing, incomplete, or saved with an incompatible config."""


# -- paths ----------------------------------------------------------------------------------------------------


def step_of(path: str | Path) -> int | None:
    """The step of a ``step-NNNNNN`` folder name, else None."""
    match = _STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(step_dir: str | Path) -> bool:
    return (Path(step_dir) / COMPLETE_FILE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``checkpoints/latest`` names, or None when the run has no checkpoint yet.

    Raises:
        CheckpointError: ``latest`` names a folder that is missing or incomplete (the file was edited by hand
            or the folder deleted; a crash cannot cause this).
    """
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = root / name
    if step_of(name) is None or not is_complete(folder):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a complete checkpoint folder; point it at a folder of "
            f"{root} that holds {COMPLETE_FILE}, or delete it to start the run afresh"
        )
    return folder


def require_checkpoint(run_dir: str | Path) -> Path:
    """The folder ``checkpoints/latest`` names; unlike :func:`latest_checkpoint`, a run without one is an error.

    Raises:
        UserError: the run folder does not exist, or has no checkpoint yet (train first).
        CheckpointError: ``latest`` names a missing or incomplete folder.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {str(run)!r} does not exist; pass a folder under runs/ (see `uniemo train`)")
    found = latest_checkpoint(run)
    if found is None:
        raise UserError(
            f"run {str(run)!r} has no checkpoint yet (no {CHECKPOINTS_DIR}/{LATEST_FILE}); train it first with "
            "`uniemo train --config ...`"
        )
    return found


def checkpoint_step(step_dir: str | Path) -> int:
    """The optimizer step a complete step folder was saved at (``trainer_state.json``'s ``step``)."""
    return int(read_trainer_state(step_dir)["step"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete step folder from a run directory, its ``checkpoints/`` folder, or a step folder."""
    path = Path(path).expanduser()
    if step_of(path) is not None and is_complete(path):
        return path
    run_dir = path.parent if path.name == CHECKPOINTS_DIR else path
    found = latest_checkpoint(run_dir) if path.exists() else None
    if found is None:
        raise CheckpointError(
            f"{path} is neither a complete checkpoint folder (step-NNNNNN with {COMPLETE_FILE}) nor a run directory "
            "with checkpoints/latest; give a run that has saved a checkpoint"
        )
    return found


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a partial file."""
    atomic_write(path, text)


def publish(run_dir: str | Path, step_dir: Path) -> None:
    """Mark ``step_dir`` complete and make it ``latest`` (rank 0, after every rank finished writing)."""
    atomic_write_text(step_dir / COMPLETE_FILE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    atomic_write_text(checkpoints_dir(run_dir) / LATEST_FILE, step_dir.name + "\n")


def rotate(run_dir: str | Path, keep: int, keep_steps: Collection[int] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` complete step folders, and incomplete folders older than ``latest``.

    The folder ``latest`` names is never deleted, nor the complete folders of ``keep_steps`` (the pinned feedback
    pool still has to read them). Returns the deleted folders.
    """
    root = checkpoints_dir(run_dir)
    latest = latest_checkpoint(run_dir)
    latest_step = step_of(latest) if latest is not None else None
    steps: dict[Path, int] = {}
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and p.is_dir():
            steps[p] = step
    folders = sorted(steps, key=steps.__getitem__)
    complete = [p for p in folders if is_complete(p)]
    doomed = [p for p in complete[: max(0, len(complete) - keep)] if steps[p] not in keep_steps]
    if latest_step is not None:
        doomed += [p for p in folders if not is_complete(p) and steps[p] < latest_step]
    deleted = []
    for folder in doomed:
        if latest is not None and folder.resolve() == latest.resolve():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


# -- RNG --------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers (``torch.load(weights_only=True)`` reads them)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": [str(np_name), [int(x) for x in np_keys], int(np_pos), int(np_has_gauss), float(np_cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- compatibility --------------------------------------------------------------------------------------------


def config_digest(cfg: Config) -> str:
    """sha256 of the resolved config (sorted JSON)."""
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


# Generation-time settings: they do not shape the trained model, so a resumed run may change them.
_INFERENCE_ONLY = ("sampler", "sampling_steps", "guidance_scale", "generation_batch_size", "compile")


def compat_keys(cfg: Config, world_size: int) -> dict[str, Any]:
    """Config values a checkpoint can only be resumed with unchanged: the stage, the model the stage trains
    (stage 1: ``model.understanding``; stage 2: all of ``model`` but generation-time settings), the world size,
    the ZeRO stage and the precision (DeepSpeed's shards and optimiser state depend on them)."""
    keys: dict[str, Any] = {
        "training.stage": cfg.training.stage,
        "distributed.num_workers": world_size,
        "distributed.zero_stage": cfg.distributed.zero_stage,
        "training.precision": cfg.training.precision,
    }
    model = dataclasses.asdict(cfg.model)
    if cfg.training.stage == 1:
        model = {"understanding": model["understanding"]}
    else:
        model["generator"] = {k: v for k, v in model["generator"].items() if k not in _INFERENCE_ONLY}
    keys.update(_flatten("model", model))
    return keys


_NO_DEFAULT = object()


def _model_defaults() -> dict[str, Any]:
    from uniemo.config.schema import ModelConfig

    return _flatten("model", dataclasses.asdict(ModelConfig()))


_MODEL_DEFAULTS = _model_defaults()
"""Every ``model.*`` key at its schema default: a key added to the schema after a checkpoint was saved is
compatible with it when the resumed run leaves the key at its default (the behaviour of the older code)."""


def check_compatible(saved: dict[str, Any], current: dict[str, Any], step_dir: Path) -> None:
    """Raise a one-line :class:`CheckpointError` naming the first key that changed since ``step_dir`` was saved."""
    # The run-level keys first (a stage change would otherwise surface as some model key), then the model's.
    first = [k for k in current if not k.startswith("model.")]
    for key in first + sorted((set(saved) | set(current)) - set(first)):
        if key not in saved and current[key] == _MODEL_DEFAULTS.get(key, _NO_DEFAULT):
            continue  # a key newer than the checkpoint, at its default: the saved run trained with that behaviour
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"cannot resume from {step_dir}: {key} was {saved.get(key)!r} there and is {current.get(key)!r} "
                "now; resume with the same value, or start a new run (another run.name)"
            )


# -- save / load -----------------------------------------------------------------------------------------------


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Saves and restores the checkpoints of one run on every rank (the calls are collective).

    With ``background`` (``training.async_checkpoint``) a save returns once the states are serialized in host memory
    (:mod:`uniemo.training.checkpoint_writer`) and the checkpoint is *pending*: :meth:`poll` (after each step)
    publishes it once every rank's files are on disk, :meth:`wait` blocks until then. Publication itself is the same
    protocol as a synchronous save's.
    """

    def __init__(self, run_dir: str | Path, env: DistEnv, keep: int, background: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.env = env
        self.keep = keep
        self.root = checkpoints_dir(run_dir)
        self.background = background
        self.pending: Path | None = None
        """A background save's folder, written but not yet published."""
        self.blocking_seconds = 0.0
        """How long the last :meth:`save` kept the caller (the training loop) waiting."""
        self._writer: Any = None
        self._keep_steps: tuple[int, ...] = ()

    def save(
        self,
        engine: Any,
        step: int,
        trainer_state: dict[str, Any],
        loader_state: dict[str, Any],
        keep_steps: Collection[int] = (),
    ) -> Path:
        """Write the checkpoint of ``step`` and publish it as ``latest`` (module docstring for the protocol).

        ``trainer_state`` (the same on every rank) goes into ``trainer_state.json`` with the loader position of
        every rank (``loader_state`` is this rank's ``ShardLoader.state_dict()``). A background save returns the
        folder unpublished (:attr:`pending`). The rotation at its publication keeps the folders of ``keep_steps``
        besides the newest ``keep``.
        """
        self.wait()  # the previous background save is published first
        self._keep_steps = tuple(keep_steps)
        start = time.perf_counter()
        folder = self.root / step_dir_name(step)
        published = latest_checkpoint(self.run_dir)
        if published is not None and published.name == folder.name:
            raise RuntimeError(f"step {step} is already the published checkpoint {published}; not overwriting it")
        if self.env.is_main:
            if folder.exists():
                shutil.rmtree(folder)  # a crashed save of this step, or a re-run of it after a restart
            folder.mkdir(parents=True)
        _barrier()
        if self.background:
            from uniemo.training.checkpoint_writer import install

            self._writer = install(engine)
        engine.save_checkpoint(str(folder), tag=DS_TAG, exclude_frozen_parameters=True)
        rng_dir = folder / RNG_DIR
        rng_dir.mkdir(exist_ok=True)
        torch.save(rng_state(), rng_dir / f"rank-{self.env.rank:05d}.pt")
        positions = _gather_objects(loader_state, self.env.world_size)
        if self.env.is_main:
            state = dict(trainer_state, step=step, version=STATE_VERSION, loader_positions=positions,
                         world_size=self.env.world_size, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            atomic_write_text(folder / TRAINER_STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")
        if self._writer is not None:
            self.pending = folder
        else:
            self._publish(folder)
        self.blocking_seconds = time.perf_counter() - start
        return folder

    def _publish(self, folder: Path) -> None:
        _barrier()  # every rank has finished writing
        if self.env.is_main:
            publish(self.run_dir, folder)
            rotate(self.run_dir, self.keep, self._keep_steps)
        _barrier()  # nobody reads `latest` (or exits) before it is published

    def poll(self) -> bool:
        """Publish the pending background save if every rank's files are on disk (collective while one is pending,
        a no-op otherwise); returns whether it did."""
        if self.pending is None:
            return False
        if not all(_gather_objects(bool(self._writer.done()), self.env.world_size)):
            return False
        folder, self.pending = self.pending, None
        self._publish(folder)
        return True

    def wait(self) -> None:
        """Block until the pending background save is on disk on every rank, then publish it (collective)."""
        if self.pending is None:
            return
        self._writer.wait()
        folder, self.pending = self.pending, None
        self._publish(folder)

    def load(self, engine: Any, folder: Path, compat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the engine, this rank's RNG and return ``(trainer_state, this rank's loader position)``.

        Raises:
            CheckpointError: the config changed incompatibly, or the checkpoint was saved by another world size.
        """
        state = read_trainer_state(folder)
        check_compatible(state.get("compat", {}), compat, folder)
        positions = state["loader_positions"]
        if len(positions) != self.env.world_size:
            raise CheckpointError(
                f"cannot resume from {folder}: saved by {len(positions)} ranks, this job has "
                f"{self.env.world_size}; use distributed.num_workers={len(positions)}"
            )
        folder = check_step_folder(folder)
        # DeepSpeed's own loads (weights_only=False) go through the restricted unpickler: its checkpoint engine is
        # swapped for one that loads safely, and any torch.load it makes itself is forced to weights-only.
        install_safe_engine(engine)
        with weights_only_loads():
            try:
                load_path, _ = engine.load_checkpoint(
                    str(folder), tag=DS_TAG, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
            except pickle.UnpicklingError as exc:  # a load DeepSpeed made itself, refused
                raise refused_file_in(folder / DS_TAG, exc) from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {folder / DS_TAG}; the folder is damaged")
        rng_file = folder / RNG_DIR / f"rank-{self.env.rank:05d}.pt"
        set_rng_state(safe_load(rng_file))
        return state, positions[self.env.rank]


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a complete step folder."""
    folder = Path(folder)
    path = folder / TRAINER_STATE_FILE
    if not is_complete(folder) or not path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {COMPLETE_FILE} or {TRAINER_STATE_FILE})")
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} has version {state.get('version')!r}; this uniemo reads {STATE_VERSION}")
    return state


# ---------------------------------------------------------------------------------------------------------
# Consolidation: a step folder as plain fp32 weights
# ---------------------------------------------------------------------------------------------------------
def is_checkpoint(step_dir: str | Path) -> bool:
    """Whether ``step_dir`` holds a DeepSpeed checkpoint under the tag ``ds`` (a model-states file), or consolidated
    weights (``model.safetensors``, a converted run)."""
    ds_dir = Path(step_dir) / DS_TAG
    return (Path(step_dir) / CONSOLIDATED_FILE).is_file() or (ds_dir.is_dir() and any(ds_dir.glob("*model_states.pt")))


def consolidated_state_dict(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of one checkpoint folder, on the CPU, keyed by the task module's parameter names.

    ZeRO 1-3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` over every rank's optimizer shard (the fp32
    master weights). ZeRO 0: the model-states file; a bf16/fp16 run's weights come from the optimizer's fp32
    master copies (matched to names, see :func:`_zero0_state_dict`). Frozen parameters are included only when the
    checkpoint was saved with them; persistent buffers always are. A step folder of consolidated weights
    (``model.safetensors``, written by ``uniemo convert official``) is read as it is, without any pickle.

    Raises:
        UserError: ``step_dir`` holds no DeepSpeed checkpoint (tag ``ds``) or is incomplete.
    """
    step_dir = Path(step_dir)
    if not is_checkpoint(step_dir):
        raise UserError(
            f"{str(step_dir)!r} is not a checkpoint folder: it has no {DS_TAG}/*model_states.pt "
            "(expected runs/<name>/checkpoints/step-NNNNNN)"
        )
    step_dir = check_step_folder(step_dir)
    if (step_dir / CONSOLIDATED_FILE).is_file():
        from safetensors.torch import load_file

        return {k: v.float().contiguous() if v.is_floating_point() else v
                for k, v in load_file(str(step_dir / CONSOLIDATED_FILE)).items()}
    ds_dir = step_dir / DS_TAG
    optim_files = sorted(ds_dir.glob("*_optim_states.pt"))
    if optim_files and _is_zero_optimizer_file(optim_files[0]):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 reports progress with print and tqdm; the CLI keeps its output to its own lines. It calls
        # torch.load(weights_only=False) itself: weights_only_loads makes those loads restricted.
        sink = io.StringIO()
        try:
            with weights_only_loads(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(step_dir), tag=DS_TAG, exclude_frozen_parameters=False
                )
        except pickle.UnpicklingError as exc:
            raise refused_file_in(ds_dir, exc) from None
        except (ValueError, FileNotFoundError) as e:
            raise UserError(
                f"checkpoint {str(step_dir)!r} is incomplete or damaged ({_one_line(e)}); use an earlier step folder"
            ) from None
    else:
        model_files = sorted(ds_dir.glob("*model_states.pt"))
        state = _zero0_state_dict(model_files[0])
    return {k: v.detach().to("cpu").float().contiguous() if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def _is_zero_optimizer_file(path: Path) -> bool:
    """Whether an ``*_optim_states.pt`` file is a ZeRO 1-3 shard (zero_to_fp32's input) rather than ZeRO-0 bf16."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    data = safe_load(path, mmap=True)
    inner = data.get(OPTIMIZER_STATE_DICT, {}) if isinstance(data, dict) else {}
    return isinstance(inner, dict) and ZERO_STAGE in inner


def _zero0_state_dict(model_file: Path) -> dict[str, torch.Tensor]:
    """ZeRO 0: the saved module, with 16-bit weights replaced by the optimizer's fp32 master copies.

    DeepSpeed's fp16/bf16 optimizers at ZeRO 0 save their fp32 masters per parameter group, without names. Each
    group lists its parameters in module order (``build_param_groups`` walks ``named_parameters``), so the module's
    trainable entries are a merge of the groups; walking the module in order, each entry is matched to the group
    whose next master has its shape and rounds to its 16-bit value. A parameter no master matches keeps its
    upcast 16-bit value (a warning says how many).
    """
    saved = safe_load(model_file)  # a refused or unreadable file: one line naming it
    try:
        module = saved["module"]
    except Exception as e:  # a foreign file: anything but DeepSpeed's mapping means "not a usable checkpoint"
        raise UserError(f"cannot read {str(model_file)!r} ({_one_line(e)}); use an earlier step folder") from None
    state = dict(module)
    low = [k for k, v in module.items() if v.dtype in (torch.float16, torch.bfloat16)]
    optimizer = saved.get("optimizer")
    if not low or not isinstance(optimizer, dict):
        return state
    groups = optimizer.get("fp32_groups")
    if groups is not None:
        flats = [torch.cat([t.detach().float().reshape(-1) for t in g]) if len(g) else torch.zeros(0) for g in groups]
    else:
        flats = [t.detach().float().reshape(-1) for t in optimizer.get("fp32_groups_flat") or []]
    if not flats:
        return state
    buffers = set(saved.get("buffer_names") or [])
    offsets = [0] * len(flats)
    unmatched = 0
    for name in low:
        if name in buffers:
            continue
        value = module[name]
        n = value.numel()
        match = None
        for g, flat in enumerate(flats):
            if offsets[g] + n > flat.numel():
                continue
            master = flat[offsets[g] : offsets[g] + n]
            if torch.equal(master.to(value.dtype), value.reshape(-1)):
                match = g
                break
        if match is None:
            unmatched += 1
            continue
        state[name] = flats[match][offsets[match] : offsets[match] + n].reshape(value.shape).clone()
        offsets[match] += n
    if unmatched:
        warnings.warn(
            f"{model_file}: {unmatched} 16-bit parameter(s) have no fp32 master copy; their 16-bit values are used",
            stacklevel=3,
        )
    return state


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
