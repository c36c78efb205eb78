"""The training loop: one loop in named phases (STYLE 7), the same for stage 1 and stage 2.

::

    train()                       restore or seed, then until the stop step:
      train_step()                  gradient_accumulation x forward_backward(), then optimizer_step()
        forward_backward(batch)       engine(batch) -> named loss terms; engine.backward(total)
        optimizer_step()              engine.step(): clip, AdamW, lr schedule (DeepSpeed, at the boundary)
      maybe_eval()                  every training.eval_every steps and at the end: the full validation split
      maybe_checkpoint()            every training.checkpoint_every steps and at the stop step
      maybe_log()                   every logging.every steps, on validation steps and at the stop step
      maybe_refresh_sources()       every feedback.refresh_every steps: new feedback rounds start a new epoch
    (pinned feedback mode: maybe_pickup_rounds() before each step waits for a round due at this step instead)
    finish                          the stage's end hook (stage 2: emotion space, sample grids)

Stage 1 and 2 differ only by the :class:`uniemo.training.parts.StageParts` (task, data, end hook) and config.
A rank's whole job (process group, stage, engine, logger, this loop) is :func:`uniemo.training.worker.run_worker`.

Reductions across ranks: logged training terms are the mean over ranks (and over the steps since the last
log); validation sums loss x samples, correct predictions and samples over every rank, then divides (never a
mean of per-rank means). ``data/samples/<source>`` in a metrics line is the number of training samples of that
source (``real``, ``synthetic``, ...) consumed since the previous line, summed over ranks (per interval, not
cumulative), and ``data/skipped`` the shards and samples the training loaders skipped in that interval (missing or
corrupt shards, bad samples; ``uniemo.data.loader``); ``data/labels/<source>/<emotion>`` counts the labels the extra
sources (not ``real``) fed the trainers in that interval, per emotion (only non-zero counts); ``time`` is when the
line was written (Unix seconds); ``data_wait_share`` is the share of the interval the loop waited for its next batch
(mean over ranks). Under ZeRO-3 a forward is collective (parameters are gathered), so a rank whose validation shards
ran out keeps joining forwards (on a batch it already has, results discarded) until every rank is done.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError
from uniemo.logging import NullRunLogger, truncate_metrics
from uniemo.run_layout import MIX_FILE, ROUNDS_DIR, stop_request_path
from uniemo.seeds import seed_everything, training_seed, validation_seed
from uniemo.training.checkpoint import (
    Checkpointer,
    compat_keys,
    config_digest,
    latest_checkpoint,
)
from uniemo.training.engine import Engine, check_batch_arithmetic
from uniemo.training.feedback_schedule import (
    append_mix,
    generation_step,
    generation_steps,
    listed_rounds,
    read_mix,
    round_published,
    rounds_due,
)
from uniemo.training.run_weights import stored_init

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import Config
    from uniemo.distributed.env import DistEnv
    from uniemo.training.parts import StageParts


_PICKUP_POLL_S = 0.5
"""Pinned feedback mode: how often the trainers look for a round they wait for."""


def total_steps_for(cfg: Config, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``training.steps``, or ``training.epochs`` of the train split."""
    if cfg.training.epochs > 0:
        return max(1, math.ceil(cfg.training.epochs * batches_per_epoch / cfg.training.gradient_accumulation))
    return cfg.training.steps


