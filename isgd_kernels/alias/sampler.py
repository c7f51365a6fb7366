"""AliasSampler: a drop-in for ``torch.utils.data.WeightedRandomSampler`` on an alias table, whose
weights can be refreshed cheaply, as importance-sampled SGD needs."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

from isgd_kernels.alias import AliasTable, as_weights

__all__ = ["AliasSampler"]


class AliasSampler(Sampler):
    """Drop-in for ``torch.utils.data.WeightedRandomSampler`` (with replacement) on an alias table.

    Args:
        weights: sequence / numpy array / tensor of N non-negative weights (need not sum to 1).
        num_samples: number of indices per epoch (positive int).
        replacement: must be True (an alias table draws with replacement); False raises ValueError.
        generator: torch.Generator for reproducible draws (on the table's device).
        batch_size: if given, yield lists of ``batch_size`` indices (use as ``batch_sampler=``).
        drop_last: with batch_size, drop a last incomplete batch.
        device: where the table lives (default CPU).
        backend: see AliasTable.

    Yields python ints (or lists of ints). ``update_weights`` refreshes all or some weights; the
    table is rebuilt in place, once, before the next draw (so many small updates cost one rebuild).
    """

    def __init__(self, weights, num_samples: int, replacement: bool = True, generator=None,
                 batch_size: int | None = None, drop_last: bool = False, *, device=None, backend: str = "auto"):
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise ValueError(f"num_samples should be a positive integer value, but got num_samples={num_samples}")
        if not isinstance(replacement, bool):
            raise ValueError(f"replacement should be a boolean value, but got replacement={replacement}")
        if not replacement:
            raise ValueError(
                "AliasSampler draws with replacement only (an alias table cannot remove drawn items); "
                "use torch.utils.data.WeightedRandomSampler(weights, num_samples, replacement=False) for that")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size <= 0):
            raise ValueError(f"batch_size should be a positive integer value or None, but got batch_size={batch_size}")
        w = as_weights(weights, device)
        if w.dim() != 1:
            raise ValueError(f"weights should be a 1d sequence but given weights have shape {tuple(w.shape)}")
        # Our own float64 copy (update_weights writes into it), made in one pass.
        self._weights = w.to(torch.float64, copy=True)
        self.num_samples = num_samples
        self.replacement = replacement
        self.generator = generator
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.table = AliasTable(self._weights, backend=backend)
        self._dirty = False

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    def update_weights(self, weights, index=None) -> None:
        """Replace all weights (``index=None``), or ``weights[index] = weights`` for a subset.

        A full update is validated and rebuilt now (into the existing buffers when N is unchanged).
        A subset update checks the new values now (ValueError naming the first bad one) and marks
        the table stale; it is rebuilt before the next draw."""
        if index is None:
            w = as_weights(weights, self._weights.device)
            if w.dim() == 1 and w.numel() == self._weights.numel() and w.is_floating_point():
                # Built from the weights as given (the kernels read any float dtype) and copied into our
                # float64 buffer afterwards: converting first allocated a new N-element float64 tensor
                # and cost more than the rebuild (~40 ms at N = 1e7). The rebuild validates before
                # anything is overwritten; the table then reads our copy (the same values).
                self.table.rebuild_(w, copy_into=self._weights)
            else:
                self._weights = w.to(torch.float64, copy=True)
                self.table = AliasTable(self._weights, backend=self.table.backend)
            self._dirty = False
            return
        idx = torch.as_tensor(index, device=self._weights.device).reshape(-1)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        vals = as_weights(weights, self._weights.device).to(torch.float64).reshape(-1)
        if vals.numel() == 1 and idx.numel() != 1:
            vals = vals.expand(idx.numel())
        if vals.numel() != idx.numel():
            raise ValueError(f"update_weights: {vals.numel()} weights for {idx.numel()} indices")
        n = self._weights.numel()
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise ValueError(f"update_weights: index out of range for {n} weights")
        ok = (vals >= 0) & (vals != math.inf)
        if not bool(ok.all()):
            k = int((~ok).to(torch.uint8).argmax())
            v = float(vals[k])
            kind = "NaN" if math.isnan(v) else ("infinite" if math.isinf(v) else "negative")
            raise ValueError(f"update_weights: new weight for index {int(idx[k])} is {kind} ({v}); "
                             "weights must be finite and non-negative")
        self._weights[idx] = vals
        self._dirty = True

    def _refresh(self) -> None:
        if self._dirty:
            self.table.rebuild_(self._weights)
            self._dirty = False

    def sample_with_weights(self, n: int | None = None):
        """(indices, 1 / (N q_i)) as tensors, from the current weights."""
        self._refresh()
        return self.table.sample_with_weights(self.num_samples if n is None else n, generator=self.generator)

    def __iter__(self) -> Iterator:
        self._refresh()
        idx = self.table.sample(self.num_samples, generator=self.generator).tolist()
        if self.batch_size is None:
            yield from idx
            return
        bs = self.batch_size
        for k in range(0, len(idx), bs):
            batch = idx[k:k + bs]
            if self.drop_last and len(batch) < bs:
                return
            yield batch

    def __len__(self) -> int:
        if self.batch_size is None:
            return self.num_samples
        if self.drop_last:
            return self.num_samples // self.batch_size
        return (self.num_samples + self.batch_size - 1) // self.batch_size
