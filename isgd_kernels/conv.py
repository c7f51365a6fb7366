"""Per-example gradient norms of convolutions (nn.Conv1d/2d/3d), and their scorer rule.

im2col view (DESIGN.md section 1): for example i and group g, the unfolded input U_{i,g} is
(T, d) with T = number of output positions and d = C_in/groups * prod(kernel_size), the output
gradient G_{i,g} is (T, p) with p = C_out/groups, and the group's weight gradient is G^T U (p, d).
The squared norm of the whole weight gradient is the sum over groups,

    ||g_i||^2 = sum_g ||G_{i,g}^T U_{i,g}||_F^2 = sum_g sum_{t,s} (u_t . u_s)(delta_t . delta_s),

and the bias adds ||sum_t delta_t||^2 over all C_out channels. Each group is a Linear problem of
shape (T, d, p), so ghost vs materialize is the same FLOP rule (isgd_kernels.cost.choose_method).

Backends of `conv_grad_sq_norms`:
  "triton" - fused kernels with implicit im2col (isgd_kernels.triton.conv_norms): patches are
             gathered from x by index arithmetic inside the kernel; no unfold tensor, no per-example
             gradient, no T x T Gram matrix in memory. 1-D, 2-D and 3-D (all run as 3-D).
  "cpu"    - C++ kernel (csrc/cpu/conv_norms_cpu.cpp): parallel over (example, group), each thread
             gathering the patches of a chunk of positions into its own buffer (implicit im2col);
             materialize by AVX-512 blocks of dot products along positions (else one BLAS GEMM per
             chunk), ghost by Gram strips; memory O(threads), not O(B). On the 2-core CPU machine it
             costs about aten's batched dW of the same layers.
  "cuda"   - CUDA C++ kernel (csrc/cuda/conv_norms_cuda.cu): implicit im2col in shared memory, fp32
             (fp64) FMA on CUDA cores, ghost and materialize. Compiled and checked with nvcc, but it has
             not run on a GPU yet: the tests run it against the float64 reference where a GPU exists.
  "torch"  - the im2col path below (F.pad + unfold views + the Linear formulas), pure PyTorch, a batch
             chunk at a time so the unfolded tensor stays bounded (_TORCH_CHUNK_ELEMENTS).
  "auto"   - CUDA tensors: triton, else cuda, else torch; CPU tensors: cpu, else torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels import _extension
from isgd_kernels.cost import METHODS, choose_method
from isgd_kernels._extension import resolve_backend
from isgd_kernels.ops import _check_pair, _shape
from isgd_kernels.reference import accumulation_dtype, linear_grad_sq_norms_ref
from isgd_kernels.scorer import LayerCapture, register_rule

_OP = "conv_grad_sq_norms"
# The compiled kernel (schema in csrc/conv_norms.cpp; CPU and CUDA implementations).
_CPP_OP = "_conv_grad_sq_norms"

# Elements of the per-chunk intermediates (unfolded input + output gradient + Gram or per-example
# gradient) of the "torch" backend: 2^24 floats = 64 MiB in fp32, whatever the batch size.
_TORCH_CHUNK_ELEMENTS = 1 << 24


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


# ------------------------------------------------------------------------------ pure-torch backends

def _im2col(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
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


def _grad_rows(grad_out: torch.Tensor, groups: int) -> torch.Tensor:
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
    u = _im2col(a, kernel_size, stride, padding, dilation, groups)
    rows = _grad_rows(g, groups)
    sq = linear_grad_sq_norms_ref(u, rows, False, method).view(B, groups).sum(1)
    if bias:
        sq = sq + g.flatten(2).sum(2).square().sum(1)
    return sq


def _conv_torch_chunked(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, method):
    """The im2col path a batch chunk at a time: peak memory ~_TORCH_CHUNK_ELEMENTS, not B * T * d."""
    B = x.shape[0]
    T, d, p = group_problem(x, grad_out, kernel_size, groups)
    resolved = choose_method(T, d, p, method)
    inner = T * T if resolved == "ghost" else p * d
    per_example = groups * (T * d + T * p + inner) + x[0].numel()
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(per_example, 1))
    if step >= B:
        return conv_grad_sq_norms_ref(x, grad_out, kernel_size, stride, padding, dilation, groups, bias,
                                      method)
    return torch.cat([
        conv_grad_sq_norms_ref(x[i:i + step], grad_out[i:i + step], kernel_size, stride, padding, dilation,
                               groups, bias, method)
        for i in range(0, B, step)
    ])


# ----------------------------------------------------------------------------- backend resolution

def _cpp_op_built() -> bool:
    """False when isgd_kernels._C predates the conv kernel (a stale build of an older checkout)."""
    return _extension._C is not None and hasattr(torch.ops.isgd_kernels, _CPP_OP)


def group_problem(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, groups: int) -> tuple[int, int, int]:
    """(T, d, p) of one group's Linear problem: output positions, C_in/groups * prod(k), C_out/groups."""
    return math.prod(grad_out.shape[2:]), x.shape[1] // groups * math.prod(kernel_size), grad_out.shape[1] // groups


def _cpp_method(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, groups: int, method: str) -> str:
    """The cost rule of isgd_kernels.cost applied to one group's (T, d, p) problem."""
    return choose_method(*group_problem(x, grad_out, kernel_size, groups), method)


# ---------------------------------------------------------------------------------- the custom op

