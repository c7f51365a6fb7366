"""Pure-PyTorch reference of the conv op (the `backend="torch"` path and the kernels' oracle).

Explicit im2col per group (F.pad, one Tensor.unfold per spatial dim), then the Linear formulas of
linear_norms/reference.py on each group's (T, d, p) problem (docs/design.md). It materializes the
unfolded input, so the torch backend runs it a batch chunk at a time (TORCH_CHUNK_ELEMENTS).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.cost import choose_method
from isgd_kernels.linear_norms.reference import linear_grad_sq_norms_ref

# Elements of the per-chunk intermediates (unfolded input + output gradient + Gram or per-example
# gradient) of the "torch" backend: 2^24 floats = 64 MiB in fp32, whatever the batch size.
TORCH_CHUNK_ELEMENTS = 1 << 24


def group_problem(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, groups: int) -> tuple[int, int, int]:
    """(T, d, p) of one group's Linear problem: output positions, C_in/groups * prod(k), C_out/groups."""
    return math.prod(grad_out.shape[2:]), x.shape[1] // groups * math.prod(kernel_size), grad_out.shape[1] // groups


def im2col(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int) -> torch.Tensor:
    """x (B, C_in, *S) -> unfolded input (B*groups, T, C_in/groups * prod(k)).

    Column order (channel, k_0, k_1, ...) matches the weight's (C_out, C_in/groups, *k) layout.
    Works for any number of spatial dims: F.pad, then one Tensor.unfold per spatial dim over the
    dilated window span, then every dilation-th element of the window.
    """
    n = len(kernel_size)
    pad = []
    for j in reversed(range(n)):  # F.pad lists the last dim first
        pad += [padding[2 * j], padding[2 * j + 1]]
    if any(pad):
        x = F.pad(x, pad)
    for j in range(n):
        x = x.unfold(2 + j, dilation[j] * (kernel_size[j] - 1) + 1, stride[j])
    x = x[(Ellipsis,) + tuple(slice(None, None, dil) for dil in dilation)]  # (B, C, *O, *k)
    B, C = x.shape[:2]
    T = math.prod(x.shape[2:2 + n])
    K = math.prod(kernel_size)
    x = x.reshape(B, groups, C // groups, T, K).permute(0, 1, 3, 2, 4)
    return x.reshape(B * groups, T, (C // groups) * K)


def grad_rows(grad_out: torch.Tensor, groups: int) -> torch.Tensor:
    """grad_out (B, C_out, *O) -> (B*groups, T, C_out/groups)."""
    B, C = grad_out.shape[:2]
    return grad_out.reshape(B, groups, C // groups, -1).transpose(2, 3).reshape(B * groups, -1, C // groups)


def conv_grad_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: Sequence[int],
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                           groups: int, bias: bool = True, method: str = "auto") -> torch.Tensor:
    """Pure-torch oracle: explicit im2col per group, then the Linear ghost/materialize formulas.

    Arguments already resolved (padding per side, [lo_0, hi_0, ...]); x (B, C_in, *S),
    grad_out (B, C_out, *O) -> (B,) in the accumulation dtype. Materializes the unfolded input
    (prod(k) times the input) and a Gram matrix or per-example gradients: for tests and small inputs.
    """
    acc = accumulation_dtype(x.dtype)
    a, g = x.to(acc), grad_out.to(acc)
    B = a.shape[0]
    u = im2col(a, kernel_size, stride, padding, dilation, groups)
    rows = grad_rows(g, groups)
    sq = linear_grad_sq_norms_ref(u, rows, False, method).view(B, groups).sum(1)
    if bias:
        sq = sq + g.flatten(2).sum(2).square().sum(1)
    return sq


def conv_grad_sq_norms_chunked(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, method):
    """The im2col path a batch chunk at a time: peak memory ~TORCH_CHUNK_ELEMENTS, not B * T * d."""
    B = x.shape[0]
    T, d, p = group_problem(x, grad_out, kernel_size, groups)
    resolved = choose_method(T, d, p, method)
    inner = T * T if resolved == "ghost" else p * d
    per_example = groups * (T * d + T * p + inner) + x[0].numel()
    step = max(1, TORCH_CHUNK_ELEMENTS // max(per_example, 1))
    if step >= B:
        return conv_grad_sq_norms_ref(x, grad_out, kernel_size, stride, padding, dilation, groups, bias,
                                      method)
    return torch.cat([
        conv_grad_sq_norms_ref(x[i:i + step], grad_out[i:i + step], kernel_size, stride, padding, dilation,
                               groups, bias, method)
        for i in range(0, B, step)
    ])
