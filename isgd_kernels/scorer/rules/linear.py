"""nn.Linear: the Linear op on the captured input and output gradient, (B, d) or batch-first (B, *, d)."""
from __future__ import annotations

import torch
from torch import nn

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.linear_norms import linear_grad_sq_norms_impl, linear_op_args
from isgd_kernels.scorer.parts import LinearPart
from isgd_kernels.scorer.registry import LayerCapture, register_rule


def linear_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    if cap.is_trainable("weight"):
        x = cap.first_input()
        return linear_grad_sq_norms_impl(*linear_op_args(x, grad_output, backend), cap.is_trainable("bias"),
                                         backend, "auto")
    # Only the bias is trainable: ||sum_t delta_t||^2.
    g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).to(accumulation_dtype(grad_output.dtype))
    return g.sum(1).square().sum(-1)


def linear_grads(cap: LayerCapture, grad_output: torch.Tensor) -> dict:
    """Example i's gradients: the weight's as its factors (a LinearPart: A_i, G_i), the bias's sum_t delta_t."""
    g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])
    grads = {}
    if cap.is_trainable("weight"):
        x = cap.first_input()
        grads["weight"] = LinearPart(x.reshape(x.shape[0], -1, x.shape[-1]), g)
    if cap.is_trainable("bias"):
        grads["bias"] = g.sum(1)
    return grads


register_rule(nn.Linear, linear_rule, grads=linear_grads)