def conv_grad_sq_norms_impl(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: list[int], stride: list[int],
                            padding: list[int], dilation: list[int], groups: int, bias: bool, backend: str,
                            method: str) -> torch.Tensor:
    """The body of the custom op: x (B, C_in, *S), grad_out (B, C_out, *O), validated; padding per side
    [lo_0, hi_0, ...] -> (B,). GradNormScorer's rule calls it directly (see ops.linear_grad_sq_norms_impl)."""
    # The C++ op's name serves every backend: a build without it (stale) leaves triton / torch.
    backend = resolve_backend(backend, x.device, (_CPP_OP,))
    if x.shape[0] == 0:
        return x.new_empty(0, dtype=accumulation_dtype(x.dtype))
    if backend == "triton":
        from isgd_kernels.triton import conv_norms  # imported lazily: Triton is optional

        return conv_norms.conv_sq_norms_triton(x, grad_out, kernel_size, stride, padding, dilation, groups,
                                               bias, method)
    if backend in ("cpu", "cuda"):
        return torch.ops.isgd_kernels._conv_grad_sq_norms(x, grad_out, kernel_size, stride, padding, dilation,
                                                          groups, bias,
                                                          _cpp_method(x, grad_out, kernel_size, groups, method))
    return _conv_torch_chunked(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, method)


_conv_grad_sq_norms_op = torch.library.custom_op("isgd_kernels::conv_grad_sq_norms", mutates_args=())(
    conv_grad_sq_norms_impl)


@_conv_grad_sq_norms_op.register_fake
def _(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, backend, method):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


if _cpp_op_built():
    @torch.library.register_fake(f"isgd_kernels::{_CPP_OP}")
    def _(x, grad_out, kernel_size, stride, padding, dilation, groups, bias, method):
        return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


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
    _check_pair(x, grad_out, "x", "grad_out", _OP)
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"{_OP}: x must be (B, C_in, *spatial) with 1, 2 or 3 spatial dims, "
                         f"got x {_shape(x)}")
    n = x.dim() - 2
    if grad_out.dim() != x.dim():
        raise ValueError(f"{_OP}: x {_shape(x)} is a {n}-D convolution input but grad_out {_shape(grad_out)} "
                         f"has {grad_out.dim() - 2} spatial dims; grad_out must be (B, C_out, *out_spatial) "
                         "of the same rank")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"{_OP}: x {_shape(x)} and grad_out {_shape(grad_out)} differ in batch size")
    if backend not in ("auto",) + _extension.BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {('auto',) + _extension.BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"{_OP}: method must be one of {METHODS}, got {method!r}")
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
        raise ValueError(f"{_OP}: C_in = {c_in} of x {_shape(x)} is not divisible by groups = {groups}")
    if c_out % groups:
        raise ValueError(f"{_OP}: C_out = {c_out} of grad_out {_shape(grad_out)} is not divisible by "
                         f"groups = {groups}")
    pad = resolve_padding(padding, ks, st, dil)
    out_size = conv_output_size(x.shape[2:], ks, st, pad, dil)
    if any(o < 1 for o in out_size):
        raise ValueError(f"{_OP}: x {_shape(x)} with kernel_size {ks}, dilation {dil} and padding "
                         f"{padding!r} is smaller than the kernel (output size {tuple(out_size)})")
    if list(grad_out.shape[2:]) != out_size:
        raise ValueError(f"{_OP}: grad_out {_shape(grad_out)} has spatial size {tuple(grad_out.shape[2:])}, "
                         f"but a convolution of x {_shape(x)} with kernel_size {ks}, stride {st}, padding "
                         f"{padding!r}, dilation {dil} outputs {tuple(out_size)}")
    if x.dtype != grad_out.dtype:
        common = torch.promote_types(x.dtype, grad_out.dtype)
        x, grad_out = x.to(common), grad_out.to(common)
    return x, grad_out, list(ks), list(st), pad, list(dil), groups


# ------------------------------------------------------------------------------------ scorer rule

_CONV_RANK = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def conv_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.Conv1d/2d/3d: the module's own kernel_size/stride/padding/dilation/groups.

    padding_mode 'reflect'/'replicate'/'circular': the module pads its input with that mode and
    convolves with padding 0; the rule does the same to the captured input, which is exact.
    Only the bias trainable: ||sum over positions of delta||^2.
    """
    module = cap.module
    n = _CONV_RANK[type(module)]
    label = f"module '{cap.name}' ({type(module).__name__})"
    if not cap.inputs or not isinstance(cap.inputs[0], torch.Tensor):
        raise ValueError(f"GradNormScorer: {label} was called without a tensor as first input")
    x = cap.inputs[0]
    if x.dim() != n + 2:
        raise ValueError(f"GradNormScorer: {label} got a {x.dim()}-D input {tuple(x.shape)}; the scorer "
                         f"needs the batched {n + 2}-D form (B, C, ...); an unbatched input has no batch dim")
    with_bias = module.bias is not None and cap.trainable.get("bias", False)
    if not cap.trainable.get("weight", False):
        return grad_output.to(accumulation_dtype(grad_output.dtype)).flatten(2).sum(2).square().sum(1)
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    args = conv_op_args(x, grad_output, module.kernel_size, module.stride, padding, module.dilation, module.groups,
                        backend)
    return conv_grad_sq_norms_impl(*args, with_bias, backend, "auto")


for _cls in _CONV_RANK:
    register_rule(_cls, conv_rule)
