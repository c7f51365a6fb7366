"""nn.Embedding: g_i[v] = sum_{t: tok_t = v} delta_t, so ||g_i||^2 = sum over the distinct tokens v of
example i of ||sum_{t: tok_t = v} delta_t||^2. Rows are summed per (example, token) key found by one
sort of the B*T keys; no (B, num_embeddings, dim) buffer, no host synchronization."""
from __future__ import annotations

import torch
from torch import nn

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.scorer.registry import LayerCapture, register_rule


def embedding_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.Embedding: sum over distinct tokens v of example i of ||sum_{t: tok_t = v} delta_t||^2.

    Tokens equal to padding_idx get a zero gradient row in PyTorch and contribute nothing. With
    max_norm the forward renormalizes the looked-up rows in place without autograd, so the gradient
    is the same scatter of delta rows (w.r.t. the renormalized weight, as `.grad` is): exact.
    sparse=True changes the gradient's layout only. scale_grad_by_freq is refused: it divides each
    row's gradient by the token's count in the whole mini-batch, which couples examples.
    """
    module = cap.module
    if module.scale_grad_by_freq:
        raise ValueError(
            f"GradNormScorer: {cap.label} has scale_grad_by_freq=True: PyTorch divides each row's "
            "gradient by that token's frequency in the whole mini-batch, so one example's gradient depends "
            "on the other examples and per-example gradient norms are not defined. Build the embedding "
            "with scale_grad_by_freq=False to score it, or freeze it (requires_grad_(False)).")
    idx = cap.first_input()
    batch, dim = idx.shape[0], module.embedding_dim
    if grad_output.shape != (*idx.shape, dim):
        raise ValueError(f"GradNormScorer: {cap.label}: indices {tuple(idx.shape)} and gradient "
                         f"of output {tuple(grad_output.shape)} do not match (expected indices shape + "
                         f"({dim},))")
    acc = accumulation_dtype(grad_output.dtype)
    delta = grad_output.reshape(-1, dim).to(acc)  # (N, dim), N = B*T, rows in example-major order
    n = delta.shape[0]
    if n == 0:
        return delta.new_zeros(batch)
    tok = idx.reshape(-1).long()
    if module.padding_idx is not None:
        delta = delta * (tok != module.padding_idx).unsqueeze(1).to(acc)
    per_example = n // batch
    example = torch.arange(batch, device=tok.device).repeat_interleave(per_example)
    # One sort of the (example, token) keys; segment ids of equal keys. Static sizes throughout (at
    # most N segments), so no host synchronization, unlike torch.unique.
    keys = example * module.num_embeddings + tok
    sorted_keys, order = keys.sort()
    new_segment = torch.ones_like(sorted_keys, dtype=torch.long)
    new_segment[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    segment_sorted = new_segment.cumsum(0) - 1
    segment = torch.empty_like(segment_sorted).scatter_(0, order, segment_sorted)  # per row, original order
    rows = delta.new_zeros(n, dim).index_add_(0, segment, delta)  # summed gradient row per (example, token)
    seg_example = torch.zeros(n, dtype=torch.long, device=tok.device).scatter_(0, segment, example)
    # Unused segment slots are zero rows: they add 0 to example 0.
    return delta.new_zeros(batch).index_add_(0, seg_example, rows.square().sum(1))


register_rule(nn.Embedding, embedding_rule)
