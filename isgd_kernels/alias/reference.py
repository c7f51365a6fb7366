"""Pure-torch alias table (Walker/Vose, merge formulation of PSA): the test oracle and the fallback.

Every backend builds and draws with the same numerical contract, written down here once.

Scaling (float64).  With m = max_i w_i and pre = 1 (or 2**600 when m is so small that 1/m would
overflow):  ws_i = 1 if w_i == m else (w_i * pre) * (1 / (m * pre));   cs = max(1, N / sum(ws));
s_i = ws_i * cs, so that mean(s) = 1.  The max item has s = cs >= 1 exactly, so there is always
a heavy item; all-equal weights give identical s >= 1, i.e. every row a threshold of exactly 1.
The C++ CPU build computes s_i = min((w_i * pre) * k, cs) with k = cs / (m * pre) rounded up until
the max weight gives exactly cs (two operations per item instead of a select): the same s up to an
ulp, with the same guarantees.

Classes.  light: s < 1 (deficit d = 1 - s), heavy: s >= 1 (excess e = s - 1), each in index order.
KL[a] = sum of the deficits of the first a lights (exclusive prefix, KL[A] = total deficit),
KH[b] = sum of the excesses of heavies 0..b (inclusive prefix).

Merge.  The sequential sweep (lights in order, each filled from the current heavy; a heavy whose
residual drops to <= 1 becomes light itself and is filled from the next heavy) visits items in the
order of the two-way merge "light a before heavy b iff KL[a] < KH[b]".  That gives, per item:
  light a:  threshold s, alias = heavy number #{b : KH[b] <= KL[a]}
  heavy b:  threshold 1 - (KL[#{a : KL[a] < KH[b]}] - KH[b]) clamped to [0, 1], alias = heavy b+1
            (the last heavy aliases itself).
PSA splits the merged sequence into independent chunks by co-ranking (merge path) and sweeps each
chunk; this module evaluates the same formulas with torch.searchsorted.  (The CPU build keeps each
prefix as a compensated sum of 64-item partial sums, accurate to ~1 ulp of its magnitude; tables
agree with this module's to rounding.)  A zero-weight item is a light with threshold exactly 0, and
aliases only ever point to heavy items (s >= 1 > 0), so a zero weight can never be returned,
whatever the rounding.

Draws.  Two independent 64-bit words per draw (bits[k, 0], bits[k, 1]):
  row  = min(floor(u0 * N), N - 1),  u0 = (bits[k, 0] >>> 11) * 2**-53
  coin = (bits[k, 1] >>> 11) * 2**-53;  index = row if coin < threshold[row] else alias[row].
Importance weight of a drawn index i: 1 / (N q_i) = mean / w_i with mean = m / cs (= sum(w) / N).
"""
from __future__ import annotations

import math

import torch

_TWO_POW_M53 = 2.0 ** -53
_MANTISSA_MASK = (1 << 53) - 1
# Below this max weight, 1 / m overflows float64: weights are first scaled (exactly) by 2**600.
_TINY_MAX = 2.0 ** -960
_PRESCALE = 2.0 ** 600
# Two-level cumsum block: error ~ (block + N / block) ulps instead of N ulps for a serial scan.
_SCAN_BLOCK = 1024


def alias_index_dtype(n: int) -> torch.dtype:
    """dtype of the alias column: int32 while every index fits (12 bytes per row instead of 16)."""
    return torch.int32 if n < 2**31 else torch.int64


