"""nn.Conv1d/2d/3d: the conv op on the module's own geometry (kernel, stride, padding, dilation, groups)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.conv_norms import conv_grad_sq_norms_impl, conv_op_args, conv_output_size, resolve_padding
from isgd_kernels.scorer.registry import LayerCapture, register_rule

_CONV_RANK = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _batched_input(cap: LayerCapture, rank: int) -> torch.Tensor:
    x = cap.first_input()
    if x.dim() != rank + 2:
        raise ValueError(f"GradNormScorer: {cap.label} got a {x.dim()}-D input {tuple(x.shape)}; the scorer "
                         f"needs the batched {rank + 2}-D form (B, C, ...); an unbatched input has no batch dim")
    return x


def _bias_sq_norms(grad_output: torch.Tensor) -> torch.Tensor:
    """||sum over positions of delta||^2 over the output channels (dim 1)."""
    return grad_output.to(accumulation_dtype(grad_output.dtype)).flatten(2).sum(2).square().sum(1)


def conv_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.Conv1d/2d/3d: the module's own kernel_size/stride/padding/dilation/groups.

    padding_mode 'reflect'/'replicate'/'circular': the module pads its input with that mode and
    convolves with padding 0; the rule does the same to the captured input, which is exact.
    Only the bias trainable: ||sum over positions of delta||^2.
    """
    module = cap.module
    x = _batched_input(cap, _CONV_RANK[type(module)])
    with_bias = cap.is_trainable("bias")
    if not cap.is_trainable("weight"):
        return _bias_sq_norms(grad_output)
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    args = conv_op_args(x, grad_output, module.kernel_size, module.stride, padding, module.dilation, module.groups,
                        backend)
    return conv_grad_sq_norms_impl(*args, with_bias, backend, "auto")


for _cls in _CONV_RANK:
    register_rule(_cls, conv_rule)


# --------------------------------------------------------------------------------- ConvTranspose

_CONV_TRANSPOSE_RANK = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def conv_transpose_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.ConvTranspose1d/2d/3d: the conv op with the roles of input and output exchanged.

    A transposed convolution y = conv_transpose(x, W) is the adjoint in its input of conv(., W), so
    <delta, conv_transpose(x, W)> = <conv(delta, W), x>, and its weight gradient is the weight gradient
    of the convolution that maps delta (C_out channels, the size of y) to x (C_in channels) with the same
    kernel, stride, padding, dilation and groups (output_padding only pads y at the far end, which that
    convolution never reads). The bias adds ||sum over positions of delta||^2, from delta itself.
    """
    module = cap.module
    x = _batched_input(cap, _CONV_TRANSPOSE_RANK[type(module)])
    sq = None
    if cap.is_trainable("weight"):
        # With stride 1 and output_padding < dilation, that convolution has more outputs than x has
        # positions; the extra ones pair with no input of the transposed convolution: x is 0 there.
        pads = resolve_padding(module.padding, module.kernel_size, module.stride, module.dilation)
        natural = conv_output_size(grad_output.shape[2:], module.kernel_size, module.stride, pads, module.dilation)
        extra = [o - size for o, size in zip(natural, x.shape[2:])]
        if any(extra):
            x = F.pad(x, [v for e in reversed(extra) for v in (0, e)])
        args = conv_op_args(grad_output, x, module.kernel_size, module.stride, module.padding, module.dilation,
                            module.groups, backend)
        sq = conv_grad_sq_norms_impl(*args, False, backend, "auto")
    if cap.is_trainable("bias"):
        bias_sq = _bias_sq_norms(grad_output)
        sq = bias_sq if sq is None else sq + bias_sq.to(sq.dtype)
    return sq


for _cls in _CONV_TRANSPOSE_RANK:
    register_rule(_cls, conv_transpose_rule)
