"""Triton kernels for the per-example gradient norms of a convolution, with implicit im2col.

Shape contract of the launcher: x (B, C_in, *S), grad_out (B, C_out, *O) with 1, 2 or 3 spatial
dims, any strides; kernel_size/stride/dilation n ints, padding per side [lo_0, hi_0, ...];
returns (B,) float32 (float64 for float64 inputs).

Every rank runs as 3-D: a 1-D or 2-D convolution gets leading spatial dims of size 1 (views, no
copy), kernel 1, stride 1, padding 0. Per (example, group) the problem is the Linear one with
U (T, d), d = C_in/groups * kd*kh*kw, and G (T, p), p = C_out/groups (see isgd_kernels.conv_norms):

* Implicit im2col: U[t, k] is never stored. Row t = (od, oh, ow) gives the window corner
  (od*sd - pd, oh*sh - ph, ow*sw - pw); column k = (c, kd, kh, kw) gives the offset
  (kd*dd, kh*dh, kw*dw) and channel c. An input coordinate is corner + offset, so a tile's addresses
  are a broadcast sum of a row part and a column part; zero padding is the bounds mask (only the low
  padding shifts indices; the high padding only shows up as masked reads past the end).
* ghost:       sum_{t,s} (u_t . u_s)(delta_t . delta_s). A program owns (example, group, row tile
               of T) and sweeps column tiles s >= t (off-diagonal tiles count twice), forming both
               Gram tiles in registers with tl.dot, like the Linear ghost kernel.
* materialize: ||G^T U||_F^2. A program owns (example, group, tile of p) and builds each (p tile,
               d tile) of the group's weight gradient in registers, squares and sums it.

The bias term ||sum_t delta_t||^2 splits over the groups' channels, so each group adds its own.
Partial sums (B*groups x #tiles) are reduced by torch: deterministic, unlike atomics.
Portability (no loop-carried row reductions; fp64 without tl.dot before Triton 3.9): as in
isgd_kernels.triton.linear_norms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from isgd_kernels.cost import choose_method
from isgd_kernels._checks import accumulation_dtype
from isgd_kernels._triton_common import dtype_constants, mm, partial_sums, tile, use_dot


@triton.jit
def _out_rows(offs_t, OH, OW, SD, SH, SW, PD, PH, PW, sgd, sgh, sgw):
    """Output positions t -> window corner in the input (3 coords) and the offset of row t in grad_out."""
    ow = offs_t % OW
    oh = (offs_t // OW) % OH
    od = offs_t // (OW * OH)
    return od * SD - PD, oh * SH - PH, ow * SW - PW, od * sgd + oh * sgh + ow * sgw


@triton.jit
def _patch_cols(ks, KH, KW, KVOL, DD, DH, DW, sxc):
    """Patch columns k = (c, kd, kh, kw) -> channel offset in x and the dilated kernel offsets."""
    c = ks // KVOL
    r = ks % KVOL
    kd = r // (KH * KW)
    kh = (r // KW) % KH
    kw = r % KW
    return c * sxc, kd * DD, kh * DH, kw * DW


@triton.jit
def _gather(x_bg, rd, rh, rw, r_mask, c_off, cd, ch, cw, c_mask, D, H, W, sxd, sxh, sxw):
    """Tile of the unfolded input. Row parts (rd, rh, rw, r_mask) and column parts (c_off, cd, ch, cw,
    c_mask) come pre-shaped ([:, None] / [None, :], either way round), so one helper loads a tile and
    its transpose."""
    i_d = rd + cd
    i_h = rh + ch
    i_w = rw + cw
    mask = r_mask & c_mask & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
    off = tl.where(mask, c_off + i_d * sxd + i_h * sxh + i_w * sxw, 0)
    return tl.load(x_bg + off, mask=mask, other=0.0)


@triton.jit
def _conv_sq_norms_ghost_kernel(
    x_ptr, g_ptr, partial_ptr,
    GROUPS, CG, PG, T, K, D, H, W, OH, OW, KH, KW, KVOL,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw, NUM_T_TILES,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    t_tile = tl.program_id(1)
    b = (pid // GROUPS).to(tl.int64)
    grp = (pid % GROUPS).to(tl.int64)
    x_bg = x_ptr + b * sxb + grp * CG * sxc
    g_bg = g_ptr + b * sgb + grp * PG * sgc

    offs_t = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    td, th, tw, tg = _out_rows(offs_t, OH, OW, SD, SH, SW, PD, PH, PW, sgd, sgh, sgw)
    kr = tl.arange(0, BLOCK_K)
    pr = tl.arange(0, BLOCK_P)

    total = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)  # reduced once, after the loop
    for s_tile in range(t_tile, NUM_T_TILES):
        offs_s = s_tile * BLOCK_T + tl.arange(0, BLOCK_T)
        s_mask = offs_s < T
        sd, sh, sw, sg = _out_rows(offs_s, OH, OW, SD, SH, SW, PD, PH, PW, sgd, sgh, sgw)

        gram_a = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + kr
            k_mask = ks < K
            c_off, cd, ch, cw = _patch_cols(ks, KH, KW, KVOL, DD, DH, DW, sxc)
            u_t = _gather(x_bg, td[:, None], th[:, None], tw[:, None], t_mask[:, None],
                          c_off[None, :], cd[None, :], ch[None, :], cw[None, :], k_mask[None, :],
                          D, H, W, sxd, sxh, sxw)                                   # (BLOCK_T, BLOCK_K)
            u_s = _gather(x_bg, sd[None, :], sh[None, :], sw[None, :], s_mask[None, :],
                          c_off[:, None], cd[:, None], ch[:, None], cw[:, None], k_mask[:, None],
                          D, H, W, sxd, sxh, sxw)                                   # (BLOCK_K, BLOCK_T)
            if DOT_FP32:
                u_t, u_s = u_t.to(tl.float32), u_s.to(tl.float32)
            gram_a = mm(u_t, u_s, gram_a, USE_DOT, DOT_PRECISION)

        gram_g = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
        for p0 in range(0, PG, BLOCK_P):
            ps = p0 + pr
            p_mask = ps < PG
            g_t = tl.load(g_bg + tg[:, None] + ps[None, :] * sgc, mask=t_mask[:, None] & p_mask[None, :],
                          other=0.0)                                                  # (BLOCK_T, BLOCK_P)
            g_s = tl.load(g_bg + ps[:, None] * sgc + sg[None, :], mask=p_mask[:, None] & s_mask[None, :],
                          other=0.0)                                                  # (BLOCK_P, BLOCK_T)
            if DOT_FP32:
                g_t, g_s = g_t.to(tl.float32), g_s.to(tl.float32)
            gram_g = mm(g_t, g_s, gram_g, USE_DOT, DOT_PRECISION)

        contrib = gram_a * gram_g
        if HAS_BIAS:
            contrib += gram_g  # ||sum_t delta_t||^2 = sum_{t,s} delta_t . delta_s
        weight = tl.where(s_tile == t_tile, 1.0, 2.0).to(ACC_DTYPE)
        total += weight * contrib
    tl.store(partial_ptr + pid.to(tl.int64) * NUM_T_TILES + t_tile, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _conv_sq_norms_materialize_kernel(
    x_ptr, g_ptr, partial_ptr,
    GROUPS, CG, PG, T, K, D, H, W, OH, OW, KH, KW, KVOL,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw, NUM_P_TILES,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    p_tile = tl.program_id(1)
    b = (pid // GROUPS).to(tl.int64)
    grp = (pid % GROUPS).to(tl.int64)
    x_bg = x_ptr + b * sxb + grp * CG * sxc
    g_bg = g_ptr + b * sgb + grp * PG * sgc

    offs_p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < PG
    tr = tl.arange(0, BLOCK_T)
    kr = tl.arange(0, BLOCK_K)

    total = tl.zeros([BLOCK_P, BLOCK_K], dtype=ACC_DTYPE)  # squares, reduced once after the loop
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kr
        k_mask = ks < K
        c_off, cd, ch, cw = _patch_cols(ks, KH, KW, KVOL, DD, DH, DW, sxc)
        grad_tile = tl.zeros([BLOCK_P, BLOCK_K], dtype=ACC_DTYPE)  # rows of the group's G^T U
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tr
            t_mask = ts < T
            td, th, tw, tg = _out_rows(ts, OH, OW, SD, SH, SW, PD, PH, PW, sgd, sgh, sgw)
            g_t = tl.load(g_bg + offs_p[:, None] * sgc + tg[None, :], mask=p_mask[:, None] & t_mask[None, :],
                          other=0.0)                                                  # (BLOCK_P, BLOCK_T)
            u = _gather(x_bg, td[:, None], th[:, None], tw[:, None], t_mask[:, None],
                        c_off[None, :], cd[None, :], ch[None, :], cw[None, :], k_mask[None, :],
                        D, H, W, sxd, sxh, sxw)                                       # (BLOCK_T, BLOCK_K)
            if DOT_FP32:
                g_t, u = g_t.to(tl.float32), u.to(tl.float32)
            grad_tile = mm(g_t, u, grad_tile, USE_DOT, DOT_PRECISION)
        total += grad_tile * grad_tile
    result = tl.sum(tl.sum(total, axis=1), axis=0)

    if HAS_BIAS:
        bias_acc = tl.zeros([BLOCK_P, BLOCK_T], dtype=ACC_DTYPE)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tr
            t_mask = ts < T
            _, _, _, tg = _out_rows(ts, OH, OW, SD, SH, SW, PD, PH, PW, sgd, sgh, sgw)
            g_t = tl.load(g_bg + offs_p[:, None] * sgc + tg[None, :], mask=p_mask[:, None] & t_mask[None, :],
                          other=0.0)
            bias_acc += g_t.to(ACC_DTYPE)
        bias_grad = tl.sum(bias_acc, axis=1)
        result += tl.sum(bias_grad * bias_grad, axis=0)
    tl.store(partial_ptr + pid.to(tl.int64) * NUM_P_TILES + p_tile, result)


def _as_3d(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride, padding, dilation):
    """Prepend size-1 spatial dims (views) so every rank runs as a 3-D convolution."""
    extra = 3 - (x.dim() - 2)
    for _ in range(extra):
        x, grad_out = x.unsqueeze(2), grad_out.unsqueeze(2)
    ones, zeros = [1] * extra, [0] * extra
    lo_pad = [padding[2 * j] for j in range(len(kernel_size))]
    return (x, grad_out, ones + list(kernel_size), ones + list(stride), zeros + lo_pad, ones + list(dilation))


def conv_ghost_config(T: int, K: int, PG: int, dtype: torch.dtype) -> dict:
    """Tiles of the ghost kernel for a group's problem U (T, K), G (T, PG); the launcher's rule."""
    if not use_dot(dtype):
        return dict(USE_DOT=False, BLOCK_T=tile(T, 16, 32), BLOCK_K=4, BLOCK_P=4, num_warps=4)
    if dtype.itemsize > 2:
        # fp32 (tf32x3: split operands, three MMAs), fp64, and the im2col index math: wider tiles
        # spill (AOT test; 32 x 32 x 32 does with Triton 3.8).
        block_t = tile(T, 16, 32)
        return dict(USE_DOT=True, BLOCK_T=block_t, BLOCK_K=16, BLOCK_P=16, num_warps=8 if block_t >= 32 else 4)
    block_t = tile(T, 16, 64)
    return dict(USE_DOT=True, BLOCK_T=block_t, BLOCK_K=tile(K, 16, 64), BLOCK_P=tile(PG, 16, 64),
                num_warps=8 if block_t >= 64 else 4)


def conv_materialize_config(T: int, K: int, PG: int, dtype: torch.dtype) -> dict:
    """Tiles of the materialize kernel for a group's problem U (T, K), G (T, PG); the launcher's rule."""
    if not use_dot(dtype):
        return dict(USE_DOT=False, BLOCK_P=tile(PG, 16, 32), BLOCK_K=tile(K, 16, 32), BLOCK_T=4,
                    num_warps=4)
    block_p, block_k = tile(PG, 16, 64), tile(K, 16, 64)
    # fp32 (tf32x3) and fp64 take a shorter reduction tile: 32 wide they spill (AOT test).
    block_t = tile(T, 16, 64 if dtype.itemsize <= 2 else 16)
    # fp64 tiles take twice the registers: 8 warps from 2048 elements (32 x 64 spills with 4 warps).
    return dict(USE_DOT=True, BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_T=block_t,
                num_warps=8 if block_p * block_k >= (2048 if dtype.itemsize > 4 else 4096) else 4)


def conv_sq_norms_triton(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: Sequence[int],
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                         bias: bool, method: str = "auto") -> torch.Tensor:
    """x (B, C_in, *S), grad_out (B, C_out, *O), validated (see isgd_kernels.conv_norms) -> (B,)."""
    B = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    if B == 0:
        return torch.empty(0, device=x.device, dtype=acc)
    x, grad_out, ks, st, lo, dil = _as_3d(x, grad_out, kernel_size, stride, padding, dilation)
    C_in, D, H, W = x.shape[1:]
    C_out, OD, OH, OW = grad_out.shape[1:]
    cg, pg = C_in // groups, C_out // groups
    kvol = math.prod(ks)
    T, K = OD * OH * OW, cg * kvol
    # T == 1 ("outer") runs the ghost kernel: one 1x1 Gram tile is the outer-product formula.
    resolved = choose_method(T, K, pg, method)
    args = (groups, cg, pg, T, K, D, H, W, OH, OW, ks[1], ks[2], kvol, *st, *lo, *dil,
            *x.stride(), *grad_out.stride())
    if resolved == "materialize":
        kernel, cfg = _conv_sq_norms_materialize_kernel, conv_materialize_config(T, K, pg, x.dtype)
        num_tiles = triton.cdiv(pg, cfg["BLOCK_P"])
    else:
        kernel, cfg = _conv_sq_norms_ghost_kernel, conv_ghost_config(T, K, pg, x.dtype)
        num_tiles = triton.cdiv(T, cfg["BLOCK_T"])
    per_group = partial_sums(kernel, x, grad_out, args, B * groups, num_tiles, HAS_BIAS=bias,
                             **dtype_constants(x.dtype), **cfg)
    return per_group.view(B, groups).sum(1)
