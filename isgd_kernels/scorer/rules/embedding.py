"""nn.Embedding and nn.EmbeddingBag: gradient rows summed per (example, token).

Embedding: g_i[v] = sum_{t: tok_t = v} delta_t, so ||g_i||^2 = sum over the distinct tokens v of example
i of ||sum_{t: tok_t = v} delta_t||^2. Rows are summed per (example, token) key found by one sort of
the B*T keys; no (B, num_embeddings, dim) buffer, no host synchronization."""
from __future__ import annotations

import torch
from torch import nn

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.scorer.parts import EmbeddingPart, embedding_sq_norms
from isgd_kernels.scorer.registry import LayerCapture, register_rule


def embedding_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.Embedding: sum over distinct tokens v of example i of ||sum_{t: tok_t = v} delta_t||^2.

    Tokens equal to padding_idx get a zero gradient row in PyTorch and contribute nothing. With
    max_norm the forward renormalizes the looked-up rows in place without autograd, so the gradient
    is the same scatter of delta rows (w.r.t. the renormalized weight, as `.grad` is): exact.
    sparse=True changes the gradient's layout only. scale_grad_by_freq is refused: it divides each
    row's gradient by the token's count in the whole mini-batch, which couples examples.
    """
    module, idx = cap.module, _checked_indices(cap, grad_output)
    batch, dim = idx.shape[0], module.embedding_dim
    acc = accumulation_dtype(grad_output.dtype)
    delta = grad_output.reshape(-1, dim).to(acc)  # (N, dim), N = B*T, rows in example-major order
    n = delta.shape[0]
    if n == 0:
        return delta.new_zeros(batch)
    tok = idx.reshape(-1).long()
    if module.padding_idx is not None:
        delta = delta * (tok != module.padding_idx).unsqueeze(1).to(acc)
    example = torch.arange(batch, device=tok.device).repeat_interleave(n // batch)
    return embedding_sq_norms(example, tok, delta, module.num_embeddings, batch)


def _checked_indices(cap: LayerCapture, grad_output: torch.Tensor) -> torch.Tensor:
    module = cap.module
    if module.scale_grad_by_freq:
        raise ValueError(
            f"GradNormScorer: {cap.label} has scale_grad_by_freq=True: PyTorch divides each row's "
            "gradient by that token's frequency in the whole mini-batch, so one example's gradient depends "
            "on the other examples and per-example gradient norms are not defined. Build the embedding "
            "with scale_grad_by_freq=False to score it, or freeze it (requires_grad_(False)).")
    idx, dim = cap.first_input(), module.embedding_dim
    if grad_output.shape != (*idx.shape, dim):
        raise ValueError(f"GradNormScorer: {cap.label}: indices {tuple(idx.shape)} and gradient "
                         f"of output {tuple(grad_output.shape)} do not match (expected indices shape + "
                         f"({dim},))")
    return idx


def embedding_grads(cap: LayerCapture, grad_output: torch.Tensor) -> dict:
    """Example i's gradient as its looked-up rows and their delta rows (an EmbeddingPart)."""
    module, idx = cap.module, _checked_indices(cap, grad_output)
    batch, dim = idx.shape[0], module.embedding_dim
    delta = grad_output.reshape(batch, -1, dim)
    tok = idx.reshape(batch, -1).long()
    if module.padding_idx is not None:
        delta = delta * (tok != module.padding_idx).unsqueeze(2).to(delta.dtype)
    return {"weight": EmbeddingPart(tok, delta, module.num_embeddings)}


register_rule(nn.Embedding, embedding_rule, grads=embedding_grads)


# -------------------------------------------------------------------------------------- EmbeddingBag

def embedding_bag_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.EmbeddingBag, one bag per example: 2-D input (B, L), or 1-D input with B (B + 1 with
    include_last_offset) offsets.

    sum / mean: bag b's output is sum_j c_j E[tok_j] (c_j = per_sample_weights[j], 1, or 1/#bag), so the
    gradient row of token v is (sum of c_j over its occurrences) * delta_b and
    ||g_b||^2 = ||delta_b||^2 * sum_v (sum_{j: tok_j = v} c_j)^2. max: each output coordinate d takes its
    gradient to one row (the argmax), so ||g_b||^2 = ||delta_b||^2 for a bag with an entry. padding_idx
    entries are left out of bags (and of the mean's count), as PyTorch does.
    """
    module = cap.module
    if module.scale_grad_by_freq:
        raise ValueError(f"GradNormScorer: {cap.label} has scale_grad_by_freq=True, which couples the examples "
                         "of a batch; build it with scale_grad_by_freq=False, or freeze it.")
    idx = cap.first_input()
    offsets = cap.argument(1, "offsets")
    weights = cap.argument(2, "per_sample_weights")
    acc = accumulation_dtype(grad_output.dtype)
    delta_sq = grad_output.to(acc).square().sum(1)  # (bags,)
    bags = grad_output.shape[0]
    if idx.dim() == 2:
        if offsets is not None:
            raise ValueError(f"GradNormScorer: {cap.label}: offsets with a 2-D input")
        bag = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    elif idx.dim() == 1 and offsets is not None:
        starts = offsets[:-1] if module.include_last_offset else offsets
        # bag of entry j = number of bag starts <= j, less one
        bag = torch.bucketize(torch.arange(idx.numel(), device=idx.device), starts, right=True) - 1
    else:
        raise ValueError(f"GradNormScorer: {cap.label} needs a 2-D input (B, L) or a 1-D input with offsets, "
                         f"got {tuple(idx.shape)}")
    tok = idx.reshape(-1).long()
    keep = torch.ones_like(tok, dtype=acc)
    if module.padding_idx is not None:
        keep = (tok != module.padding_idx).to(acc)
    if module.mode == "max":
        has_entry = torch.zeros(bags, dtype=acc, device=idx.device).index_add_(0, bag, keep) > 0
        return delta_sq * has_entry.to(acc)
    coef = keep if weights is None else keep * weights.reshape(-1).to(acc)
    if module.mode == "mean":
        count = torch.zeros(bags, dtype=acc, device=idx.device).index_add_(0, bag, keep)
        coef = coef / count.clamp_min(1)[bag]
    if tok.numel() == 0:
        return delta_sq.new_zeros(bags)
    coef_sq = embedding_sq_norms(bag, tok, coef.unsqueeze(1), module.num_embeddings, bags)
    return delta_sq * coef_sq


register_rule(nn.EmbeddingBag, embedding_bag_rule)
