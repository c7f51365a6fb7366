"""Whole-model oracles: per-example gradient norms from materialized per-example gradients.

The tests and benchmarks compare GradNormScorer with these (float64, on fresh random inputs);
they cost B copies of the parameters (vmap) or B backward passes (loop).
"""
from __future__ import annotations

import torch


def _trainable_and_frozen(model: torch.nn.Module):
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    frozen.update(dict(model.named_buffers()))
    return params, frozen


def per_example_grad_norms_vmap(model: torch.nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                                *, chunk_size: int | None = None) -> torch.Tensor:
    """Oracle: ||grad_theta l_i|| over the trainable parameters by torch.func.vmap(grad).

    Materializes per-example gradients (chunk_size examples at a time, all at once when None) and
    reduces each chunk to norms, so memory is chunk_size copies of the parameters.
    """
    from torch.func import functional_call, grad, vmap

    params, frozen = _trainable_and_frozen(model)

    def loss(p, xi, yi):
        return loss_fn(functional_call(model, {**p, **frozen}, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_example_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    step = chunk_size or max(1, inputs.shape[0])
    norms = []
    for i in range(0, inputs.shape[0], step):
        grads = per_example_grad(params, inputs[i:i + step], targets[i:i + step])
        norms.append(sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()).sqrt())
    return torch.cat(norms)


def per_example_grad_norms_loop(model: torch.nn.Module, loss_fn, inputs: torch.Tensor | tuple,
                                targets: torch.Tensor) -> torch.Tensor:
    """Oracle: one autograd backward per example (also for layers vmap cannot run), float64 sums. `inputs`
    is the batched input, or a tuple of batched positional inputs (each sliced per example)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(args[0].shape[0]):
        loss = loss_fn(model(*(a[i:i + 1] for a in args)), targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        sq = sum(g.to_dense().double().square().sum() for g in grads if g is not None)
        out.append(torch.as_tensor(sq, dtype=torch.float64, device=args[0].device))
    return torch.stack(out).sqrt()
