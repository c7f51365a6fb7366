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
from torch.utils._pytree import tree_leaves, tree_unflatten

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


# Ops whose vjp w.r.t. a carrier c (no batch) broadcast against the batch is known in closed form: x + c (a
# positional table added to every example), x * c (a LayerScale gamma), c.expand(B, ...) (a class token).
# Their per-example gradients need no vmap.
_CLOSED_FORM = {torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
                torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul",
                torch.Tensor.expand: "expand", torch.Tensor.expand_as: "expand", torch.broadcast_to: "expand",
                torch.Tensor.broadcast_to: "expand"}


def _closed_form_grads(func, flat: list, kinds: list, grad: torch.Tensor) -> list | None:
    """[(B, *c.shape)] per-example gradients of c + x, c * x (x batched with the output's shape) or c broadcast
    to the output w.r.t. the carrier c; None for any other op or layout."""
    kind = _CLOSED_FORM.get(func)
    if kind is None or kinds.count("carrier") != 1:
        return None
    c = flat[kinds.index("carrier")]
    if kind == "expand":
        if kinds[0] != "carrier":
            return None
        g = grad
    else:
        if len(flat) != 2 or "split" not in kinds:
            return None
        x = flat[kinds.index("split")]
        if x.shape != grad.shape:
            return None
        g = grad if kind == "add" else grad * x.detach()
    if c.dim() > grad.dim():
        return None
    padded = (1,) * (grad.dim() - c.dim()) + tuple(c.shape)  # c broadcast against the batch
    if padded[0] != 1:
        return None
    return [g.sum_to_size((grad.shape[0],) + padded[1:]).reshape((grad.shape[0],) + tuple(c.shape))]


def _sum_or_none(grads: list):
    return None if not grads else grads[0] if len(grads) == 1 else sum(grads[1:], grads[0])


