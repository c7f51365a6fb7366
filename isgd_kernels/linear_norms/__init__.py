"""The Linear op: per-example gradient norms of a Linear layer, `torch.ops.isgd_kernels.linear_grad_sq_norms`.

A custom op with a fake (meta) kernel, so it passes `torch.library.opcheck` and traces under
`torch.compile(fullgraph=True)`. Inside, it dispatches to one of four backends:

  "triton" - fused Triton kernels (linear_norms/triton.py; CUDA, CPU only under TRITON_INTERPRET=1)
  "cuda"   - CUDA C++ kernels of the compiled extension (csrc/linear_norms/)
  "cpu"    - C++ kernels of the compiled extension (csrc/linear_norms/)
  "torch"  - pure PyTorch (linear_norms/reference.py), materializes intermediates
  "auto"   - the fastest one available for the tensors' device

The math (outer product, ghost norm, tile-materialize) is in docs/design.md.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from isgd_kernels._backend import register_extension_fake, resolve_backend
from isgd_kernels._checks import (accumulation_dtype, check_backend_and_method, check_pair, promote_pair,
                                  shape_str)
from isgd_kernels.cost import choose_method
from isgd_kernels.linear_norms.reference import linear_grad_sq_norms_ref

# Low-level kernels per (backend, method). C++/CUDA ones are the extension's dispatcher ops.
_LINEAR_CPP_OPS = {
    "outer": "_linear_sq_norms_outer",
    "ghost": "_linear_sq_norms_ghost",
    "materialize": "_linear_sq_norms_materialize",
}


def _linear_triton(method: str) -> Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]:
    from isgd_kernels.linear_norms import triton as kernels  # imported lazily: Triton is optional

    return {
        "outer": kernels.linear_sq_norms_outer_triton,
        "ghost": kernels.linear_sq_norms_ghost_triton,
        "materialize": kernels.linear_sq_norms_materialize_triton,
    }[method]


def linear_grad_sq_norms_impl(x: torch.Tensor, grad_out: torch.Tensor, bias: bool, backend: str,
                              method: str) -> torch.Tensor:
    """The body of the custom op: x (B, T, d_in), grad_out (B, T, d_out), validated -> (B,).

    GradNormScorer's rules call it directly (eager, on detached activations inside backward): the
    custom-op wrapper costs about as much as a small layer's kernel."""
    B, T, d_in = x.shape
    resolved = choose_method(T, d_in, grad_out.shape[2], method)
    ops = (_LINEAR_CPP_OPS[resolved],)
    backend = resolve_backend(backend, x.device, ops)
    if backend == "torch":
        return linear_grad_sq_norms_ref(x, grad_out, bias, method)
    if backend == "triton":
        return _linear_triton(resolved)(x, grad_out, bias)
    if backend == "cpu" and resolved == "materialize" and T >= _CPU_GEMM_MIN_T:
        return _materialize_by_gemm(x, grad_out, bias)
    return getattr(torch.ops.isgd_kernels, ops[0])(x, grad_out, bias)


# From this many positions on, the CPU materialize path forms each example's gradient with the BLAS batched
# GEMM (the weight-gradient GEMM of a training step, one example at a time) and squares it, instead of the
# fused kernel: at T = 1024 the GEMM was 1.3-3x faster on the 2-core machine, at T <= 256 slower
# (benchmarks/README.md, "CPU kernel tuning measurements").
_CPU_GEMM_MIN_T = 512
_GEMM_CHUNK_BYTES = 1 << 26  # per-example gradients held at once


def _materialize_by_gemm(x: torch.Tensor, grad_out: torch.Tensor, bias: bool) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    a, g = x.to(acc), grad_out.to(acc)
    B, _, d_in = a.shape
    per_example = d_in * g.shape[2] * a.element_size()
    chunk = max(1, min(B, _GEMM_CHUNK_BYTES // per_example))
    out = a.new_empty(B)
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        out[start:stop] = torch.bmm(g[start:stop].transpose(1, 2), a[start:stop]).square().sum((1, 2))
    if bias:
        out += g.sum(1).square().sum(-1)
    return out


_linear_grad_sq_norms_op = torch.library.custom_op("isgd_kernels::linear_grad_sq_norms", mutates_args=())(
    linear_grad_sq_norms_impl)


def _fake_sq_norms(x, grad_out, *args):
    torch._check(x.dim() == 3 and grad_out.dim() == 3, lambda: "x and grad_out must be (B, T, d)")
    torch._check(x.shape[:2] == grad_out.shape[:2], lambda: "x and grad_out must agree on (B, T)")
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


_linear_grad_sq_norms_op.register_fake(_fake_sq_norms)
for _name in _LINEAR_CPP_OPS.values():
    register_extension_fake(_name)(_fake_sq_norms)


def linear_grad_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, *, bias: bool = True,
                         backend: str = "auto", method: str = "auto") -> torch.Tensor:
    """Squared L2 norm of each example's gradient of a Linear layer's weight (+ bias).

    Args:
        x: the layer's input, (B, d_in) or (B, *, d_in) (e.g. (B, T, d_in) for sequences).
        grad_out: gradient of the per-example losses w.r.t. the layer's output, (B, d_out) or
            (B, *, d_out) with the same leading dims as `x`.
        bias: include the bias gradient ``sum_t grad_out[i, t]``.
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch".
        method: for T > 1, "auto" (FLOP rule, see isgd_kernels.cost), "ghost" or "materialize".

    Returns:
        (B,) float32 (float64 for float64 inputs): ``||dL_i/dW||^2 (+ ||dL_i/db||^2)``.
        Mixed input dtypes are promoted to the wider one.
    """
    x, grad_out = linear_op_args(x, grad_out, backend, method)
    return torch.ops.isgd_kernels.linear_grad_sq_norms(x, grad_out, bias, backend, method)


def linear_op_args(x: torch.Tensor, grad_out: torch.Tensor, backend: str = "auto",
                   method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments of linear_grad_sq_norms; return x, grad_out as (B, T, d) of one dtype."""
    op = "linear_grad_sq_norms"
    check_pair(x, grad_out, "x", "grad_out", op)
    if x.dim() < 2 or grad_out.dim() < 2:
        raise ValueError(f"{op}: x and grad_out need a batch dim and a feature dim, (B, d) or (B, *, d); "
                         f"got x {shape_str(x)} and grad_out {shape_str(grad_out)}")
    if x.dim() != grad_out.dim() or x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(f"{op}: x {shape_str(x)} and grad_out {shape_str(grad_out)} must agree on every dim but "
                         "the last (batch and sequence dims)")
    check_backend_and_method(backend, method, op)
    x, grad_out = promote_pair(x, grad_out)
    # (B, *, d) -> (B, T, d): a view whenever the middle dims allow it; strides go to the kernels.
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    elif x.dim() > 3:
        x, grad_out = x.flatten(1, -2), grad_out.flatten(1, -2)
    return x, grad_out
