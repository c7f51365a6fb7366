"""The conv op: per-example gradient norms of a convolution, `torch.ops.isgd_kernels.conv_grad_sq_norms`.

Each (example, group) of a convolution is the Linear problem of its im2col view, (T, d, p) with
T output positions, d = C_in/groups * prod(kernel_size), p = C_out/groups; the squared norm of the
weight gradient is the sum over groups, and the bias adds ||sum_t delta_t||^2 (docs/design.md).
Ghost vs materialize is the Linear FLOP rule (isgd_kernels.cost) on one group's problem.

Backends of `conv_grad_sq_norms`:
  "triton" - fused kernels with implicit im2col (conv_norms/triton.py): patches are gathered from x
             by index arithmetic inside the kernel; no unfold tensor, no per-example gradient, no
             T x T Gram matrix in memory. 1-D, 2-D and 3-D (all run as 3-D).
  "cpu"    - C++ kernel (csrc/conv_norms/): parallel over (example, group), each thread gathering
             the patches of a chunk of positions into its own buffer (implicit im2col); materialize
             by AVX-512 outer products along output channels (else one BLAS GEMM per chunk), ghost by
             Gram strips; memory O(threads), not O(B).
  "cuda"   - CUDA C++ kernel (csrc/conv_norms/): implicit im2col in shared memory, fp32 (fp64) FMA on
             CUDA cores, ghost and materialize.
  "torch"  - conv_norms/reference.py: F.pad + unfold views + the Linear formulas, pure PyTorch, a
             batch chunk at a time so the unfolded tensor stays bounded.
  "auto"   - CUDA tensors: triton, else cuda, else torch; CPU tensors: cpu, else torch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from isgd_kernels._backend import register_extension_fake, resolve_backend
from isgd_kernels._checks import (accumulation_dtype, check_backend_and_method, check_pair, promote_pair,
                                  shape_str)
from isgd_kernels.conv_norms.reference import conv_grad_sq_norms_chunked, group_problem
from isgd_kernels.cost import choose_method

_OP = "conv_grad_sq_norms"
# The compiled kernel (schema in csrc/conv_norms/; CPU and CUDA implementations).
_CPP_OP = "_conv_grad_sq_norms"


# ------------------------------------------------------------------------------- argument handling

def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise ValueError(f"{_OP}: {name} must be an int or a sequence of {n} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{_OP}: {name} must be an int or a sequence of {n} ints for a {n}-D convolution "
                         f"(x has {n} spatial dims), got {value!r}")
    return value


def resolve_padding(padding, kernel_size: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int]) -> list[int]:
    """Per-side padding [lo_0, hi_0, lo_1, hi_1, ...] (spatial dims in order) as PyTorch pads.

    'valid' is no padding; 'same' pads dilation*(k-1) in total per dim, the extra element of an odd
    total on the right (high) side, and, as in PyTorch, only for stride 1.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * n)
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{_OP}: padding='same' needs stride 1 (as in PyTorch), "
                                 f"got stride {tuple(stride)}")
            out = []
            for k, dil in zip(kernel_size, dilation):
                total = dil * (k - 1)
                out += [total // 2, total - total // 2]
            return out
        raise ValueError(f"{_OP}: padding must be an int, a sequence of {n} ints, 'same' or 'valid', "
                         f"got {padding!r}")
    pad = _tuple(padding, n, "padding")
    if any(p < 0 for p in pad):
        raise ValueError(f"{_OP}: padding must be >= 0, got {pad}")
    return [p for p in pad for _ in range(2)]


def conv_output_size(in_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Output spatial size of a convolution with per-side `padding` [lo_0, hi_0, ...]."""
    return [(n + padding[2 * j] + padding[2 * j + 1] - dilation[j] * (k - 1) - 1) // stride[j] + 1
            for j, (n, k) in enumerate(zip(in_size, kernel_size))]


# ----------------------------------------------------------------------------- backend resolution

def _cpp_method(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, groups: int, method: str) -> str:
    """The cost rule of isgd_kernels.cost applied to one group's (T, d, p) problem."""
    return choose_method(*group_problem(x, grad_out, kernel_size, groups), method)


# ---------------------------------------------------------------------------------- the custom op

def conv_grad_sq_norms_impl(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: list[int], stride: list[int],
                            padding: list[int], dilation: list[int], groups: int, bias: bool, backend: str,
                            method: str) -> torch.Tensor:
    """The body of the custom op: x (B, C_in, *S), grad_out (B, C_out, *O), validated; padding per side
    [lo_0, hi_0, ...] -> (B,). GradNormScorer's rule calls it directly (see linear_norms.linear_grad_sq_norms_impl)."""
    # The C++ op's name serves every backend: a build without it (stale) leaves triton / torch.
    backend = resolve_backend(backend, x.device, (_CPP_OP,))
    if x.shape[0] == 0:
        return x.new_empty(0, dtype=accumulation_dtype(x.dtype))
    if backend == "triton":
        from isgd_kernels.conv_norms import triton as kernels  # imported lazily: Triton is optional

        return kernels.conv_sq_norms_triton(x, grad_out, kernel_size, stride, padding, dilation, groups,
                                               bias, method)
    if backend in ("cpu", "cuda"):
        return torch.ops.isgd_kernels._conv_grad_sq_norms(x, grad_out, kernel_size, stride, padding, dilation,
                                                          groups, bias,
                                                          _cpp_method(x, grad_out, kernel_size, groups, method))
    return conv_grad_sq_norms_chunked(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, method)


_conv_grad_sq_norms_op = torch.library.custom_op("isgd_kernels::conv_grad_sq_norms", mutates_args=())(
    conv_grad_sq_norms_impl)


def _fake_sq_norms(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, *args):
    torch._check(x.dim() == grad_out.dim() and x.dim() in (3, 4, 5), lambda: "x, grad_out: (B, C, *spatial)")
    torch._check(x.shape[0] == grad_out.shape[0], lambda: "x and grad_out differ in batch size")
    torch._check(len(kernel_size) == x.dim() - 2, lambda: "kernel_size must have one entry per spatial dim")
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


_conv_grad_sq_norms_op.register_fake(_fake_sq_norms)
register_extension_fake(_CPP_OP)(_fake_sq_norms)


def conv_grad_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, *, kernel_size, stride=1, padding=0,
                       dilation=1, groups: int = 1, bias: bool = True, backend: str = "auto",
                       method: str = "auto") -> torch.Tensor:
    """Squared L2 norm of each example's gradient of a convolution's weight (+ bias).

    Args:
        x: the convolution's input, (B, C_in, L), (B, C_in, H, W) or (B, C_in, D, H, W); the number
            of spatial dims n (1, 2 or 3) is the convolution's rank.
        grad_out: gradient of the per-example losses w.r.t. the convolution's output,
            (B, C_out, *out_spatial) with out_spatial the output size of these arguments.
        kernel_size, stride, dilation: int or n ints, as for nn.ConvNd.
        padding: int, n ints, 'same' (stride 1; an odd total pads one more on the right, like
            PyTorch) or 'valid'. Zero padding; for other padding modes pad x first and pass 0.
        groups: as for nn.ConvNd (C_in and C_out divisible by it; groups = C_in is depthwise).
        bias: include the bias gradient ``sum over positions of grad_out[i, c]``.
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (see the module docstring).
        method: "auto" (FLOP rule per group problem, see isgd_kernels.cost), "ghost" or "materialize".

    Returns:
        (B,) float32 (float64 for float64 inputs): ``||dL_i/dW||^2 (+ ||dL_i/db||^2)``, where the
        weight gradient of a grouped convolution is the sum over groups. Mixed input dtypes are
        promoted to the wider one.
    """
    args = conv_op_args(x, grad_out, kernel_size, stride, padding, dilation, groups, backend, method)
    return torch.ops.isgd_kernels.conv_grad_sq_norms(*args, bias, backend, method)


def conv_op_args(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
                 backend: str = "auto", method: str = "auto"):
    """Validate the arguments of conv_grad_sq_norms; return (x, grad_out, kernel_size, stride, padding per
    side, dilation, groups) as the op takes them (lists of ints, x and grad_out of one dtype)."""
    check_pair(x, grad_out, "x", "grad_out", _OP)
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"{_OP}: x must be (B, C_in, *spatial) with 1, 2 or 3 spatial dims, "
                         f"got x {shape_str(x)}")
    n = x.dim() - 2
    if grad_out.dim() != x.dim():
        raise ValueError(f"{_OP}: x {shape_str(x)} is a {n}-D convolution input but grad_out {shape_str(grad_out)} "
                         f"has {grad_out.dim() - 2} spatial dims; grad_out must be (B, C_out, *out_spatial) "
                         "of the same rank")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"{_OP}: x {shape_str(x)} and grad_out {shape_str(grad_out)} differ in batch size")
    check_backend_and_method(backend, method, _OP)
    ks = _tuple(kernel_size, n, "kernel_size")
    st = _tuple(stride, n, "stride")
    dil = _tuple(dilation, n, "dilation")
    for name, vals in (("kernel_size", ks), ("stride", st), ("dilation", dil)):
        if any(v < 1 for v in vals):
            raise ValueError(f"{_OP}: {name} must be >= 1, got {vals}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{_OP}: groups must be a positive int, got {groups!r}")
    c_in, c_out = x.shape[1], grad_out.shape[1]
    if c_in % groups:
        raise ValueError(f"{_OP}: C_in = {c_in} of x {shape_str(x)} is not divisible by groups = {groups}")
    if c_out % groups:
        raise ValueError(f"{_OP}: C_out = {c_out} of grad_out {shape_str(grad_out)} is not divisible by "
                         f"groups = {groups}")
    pad = resolve_padding(padding, ks, st, dil)
    out_size = conv_output_size(x.shape[2:], ks, st, pad, dil)
    if any(o < 1 for o in out_size):
        raise ValueError(f"{_OP}: x {shape_str(x)} with kernel_size {ks}, dilation {dil} and padding "
                         f"{padding!r} is smaller than the kernel (output size {tuple(out_size)})")
    if list(grad_out.shape[2:]) != out_size:
        raise ValueError(f"{_OP}: grad_out {shape_str(grad_out)} has spatial size {tuple(grad_out.shape[2:])}, "
                         f"but a convolution of x {shape_str(x)} with kernel_size {ks}, stride {st}, padding "
                         f"{padding!r}, dilation {dil} outputs {tuple(out_size)}")
    x, grad_out = promote_pair(x, grad_out)
    return x, grad_out, list(ks), list(st), pad, list(dil), groups


