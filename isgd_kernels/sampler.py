"""Alias-table sampling: O(N) build, O(1) weighted draws with replacement, unbiasing weights.

* ``AliasTable(weights)`` -- the table; ``sample(n)``, ``sample_with_weights(n)``.
* ``AliasSampler(weights, num_samples, ...)`` -- a drop-in for ``torch.utils.data.WeightedRandomSampler``
  (with replacement) whose weights can be refreshed cheaply, as importance-sampled SGD needs.

Backends (``backend=``): "cpu" (C++ op), "cuda" (CUDA C++ op), "triton", "torch" (pure-torch
reference), or "auto": cpu for CPU tensors; cuda, else triton, else torch for CUDA tensors.
The numerical contract shared by all of them is in ``isgd_kernels/reference_sampler.py``.
"""
from __future__ import annotations

import math
import operator
from typing import Iterator

import torch
from torch.utils.data import Sampler

from isgd_kernels import _extension
from isgd_kernels.reference_sampler import (
    alias_build_ref,
    alias_index_dtype,
    alias_sample_ref,
    alias_sample_weighted_ref,
    validate_weights,
)

__all__ = ["AliasTable", "AliasSampler", "alias_build", "alias_sample"]

_I64_MIN = -(2**63)
_BUILD_OP = "_alias_build"


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, so the ops trace under torch.compile / FakeTensorMode.
# ----------------------------------------------------------------------------------------------
def _register_fakes() -> None:
    if _extension._C is None or not hasattr(torch.ops.isgd_kernels, "_alias_build"):
        return

    @torch.library.register_fake("isgd_kernels::_alias_build")
    def _(weights):
        n = weights.shape[0]
        return (
            weights.new_empty((n,), dtype=torch.float64),
            weights.new_empty((n,), dtype=alias_index_dtype(n)),
            weights.new_empty((), dtype=torch.float64),
        )

    @torch.library.register_fake("isgd_kernels::_alias_build_into")
    def _(weights, threshold, alias):
        return weights.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("isgd_kernels::_alias_sample")
    def _(threshold, alias, bits):
        return bits.new_empty((bits.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("isgd_kernels::_alias_sample_weighted")
    def _(threshold, alias, weights, mean, bits, dtype):
        n = bits.shape[0]
        return bits.new_empty((n,), dtype=torch.int64), bits.new_empty((n,), dtype=dtype)


_register_fakes()


# ----------------------------------------------------------------------------------------------
# Backend dispatch
# ----------------------------------------------------------------------------------------------
# "auto" for the sampler tries the CUDA C++ kernels before Triton on GPU (unlike the norm ops).
_SAMPLER_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _resolve_backend(backend: str, device: torch.device) -> str:
    return _extension.resolve_backend(backend, device, (_BUILD_OP,), order=_SAMPLER_AUTO_ORDER)


def _triton_module():
    from isgd_kernels.triton import alias as triton_alias  # imported lazily: Triton is optional

    return triton_alias


def alias_build(weights: torch.Tensor, *, backend: str = "auto"):
    """(threshold float64 (N,), alias int32/int64 (N,), mean float64 0-d) of validated-or-not weights.

    Raises ValueError for unusable weights (see AliasTable)."""
    backend = _resolve_backend(backend, weights.device)
    if backend in ("cpu", "cuda"):
        return torch.ops.isgd_kernels._alias_build(weights)
    validate_weights(weights)
    if backend == "triton":
        return _triton_module().alias_build_triton(weights)
    return alias_build_ref(weights)


def alias_sample(threshold: torch.Tensor, alias: torch.Tensor, bits: torch.Tensor, *, backend: str = "auto"):
    """Indices (n,) int64 from a table and random words bits (n, 2) int64."""
    backend = _resolve_backend(backend, threshold.device)
    if backend in ("cpu", "cuda"):
        return torch.ops.isgd_kernels._alias_sample(threshold, alias, bits)
    if backend == "triton":
        return _triton_module().alias_sample_triton(threshold, alias, bits)
    return alias_sample_ref(threshold, alias, bits)


def _as_weights(weights, device=None) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        w = weights.detach()
        return w if device is None else w.to(device)
    # Lists, tuples, numpy arrays: like WeightedRandomSampler, as float64.
    return torch.as_tensor(weights, dtype=torch.float64, device=device)


def _check_n(n) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n must be a non-negative integer, got {n!r}") from None
    if n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    return n


class AliasTable:
    """Walker/Vose alias table of non-negative weights: draws index i with probability
    q_i = w_i / sum(w), with replacement, in O(1) per draw after an O(N) build.

    Args:
        weights: 1-D tensor (or list / numpy array) of N >= 1 finite, non-negative values, not all
            zero, any floating dtype, on CPU or CUDA (the table lives on the same device).
        dtype: dtype of the importance weights returned by ``sample_with_weights`` (default float32).
        backend: "auto", "cpu", "cuda", "triton" or "torch" (see the module docstring).

    Raises ValueError naming the problem (and the first offending index) for NaN, +-inf, negative,
    all-zero, empty, non-1-D or integer weights.

    The table keeps a reference to ``weights`` (for ``probs`` and the importance weights): do not
    modify them in place afterwards; build a new table or call ``rebuild_``.
    Guarantees: a zero-weight index is never returned; all-equal weights give exactly uniform draws;
    no limit on N below 2**53 (64-bit indices); float64 thresholds.
    """

    def __init__(self, weights, *, dtype: torch.dtype | None = None, backend: str = "auto"):
        w = _as_weights(weights)
        self._iw_dtype = torch.float32 if dtype is None else dtype
        if not self._iw_dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self._iw_dtype}")
        self.backend = _resolve_backend(backend, w.device)
        self._bind()
        self._build(w)

    def _bind(self) -> None:
        if self.backend in ("cpu", "cuda"):
            self._draw = torch.ops.isgd_kernels._alias_sample.default
            self._draw_weighted = torch.ops.isgd_kernels._alias_sample_weighted.default
        elif self.backend == "triton":
            tm = _triton_module()
            self._draw = tm.alias_sample_triton
            self._draw_weighted = tm.alias_sample_weighted_triton
        else:
            self._draw = alias_sample_ref
            self._draw_weighted = alias_sample_weighted_ref

    def _build(self, w: torch.Tensor, into: bool = False) -> None:
        if self.backend in ("cpu", "cuda"):
            # The C++ ops validate (fused into the first pass on CPU) and raise ValueError.
            w = w.contiguous()
            if into:
                self.mean = torch.ops.isgd_kernels._alias_build_into(w, self.threshold, self.alias)
            else:
                self.threshold, self.alias, self.mean = torch.ops.isgd_kernels._alias_build(w)
        else:
            validate_weights(w)
            w = w.contiguous()
            if self.backend == "triton":
                out = (self.threshold, self.alias) if into else (None, None)
                self.threshold, self.alias, self.mean = _triton_module().alias_build_triton(w, *out)
            else:
                self.threshold, self.alias, self.mean = alias_build_ref(w)
        self._weights = w
        self._n = w.numel()

    def rebuild_(self, weights) -> "AliasTable":
        """Rebuild from new weights in place (same N and device: reuses the table's buffers, which
        avoids the page-faulting of fresh allocations on CPU). Returns self."""
        w = _as_weights(weights, self.threshold.device)
        if w.dim() == 1 and w.numel() == self._n and w.is_floating_point():
            self._build(w, into=True)
        else:
            self._build(w)
        return self

    # -- draws ----------------------------------------------------------------------------------
    def _bits(self, n: int, generator) -> torch.Tensor:
        # Two independent 64-bit words per draw: row word, coin word.
        return torch.empty((n, 2), dtype=torch.int64, device=self.threshold.device).random_(
            _I64_MIN, None, generator=generator)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n indices (int64, on the table's device) drawn i.i.d. from q. No host synchronisation."""
        n = _check_n(n)
        return self._draw(self.threshold, self.alias, self._bits(n, generator))

    def sample_with_weights(self, n: int, *, generator: torch.Generator | None = None):
        """(indices (n,) int64, iw (n,)) with iw = 1 / (N q_i): scale example i's loss by iw to make
        the importance-sampled gradient unbiased. iw has the table's ``dtype`` (float32 default)."""
        n = _check_n(n)
        bits = self._bits(n, generator)
        dtype = self._iw_dtype if self._iw_dtype in (torch.float32, torch.float64) else torch.float32
        idx, iw = self._draw_weighted(self.threshold, self.alias, self._weights, self.mean, bits, dtype)
        return idx, (iw if iw.dtype == self._iw_dtype else iw.to(self._iw_dtype))

    def importance_weights(self, indices: torch.Tensor) -> torch.Tensor:
        """1 / (N q_i) for given indices (e.g. those a DataLoader delivered)."""
        indices = torch.as_tensor(indices, device=self.threshold.device)
        iw = self.mean / self._weights[indices].to(torch.float64)
        return iw.to(self._iw_dtype)

    # -- properties -----------------------------------------------------------------------------
    @property
    def probs(self) -> torch.Tensor:
        """q (N,) float64: the distribution the table samples from."""
        return (self._weights.to(torch.float64) / self.mean) / self._n

    @property
    def device(self) -> torch.device:
        return self.threshold.device

    @property
    def dtype(self) -> torch.dtype:
        return self._iw_dtype

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"AliasTable(N={self._n}, device={self.device}, backend='{self.backend}')"


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
        w = _as_weights(weights, device)
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
            w = _as_weights(weights, self._weights.device)
            if w.dim() == 1 and w.numel() == self._weights.numel() and w.is_floating_point():
                # Built from the weights as given (the kernels read any float dtype) and copied into our
                # float64 buffer afterwards: converting first allocated a new N-element float64 tensor
                # and cost more than the rebuild (~40 ms at N = 1e7). The rebuild validates before
                # anything is overwritten; the table then reads our copy (the same values).
                self.table.rebuild_(w)
                self._weights.copy_(w)
                self.table._weights = self._weights
            else:
                w = w.to(torch.float64)
                self.table = AliasTable(w, backend=self.table.backend)
                self._weights = w.clone()
                self.table._weights = self._weights
            self._dirty = False
            return
        idx = torch.as_tensor(index, device=self._weights.device).reshape(-1)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        vals = _as_weights(weights, self._weights.device).to(torch.float64).reshape(-1)
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
