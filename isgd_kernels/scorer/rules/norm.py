"""Normalization layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm on running statistics)
and PReLU: elementwise layers whose per-example parameter gradients are cheap to form directly.

The layer is y = x_hat * w + b with x_hat free of w and b, so per example dW = sum over the
positions that share a parameter element of delta * x_hat and db = sum of delta: a (B, |param|)
tensor each, never a per-example weight gradient larger than that. x_hat is recomputed from the
captured input in the accumulation dtype (float32; float64 when the input or grad_output is float64):
for LayerNorm and RMSNorm by the layer_norm_norms op (a fused C++ kernel on CPU), for the others with
the layer's own functional (no affine), in PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.layer_norm_norms import layer_norm_sq_norms
from isgd_kernels.layer_norm_norms.reference import affine_sq_norms
from isgd_kernels.scorer.registry import LayerCapture, register_rule


def _input_shaped_like(cap: LayerCapture, grad_output: torch.Tensor) -> torch.Tensor:
    """The captured input, which an elementwise-affine layer must have in the output's shape."""
    x = cap.first_input()
    if x.shape != grad_output.shape:
        raise ValueError(f"GradNormScorer: {cap.label}: input {tuple(x.shape)} and gradient of "
                         f"output {tuple(grad_output.shape)} differ in shape")
    return x


# ---------------------------------------------------------------------------- LayerNorm / RMSNorm

def _last_dims_rule(cap: LayerCapture, grad_output: torch.Tensor, eps: float, rms: bool,
                    backend: str) -> torch.Tensor:
    x = _input_shaped_like(cap, grad_output)
    shape = tuple(cap.module.normalized_shape)
    if x.dim() <= len(shape):
        raise ValueError(
            f"GradNormScorer: {cap.label} normalizes over the last {len(shape)} dims {shape} of an "
            f"input {tuple(x.shape)} that has no batch dim outside them, so it mixes examples; feed it "
            f"(B, ..., {', '.join(map(str, shape))}).")
    p, batch = math.prod(shape), x.shape[0]
    return layer_norm_sq_norms(x.reshape(batch, -1, p), grad_output.reshape(batch, -1, p), eps, rms=rms,
                               weight=cap.is_trainable("weight"), bias=cap.is_trainable("bias"), backend=backend)


def layer_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.LayerNorm: dW_i = sum over the non-normalized positions of delta * x_hat, db_i = sum of delta."""
    return _last_dims_rule(cap, grad_output, cap.module.eps, False, backend)


def rms_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.RMSNorm: dW_i = sum over the non-normalized positions of delta * x / rms(x).

    eps=None is the epsilon of the op-math type (float32 for fp16/bf16/fp32 inputs, float64 for float64),
    which is what PyTorch's forward used."""
    eps = cap.module.eps
    if eps is None:
        eps = torch.finfo(accumulation_dtype(cap.first_input().dtype)).eps
    return _last_dims_rule(cap, grad_output, eps, True, backend)


# ------------------------------------------------------------------ GroupNorm / InstanceNorm / BatchNorm

def _channel_rule(cap: LayerCapture, grad_output: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
                  acc: torch.dtype) -> torch.Tensor:
    batch, channels = x.shape[0], x.shape[1]
    return affine_sq_norms(x_hat.reshape(batch, channels, -1), grad_output.to(acc).reshape(batch, channels, -1), 2,
                           cap.is_trainable("weight"), cap.is_trainable("bias"))


