"""The exact fallback for a module with trainable parameters and no rule (a custom layer, a third-party
layer, a bare parameter of the root module): slow, never wrong.

The module's forward is replayed on its captured inputs with its direct parameters as fresh leaves that
require grad; then, a chunk of examples at a time, one batched backward (``is_grads_batched``, i.e. vmap
over the cotangent) whose cotangent k holds only example k's row of the output gradient gives each
example's gradient of those parameters exactly. It needs no knowledge of how the module's inputs are
laid out, only that row i of its output belongs to example i (the scorer's batch-first contract).
Cost: a forward of the module plus B/chunk batched backward passes over it; memory chunk x |output|.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.func import functional_call

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.scorer.registry import LayerCapture

# Output-gradient elements held at once by the stacked cotangents: 2^24 floats = 64 MiB in fp32.
_CHUNK_ELEMENTS = 1 << 24
_WARNED: set[type] = set()
_REPLAYING = [False]


def replaying() -> bool:
    """True while a fallback replays a module's forward (the scorer's hooks then capture nothing)."""
    return _REPLAYING[0]


@contextlib.contextmanager
def _replay():
    _REPLAYING[0] = True
    try:
        yield
    finally:
        _REPLAYING[0] = False


def warn_once(cap: LayerCapture) -> None:
    if type(cap.module) not in _WARNED:
        _WARNED.add(type(cap.module))
        warnings.warn(
            f"GradNormScorer: {cap.label} has no per-example norm rule; its share of the norm is computed by "
            "the exact autograd fallback (a replayed forward and batched backward passes), much slower than a "
            "rule. Add a fast rule with isgd_kernels.scorer.register_rule, or pass fallback=False to refuse it.",
            stacklevel=4)


def autograd_fallback_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    module = cap.module
    leaves = {name: getattr(module, name).detach().requires_grad_(True)
              for name, trainable in cap.trainable.items() if trainable}
    with torch.enable_grad(), _replay():
        output = functional_call(module, leaves, cap.inputs, cap.kwargs, strict=False)
    if not isinstance(output, torch.Tensor) or output.shape != grad_output.shape:
        raise ValueError(f"GradNormScorer: {cap.label}: replaying its forward gave "
                         f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}, "
                         f"not the output {tuple(grad_output.shape)} of the pass; the exact fallback needs a "
                         "deterministic forward (dropout is off in eval mode)")
    batch = grad_output.shape[0]
    acc = accumulation_dtype(grad_output.dtype)
    total = torch.zeros(batch, dtype=acc, device=grad_output.device)
    chunk = max(1, min(batch, _CHUNK_ELEMENTS // max(grad_output.numel(), 1)))
    params = list(leaves.values())
    for start in range(0, batch, chunk):
        rows = torch.arange(start, min(batch, start + chunk), device=grad_output.device)
        cotangent = grad_output.new_zeros((len(rows),) + tuple(grad_output.shape))
        cotangent[torch.arange(len(rows), device=rows.device), rows] = grad_output[rows]
        grads = torch.autograd.grad(output, params, grad_outputs=cotangent, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
        total[rows] = sum((g.flatten(1).to(acc).square().sum(1) for g in grads if g is not None),
                          torch.zeros(len(rows), dtype=acc, device=rows.device))
    return total
