"""Triton kernels for the per-example gradient norms of a Linear layer.

Shape contract for every launcher: x (B, T, d_in), grad_out (B, T, d_out), any strides;
returns (B,) float32 (float64 for float64 inputs).

* outer (T = 1):  ||g_i||^2 = ||a_i||^2 ||delta_i||^2 -- one fused read of x and grad_out.
* ghost:          ||g_i||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s). A program owns a row tile of
                  the T x T Gram matrices and sweeps the column tiles s >= t (symmetry: off-diagonal
                  tiles count twice), forming both Gram tiles in registers with tl.dot. Nothing T x T
                  reaches memory; each program writes one partial sum.
* materialize:    ||G_i^T A_i||_F^2. A program owns a row tile of the d_out x d_in per-example
                  gradient, builds each (d_out tile, d_in tile) in registers, squares and sums it.

Partial sums (B x #tiles, at most B*T/16 floats) are reduced by torch: deterministic, unlike atomics.

Portability (Triton 3.6 -- 3.9, sm_80 / sm_90; tests/test_triton_compile.py compiles every configuration):
* No loop carries a row reduction: `acc += tl.sum(tile, axis=-1)` inside a loop is what Triton's
  OptimizeThreadLocality pass rewrites, and up to 3.6 that rewrite asserts when the loop result has
  more than one use (triton-lang/triton#11682) or silently drops in-loop reads of the accumulator
  (#11836). The kernels accumulate whole tiles elementwise and reduce once, after the loop.
* Triton 3.6 has no fp64 tl.dot, and the kernels use it from 3.9 on (_triton_common.fp64_dot_supported): before
  that, USE_DOT=False makes the tile products a broadcast multiply-sum over the middle axis of a
  rank-3 tile (small tiles; see the *_config rules).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels._triton_common import dtype_constants, mm, partial_sums, tile, tl_acc_dtype, use_dot


@triton.jit
def _linear_sq_norms_outer_kernel(
    x_ptr, g_ptr, out_ptr, B, D, P,
    stride_xb, stride_xd, stride_gb, stride_gp,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        mask = row_mask[:, None] & (k0 + cols[None, :] < D)
        v = tl.load(x_ptr + rows64[:, None] * stride_xb + (k0 + cols[None, :]) * stride_xd, mask=mask, other=0.0)
        v = v.to(ACC_DTYPE)
        acc += v * v
    sq_a = tl.sum(acc, axis=1)

    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC_DTYPE)
    for k0 in range(0, P, BLOCK_K):
        mask = row_mask[:, None] & (k0 + cols[None, :] < P)
        v = tl.load(g_ptr + rows64[:, None] * stride_gb + (k0 + cols[None, :]) * stride_gp, mask=mask, other=0.0)
        v = v.to(ACC_DTYPE)
        acc += v * v
    sq_g = tl.sum(acc, axis=1)

    result = sq_a * sq_g
    if HAS_BIAS:
        result += sq_g
    tl.store(out_ptr + rows, result, mask=row_mask)


@triton.jit
def _gram_tile(base_ptr, offs_t, offs_s, T, K, stride_t, stride_k,
               ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
               USE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_T, BLOCK_T) tile of M M^T for M = base (T, K): rows offs_t, columns offs_s."""
    ks = tl.arange(0, BLOCK_K)
    gram = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + ks < K
        rows = tl.load(base_ptr + offs_t[:, None] * stride_t + (k0 + ks[None, :]) * stride_k,
                       mask=(offs_t[:, None] < T) & k_mask[None, :], other=0.0)
        cols = tl.load(base_ptr + (k0 + ks[:, None]) * stride_k + offs_s[None, :] * stride_t,
                       mask=k_mask[:, None] & (offs_s[None, :] < T), other=0.0)
        if DOT_FP32:
            rows, cols = rows.to(tl.float32), cols.to(tl.float32)
        gram = mm(rows, cols, gram, USE_DOT, DOT_PRECISION)
    return gram


