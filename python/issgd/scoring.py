"""What the master knows about every example's gradient norm, and how norms are computed and shipped.

``ScoreBoard`` holds, for each training example, its last known norm ||g_i|| and the parameter
version (master step) it was computed with, and turns them into the sampling weights
w_i = ||g_i|| + c (docs/design.md, "The algorithm"). No example ever gets probability 0 because it is stale
or not scored yet: unscored examples get the mean weight of the scored ones, and every weight is
floored at a tiny fraction of the mean (a zero weight would drop an example whose gradient may no
longer be zero, which biases the step).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from issgd.sources import rows


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, shape (B,): logits (B, C) with classes (B,), or (B, ..., C) with (B, ...),
    averaged over the positions of each example (a sequence model's mean token loss). The CLI's loss."""
    if outputs.dim() == 2:
        return F.cross_entropy(outputs, targets, reduction="none")
    losses = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none")
    return losses.view(outputs.shape[0], -1).mean(1)


XENT = cross_entropy

# Smallest weight relative to the mean weight: keeps q_i > 0 (unbiased) while bounding 1/(N q_i).
WEIGHT_FLOOR = 1e-6


class ScoreBoard:
    """Per-example norms with their parameter versions; weights for the alias table."""

    def __init__(self, n: int, smoothing: float):
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.smoothing = float(smoothing)
        self.norms = torch.zeros(n, dtype=torch.float64)
        self.version = torch.full((n,), -1, dtype=torch.int64)  # -1: never scored

    def __len__(self) -> int:
        return self.norms.numel()

    def update(self, index: torch.Tensor, norms: torch.Tensor, version: int) -> int:
        """Record norms computed with parameters of master step ``version``. A result never
        overwrites a fresher one (results of different workers may arrive out of order).
        Returns how many entries changed."""
        index = index.to(torch.int64).cpu()
        norms = norms.detach().to(torch.float64).cpu()
        if not torch.isfinite(norms).all():
            bad = int((~torch.isfinite(norms)).nonzero()[0])
            raise FloatingPointError(f"non-finite gradient norm for example {int(index[bad])} "
                                     f"(parameters of step {version}): the model has diverged")
        newer = self.version[index] <= version
        self.norms[index[newer]] = norms[newer]
        self.version[index[newer]] = version
        return int(newer.sum())

    @property
    def scored(self) -> torch.Tensor:
        return self.version >= 0

    def weights(self) -> torch.Tensor:
        """w_i = ||g_i|| + c for scored examples, the mean scored weight for the others (1 when
        nothing is scored yet: uniform sampling), floored at WEIGHT_FLOOR x mean. float64 (N,)."""
        scored = self.scored
        w = self.norms + self.smoothing
        if not bool(scored.any()):
            return torch.ones_like(w)
        mean = w[scored].mean()
        if float(mean) <= 0:  # every scored gradient is exactly zero and c = 0: nothing to prefer
            return torch.ones_like(w)
        w = torch.where(scored, w, mean)
        return w.clamp_min(WEIGHT_FLOOR * float(mean))

    def staleness(self, step: int) -> dict[str, float]:
        """Master steps between now and the parameters each scored weight was computed with."""
        scored = self.scored
        if not bool(scored.any()):
            return {"scored_fraction": 0.0, "staleness_mean": float("nan"), "staleness_max": float("nan")}
        age = (step - self.version[scored]).double()
        return {"scored_fraction": float(scored.double().mean()), "staleness_mean": float(age.mean()),
                "staleness_max": float(age.max())}

    def state_dict(self) -> dict:
        return {"norms": self.norms.clone(), "version": self.version.clone(), "smoothing": self.smoothing}

    def load_state_dict(self, state: dict) -> None:
        if state["norms"].numel() != len(self):
            raise ValueError(f"checkpoint holds {state['norms'].numel()} weights, the data set has {len(self)} examples")
        self.norms.copy_(state["norms"])
        self.version.copy_(state["version"])


def score_in_chunks(scorer, x, y, chunk: int = 1024, loss_fn=XENT) -> torch.Tensor:
    """||g_i|| for all rows of x, chunk by chunk (bounded memory)."""
    n = len(y)
    if n == 0:
        return torch.zeros(0, device=y.device)
    return torch.cat([scorer.norms(rows(x, i, i + chunk), rows(y, i, i + chunk), loss_fn) for i in range(0, n, chunk)])


class ChunkCursor:
    """Round-robin over the chunks of a shard of example indices."""

    def __init__(self, shard: torch.Tensor, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
        self.shard = shard
        self.chunk_size = chunk_size
        self.position = 0

    def next(self) -> torch.Tensor:
        if len(self.shard) == 0:
            return self.shard
        idx = self.shard[self.position:self.position + self.chunk_size]
        self.position = (self.position + len(idx)) % len(self.shard)
        return idx


def shard_of(rank: int, workers: int, n: int) -> torch.Tensor:
    """Worker ``rank`` (1..workers) owns examples rank-1, rank-1+workers, ...: balanced shards."""
    return torch.arange(rank - 1, n, workers, dtype=torch.int64)


# ------------------------------------------------------------------ results on the wire
@dataclass
class ScoreResult:
    rank: int
    version: int
    index: torch.Tensor  # int64 (n,)
    norms: torch.Tensor  # float32 (n,)
    seconds: float  # time the worker spent scoring these examples

    _HEADER = struct.Struct("<qqqd")  # rank, version, n, seconds

    def to_bytes(self) -> bytes:
        n = self.index.numel()
        return (self._HEADER.pack(self.rank, self.version, n, self.seconds)
                + self.index.cpu().numpy().astype("<i8").tobytes()
                + self.norms.detach().cpu().numpy().astype("<f4").tobytes())

    @classmethod
    def from_bytes(cls, payload: bytes) -> ScoreResult:
        rank, version, n, seconds = cls._HEADER.unpack_from(payload)
        offset = cls._HEADER.size
        if len(payload) != offset + 12 * n:
            raise ValueError(f"malformed score result: {len(payload)} bytes for {n} examples")
        index = np.frombuffer(payload, dtype="<i8", count=n, offset=offset)
        norms = np.frombuffer(payload, dtype="<f4", count=n, offset=offset + 8 * n)
        return cls(rank, version, torch.from_numpy(index.copy()), torch.from_numpy(norms.copy()), seconds)
