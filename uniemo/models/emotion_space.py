"""The emotion space: a diagonal Gaussian per emotion and per feature stream (METHOD §4.1, D9).

Stored as sufficient statistics (count, sum, sum of squares, float64) rather than mean/std, so that the shards
seen by different ranks combine exactly by addition: ``statistics_tensor()`` is one flat float64 tensor that an
all-reduce (SUM) merges, which fixes the official code's "last rank to write wins" (METHOD §4.1 caveat, §9.9).

Shape legend: K = 8 emotions, D stream width, N draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS
from uniemo.errors import UserError

STREAMS: tuple[str, ...] = ("cls", "scene", "object")
"""Feature streams, in the order of the flat statistics tensor."""


class EmotionSpace:
    """Per-emotion, per-stream count / sum / sum of squares of understanding features (float64, CPU).

    ``dims`` maps each kept stream (a subset of ``cls``, ``scene``, ``object``; a switched-off query branch has no
    stream) to its width.
    """

    def __init__(self, dims: Mapping[str, int], num_emotions: int = NUM_EMOTIONS) -> None:
        unknown = set(dims) - set(STREAMS)
        if unknown:
            raise ValueError(
                f"unknown emotion-space streams {sorted(unknown)}; expected a subset of {STREAMS}"
            )
        if "cls" not in dims:
            raise ValueError("the emotion space needs the 'cls' stream")
        self.dims = {s: int(dims[s]) for s in STREAMS if s in dims}
        self.num_emotions = num_emotions
        self.count = {s: torch.zeros(num_emotions, dtype=torch.float64) for s in self.dims}
        self.sum = {s: torch.zeros(num_emotions, d, dtype=torch.float64) for s, d in self.dims.items()}
        self.sumsq = {s: torch.zeros(num_emotions, d, dtype=torch.float64) for s, d in self.dims.items()}

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.dims)

    # ----------------------------------------------------------------------------------------------------------
    # accumulation

    def update(self, features: Mapping[str, torch.Tensor | None], labels: torch.Tensor) -> None:
        """Add a batch: ``features[stream]`` [B,D] for each kept stream, ``labels`` emotion indices [B]."""
        labels_B = labels.detach().to("cpu", torch.long).reshape(-1)
        if labels_B.numel() and (labels_B.min() < 0 or labels_B.max() >= self.num_emotions):
            raise ValueError(f"emotion labels must lie in [0, {self.num_emotions}), got {labels_B.tolist()}")
        for stream in self.dims:
            x = features.get(stream)
            if x is None:
                raise ValueError(f"emotion-space update lacks the {stream!r} stream")
            x_BD = x.detach().to("cpu", torch.float64)
            if x_BD.shape != (labels_B.shape[0], self.dims[stream]):
                raise ValueError(
                    f"{stream} features have shape {list(x_BD.shape)}, expected "
                    f"[{labels_B.shape[0]}, {self.dims[stream]}]"
                )
            self.count[stream].index_add_(0, labels_B, torch.ones(labels_B.shape[0], dtype=torch.float64))
            self.sum[stream].index_add_(0, labels_B, x_BD)
            self.sumsq[stream].index_add_(0, labels_B, x_BD * x_BD)

    def merge(self, other: EmotionSpace) -> EmotionSpace:
        """Add another space's statistics (another shard) into this one; returns self."""
        if other.dims != self.dims or other.num_emotions != self.num_emotions:
            raise ValueError(f"cannot merge emotion spaces of dims {other.dims} into {self.dims}")
        for stream in self.dims:
            self.count[stream] += other.count[stream]
            self.sum[stream] += other.sum[stream]
            self.sumsq[stream] += other.sumsq[stream]
        return self

    def statistics_tensor(self) -> torch.Tensor:
        """All statistics as one flat float64 tensor (per stream: count [K], sum [K*D], sumsq [K*D])."""
        parts = []
        for stream in self.dims:
            parts += [self.count[stream], self.sum[stream].reshape(-1), self.sumsq[stream].reshape(-1)]
        return torch.cat(parts)

    def load_statistics_tensor(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`statistics_tensor` (e.g. after an all-reduce SUM over ranks)."""
        flat = flat.detach().to("cpu", torch.float64).reshape(-1)
        expected = sum(self.num_emotions * (1 + 2 * d) for d in self.dims.values())
        if flat.numel() != expected:
            raise ValueError(f"statistics tensor has {flat.numel()} values, expected {expected}")
        offset = 0
        for stream, d in self.dims.items():
            k = self.num_emotions
            self.count[stream] = flat[offset : offset + k].clone()
            offset += k
            self.sum[stream] = flat[offset : offset + k * d].reshape(k, d).clone()
            offset += k * d
            self.sumsq[stream] = flat[offset : offset + k * d].reshape(k, d).clone()
            offset += k * d

    # ----------------------------------------------------------------------------------------------------------
    # the Gaussians

    def counts(self, stream: str = "cls") -> torch.Tensor:
        """Samples seen per emotion, int64 [K]."""
        return self.count[stream].round().long()

    def mean(self, stream: str) -> torch.Tensor:
        """Element-wise mean per emotion, float64 [K,D]; rows of unseen emotions are 0."""
        n_K1 = self.count[stream].unsqueeze(-1)
        return torch.where(n_K1 > 0, self.sum[stream] / n_K1.clamp(min=1), torch.zeros_like(self.sum[stream]))

    def std(self, stream: str) -> torch.Tensor:
        """Element-wise unbiased standard deviation per emotion, float64 [K,D] (METHOD §4.1); 0 below 2 samples."""
        n_K1 = self.count[stream].unsqueeze(-1)
        centred = self.sumsq[stream] - self.sum[stream] ** 2 / n_K1.clamp(min=1)
        var = (centred / (n_K1 - 1).clamp(min=1)).clamp(min=0)
        return torch.where(n_K1 > 1, var.sqrt(), torch.zeros_like(var))

    def sample(
        self, emotion: int, n: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """n independent draws per stream from N(mu_k, diag sigma_k^2), float32 [n,D] (METHOD §4.2).

        Streams are drawn in the fixed order cls, scene, object from ``generator`` (same generator state, same
        draws).
        """
        if not 0 <= emotion < self.num_emotions:
            raise ValueError(f"emotion index must lie in [0, {self.num_emotions}), got {emotion}")
        if self.count["cls"][emotion] < 1:
            name = EMOTIONS[emotion] if self.num_emotions == NUM_EMOTIONS else str(emotion)
            raise UserError(
                f"the emotion space has no sample of emotion {name!r}: compute it over training "
                "data that contains this emotion"
            )
        draws = {}
        for stream, d in self.dims.items():
            mean_D = self.mean(stream)[emotion].float()
            std_D = self.std(stream)[emotion].float()
            noise_ND = torch.randn(n, d, generator=generator, device=generator.device if generator else None)
            draws[stream] = mean_D + std_D * noise_ND.cpu()
        return draws

    # ----------------------------------------------------------------------------------------------------------
    # files

    def save(self, path: str | Path) -> None:
        """Write the statistics (and, for readers, mean and std) to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {}
        for stream in self.dims:
            tensors[f"{stream}.count"] = self.count[stream].contiguous()
            tensors[f"{stream}.sum"] = self.sum[stream].contiguous()
            tensors[f"{stream}.sumsq"] = self.sumsq[stream].contiguous()
            tensors[f"{stream}.mean"] = self.mean(stream).float().contiguous()
            tensors[f"{stream}.std"] = self.std(stream).float().contiguous()
        metadata = {
            "format": "uniemo-emotion-space-1",
            "dims": json.dumps(self.dims),
            "num_emotions": str(self.num_emotions),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> EmotionSpace:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"emotion space file {str(path)!r} does not exist: compute it first "
                "(the emotion-space step after stage 2)"
            )
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "uniemo-emotion-space-1":
                raise UserError(f"{str(path)!r} is not a uniemo emotion-space file")
            space = cls(json.loads(metadata["dims"]), int(metadata["num_emotions"]))
            for stream in space.dims:
                space.count[stream] = f.get_tensor(f"{stream}.count").to(torch.float64)
                space.sum[stream] = f.get_tensor(f"{stream}.sum").to(torch.float64)
                space.sumsq[stream] = f.get_tensor(f"{stream}.sumsq").to(torch.float64)
        return space
