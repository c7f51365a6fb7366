"""The per-example gradient of a parameter with several uses in one pass, as the sum of its uses' parts,
and the squared norm of that sum without materializing what can stay factored.

A use of a weight W (out, in) by a Linear map over T positions contributes g_i = sum_t G[i,t] A[i,t]^T
(a ``LinearPart``); a use by an Embedding lookup contributes g_i = sum_t onehot(tok[i,t]) delta[i,t]^T
(an ``EmbeddingPart``); any other use its per-example gradients (B, *shape) (dense). For the sum
L + E + D of the three kinds:

    ||L + E + D||^2 = ||L||^2 + ||E||^2 + ||D||^2 + 2<L, E> + 2<L, D> + 2<E, D>

||L||^2 is the Linear op on the uses' A and G concatenated along T (ghost or materialize by cost, cross
terms included); ||E||^2 the Embedding rule's sum over distinct tokens of the concatenated lookups;
<L, E>_i = sum_{s,t} G[i,s,tok[i,t]] (A[i,s] . delta[i,t]) needs only the gathered (B, S, T) slice of G,
so a tied LM head (lm_head.weight = wte.weight) never forms a (B, vocab, d) tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.linear_norms import linear_grad_sq_norms_impl, linear_op_args


def linear_sq_norms(x: torch.Tensor, g: torch.Tensor, weight: bool, bias: bool, backend: str) -> torch.Tensor:
    """(B,) squared norm of each example's gradient of a Linear map's weight (when `weight`) and bias (when
    `bias`): x (B, *, d_in) its input, g (B, *, d_out) the gradient w.r.t. its output; x is not read for the
    bias alone."""
    if weight:
        return linear_grad_sq_norms_impl(*linear_op_args(x, g, backend), bias, backend, "auto")
    g = g.reshape(g.shape[0], -1, g.shape[-1]).to(accumulation_dtype(g.dtype))
    return g.sum(1).square().sum(-1)


@dataclass
class LinearPart:
    """g_i = sum_t G[i,t] A[i,t]^T for a weight (out, in): A (B, T, in), G (B, T, out)."""

    A: torch.Tensor
    G: torch.Tensor


@dataclass
class EmbeddingPart:
    """g_i = sum_t onehot(tokens[i,t]) delta[i,t]^T for a weight (num_embeddings, dim): tokens (B, T),
    delta (B, T, dim) (rows of padding tokens already zero)."""

    tokens: torch.Tensor
    delta: torch.Tensor
    num_embeddings: int


def embedding_sq_norms(example: torch.Tensor, tok: torch.Tensor, rows: torch.Tensor, num_embeddings: int,
                       batch: int) -> torch.Tensor:
    """sum over the distinct (example, token) keys of ||sum of the rows with that key||^2, per example.

    One sort of the keys gives segment ids of equal keys. Static sizes throughout (at most N segments),
    so no host synchronization, unlike torch.unique."""
    n = rows.shape[0]
    if n == 0:
        return rows.new_zeros(batch)
    keys = example * num_embeddings + tok
    sorted_keys, order = keys.sort()
    new_segment = torch.ones_like(sorted_keys, dtype=torch.long)
    new_segment[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    segment_sorted = new_segment.cumsum(0) - 1
    segment = torch.empty_like(segment_sorted).scatter_(0, order, segment_sorted)  # per row, original order
    sums = rows.new_zeros(rows.shape).index_add_(0, segment, rows)  # summed row per (example, token)
    seg_example = torch.zeros(n, dtype=torch.long, device=tok.device).scatter_(0, segment, example)
    # Unused segment slots are zero rows: they add 0 to example 0.
    return rows.new_zeros(batch).index_add_(0, seg_example, sums.square().sum(1))


def sq_norm_of_sum(parts: list, backend: str) -> torch.Tensor:
    """(B,) squared norm of the per-example sum of `parts` (LinearPart, EmbeddingPart, dense tensors)."""
    linear = [p for p in parts if isinstance(p, LinearPart)]
    embedding = [p for p in parts if isinstance(p, EmbeddingPart)]
    dense = [p for p in parts if isinstance(p, torch.Tensor)]
    first = parts[0]
    like = first if isinstance(first, torch.Tensor) else first.G if isinstance(first, LinearPart) else first.delta
    acc = accumulation_dtype(like.dtype)
    batch = like.shape[0]
    total = torch.zeros(batch, dtype=acc, device=like.device)
    A = G = tok = delta = D = None
    if linear:
        A = torch.cat([p.A for p in linear], 1)
        G = torch.cat([p.G.to(A.dtype) for p in linear], 1)
        total += linear_grad_sq_norms_impl(A, G, False, backend, "auto").to(acc)
    if embedding:
        tok = torch.cat([p.tokens.reshape(batch, -1) for p in embedding], 1).long()
        delta = torch.cat([p.delta.reshape(batch, -1, p.delta.shape[-1]) for p in embedding], 1).to(acc)
        example = torch.arange(batch, device=tok.device).repeat_interleave(tok.shape[1])
        total += embedding_sq_norms(example, tok.reshape(-1), delta.reshape(-1, delta.shape[-1]),
                                    embedding[0].num_embeddings, batch)
    if dense:
        D = sum(d.to(acc) for d in dense)
        total += D.reshape(batch, -1).square().sum(1)
    if linear and embedding:  # 2 <L, E>: G at the looked-up rows, times A . delta
        gathered = G.to(acc).gather(2, tok.unsqueeze(1).expand(batch, G.shape[1], tok.shape[1]))
        total += 2 * (gathered * torch.bmm(A.to(acc), delta.transpose(1, 2))).sum((1, 2))
    if linear and dense:  # 2 <L, D> = 2 sum_s G[s]^T D A[s]
        total += 2 * torch.einsum("bok,bsk,bso->b", D.reshape(batch, G.shape[2], A.shape[2]), A.to(acc), G.to(acc))
    if embedding and dense:  # 2 <E, D> = 2 sum_t D[tok_t] . delta_t
        rows = D.reshape(batch, embedding[0].num_embeddings, -1)
        total += 2 * (rows.gather(1, tok.unsqueeze(2).expand(-1, -1, rows.shape[2])) * delta).sum((1, 2))
    return total
