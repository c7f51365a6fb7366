"""nn.Linear: the Linear op on the captured input and output gradient, (B, d) or batch-first (B, *, d)."""
from __future__ import annotations

import torch
from torch import nn

from isgd_kernels.scorer.parts import LinearPart, linear_sq_norms
from isgd_kernels.scorer.registry import LayerCapture, register_rule


def linear_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    return linear_sq_norms(cap.first_input(), grad_output, cap.is_trainable("weight"), cap.is_trainable("bias"),
                           backend)


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
