"""Triton kernels of the alias-table sampler (numerical contract: isgd_kernels/alias/reference.py).

Build (PSA, merge-path form). torch computes the scaled weights s, the light/heavy index lists and
their prefix sums KL (deficits, exclusive) and KH (excesses, inclusive) -- the same code as the
reference, so both produce bit-identical tables. The merged light/heavy order ("light a before heavy
b iff KL[a] < KH[b]") is then cut into independent chunks of CHUNK items:
  * _alias_split_kernel   co-ranks every chunk boundary (vectorised binary search, merge path);
  * _alias_sweep_kernel   one program per chunk: each light counts the chunk's heavies merged before
                          it (its alias), each heavy the chunk's lights before it (its threshold,
                          1 - (KL[a] - KH[b])) -- a CHUNK x CHUNK comparison tile in registers
                          instead of a sequential sweep, same result.
Draw: _alias_sample_kernel turns two int64 random words per draw into (row, coin); no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from isgd_kernels.alias.reference import alias_index_dtype, alias_prefix, alias_scale

_CHUNK = 64
_SPLIT_BLOCK = 256
_SAMPLE_BLOCK = 1024


@triton.jit
def _alias_split_kernel(kl_ptr, kh_ptr, arank_ptr, A, B, N, num_bounds, iters,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < num_bounds
    k = tl.minimum(c.to(tl.int64) * CHUNK, N)
    lo = tl.maximum(k - B, 0)
    hi = tl.minimum(k, A)
    for _ in range(iters):
        active = mask & (lo < hi)
        mid = (lo + hi) // 2
        b = k - mid - 1  # in [0, B) while active
        klv = tl.load(kl_ptr + mid, mask=active, other=0.0)
        khv = tl.load(kh_ptr + b, mask=active, other=0.0)
        light_first = klv < khv  # light `mid` is among the first k merged items
        lo = tl.where(active & light_first, mid + 1, lo)
        hi = tl.where(active & (~light_first), mid, hi)
    tl.store(arank_ptr + c, lo, mask=mask)


@triton.jit
def _alias_sweep_kernel(s_ptr, l_ptr, h_ptr, kl_ptr, kh_ptr, arank_ptr, thr_ptr, alias_ptr,
                        B, N, fallback, CHUNK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    k0 = c * CHUNK
    k1 = tl.minimum(k0 + CHUNK, N)
    a0 = tl.load(arank_ptr + c)
    a1 = tl.load(arank_ptr + c + 1)
    b0 = k0 - a0
    b1 = k1 - a1
    offs = tl.arange(0, CHUNK)
    la = a0 + offs
    lmask = la < a1
    hb = b0 + offs
    hmask = hb < b1
    klv = tl.load(kl_ptr + la, mask=lmask, other=0.0)
    khv = tl.load(kh_ptr + hb, mask=hmask, other=0.0)

    # Lights: alias = heavy number b0 + (this chunk's heavies merged before the light).
    before = (khv[None, :] <= klv[:, None]) & hmask[None, :]
    nb = b0 + tl.sum(before.to(tl.int64), axis=1)
    li = tl.load(l_ptr + la, mask=lmask, other=0)
    sl = tl.load(s_ptr + li, mask=lmask, other=0.0)
    has_heavy = nb < B
    hal = tl.load(h_ptr + nb, mask=lmask & has_heavy, other=0)
    al = tl.where(has_heavy, hal, fallback)
    tl.store(thr_ptr + li, sl, mask=lmask)
    tl.store(alias_ptr + li, al.to(alias_ptr.dtype.element_ty), mask=lmask)

    # Heavies: threshold = 1 - (KL[lights merged before it] - KH[b]); alias = next heavy.
    lbefore = (klv[:, None] < khv[None, :]) & lmask[:, None]
    na = a0 + tl.sum(lbefore.to(tl.int64), axis=0)
    klna = tl.load(kl_ptr + na, mask=hmask, other=0.0)
    th = 1.0 - (klna - khv)
    th = tl.minimum(tl.maximum(th, 0.0), 1.0)
    hj = tl.load(h_ptr + hb, mask=hmask, other=0)
    hn = tl.load(h_ptr + tl.minimum(hb + 1, B - 1), mask=hmask, other=0)
    tl.store(thr_ptr + hj, th, mask=hmask)
    tl.store(alias_ptr + hj, hn.to(alias_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _alias_sample_kernel(thr_ptr, alias_ptr, bits_ptr, out_ptr, w_ptr, mean_ptr, iw_ptr, n_draws, N,
                         WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_draws
    w0 = tl.load(bits_ptr + 2 * offs, mask=mask, other=0)
    w1 = tl.load(bits_ptr + 2 * offs + 1, mask=mask, other=0)
    # Top 53 bits of each word -> float64 in [0, 1): exact, identical on every backend.
    u0 = (w0.to(tl.uint64, bitcast=True) >> 11).to(tl.float64) * 1.1102230246251565e-16
    u1 = (w1.to(tl.uint64, bitcast=True) >> 11).to(tl.float64) * 1.1102230246251565e-16
    n64 = N.to(tl.int64)
    row = tl.minimum((u0 * n64.to(tl.float64)).to(tl.int64), n64 - 1)
    t = tl.load(thr_ptr + row, mask=mask, other=1.0)
    a = tl.load(alias_ptr + row, mask=mask, other=0).to(tl.int64)
    idx = tl.where(u1 < t, row, a)
    tl.store(out_ptr + offs, idx, mask=mask)
    if WEIGHTED:
        w = tl.load(w_ptr + idx, mask=mask, other=1.0).to(tl.float64)
        mean = tl.load(mean_ptr)
        tl.store(iw_ptr + offs, (mean / w).to(iw_ptr.dtype.element_ty), mask=mask)


def alias_build_triton(weights: torch.Tensor, threshold: torch.Tensor | None = None,
                       alias: torch.Tensor | None = None):
    """Table of validated 1-D weights (N,) -> (threshold f64 (N,), alias int32/64 (N,), mean f64 0-d).

    Pass threshold/alias to build into existing buffers. The caller validates the weights."""
    w64 = weights.detach().to(torch.float64)
    n = w64.numel()
    s, mean, argmax = alias_scale(w64)
    L, H, kl, kh = alias_prefix(s)
    A, B = L.numel(), H.numel()
    if threshold is None:
        threshold = torch.empty(n, dtype=torch.float64, device=w64.device)
    if alias is None:
        alias = torch.empty(n, dtype=alias_index_dtype(n), device=w64.device)
    num_chunks = triton.cdiv(n, _CHUNK)
    arank = torch.empty(num_chunks + 1, dtype=torch.int64, device=w64.device)
    _alias_split_kernel[(triton.cdiv(num_chunks + 1, _SPLIT_BLOCK),)](
        kl, kh, arank, A, B, n, num_chunks + 1, max(1, n.bit_length() + 1),
        CHUNK=_CHUNK, BLOCK=_SPLIT_BLOCK,
    )
    # Empty light / heavy lists still need a valid pointer.
    L_ = L if A else torch.zeros(1, dtype=torch.int64, device=w64.device)
    kh_ = kh if B else torch.zeros(1, dtype=torch.float64, device=w64.device)
    _alias_sweep_kernel[(num_chunks,)](s, L_, H, kl, kh_, arank, threshold, alias, B, n, argmax, CHUNK=_CHUNK)
    return threshold, alias, torch.tensor(mean, dtype=torch.float64, device=w64.device)


def alias_sample_triton(threshold: torch.Tensor, alias: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """bits (n, 2) int64 -> indices (n,) int64."""
    n_draws = bits.shape[0]
    out = torch.empty(n_draws, dtype=torch.int64, device=bits.device)
    if n_draws:
        _alias_sample_kernel[(triton.cdiv(n_draws, _SAMPLE_BLOCK),)](
            threshold, alias, bits, out, threshold, threshold, threshold, n_draws, threshold.numel(),
            WEIGHTED=False, BLOCK=_SAMPLE_BLOCK,
        )
    return out


def alias_sample_weighted_triton(threshold, alias, weights, mean, bits, dtype=torch.float32):
    """bits (n, 2) int64 -> (indices (n,) int64, importance weights mean / w_i (n,) of dtype)."""
    n_draws = bits.shape[0]
    out = torch.empty(n_draws, dtype=torch.int64, device=bits.device)
    iw = torch.empty(n_draws, dtype=dtype, device=bits.device)
    if n_draws:
        _alias_sample_kernel[(triton.cdiv(n_draws, _SAMPLE_BLOCK),)](
            threshold, alias, bits, out, weights, mean, iw, n_draws, threshold.numel(),
            WEIGHTED=True, BLOCK=_SAMPLE_BLOCK,
        )
    return out, iw