def _running_stats_x_hat(module: nn.Module, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(acc).view(view)
    var = module.running_var.to(acc).view(view)
    return (x - mean) * torch.rsqrt(var + module.eps)


def group_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.GroupNorm: per channel c, dW_i[c] = sum over positions of delta * x_hat, db_i[c] = sum of delta."""
    x = _input_shaped_like(cap, grad_output)
    acc = accumulation_dtype(x.dtype, grad_output.dtype)
    x_hat = F.group_norm(x.to(acc), cap.module.num_groups, None, None, cap.module.eps)
    return _channel_rule(cap, grad_output, x, x_hat, acc)


_INSTANCE_NORM_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def instance_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.InstanceNorm{1,2,3}d, affine: per-channel dW/db as for GroupNorm.

    Both of PyTorch's modes are exact: per-(example, channel) statistics (training mode, or
    track_running_stats=False) and running statistics (eval mode with track_running_stats=True).
    """
    module = cap.module
    x = _input_shaped_like(cap, grad_output)
    want = _INSTANCE_NORM_DIMS[type(module)]
    if x.dim() != want:
        raise ValueError(
            f"GradNormScorer: {cap.label} got a {x.dim()}-D input {tuple(x.shape)}; the scorer "
            f"needs the batched {want}-D form (B, C, ...): an unbatched input has no batch dim.")
    acc = accumulation_dtype(x.dtype, grad_output.dtype)
    if module.training or not module.track_running_stats:
        x_hat = F.instance_norm(x.to(acc), None, None, None, None, True, 0.0, module.eps)
    else:
        x_hat = _running_stats_x_hat(module, x.to(acc), acc)
    return _channel_rule(cap, grad_output, x, x_hat, acc)


def batch_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.BatchNorm{1,2,3}d with running statistics: x_hat = (x - running_mean) / sqrt(running_var + eps),
    per-channel dW/db as for GroupNorm. Batch statistics mix examples and are refused."""
    module = cap.module
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"GradNormScorer: {cap.label} has track_running_stats=False, so it normalizes with "
            "batch statistics even in eval mode: every example's output depends on the whole batch and "
            "per-example gradients are not defined. Use track_running_stats=True and score in eval mode, or "
            "replace it with GroupNorm/LayerNorm.")
    if module.training:
        raise ValueError(
            f"GradNormScorer: {cap.label} is in training mode, where it normalizes with batch "
            "statistics and so mixes examples: per-example gradients are not defined. Score in eval mode "
            "(running statistics), or replace it with GroupNorm/LayerNorm.")
    x = _input_shaped_like(cap, grad_output)
    if x.dim() < 2:
        raise ValueError(f"GradNormScorer: {cap.label} needs a batched input (B, C, ...), got "
                         f"{tuple(x.shape)}")
    acc = accumulation_dtype(x.dtype, grad_output.dtype)
    return _channel_rule(cap, grad_output, x, _running_stats_x_hat(module, x.to(acc), acc), acc)


# --------------------------------------------------------------------------------------------- PReLU

def prelu_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.PReLU: y = max(x, 0) + a * min(x, 0), so da_i = sum of delta * min(x, 0) over the positions that
    share a slope: all of them (num_parameters = 1) or those of one channel (dim 1)."""
    x = _input_shaped_like(cap, grad_output)
    acc = accumulation_dtype(x.dtype, grad_output.dtype)
    contrib = grad_output.to(acc) * x.to(acc).clamp(max=0)
    batch = x.shape[0]
    if cap.module.num_parameters == 1:
        return contrib.reshape(batch, -1).sum(1).square()
    if x.dim() < 2 or x.shape[1] != cap.module.num_parameters:
        raise ValueError(f"GradNormScorer: {cap.label} has {cap.module.num_parameters} slopes (one per channel) "
                         f"but got input {tuple(x.shape)}: the scorer needs a batched input (B, C, ...)")
    return contrib.reshape(batch, x.shape[1], -1).sum(2).square().sum(1)


def _register_all() -> None:
    register_rule(nn.PReLU, prelu_rule)
    register_rule(nn.LayerNorm, layer_norm_rule)
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        register_rule(nn.RMSNorm, rms_norm_rule)
    register_rule(nn.GroupNorm, group_norm_rule)
    for cls in _INSTANCE_NORM_DIMS:
        register_rule(cls, instance_norm_rule)
    # SyncBatchNorm in eval mode is a plain BatchNorm on running statistics.
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        register_rule(cls, batch_norm_rule)


_register_all()
