"""The alias family: O(N) table build, O(1) weighted draws with replacement, unbiasing weights.

* ``AliasTable(weights)`` -- the table; ``sample(n)``, ``sample_with_weights(n)``.
* ``AliasSampler`` (alias/sampler.py) -- a drop-in for ``torch.utils.data.WeightedRandomSampler``.
* ``alias_build``, ``alias_sample``, ``alias_sample_weighted`` -- the kernels on given tables and
  random words (``torch.ops.isgd_kernels._alias_*`` on cpu/cuda).

Backends (``backend=``): "cpu" (C++ op), "cuda" (CUDA C++ op), "triton" (alias/triton.py), "torch"
(pure-torch reference, alias/reference.py), or "auto": cpu for CPU tensors; cuda, else triton, else
torch for CUDA tensors. The numerical contract shared by all of them is in ``alias/reference.py``.
"""
from __future__ import annotations

import operator

import torch

from isgd_kernels import _backend
from isgd_kernels.alias.reference import (
    alias_build_ref,
    alias_index_dtype,
    alias_sample_ref,
    alias_sample_weighted_ref,
    validate_weights,
)

__all__ = ["AliasTable", "alias_build", "alias_sample", "alias_sample_weighted", "as_weights"]

_I64_MIN = -(2**63)
_BUILD_OP = "_alias_build"


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels of the compiled ops: shapes only, so they trace under torch.compile.
# ----------------------------------------------------------------------------------------------
@_backend.register_extension_fake("_alias_build")
def _(weights):
    torch._check(weights.dim() == 1, lambda: "weights must be 1-D")
    n = weights.shape[0]
    return (
        weights.new_empty((n,), dtype=torch.float64),
        weights.new_empty((n,), dtype=alias_index_dtype(n)),
        weights.new_empty((), dtype=torch.float64),
    )


@_backend.register_extension_fake("_alias_build_into")
def _(weights, threshold, alias):
    torch._check(weights.shape == threshold.shape == alias.shape, lambda: "weights, threshold, alias: (N,)")
    return weights.new_empty((), dtype=torch.float64)


@_backend.register_extension_fake("_alias_sample")
def _(threshold, alias, bits):
    torch._check(bits.dim() == 2 and bits.shape[1] == 2, lambda: "bits must be (n, 2)")
    return bits.new_empty((bits.shape[0],), dtype=torch.int64)


@_backend.register_extension_fake("_alias_sample_weighted")
def _(threshold, alias, weights, mean, bits, dtype):
    torch._check(bits.dim() == 2 and bits.shape[1] == 2, lambda: "bits must be (n, 2)")
    n = bits.shape[0]
    return bits.new_empty((n,), dtype=torch.int64), bits.new_empty((n,), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Backend dispatch
# ----------------------------------------------------------------------------------------------
# "auto" for the sampler tries the CUDA C++ kernels before Triton on GPU (unlike the norm ops).
_SAMPLER_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _resolve_backend(backend: str, device: torch.device) -> str:
    return _backend.resolve_backend(backend, device, (_BUILD_OP,), order=_SAMPLER_AUTO_ORDER)


def _triton_module():
    from isgd_kernels.alias import triton as kernels  # imported lazily: Triton is optional

    return kernels


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
    return _draw_kernels(_resolve_backend(backend, threshold.device))[0](threshold, alias, bits)


def alias_sample_weighted(threshold: torch.Tensor, alias: torch.Tensor, weights: torch.Tensor, mean: torch.Tensor,
                          bits: torch.Tensor, dtype: torch.dtype = torch.float32, *, backend: str = "auto"):
    """(indices (n,) int64, 1 / (N q_i) (n,) of `dtype`) from a table built from `weights` (contiguous)."""
    return _draw_kernels(_resolve_backend(backend, threshold.device))[1](threshold, alias, weights, mean, bits, dtype)


def _draw_kernels(backend: str):
    """(sample, sample_weighted) of a resolved backend."""
    if backend in ("cpu", "cuda"):
        return (torch.ops.isgd_kernels._alias_sample.default, torch.ops.isgd_kernels._alias_sample_weighted.default)
    if backend == "triton":
        kernels = _triton_module()
        return kernels.alias_sample_triton, kernels.alias_sample_weighted_triton
    return alias_sample_ref, alias_sample_weighted_ref


def as_weights(weights, device=None) -> torch.Tensor:
    """A detached tensor of weights on `device` (lists, tuples, numpy arrays become float64)."""
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
        w = as_weights(weights)
        self._iw_dtype = torch.float32 if dtype is None else dtype
        if not self._iw_dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self._iw_dtype}")
        self.backend = _resolve_backend(backend, w.device)
        self._draw, self._draw_weighted = _draw_kernels(self.backend)
        self._build(w)

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

    def rebuild_(self, weights, *, copy_into: torch.Tensor | None = None) -> "AliasTable":
        """Rebuild from new weights in place (same N and device: reuses the table's buffers, which
        avoids the page-faulting of fresh allocations on CPU). Returns self.

        copy_into: a tensor of N elements that receives the new weights once they have been
        validated and built from, and that the table then keeps as its weights (AliasSampler keeps
        its own float64 copy this way without converting before the build)."""
        w = as_weights(weights, self.threshold.device)
        if w.dim() == 1 and w.numel() == self._n and w.is_floating_point():
            self._build(w, into=True)
        else:
            self._build(w)
        if copy_into is not None:
            self._weights = copy_into.copy_(self._weights)
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
