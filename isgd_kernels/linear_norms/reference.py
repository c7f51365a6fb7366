"""Pure-PyTorch reference of the Linear op (the `backend="torch"` path and the kernels' oracle).

It materializes what the fused kernels avoid (B x T x T Gram matrices, B x d_out x d_in
per-example gradients), so it is meant for correctness, not for large inputs.
"""
from __future__ import annotations

import torch

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.cost import choose_method


def linear_grad_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, bias: bool = True,
                             method: str = "auto") -> torch.Tensor:
    """Squared per-example gradient norms of a Linear layer.

    x: (B, T, d_in), grad_out: (B, T, d_out) -> (B,) in the accumulation dtype.
    """
    acc = accumulation_dtype(x.dtype)
    a, g = x.to(acc), grad_out.to(acc)
    B, T, d_in = a.shape
    resolved = choose_method(T, d_in, g.shape[2], method)
    if resolved == "outer":
        sq_g = g[:, 0].square().sum(-1)
        sq = a[:, 0].square().sum(-1) * sq_g
    elif resolved == "ghost":
        gram_g = torch.bmm(g, g.transpose(1, 2))
        sq = (torch.bmm(a, a.transpose(1, 2)) * gram_g).sum((1, 2))
    else:
        sq = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    if bias:
        sq = sq + g.sum(1).square().sum(-1)
    return sq
