"""Every seed uniemo derives, in one place: the same inputs give the same seed in any process, on any machine and in
any Python run (hashes of the parts' ``repr``, never Python's salted ``hash``).

| seed of                                   | function                 | from                                   |
|-------------------------------------------|--------------------------|----------------------------------------|
| a rank's torch, Python and NumPy RNGs      | :func:`training_seed`    | ``run.seed``, rank (the trainer)       |
| the loader's shuffles, shard order, mixing | :func:`stream_seed`      | ``run.seed``, epoch, rank, worker, ... |
| a rank's validation pass                   | :func:`validation_seed`  | ``run.seed``, rank                     |
| a feedback round's candidates              | :func:`candidate_seeds`  | ``run.seed``, round, emotion           |
| a round's selection and shard order        | :func:`selection_seed`, :func:`round_shuffle_seed` | ``run.seed``, round |
| the evaluation's generated images          | :func:`evaluation_seeds` | ``evaluation.seed``, emotion, M        |
| stage 2's sample grids                     | :func:`sample_grid_seeds`| ``run.seed``, emotion                  |
| ``uniemo generate`` / ``transfer``         | :func:`request_seeds`    | ``--seed``, or drawn at random (D10)   |
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from uniemo.errors import UserError


def _hashed(parts: tuple[Any, ...], digest_size: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=digest_size).digest(), "little")


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from a tuple of parts (what ``torch.Generator().manual_seed`` and NumPy both take)."""
    return _hashed(parts, 8) % (2**31 - 1)


def stream_seed(*parts: Any) -> int:
    """A 64-bit seed from a tuple of parts, for Python's ``random.Random`` (the loader's streams)."""
    return _hashed(parts, 8)


def training_seed(run_seed: int, rank: int) -> int:
    """The seed of a rank's RNGs when a run starts (:func:`seed_everything`): ranks draw differently."""
    return _hashed((run_seed, "train", rank), 4)


def validation_seed(run_seed: int, rank: int) -> int:
    """The torch seed of a rank's validation pass (so validation never moves the training RNG)."""
    return _hashed((run_seed, "val", rank), 4)


def candidate_seeds(run_seed: int, round_index: int, emotion_index: int, num: int) -> list[int]:
    """The seeds of a feedback round's ``num`` candidates of one emotion (METHOD §5)."""
    return [derive_seed(run_seed, "feedback", round_index, emotion_index, i) for i in range(num)]


def selection_seed(run_seed: int, round_index: int, emotion_index: int) -> int:
    """The seed of a round's score-proportional selection of one emotion's kept images (METHOD §5 step 4)."""
    return derive_seed(run_seed, "feedback-select", round_index, emotion_index)


def round_shuffle_seed(run_seed: int, round_index: int) -> int:
    """The seed of the shuffle that deals a round's kept images into its shards."""
    return derive_seed(run_seed, "feedback-shards", round_index)


def evaluation_seeds(evaluation_seed: int, emotion_index: int, per_emotion: int) -> list[int]:
    """The seeds of the evaluation's ``per_emotion`` images of one emotion: ``seed + k*M + i``."""
    first = evaluation_seed + emotion_index * per_emotion
    return [first + i for i in range(per_emotion)]


def sample_grid_seeds(run_seed: int, emotion_index: int, num: int) -> list[int]:
    """The seeds of stage 2's sample grid of one emotion."""
    return [run_seed * 1000 + emotion_index * 100 + i for i in range(num)]


def request_seeds(seed: int | None, num: int) -> list[int]:
    """``seed, seed+1, ...`` for ``num`` images, or ``num`` random seeds when ``seed`` is None (D10)."""
    if seed is None:
        return random.SystemRandom().sample(range(2**31 - 1), num)
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    return [seed + i for i in range(num)]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python and NumPy."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
