"""The exact fallback for a module with trainable parameters and no rule (a custom layer, a third-party
layer such as GPT-2's Conv1D): slow, never wrong.

The module's forward is replayed on its captured inputs with its parameters as fresh leaves that
require grad; then, a chunk of examples at a time, one batched backward (``is_grads_batched``, i.e. vmap
over the cotangent) whose cotangent k holds only example k's slice of the output gradient gives each
example's gradient of those parameters exactly. It needs no knowledge of how the module's inputs are
laid out, only where the batch is in its outputs (dim 0, or the rule's declared batch dims).
Cost: a forward of the module plus B/chunk batched backward passes over it; memory chunk x |output|.
The same batched backward gives the per-example gradients of parameters used outside any module
(uses.py) and of a module whose parameters have several uses in one pass.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

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
def replaying_call():
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


_IN_BATCHED_VJP = [0]


def in_batched_vjp() -> bool:
    """True while a batched backward of the scorer's own runs (the taps it meets then pass nothing on)."""
    return _IN_BATCHED_VJP[0] > 0


def batched_vjp(outputs: list, grad_outputs: list, batch_dims: list, inputs: list,
                consume: Callable[[torch.Tensor, list], None]) -> None:
    """Per-example gradients of `inputs` from the per-example output gradients, chunk by chunk.

    outputs[j] holds the batch in dim batch_dims[j] (None: it has none and gets no cotangent); for each
    chunk of examples `rows`, consume(rows, grads) receives, per input, (len(rows), *input.shape): row k is
    example rows[k]'s gradient (None for an input the outputs do not depend on)."""
    pairs = [(o, g, d) for o, g, d in zip(outputs, grad_outputs, batch_dims)
             if d is not None and isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
    if not pairs:
        return
    batch = pairs[0][1].shape[pairs[0][2]]
    device = pairs[0][1].device
    per_example = sum(g.numel() for _, g, _ in pairs)
    chunk = max(1, min(batch, _CHUNK_ELEMENTS // max(per_example, 1)))
    for start in range(0, batch, chunk):
        rows = torch.arange(start, min(batch, start + chunk), device=device)
        cotangents = []
        for _, g, d in pairs:
            moved = g.movedim(d, 0)
            cot = moved.new_zeros((len(rows),) + tuple(moved.shape))
            cot[torch.arange(len(rows), device=device), rows] = moved[rows]
            cotangents.append(cot.movedim(1, d + 1))
        _IN_BATCHED_VJP[0] += 1
        try:
            grads = torch.autograd.grad([o for o, _, _ in pairs], inputs, grad_outputs=cotangents,
                                        is_grads_batched=True, retain_graph=True, allow_unused=True)
        finally:
            _IN_BATCHED_VJP[0] -= 1
        consume(rows, list(grads))


def replay(cap: LayerCapture) -> tuple[list, dict[str, torch.Tensor]]:
    """The module's forward on the captured call, with its trainable parameters as fresh leaves: the
    tensors it returns (pytree order) and the leaves by parameter name."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in cap.trainable_parameters().items()}
    with torch.enable_grad(), replaying_call():
        output = functional_call(cap.module, leaves, cap.inputs, cap.kwargs, strict=False)
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)], leaves


def _replayed(cap: LayerCapture, grad_output, batch_dims: list | None):
    outputs, leaves = replay(cap)
    grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]
    if len(outputs) != len(grads) or any(o.shape != g.shape for o, g in zip(outputs, grads)):
        raise ValueError(f"GradNormScorer: {cap.label}: replaying its forward gave outputs "
                         f"{[tuple(o.shape) for o in outputs]}, not {[tuple(g.shape) for g in grads]} as in the "
                         "pass; the exact fallback needs a deterministic forward (dropout is off in eval mode)")
    return outputs, grads, leaves, batch_dims or [0] * len(grads)


def per_example_grads(cap: LayerCapture, grad_output, batch_dims: list | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: (B, *shape)} per-example gradients of the module's trainable parameters from
    one call, by replay and batched backward passes."""
    outputs, grads, leaves, dims = _replayed(cap, grad_output, batch_dims)
    batch = grads[0].shape[dims[0]] if dims[0] is not None else 0
    result = {name: leaf.new_zeros((batch,) + tuple(leaf.shape)) for name, leaf in leaves.items()}

    def consume(rows, chunk_grads):
        for name, g in zip(leaves, chunk_grads):
            if g is not None:
                result[name][rows] = g

    batched_vjp(outputs, grads, dims, list(leaves.values()), consume)
    return result


def autograd_fallback_rule(cap: LayerCapture, grad_output, backend: str,
                           batch_dims: list | None = None) -> torch.Tensor:
    outputs, grads, leaves, dims = _replayed(cap, grad_output, batch_dims)
    batch = grads[0].shape[dims[0] or 0]
    acc = accumulation_dtype(grads[0].dtype)
    total = torch.zeros(batch, dtype=acc, device=grads[0].device)

    def consume(rows, chunk_grads):
        total[rows] = sum((g.flatten(1).to(acc).square().sum(1) for g in chunk_grads if g is not None),
                          torch.zeros(len(rows), dtype=acc, device=rows.device))

    batched_vjp(outputs, grads, dims, list(leaves.values()), consume)
    return total