@triton.jit
def _linear_sq_norms_ghost_kernel(
    x_ptr, g_ptr, partial_ptr, T, D, P,
    stride_xb, stride_xt, stride_xd, stride_gb, stride_gt, stride_gp, NUM_T_TILES,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t_tile = tl.program_id(1)
    x_b = x_ptr + b * stride_xb
    g_b = g_ptr + b * stride_gb
    offs_t = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)

    # Elementwise accumulation, reduced once after the loop (no row reduction carried by the loop).
    total = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
    for s_tile in range(t_tile, NUM_T_TILES):
        offs_s = s_tile * BLOCK_T + tl.arange(0, BLOCK_T)
        gram_a = _gram_tile(x_b, offs_t, offs_s, T, D, stride_xt, stride_xd, ACC_DTYPE, DOT_PRECISION, DOT_FP32,
                            USE_DOT, BLOCK_T, BLOCK_K)
        gram_g = _gram_tile(g_b, offs_t, offs_s, T, P, stride_gt, stride_gp, ACC_DTYPE, DOT_PRECISION, DOT_FP32,
                            USE_DOT, BLOCK_T, BLOCK_K)
        contrib = gram_a * gram_g
        if HAS_BIAS:
            contrib += gram_g  # ||sum_t delta_t||^2 = sum_{t,s} delta_t . delta_s
        weight = tl.where(s_tile == t_tile, 1.0, 2.0).to(ACC_DTYPE)
        total += weight * contrib
    tl.store(partial_ptr + b * NUM_T_TILES + t_tile, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _linear_sq_norms_materialize_kernel(
    x_ptr, g_ptr, partial_ptr, T, D, P,
    stride_xb, stride_xt, stride_xd, stride_gb, stride_gt, stride_gp, NUM_P_TILES,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p_tile = tl.program_id(1)
    x_b = x_ptr + b * stride_xb
    g_b = g_ptr + b * stride_gb
    offs_p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    ts = tl.arange(0, BLOCK_T)
    ds = tl.arange(0, BLOCK_D)

    # Squares are accumulated elementwise and reduced once after the loop: a loop-carried row
    # reduction here is what Triton <= 3.6 miscompiles (see the module docstring).
    total = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + ds < D
        grad_tile = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC_DTYPE)  # rows of G_i^T A_i
        for t0 in range(0, T, BLOCK_T):
            t_mask = t0 + ts < T
            g_t = tl.load(g_b + offs_p[:, None] * stride_gp + (t0 + ts[None, :]) * stride_gt,
                          mask=p_mask[:, None] & t_mask[None, :], other=0.0)
            a = tl.load(x_b + (t0 + ts[:, None]) * stride_xt + (d0 + ds[None, :]) * stride_xd,
                        mask=t_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_FP32:
                g_t, a = g_t.to(tl.float32), a.to(tl.float32)
            grad_tile = mm(g_t, a, grad_tile, USE_DOT, DOT_PRECISION)
        total += grad_tile * grad_tile
    result = tl.sum(tl.sum(total, axis=1), axis=0)

    if HAS_BIAS:
        bias_acc = tl.zeros([BLOCK_P, BLOCK_T], dtype=ACC_DTYPE)
        for t0 in range(0, T, BLOCK_T):
            t_mask = t0 + ts < T
            g_t = tl.load(g_b + offs_p[:, None] * stride_gp + (t0 + ts[None, :]) * stride_gt,
                          mask=p_mask[:, None] & t_mask[None, :], other=0.0)
            bias_acc += g_t.to(ACC_DTYPE)
        bias_grad = tl.sum(bias_acc, axis=1)
        result += tl.sum(bias_grad * bias_grad, axis=0)
    tl.store(partial_ptr + b * NUM_P_TILES + p_tile, result)


# Launch configurations. Each rule is a plain function of the problem shape and dtype that its launcher
# calls, returning the compile-time constants and num_warps it launches with: the ahead-of-time compile
# test (tests/test_triton_compile.py) enumerates every configuration from these same rules.

def outer_config(D: int, P: int, dtype: torch.dtype) -> dict:
    # Bandwidth-bound: ~4K elements per loop step per program keeps loads wide without spilling.
    block_k = tile(max(D, P), 16, 1024)
    return dict(BLOCK_B=max(1, min(64, 4096 // block_k)), BLOCK_K=block_k, num_warps=4)


def ghost_config(T: int, D: int, P: int, dtype: torch.dtype) -> dict:
    if not use_dot(dtype):
        # Broadcast multiply-sum: the (BLOCK_T, BLOCK_K, BLOCK_T) product lives in registers.
        return dict(USE_DOT=False, BLOCK_T=tile(T, 16, 32), BLOCK_K=4, num_warps=4)
    if dtype.itemsize > 2:
        # fp32 (tf32x3 splits each operand in two and runs three MMAs) and fp64: 64-wide tiles spill.
        return dict(USE_DOT=True, BLOCK_T=tile(T, 16, 32), BLOCK_K=tile(max(D, P), 16, 32), num_warps=4)
    block_t = tile(T, 16, 64)
    block_k = tile(max(D, P), 16, 64)
    return dict(USE_DOT=True, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=8 if block_t >= 64 else 4)


def materialize_config(T: int, D: int, P: int, dtype: torch.dtype) -> dict:
    if not use_dot(dtype):
        return dict(USE_DOT=False, BLOCK_P=tile(P, 16, 32), BLOCK_D=tile(D, 16, 32), BLOCK_T=4, num_warps=4)
    block_p = tile(P, 16, 64)
    block_d = tile(D, 16, 64)
    # fp32 (tf32x3: split operands, three MMAs) and fp64 take a shorter reduction tile: no spills.
    block_t = tile(T, 16, 64 if dtype.itemsize <= 2 else 16)
    return dict(USE_DOT=True, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_T=block_t,
                num_warps=8 if block_p * block_d >= 4096 else 4)


def linear_sq_norms_outer_triton(x: torch.Tensor, grad_out: torch.Tensor, bias: bool) -> torch.Tensor:
    """T = 1 path. x (B, 1, d_in), grad_out (B, 1, d_out) -> (B,)."""
    B, _, D = x.shape
    P = grad_out.shape[2]
    out = torch.empty(B, device=x.device, dtype=accumulation_dtype(x.dtype))
    if B == 0:
        return out
    cfg = outer_config(D, P, x.dtype)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _linear_sq_norms_outer_kernel[grid](
        x, grad_out, out, B, D, P,
        x.stride(0), x.stride(2), grad_out.stride(0), grad_out.stride(2),
        HAS_BIAS=bias, ACC_DTYPE=tl_acc_dtype(x.dtype), **cfg,
    )
    return out


def linear_sq_norms_ghost_triton(x: torch.Tensor, grad_out: torch.Tensor, bias: bool) -> torch.Tensor:
    """Ghost-norm path. x (B, T, d_in), grad_out (B, T, d_out) -> (B,): one program per (example, row tile)."""
    return _launch_tiled(_linear_sq_norms_ghost_kernel, ghost_config, "BLOCK_T", x, grad_out, bias)


def linear_sq_norms_materialize_triton(x: torch.Tensor, grad_out: torch.Tensor, bias: bool) -> torch.Tensor:
    """Tile-materialize path. x (B, T, d_in), grad_out (B, T, d_out) -> (B,): one program per (example, d_out tile)."""
    return _launch_tiled(_linear_sq_norms_materialize_kernel, materialize_config, "BLOCK_P", x, grad_out, bias)


def _launch_tiled(kernel, config, tiled_by: str, x: torch.Tensor, grad_out: torch.Tensor, bias: bool) -> torch.Tensor:
    """Launch `kernel` with the tiles of `config(T, D, P, dtype)`, one program per example and tile of the dim
    that `tiled_by` (BLOCK_T: T, BLOCK_P: d_out) blocks."""
    B, T, D = x.shape
    P = grad_out.shape[2]
    if B == 0:
        return torch.empty(0, device=x.device, dtype=accumulation_dtype(x.dtype))
    cfg = config(T, D, P, x.dtype)
    num_tiles = triton.cdiv(T if tiled_by == "BLOCK_T" else P, cfg[tiled_by])
    return partial_sums(kernel, x, grad_out, (T, D, P, *x.stride(), *grad_out.stride()), B, num_tiles,
                        HAS_BIAS=bias, **dtype_constants(x.dtype), **cfg)
