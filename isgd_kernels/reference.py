"""Pure-PyTorch reference implementations (the `backend="torch"` path and the CPU oracle).

They materialize what the fused kernels avoid (B x T x T Gram matrices, B x d_out x d_in
per-example gradients), so they are meant for correctness, not for large inputs.
"""
from __future__ import annotations

import torch

from isgd_kernels.cost import choose_method


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp16/bf16/fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_grad_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, bias: bool = True,
                             method: str = "auto") -> torch.Tensor:
    """Squared per-example gradient norms of a Linear layer.

    x: (B, T, d_in), grad_out: (B, T, d_out) -> (B,) in the accumulation dtype.
    """
    acc = accumulation_dtype(x.dtype)
    a, g = x.to(acc), grad_out.to(acc)
    B, T, d_in = a.shape
    resolved = choose_method(T, d_in, g.shape[2], method)
    if resolved == "outer":
        sq_g = g[:, 0].square().sum(-1)
        sq = a[:, 0].square().sum(-1) * sq_g
    elif resolved == "ghost":
        gram_g = torch.bmm(g, g.transpose(1, 2))
        sq = (torch.bmm(a, a.transpose(1, 2)) * gram_g).sum((1, 2))
    else:
        sq = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    if bias:
        sq = sq + g.sum(1).square().sum(-1)
    return sq


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
        norms.append(sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt())
    return torch.cat(norms)


def per_example_grad_norms_loop(model: torch.nn.Module, loss_fn, inputs: torch.Tensor,
                                targets: torch.Tensor) -> torch.Tensor:
    """Oracle: one autograd backward per example (also for layers vmap cannot run), float64 sums."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        sq = sum(g.to_dense().double().square().sum() for g in grads if g is not None)
        out.append(torch.as_tensor(sq, dtype=torch.float64, device=inputs.device))
    return torch.stack(out).sqrt()
