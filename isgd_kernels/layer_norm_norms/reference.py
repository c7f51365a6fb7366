"""Pure-PyTorch reference of the LayerNorm / RMSNorm op (the path off CPU, and the kernel's oracle).

It writes x_hat and grad_out * x_hat as (B, R, P) temporaries, which the CPU kernel never forms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from isgd_kernels._checks import accumulation_dtype


def affine_sq_norms(x_hat: torch.Tensor, delta: torch.Tensor, reduce_dim: int, weight: bool = True,
                    bias: bool = True) -> torch.Tensor:
    """Per-example ||dw||^2 (weight) + ||db||^2 (bias) of an elementwise affine y = x_hat * w + b.

    x_hat, delta: 3-D, one dtype: (B, R, P) with reduce_dim=1 (parameters on the last dim: LayerNorm) or
    (B, P, R) with reduce_dim=2 (one per channel: GroupNorm); R indexes the positions that share a parameter
    element, P the elements."""
    total = delta.new_zeros(delta.shape[0])
    if weight:
        total += (delta * x_hat).sum(reduce_dim).square().sum(1)
    if bias:
        total += delta.sum(reduce_dim).square().sum(1)
    return total


def layer_norm_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, eps: float, rms: bool = False,
                            weight: bool = True, bias: bool = True) -> torch.Tensor:
    """x, grad_out: (B, R, P) -> (B,) in the accumulation dtype: ||sum_r grad_out * x_hat||^2 (weight) +
    ||sum_r grad_out||^2 (bias), x_hat normalized over P (layer_norm, or rms_norm when `rms`)."""
    acc = accumulation_dtype(x.dtype, grad_out.dtype)
    x = x.to(acc)
    x_hat = None
    if weight:
        shape = [x.shape[-1]]
        x_hat = F.rms_norm(x, shape, None, eps) if rms else F.layer_norm(x, shape, None, None, eps)
    return affine_sq_norms(x_hat, grad_out.to(acc), 1, weight, bias)
