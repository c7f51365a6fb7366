"""Public ops: per-example gradient norms of layers, registered as `torch.ops.isgd_kernels.*`.

Every public op is a custom op with a fake (meta) kernel, so it passes `torch.library.opcheck` and
traces under `torch.compile(fullgraph=True)`. Inside, it dispatches to one of four backends:

  "triton" - fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)
  "cuda"   - CUDA C++ kernels of the compiled extension
  "cpu"    - C++ kernels of the compiled extension
  "torch"  - pure PyTorch (isgd_kernels.reference), materializes intermediates
  "auto"   - the fastest one available for the tensors' device
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from isgd_kernels import _extension
from isgd_kernels._extension import resolve_backend
from isgd_kernels.cost import METHODS, choose_method
from isgd_kernels.reference import accumulation_dtype, linear_grad_sq_norms_ref

# Low-level kernels per (backend, method). C++/CUDA ones are the extension's dispatcher ops.
_LINEAR_CPP_OPS = {
    "outer": "_linear_sq_norms_outer",
    "ghost": "_linear_sq_norms_ghost",
    "materialize": "_linear_sq_norms_materialize",
}


def _linear_triton(method: str) -> Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]:
    from isgd_kernels.triton import linear_norms  # imported lazily: Triton is optional

    return {
        "outer": linear_norms.linear_sq_norms_outer_triton,
        "ghost": linear_norms.linear_sq_norms_ghost_triton,
        "materialize": linear_norms.linear_sq_norms_materialize_triton,
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
    return getattr(torch.ops.isgd_kernels, ops[0])(x, grad_out, bias)


_linear_grad_sq_norms_op = torch.library.custom_op("isgd_kernels::linear_grad_sq_norms", mutates_args=())(
    linear_grad_sq_norms_impl)


@_linear_grad_sq_norms_op.register_fake
def _(x, grad_out, bias, backend, method):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


def _register_extension_fakes() -> None:
    if _extension._C is None:
        return
    for name in _LINEAR_CPP_OPS.values():
        @torch.library.register_fake(f"isgd_kernels::{name}")
        def _fake(x, grad_out, bias):
            return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


_register_extension_fakes()


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_pair(x, grad_out, name_x: str, name_g: str, op: str) -> None:
    for name, t in ((name_x, x), (name_g, grad_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                             f"got {t.dtype}")
    if x.device != grad_out.device:
        raise ValueError(f"{op}: {name_x} is on {x.device} but {name_g} is on {grad_out.device}; "
                         "move both to the same device")


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
    _check_pair(x, grad_out, "x", "grad_out", op)
    if x.dim() < 2 or grad_out.dim() < 2:
        raise ValueError(f"{op}: x and grad_out need a batch dim and a feature dim, (B, d) or (B, *, d); "
                         f"got x {_shape(x)} and grad_out {_shape(grad_out)}")
    if x.dim() != grad_out.dim() or x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(f"{op}: x {_shape(x)} and grad_out {_shape(grad_out)} must agree on every dim but the "
                         "last (batch and sequence dims)")
    if backend not in ("auto",) + _extension.BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + _extension.BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    if x.dtype != grad_out.dtype:
        common = torch.promote_types(x.dtype, grad_out.dtype)
        x, grad_out = x.to(common), grad_out.to(common)
    # (B, *, d) -> (B, T, d): a view whenever the middle dims allow it; strides go to the kernels.
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    elif x.dim() > 3:
        x, grad_out = x.flatten(1, -2), grad_out.flatten(1, -2)
    return x, grad_out
