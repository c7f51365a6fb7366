"""The LayerNorm / RMSNorm op: per-example gradient norms of a normalization layer's elementwise affine,
``||dL_i/dw||^2 + ||dL_i/db||^2`` with dw_i = sum over positions of grad_out * x_hat and db_i = sum of grad_out.

The scorer's LayerNorm and RMSNorm rules call it on detached activations in backward. Backends:

  "cpu"   - the C++ kernel of the compiled extension (csrc/layer_norm_norms/): one pass over x and grad_out,
            the row statistics recomputed in cache, no (B, R, P) temporary
  "torch" - pure PyTorch (layer_norm_norms/reference.py), every other device
"""
from __future__ import annotations

import torch

from isgd_kernels._backend import register_extension_fake, resolve_backend
from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.layer_norm_norms.reference import layer_norm_sq_norms_ref

_OP = "_layer_norm_sq_norms"
# "auto" per device type: the C++ kernel on CPU; no GPU kernel (the composition is a few fused elementwise
# kernels and reductions there).
_AUTO_ORDER = {"cpu": ("cpu", "torch")}


def layer_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, eps: float, *, rms: bool = False,
                        weight: bool = True, bias: bool = True, backend: str = "auto") -> torch.Tensor:
    """x, grad_out: (B, R, P), P the normalized features -> (B,) float32 (float64 for float64 inputs).

    backend: "auto" (the C++ kernel on CPU, PyTorch elsewhere), "cpu" or "torch"; the scorer's other
    backends ("triton", "cuda") run the PyTorch path, as this op has no GPU kernel."""
    if backend not in ("auto", "cpu", "torch"):
        backend = "auto"
    if x.dtype != grad_out.dtype:
        acc = accumulation_dtype(x.dtype, grad_out.dtype)
        x, grad_out = x.to(acc), grad_out.to(acc)
    if resolve_backend(backend, x.device, (_OP,), _AUTO_ORDER) == "cpu":
        return torch.ops.isgd_kernels._layer_norm_sq_norms(x, grad_out, eps, rms, weight, bias)
    return layer_norm_sq_norms_ref(x, grad_out, eps, rms, weight, bias)


@register_extension_fake(_OP)
def _fake(x, grad_out, eps, rms, weight, bias):
    torch._check(x.dim() == 3 and x.shape == grad_out.shape, lambda: "x and grad_out must be one (B, R, P) shape")
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))