def validate_weights(weights: torch.Tensor) -> None:
    """Raise ValueError naming the problem (and the first offending index) for unusable weights."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor, got {type(weights).__name__}")
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D, got a tensor of shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must have a floating dtype, got {weights.dtype}")
    if weights.numel() == 0:
        raise ValueError("weights is empty: need at least one category")
    ok = (weights >= 0) & (weights != math.inf)  # NaN fails both comparisons
    if not bool(ok.all()):
        i = int((~ok).to(torch.uint8).argmax())
        v = float(weights[i])
        kind = "NaN" if math.isnan(v) else ("infinite" if math.isinf(v) else "negative")
        raise ValueError(f"weights[{i}] is {kind} ({v}); weights must be finite and non-negative")
    if not bool((weights > 0).any()):
        raise ValueError("all weights are zero: there is nothing to sample")


def _cumsum_blocked(x: torch.Tensor) -> torch.Tensor:
    """Inclusive float64 cumsum as a two-level scan (blocks, then block totals): rounding error grows
    with block + N / block instead of N, which keeps heavy thresholds accurate at N = 1e7+."""
    n = x.numel()
    if n <= _SCAN_BLOCK:
        return x.cumsum(0)
    nb = (n + _SCAN_BLOCK - 1) // _SCAN_BLOCK
    pad = torch.zeros(nb * _SCAN_BLOCK, dtype=x.dtype, device=x.device)
    pad[:n] = x
    inner = pad.view(nb, _SCAN_BLOCK).cumsum(1)
    offsets = torch.zeros(nb, dtype=x.dtype, device=x.device)
    offsets[1:] = inner[:-1, -1].cumsum(0)
    return (inner + offsets[:, None]).view(-1)[:n]


def alias_scale(w64: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """s (mean 1, float64), mean = m / cs (the unbiasing numerator), argmax index. See module doc."""
    n = w64.numel()
    m = float(w64.max())
    pre = _PRESCALE if m < _TINY_MAX else 1.0
    rinv = 1.0 / (m * pre)
    ws = torch.where(w64 == m, torch.ones_like(w64), (w64 * pre) * rinv)
    cs = max(1.0, n / float(ws.sum()))
    s = ws * cs
    argmax = int((w64 == m).to(torch.uint8).argmax())
    return s, m / cs, argmax


def alias_prefix(s: torch.Tensor):
    """Light/heavy index lists (int64) and prefix sums KLx (A + 1 entries, exclusive) and KH (B,
    inclusive) of the scaled weights s, as used by the merge formulation (shared by the Triton and
    reference builds so that both produce bit-identical tables)."""
    light = s < 1
    L = light.nonzero().view(-1)
    H = (~light).nonzero().view(-1)
    kl = torch.zeros(L.numel() + 1, dtype=torch.float64, device=s.device)
    if L.numel():
        kl[1:] = _cumsum_blocked(1.0 - s[L])
    kh = _cumsum_blocked(s[H] - 1.0) if H.numel() else torch.zeros(0, dtype=torch.float64, device=s.device)
    # A scan of non-negative terms is monotone in exact arithmetic; a parallel (GPU) scan can be off
    # by an ulp at block joins. cummax restores monotonicity, which the merge relies on.
    if kl.numel() > 1:
        kl = torch.cummax(kl, 0).values
    if kh.numel() > 1:
        kh = torch.cummax(kh, 0).values
    return L, H, kl, kh


def alias_build_ref(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the alias table of 1-D non-negative weights (N,), any float dtype, CPU or CUDA.

    Returns (threshold float64 (N,), alias int32/int64 (N,), mean float64 0-d) on weights.device,
    where mean = sum(w) / N as implied by the table (importance weight of item i: mean / w_i).
    """
    validate_weights(weights)
    w64 = weights.detach().to(torch.float64)
    n = w64.numel()
    s, mean, argmax = alias_scale(w64)
    L, H, kl, kh = alias_prefix(s)
    A, B = L.numel(), H.numel()
    threshold = torch.empty(n, dtype=torch.float64, device=w64.device)
    alias = torch.empty(n, dtype=torch.int64, device=w64.device)
    if A:
        nb = torch.searchsorted(kh, kl[:-1], right=True)  # heavies merged before each light
        threshold[L] = s[L]
        fallback = torch.full_like(nb, argmax)  # only reachable through rounding: no heavy left
        alias[L] = torch.where(nb < B, H[nb.clamp(max=B - 1)], fallback)
    na = torch.searchsorted(kl[:-1], kh, right=False)  # lights merged before each heavy
    threshold[H] = (1.0 - (kl[na] - kh)).clamp(0.0, 1.0)
    nxt = torch.arange(1, B + 1, device=w64.device).clamp(max=B - 1)
    alias[H] = H[nxt]
    return threshold, alias.to(alias_index_dtype(n)), torch.tensor(mean, dtype=torch.float64, device=w64.device)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Top 53 bits of each int64 word as a float64 in [0, 1)."""
    return ((bits >> 11) & _MANTISSA_MASK).to(torch.float64) * _TWO_POW_M53


def alias_sample_ref(threshold: torch.Tensor, alias: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Indices (n,) int64 from a table and random words bits (n, 2) int64 (row word, coin word)."""
    n = threshold.numel()
    row = (uniform_from_bits(bits[:, 0]) * n).to(torch.int64).clamp_(max=n - 1)
    coin = uniform_from_bits(bits[:, 1])
    return torch.where(coin < threshold[row], row, alias[row].to(torch.int64))


def alias_sample_weighted_ref(threshold, alias, weights, mean, bits, dtype=torch.float32):
    """(indices int64 (n,), importance weights 1 / (N q_i) (n,) of `dtype`)."""
    idx = alias_sample_ref(threshold, alias, bits)
    iw = mean.to(torch.float64) / weights[idx].to(torch.float64)
    return idx, iw.to(dtype)


def alias_implied_mass(threshold: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """Mass (in units of 1/N, float64) each item receives from a table: its own rows' thresholds plus
    the complements of the rows aliasing to it. Equals s (= N q) for a correct table."""
    t = threshold.detach().to(torch.float64)
    mass = t.clone()
    mass.index_add_(0, alias.detach().to(torch.int64), 1.0 - t)
    return mass