def op_by_vmap(op: tuple, output: torch.Tensor, grad: torch.Tensor, leaves: list) -> list | None:
    """Per-example gradients of an op-level use (uses.py) without the batched backward's B x |output|
    cotangents: vmap over the examples of the op's vjp on one example, w.r.t. its inputs that carry
    parameters (which hold no batch: a positional table added to every example), then one batched backward
    from those inputs to the stand-in `leaves`.

    op = (func, flat inputs, their pytree spec, ids of the carriers); tensor inputs whose dim 0 is the batch
    are split. `x + c`, `x * c` and `c.expand(B, ...)` need no vmap: their per-example vjp is closed-form
    (_closed_form_grads), and carriers that are the stand-ins themselves need no batched backward.
    Checked: the vmapped forward must give the op's own output, else (an op that mixes examples,
    an op vmap cannot run, a carrier with a batch dim) None, and the caller takes the batched backward.
    Else [(rows, per-leaf gradients (len(rows), *leaf.shape))] chunk by chunk, as batched_vjp hands them
    to its `consume`."""
    func, flat, spec, carriers = op
    batch = grad.shape[0]
    kinds = []  # per input: "carrier", "split" (its rows go with the examples), or None (as is)
    for v in flat:
        batched = isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
        if isinstance(v, torch.Tensor) and id(v) in carriers:
            if batched:
                return None
            kinds.append("carrier")
        else:
            kinds.append("split" if batched else None)
    carried = [v for v, k in zip(flat, kinds) if k == "carrier"]
    split = [v.detach() for v, k in zip(flat, kinds) if k == "split"]

    def to_leaves(start, stop, cots):
        """(rows, per-leaf gradients): the carriers' per-example gradients carried back to the leaves."""
        rows = torch.arange(start, stop, device=grad.device)
        if all(any(c is leaf for leaf in leaves) for c in carried):  # the carriers are the stand-ins themselves
            return rows, [_sum_or_none([g for c, g in zip(carried, cots) if c is leaf]) for leaf in leaves]
        _IN_BATCHED_VJP[0] += 1
        try:
            got = torch.autograd.grad(carried, leaves, grad_outputs=list(cots), is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
        finally:
            _IN_BATCHED_VJP[0] -= 1
        return rows, list(got)

    closed_form = _closed_form_grads(func, flat, kinds, grad)
    if closed_form is not None:
        return [to_leaves(0, batch, closed_form)]

    def one(values, rows, cot):
        def forward(w):
            it = {"carrier": iter(w), "split": (r.unsqueeze(0) for r in rows)}
            a, kw = tree_unflatten([v if k is None else next(it[k]) for v, k in zip(flat, kinds)], spec)
            return func(*a, **kw).squeeze(0)

        out, pullback = torch.func.vjp(forward, values)
        return pullback(cot)[0], out

    per_example = sum(t.numel() for t in carried) + grad[0].numel() + output[0].numel()
    chunk = max(1, min(batch, _CHUNK_ELEMENTS // max(per_example, 1)))
    results = []
    try:
        for start in range(0, batch, chunk):
            stop = min(batch, start + chunk)
            with torch.enable_grad():
                cots, outs = torch.func.vmap(one, in_dims=(None, 0, 0))(
                    [t.detach() for t in carried], [t[start:stop] for t in split], grad[start:stop])
            want = output[start:stop].detach()
            # Elementwise ops give the same bits; others (a matmul batched differently) agree to rounding.
            if outs.shape != want.shape or not (torch.equal(outs, want)
                                                or torch.allclose(outs, want, rtol=1e-5, atol=1e-7)):
                return None
            results.append(to_leaves(start, stop, cots))
    except (RuntimeError, ValueError):  # an op without a batching rule, or one that refuses a lone example
        return None
    return results


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


def _by_vmap(cap: LayerCapture, grads: list, dims: list, consume) -> bool:
    """Per-example gradients by torch.func, a chunk of examples at a time: vmap over the examples of the vjp
    of the module on one example (tensor inputs whose dim 0 is the batch are split, the others shared). As
    cheap as one batched backward, where the cotangent-batched path costs one per chunk. Checked: the
    vmapped forward must give the call's own outputs, else (an input that only looks batched, a module
    that treats one example differently) False, and the caller takes the batched-backward path."""
    if not cap.outputs or any(d != 0 for d in dims) or len(cap.outputs) != len(grads):
        return False
    batch = grads[0].shape[0]
    params = {name: p.detach() for name, p in cap.trainable_parameters().items()}
    args, kwargs = cap.inputs, cap.kwargs
    split = lambda v: isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch  # noqa: E731
    in_args = tuple(0 if split(a) else None for a in args)
    in_kwargs = {k: 0 if split(v) else None for k, v in kwargs.items()}

    def one(p, a, kw, cot):
        def forward(q):
            with replaying_call():
                out = functional_call(cap.module, q, tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(a, in_args)),
                                      {k: v.unsqueeze(0) if in_kwargs[k] == 0 else v for k, v in kw.items()},
                                      strict=False)
            return [t.squeeze(0) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

        out, pullback = torch.func.vjp(forward, p)
        return pullback(list(cot))[0], out

    per_example = sum(p.numel() for p in params.values()) + sum(g[0].numel() for g in grads)
    chunk = max(1, min(batch, _CHUNK_ELEMENTS // max(per_example, 1)))
    try:
        for start in range(0, batch, chunk):
            rows = torch.arange(start, min(batch, start + chunk), device=grads[0].device)
            a = tuple(x[start:start + chunk] if d == 0 else x for x, d in zip(args, in_args))
            kw = {k: v[start:start + chunk] if in_kwargs[k] == 0 else v for k, v in kwargs.items()}
            with torch.enable_grad():
                chunk_grads, outs = torch.func.vmap(one, in_dims=(None, in_args, in_kwargs, 0))(
                    params, a, kw, [g[start:start + chunk] for g in grads])
            for got, want in zip(outs, cap.outputs):
                if not torch.allclose(got, want[start:start + chunk], rtol=1e-4, atol=1e-6):
                    return False
            consume(rows, [chunk_grads.get(name) for name in params])
    except RuntimeError:  # an op without a batching rule: the batched-backward path needs none
        return False
    return True


def _per_example(cap: LayerCapture, grad_output, batch_dims: list | None, consume) -> None:
    grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]
    dims = batch_dims or [0] * len(grads)
    results = []
    if _by_vmap(cap, grads, dims, lambda rows, g: results.append((rows, g))):
        for rows, g in results:
            consume(rows, g)
        return
    outputs, grads, leaves, dims = _replayed(cap, grad_output, batch_dims)
    batched_vjp(outputs, grads, dims, list(leaves.values()), consume)


def per_example_grads(cap: LayerCapture, grad_output, batch_dims: list | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: (B, *shape)} per-example gradients of the module's trainable parameters from
    one call (vmap over the examples, or replay and batched backward passes)."""
    grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]
    batch = grads[0].shape[(batch_dims or [0])[0] or 0]
    params = cap.trainable_parameters()
    result = {name: p.new_zeros((batch,) + tuple(p.shape)) for name, p in params.items()}

    def consume(rows, chunk_grads):
        for name, g in zip(params, chunk_grads):
            if g is not None:
                result[name][rows] = g.to(result[name].dtype)

    _per_example(cap, grad_output, batch_dims, consume)
    return result


def autograd_fallback_rule(cap: LayerCapture, grad_output, backend: str,
                           batch_dims: list | None = None) -> torch.Tensor:
    grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]
    batch = grads[0].shape[(batch_dims or [0])[0] or 0]
    acc = accumulation_dtype(grads[0].dtype)
    total = torch.zeros(batch, dtype=acc, device=grads[0].device)

    def consume(rows, chunk_grads):
        total[rows] = sum((g.reshape(len(rows), -1).to(acc).square().sum(1) for g in chunk_grads if g is not None),
                          torch.zeros(len(rows), dtype=acc, device=rows.device))

    _per_example(cap, grad_output, batch_dims, consume)
    return total