class Trainer:
    """The loop of one rank (module docstring). All public phases are called on every rank."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        run_dir: str | Path,
        engine: Engine,
        parts: StageParts,
        total_steps: int,
        reduce_device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(run_dir)
        self.engine = engine
        self.parts = parts
        self.total_steps = total_steps
        self.stop_step = min(total_steps, cfg.training.stop_at_step) if cfg.training.stop_at_step else total_steps
        self.device = engine.device
        self.reduce_device = reduce_device
        self.global_batch = check_batch_arithmetic(cfg, env.world_size)
        self.checkpointer = Checkpointer(run_dir, env, cfg.training.keep_checkpoints,
                                         background=cfg.training.async_checkpoint)
        self.compat = compat_keys(cfg, env.world_size)
        self.logger: NullRunLogger = NullRunLogger()
        """The run's logger, set by :meth:`train` (a null object before, STYLE 14)."""
        self.step = 0
        self.samples_seen = 0
        self.bad_steps = 0
        """Steps skipped for a non-finite loss so far (``training.max_bad_steps``), over the whole run."""
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        self._batches: Generator[dict[str, Any], None, None] | None = None
        self._last_batch: dict[str, Any] | None = None
        self._loss_keys: list[str] = ["total"]
        self._metric_keys: set[str] = {"metrics/accuracy"}
        self._step_lrs: dict[str, float] = {}
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._window_start = time.perf_counter()
        self._samples_per_s: float | None = None
        self._source_names = [s.name for s in parts.train_loader.sources]
        self._source_window: Counter = Counter()
        # Labels the extra sources (feedback rounds, controls) fed this rank, by (source, emotion index).
        self._label_window: Counter = Counter()
        self._data_wait = 0.0
        """Seconds this log window spent waiting for the next batch (``data_wait_share`` in the metrics)."""
        self._skipped_logged = 0
        fb = cfg.feedback
        self.feedback_run = (self.run_dir / ROUNDS_DIR).is_dir()
        """A run of the feedback loop: rank 0 records the rounds its mix lists (``rounds/mix.jsonl``)."""
        self.pinned = self.feedback_run and fb.mode == "async" and fb.pinned
        """The pinned async schedule (:mod:`uniemo.training.feedback_schedule`): rounds enter the mix at fixed steps."""
        self._mix_rounds: list[int] | None = None
        self._waited_s = 0.0

    # -- start --------------------------------------------------------------------------------------------------
    def restore(self) -> int:
        """Continue from ``checkpoints/latest`` when it exists, else seed this rank's RNG. Returns the step.

        The engine (weights, optimiser, schedule), this rank's RNG and loader position come back, so the run
        continues exactly where the checkpoint was taken (no sample window trained twice).
        """
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            # Same model on every rank (seeded before building); per-rank streams for dropout and noise.
            seed_everything(training_seed(self.cfg.run.seed, self.env.rank))
            self._restore_mix(0)
            return 0
        state, position = self.checkpointer.load(self.engine.ds_engine, latest, self.compat)
        self.step = int(state["step"])
        self._restore_mix(self.step)
        self.samples_seen = int(state.get("samples_seen", self.step * self.global_batch))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.parts.train_loader.load_state_dict(position)
        self.last_checkpoint = latest
        self._saved_step = self.step
        return self.step

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self, logger: NullRunLogger) -> dict[str, Any]:
        """Run from the current step to the stop step; returns a small summary."""
        self.logger = logger
        self.engine.set_train(True)
        self._batches = self.parts.train_loader.batches()
        logger.start_progress(initial=self.step, total=self.stop_step)
        started_at = self.step
        self._window_start = time.perf_counter()
        stopped = False
        while self.step < self.stop_step:
            if not self.maybe_pickup_rounds():  # a stop was requested while the trainers waited for a round
                stopped = True
                break
            terms = self.train_step()
            if terms is None:  # a skipped non-finite step: no update, the step number stays
                continue
            val = self.maybe_eval()
            # The step's metrics line goes out before its checkpoint: a checkpoint must never cover a step whose
            # record is missing (a rank dying between the two would lose that line for good). The other order is
            # safe, because a resume truncates metrics.jsonl back to the checkpoint's step.
            self.maybe_log(terms, val)
            self.maybe_checkpoint()
            self.checkpointer.poll()  # a background save becomes `latest` once every rank has written it
            self.maybe_refresh_sources()
            if self.stop_requested():
                stopped = True
                break
        self.maybe_checkpoint(final=True)
        self.checkpointer.wait()
        logger.end_progress()
        if not stopped and self.step >= self.total_steps and self.parts.finish is not None:
            self.parts.finish(self)
        return {"step": self.step, "steps_run": self.step - started_at, "total_steps": self.total_steps,
                "stopped": stopped}

    def stop_requested(self) -> bool:
        """Whether the driver asked to stop (SIGTERM: preemption, requeue, scancel). Rank 0 looks at the run
        directory and every rank learns the answer from the same collective, so all ranks stop at one step."""
        return self._any_rank(self.env.rank == 0 and stop_request_path(self.run_dir).exists())

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step: ``gradient_accumulation`` micro-batches, then the update. Returns the mean terms, or
        None for a step skipped because its loss was not finite on some rank (:meth:`skip_bad_step`)."""
        accum = self.cfg.training.gradient_accumulation
        sums: dict[str, torch.Tensor] = {}
        self.engine.task.set_step(self.step)  # a task whose forward depends on it: generator pretraining's phases
        for micro in range(accum):
            terms = self.forward_backward(self._next_batch())
            if terms is None:
                self.skip_bad_step()
                return None
            for key, value in terms.items():
                sums[key] = sums[key] + value if key in sums else value
            self._loss_keys = sorted(k for k in terms if not k.startswith("metrics/"))
            self._metric_keys = {k for k in terms if k.startswith("metrics/")}
            if micro < accum - 1:
                self.engine.ds_engine.step()  # DeepSpeed counts the micro-step; it updates only at the boundary
        self._step_lrs = self.engine.learning_rates()  # the rates this update uses (the schedule moves after it)
        self.optimizer_step()
        self.step += 1
        self.samples_seen += self.global_batch
        return {key: value / accum for key, value in sums.items()}

    def _next_batch(self) -> dict[str, Any]:
        # torch's DataLoader draws a seed from the global RNG whenever it starts an iterator (at the first batch
        # of every epoch and after a resume). Forking keeps the training RNG (dropout, noise) independent of
        # when that happens, so a resumed run draws exactly what the uninterrupted one draws.
        assert self._batches is not None, "train() starts the batch stream"
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            batch = next(self._batches)
        self._data_wait += time.perf_counter() - start
        self._source_window.update(batch["source"])
        self._label_window.update((s, int(k)) for s, k in zip(batch["source"], batch["label"].tolist(), strict=True)
                                  if s != self._source_names[0])
        if self.feedback_run and self.env.is_main:
            self._record_mix()
        return batch

    # -- feedback rounds in the mix ----------------------------------------------------------------------------
    def _restore_mix(self, step: int) -> None:
        """At the start (``step`` 0) or a resume: the rounds the checkpoint's listing holds (pinned: the rounds due
        before ``step``), and ``rounds/mix.jsonl`` cut back to the lines before ``step`` (rank 0)."""
        loader = self.parts.train_loader
        if self.pinned:
            loader.set_round_limit(rounds_due(self.cfg.feedback, step - 1))  # pickups at `step` come after its save
        if self.feedback_run and self.env.is_main:
            truncate_metrics(self.run_dir / MIX_FILE, step - 1)  # a line at step s was listed after checkpoint s
            lines = read_mix(self.run_dir)
            self._mix_rounds = lines[-1]["rounds"] if lines else None

    def _record_mix(self) -> None:
        """Rank 0: a line in ``rounds/mix.jsonl`` when the round folders of the current listing changed."""
        loader = self.parts.train_loader
        rounds = listed_rounds(loader.listed)
        if rounds != self._mix_rounds:
            append_mix(self.run_dir, self.step, loader.epoch, rounds, self._waited_s)
            self._mix_rounds = rounds
            self._waited_s = 0.0

    def maybe_pickup_rounds(self) -> bool:
        """Pinned feedback mode, before each step: when a round is due at this step (its shards enter the mix after
        ``r x steps_per_round + pinned_delay`` steps), every rank waits until the round is published, then starts
        a new epoch whose listing holds it. Returns False when a stop was requested while waiting."""
        loader = self.parts.train_loader
        if not self.pinned:
            return True
        due = rounds_due(self.cfg.feedback, self.step)
        if loader.round_limit is not None and due <= loader.round_limit:
            return True
        started = time.perf_counter()
        waiting = False
        self.checkpointer.wait()  # a pending background save may be the checkpoint the pool waits for
        while self._any_rank(not round_published(self.run_dir, due)):
            if not waiting:
                self.logger.info(f"step {self.step}: waiting for feedback round {due}, due at this step (pinned)")
                waiting = True
            if self.stop_requested():
                return False
            time.sleep(_PICKUP_POLL_S)
        self._waited_s = time.perf_counter() - started
        loader.set_round_limit(due)
        assert self._batches is not None, "train() starts the batch stream"
        self._batches.close()
        loader.set_epoch(loader.epoch + 1)  # always a new epoch: the same steps whatever the listing holds
        self._batches = loader.batches()
        waited = f" after waiting {self._waited_s:.1f} s" if waiting else ""
        self.logger.info(f"step {self.step}: feedback round {due} enters the mix{waited}; epoch {loader.epoch}")
        return True

    def maybe_refresh_sources(self) -> bool:
        """Every ``feedback.refresh_every`` steps: when the manifests of any rank list other training shards than
        the current epoch's (a new feedback round), every rank ends its epoch here and starts the next one with
        them. Returns whether it did. (Without it new rounds join at the next epoch boundary.)"""
        every = self.cfg.feedback.refresh_every
        if self.pinned or every <= 0 or self.step % every != 0 or self.step >= self.stop_step:
            return False
        loader = self.parts.train_loader
        if not self._any_rank(loader.listing_changed()):
            return False
        assert self._batches is not None, "train() starts the batch stream"
        self._batches.close()  # stops this epoch's DataLoader; the position counts delivered batches only
        loader.set_epoch(loader.epoch + 1)  # the next iteration lists the manifests again
        self._batches = loader.batches()
        self.logger.info(f"step {self.step}: new training shards listed; epoch {loader.epoch} starts with them")
        return True

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Forward through the engine (the task: model + losses), backward of ``total``; detached float terms.
        None when the loss is not finite on some rank (nothing was backpropagated)."""
        batch = self.engine.prepare_batch(batch)
        self._last_batch = batch
        out = self.engine.ds_engine(batch)
        if self._any_rank(not bool(torch.isfinite(out["total"].detach()).all())):
            return None  # every rank agrees (one collective), so no rank enters the backward's collectives
        self.engine.ds_engine.backward(out["total"])
        return {key: value.detach().float() for key, value in out.items()}

    def skip_bad_step(self) -> None:
        """A non-finite loss on some rank: no backward, no update. Counted, and skipped while the run's count stays
        within ``training.max_bad_steps``; beyond it the run stops with a one-line error, saving nothing, so
        ``checkpoints/latest`` stays the last good checkpoint. (max_bad_steps > 0 implies gradient_accumulation 1,
        so no gradient of another micro-batch is left behind.)"""

        self.bad_steps += 1
        self.checkpointer.wait()  # a pending background save was taken at a good step: publish it either way
        if self.bad_steps <= self.cfg.training.max_bad_steps:
            self.logger.info(
                f"step {self.step + 1}: non-finite loss, step skipped "
                f"({self.bad_steps} of training.max_bad_steps={self.cfg.training.max_bad_steps})"
            )
            return
        kept = self.last_checkpoint.name if self.last_checkpoint is not None else "none (no checkpoint yet)"
        raise UserError(
            f"non-finite loss at step {self.step + 1} (bad steps so far: {self.bad_steps}, "
            f"training.max_bad_steps={self.cfg.training.max_bad_steps}); stopped without saving, the latest "
            f"checkpoint stays {kept}. Lower the learning rates (training.lr_*), check the data, or allow skipping "
            "with training.max_bad_steps"
        )

    def optimizer_step(self) -> None:
        """The update at the accumulation boundary: clipping, AdamW, schedule (inside DeepSpeed)."""
        self.engine.ds_engine.step()

    # -- validation -----------------------------------------------------------------------------------------------
    def maybe_eval(self) -> dict[str, float] | None:
        every = self.cfg.training.eval_every
        if self.parts.val_loader is None or every <= 0:
            return None
        if self.step % every != 0 and self.step != self.total_steps:
            return None
        return self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The full validation split, every sample once over all ranks; sums reduced across ranks."""
        val_loader = self.parts.val_loader
        if val_loader is None:
            raise ValueError("evaluate() needs the stage's validation stream (StageParts.val_loader is None)")
        self.engine.set_train(False)
        zero3 = self.cfg.distributed.zero_stage == 3
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Deterministic validation (stage-2 noise and timesteps), without moving the training RNG.
            torch.manual_seed(validation_seed(self.cfg.run.seed, self.env.rank))
            batches = iter(val_loader)
            while True:
                batch = next(batches, None)
                if not self._any_rank(batch is not None):
                    break
                if batch is None:
                    if zero3 and self._last_batch is not None:
                        self.engine.ds_engine(self._last_batch)  # join the collective parameter gathers
                    continue
                out = self.engine.ds_engine(self.engine.prepare_batch(batch))
                n = float(len(batch["label"]))
                for key, value in out.items():
                    if not key.startswith("metrics/"):
                        sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + float(value) * n
                correct += float(out.get("metrics/accuracy", 0.0)) * n
                count += n
        keys = self._loss_keys  # the task's terms: the same on every rank, even one that validated nothing
        vector = torch.stack([sums.get(k, torch.zeros((), dtype=torch.float64)) for k in keys] + [correct, count])
        vector = self._all_reduce(vector)
        total = float(vector[-1])
        self.engine.set_train(True)
        result: dict[str, float] = {"val/samples": int(total)}
        if "metrics/accuracy" in self._metric_keys:
            result["val/accuracy"] = float(vector[-2]) / max(total, 1.0)
        for key, value in zip(keys, vector[:-2].tolist(), strict=True):
            name = "val/loss" if key == "total" else f"val/loss/{key}"
            result[name] = value / max(total, 1.0)
        return result

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def maybe_checkpoint(self, final: bool = False) -> Path | None:
        every = self.cfg.training.checkpoint_every
        due = final or self.step == self.stop_step or (every > 0 and self.step % every == 0)
        fb = self.cfg.feedback
        pinned_steps = generation_steps(fb) if self.pinned else []
        due = due or self.step in pinned_steps  # the pool generates round r from the checkpoint of step g(r)
        if not due or self.step == self._saved_step:
            return None
        # ... and until round r is published, rotation keeps that checkpoint
        keep = [generation_step(fb, r) for r in range(1, fb.rounds) if not round_published(self.run_dir, r)] \
            if self.pinned else []
        state = {
            "stage": self.cfg.training.stage,
            "compat": self.compat,
            "config_digest": config_digest(self.cfg),
            "samples_seen": self.samples_seen,
            "bad_steps": self.bad_steps,
            "total_steps": self.total_steps,
            "init_from": stored_init(self.parts.init_from, self.run_dir),
            "continued_from": stored_init(self.parts.continued_from, self.run_dir),
            "epoch": self.parts.train_loader.epoch,
        }
        self.last_checkpoint = self.checkpointer.save(
            self.engine.ds_engine, self.step, state, self.parts.train_loader.state_dict(),
            keep_steps=keep,
        )
        self._saved_step = self.step
        return self.last_checkpoint

    def final_checkpoint(self) -> Path:
        """The checkpoint a stage's end hook reads the trained weights from (the final one, written before)."""
        if self.last_checkpoint is None:
            raise RuntimeError("no checkpoint has been written or restored yet; the end hook runs after the final one")
        return self.last_checkpoint

    # -- logging ----------------------------------------------------------------------------------------------------
    def maybe_log(self, terms: dict[str, torch.Tensor], val: dict[str, float] | None) -> dict[str, Any] | None:
        """Accumulate this step's terms; on a log step reduce them across ranks and write one metrics line."""
        for key, value in terms.items():
            self._window[key] = self._window[key] + value if key in self._window else value
        self._window_steps += 1
        self.logger.progress(self.step, loss=terms.get("total"), samples_per_s=self._samples_per_s)
        every = self.cfg.logging.every
        due = val is not None or self.step == self.stop_step or (every > 0 and self.step % every == 0)
        if not due:
            return None
        keys = sorted(self._window)
        means = torch.stack([self._window[k].to(torch.float64) for k in keys]) / self._window_steps
        skipped = self.parts.train_loader.stats()["skipped"]["total"]
        counts = torch.tensor([self._source_window[n] for n in self._source_names]
                              + [skipped - self._skipped_logged, self._data_wait], dtype=torch.float64)
        label_keys = [(n, k) for n in self._source_names[1:] for k in range(len(EMOTIONS))]
        labels = torch.tensor([self._label_window[key] for key in label_keys], dtype=torch.float64)
        reduced = self._all_reduce(torch.cat([means, labels, counts]))  # one collective for all
        n_means, n_labels = len(keys), len(label_keys)
        means, labels = reduced[:n_means] / self.env.world_size, reduced[n_means : n_means + n_labels]
        counts = reduced[n_means + n_labels : -1]
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        data_wait = float(reduced[-1]) / self.env.world_size
        self._samples_per_s = self._window_steps * self.global_batch / elapsed
        metrics: dict[str, Any] = {}
        for key, value in zip(keys, means.tolist(), strict=True):
            if key == "total":
                metrics["loss"] = value
            elif key.startswith("metrics/"):
                metrics[key[len("metrics/") :]] = value
            else:
                metrics[f"loss/{key}"] = value
        metrics.update({f"lr/{name}": lr for name, lr in self._step_lrs.items()})
        metrics["samples_per_s"] = self._samples_per_s
        # Share of the window's wall time the loop waited for batches (mean over ranks): > a few % is a data stall.
        metrics["data_wait_share"] = round(min(1.0, data_wait / elapsed), 4)
        metrics["samples"] = self.samples_seen
        metrics["bad_steps"] = self.bad_steps
        for name, count in zip(self._source_names, counts.tolist()[:-1], strict=True):
            metrics[f"data/samples/{name}"] = int(count)
        for (name, k), count in zip(label_keys, labels.tolist(), strict=True):
            if count:
                metrics[f"data/labels/{name}/{EMOTIONS[k]}"] = int(count)
        metrics["data/skipped"] = int(counts[-1])
        self._skipped_logged = skipped
        metrics["epoch"] = self.parts.train_loader.epoch
        metrics["time"] = round(time.time(), 3)
        if val is not None:
            metrics.update(val)
        self.logger.log(self.step, metrics)
        self._window = {}
        self._source_window = Counter()
        self._label_window = Counter()
        self._data_wait = 0.0
        self._window_steps = 0
        self._window_start = time.perf_counter()
        return metrics

    # -- collectives ------------------------------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (torch.distributed.is_initialized() and self.env.world_size > 1):
            return tensor
        buffer = tensor.to(self.reduce_device)
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        return buffer.cpu()

    def _any_rank(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self._all_reduce(value).item() > 0)
