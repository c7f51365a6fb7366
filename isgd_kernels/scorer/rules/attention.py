"""nn.MultiheadAttention, and the sequence-first nn.Transformer* layers.

MultiheadAttention's parameters are Linear maps over positions: the in-projections q = x_q W_qᵀ + b_q
(k and v alike; the three row blocks of a packed in_proj_weight), the out-projection
out = ctx W_oᵀ + b_o, and bias_k / bias_v, appended as one more key and value row. Per example, a
projection's weight gradient is G_iᵀ A_i (A its input, G the gradient w.r.t. its output), so the Linear
norm op gives its squared norm; the blocks of a packed weight (or separate weights) are disjoint rows,
so their squared norms add. The out-projection's G is the arriving output gradient, but its input ctx and
the in-projections' G lie inside the attention: the rule replays the attention from the captured call,
with the ops of F.multi_head_attention_forward (masks, bias_kv, zero attention, the is_causal hint, the
explicit-softmax path when weights are returned and scaled_dot_product_attention otherwise), and one
autograd.grad from ctx (and the returned weights, whose gradient counts when the loss uses them) to the
projection outputs gives every G. MultiheadAttention never calls out_proj as a module (the functional
reads its weight), so the rule owns it.

The batch-first Transformer layers are scored through their children (MultiheadAttention, Linear,
LayerNorm). Sequence-first ones (batch_first=False) feed their Linear and LayerNorm children (T, B, E)
activations, which those rules do not take: such a layer, encoder, decoder or nn.Transformer owns its
children instead, replays its forward once, takes each child's output gradient there and hands each child
to its rule with the batch moved to dim 0 (exact for position-wise layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.linear_norms import linear_grad_sq_norms_impl, linear_op_args
from isgd_kernels.scorer.registry import RULES, LayerCapture, register_rule

_BLOCKS = ("q", "k", "v")


# ------------------------------------------------------------------------------ MultiheadAttention

@dataclass
class _Replayed:
    """One MultiheadAttention call, batch-first: the projections' inputs and output gradients."""

    inputs: dict  # "q"/"k"/"v" -> (B, L or S, E_x) input of that in-projection
    grads: dict  # "q"/"k"/"v" -> (B, L or S, E) gradient w.r.t. its output, for the blocks that need it
    ctx: torch.Tensor  # (B, L, E): the out-projection's input
    grad_out: torch.Tensor  # (B, L, E): the out-projection's output gradient
    bias_kv: dict  # "bias_k"/"bias_v" -> (B, E) gradient w.r.t. the appended row


def _check_call(module: nn.MultiheadAttention, query) -> None:
    what = f"a MultiheadAttention (embed_dim={module.embed_dim}, num_heads={module.num_heads})"
    if not isinstance(query, torch.Tensor) or query.is_nested:
        raise ValueError(f"GradNormScorer: {what} was called on a nested tensor; per-example gradient norms "
                         "need padded (B, T, E) inputs with a key_padding_mask.")
    if query.dim() != 3:
        raise ValueError(f"GradNormScorer: {what} was called on unbatched inputs {tuple(query.shape)}; "
                         "call it on (B, L, E) inputs (batch_first=True) or (L, B, E).")
    if module.training and module.dropout > 0:
        raise ValueError(f"GradNormScorer: {what} runs in training mode with dropout={module.dropout}; its "
                         "random attention mask cannot be replayed to take per-example gradients. Score in "
                         "eval mode (GradNormScorer(..., eval_mode=True), the default) or set dropout=0.")


def mha_batch_dims(module: nn.MultiheadAttention, outputs: list) -> list:
    """attn_output holds the batch in dim 0 (batch_first) or 1; the attention weights in dim 0."""
    _check_call(module, outputs[0])
    return [0 if module.batch_first else 1] + [0] * (len(outputs) - 1)


def _float_mask(mask, dtype):
    """A boolean mask as the additive float mask PyTorch makes of it (-inf where True); a float one as is."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise ValueError(f"GradNormScorer: MultiheadAttention mask of dtype {mask.dtype}: only bool and "
                         "float masks are supported (as in PyTorch)")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _in_projection_weights(module: nn.MultiheadAttention) -> dict:
    """"q"/"k"/"v" -> (weight, bias) of each in-projection, detached."""
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.detach().chunk(3)
    else:
        weights = tuple(getattr(module, f"{x}_proj_weight").detach() for x in _BLOCKS)
    biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    return {x: (w, b) for x, w, b in zip(_BLOCKS, weights, biases)}


def _weight_names(module: nn.MultiheadAttention) -> dict:
    """"q"/"k"/"v" -> the parameter holding that block's weight."""
    if module._qkv_same_embed_dim:
        return dict.fromkeys(_BLOCKS, "in_proj_weight")
    return {x: f"{x}_proj_weight" for x in _BLOCKS}


def _replay(cap: LayerCapture, grad_output) -> _Replayed:
    """The attention of the captured call, replayed with PyTorch's ops, differentiated once from ctx (and the
    returned weights) to the in-projection outputs and the bias_k / bias_v rows that need a gradient."""
    m: nn.MultiheadAttention = cap.module
    query, key, value = cap.argument(0, "query"), cap.argument(1, "key"), cap.argument(2, "value")
    _check_call(m, query)
    kpm, need_weights = cap.argument(3, "key_padding_mask"), cap.argument(4, "need_weights", True)
    attn_mask, average = cap.argument(5, "attn_mask"), cap.argument(6, "average_attn_weights", True)
    is_causal = cap.argument(7, "is_causal", False)
    grads = tuple(grad_output) if isinstance(grad_output, (tuple, list)) else (grad_output,)
    g_attn = grads[0]
    g_weights = grads[1] if need_weights and len(grads) > 1 else None

    inputs = dict(zip(_BLOCKS, (query, key, value)))

    def seq_first(t):  # the (T, B, ...) view F.multi_head_attention_forward works on
        return t.transpose(0, 1) if m.batch_first else t

    tgt_len, bsz, embed_dim = seq_first(query).shape
    heads, head_dim = m.num_heads, m.embed_dim // m.num_heads
    w_names = _weight_names(m)
    bias_trainable = cap.is_trainable("in_proj_bias")
    needed = [x for x in _BLOCKS if cap.is_trainable(w_names[x]) or bias_trainable]
    kv_rows = [n for n in ("bias_k", "bias_v") if cap.is_trainable(n)]

    with torch.enable_grad():
        proj = {}
        for x, (w, b) in _in_projection_weights(m).items():
            # In the call's own layout (contiguous rows for the matmul); its gradient is then G as laid out.
            proj[x] = F.linear(inputs[x], w, b)
            if x in needed:
                proj[x].requires_grad_(True)
        kpm_f = _float_mask(kpm, query.dtype)
        sdpa_causal = bool(is_causal) and kpm is None and not need_weights
        mask = None if sdpa_causal else _float_mask(attn_mask, query.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        k, v, rows = seq_first(proj["k"]), seq_first(proj["v"]), {}
        if m.bias_k is not None:
            # One (1, B, E) leaf per appended row: its gradient at example b is that example's bias gradient.
            rows = {n: getattr(m, n).detach().repeat(1, bsz, 1).requires_grad_(n in kv_rows)
                    for n in ("bias_k", "bias_v")}
            k, v = torch.cat([k, rows["bias_k"]]), torch.cat([v, rows["bias_v"]])
            mask = F.pad(mask, (0, 1)) if mask is not None else None
            kpm_f = F.pad(kpm_f, (0, 1)) if kpm_f is not None else None
        q = seq_first(proj["q"]).reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if m.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            mask = F.pad(mask, (0, 1)) if mask is not None else None
            kpm_f = F.pad(kpm_f, (0, 1)) if kpm_f is not None else None
        src_len = k.shape[1]
        if kpm_f is not None:
            kpm_f = kpm_f.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            mask = kpm_f if mask is None else mask + kpm_f
        weights = None
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            scores = (torch.baddbmm(mask, q_scaled, k.transpose(-2, -1)) if mask is not None
                      else torch.bmm(q_scaled, k.transpose(-2, -1)))
            attn = torch.softmax(scores, dim=-1)
            ctx = torch.bmm(attn, v).transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
            weights = attn.view(bsz, heads, tgt_len, src_len)
            weights = weights.mean(dim=1) if average else weights
        else:
            if mask is not None:
                mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.view(bsz, heads, -1, src_len)
            ctx = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim), mask, 0.0, sdpa_causal)
            ctx = ctx.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)

        inner = [proj[x] for x in needed] + [rows[n] for n in kv_rows]
        got = [None] * len(inner)
        if inner:
            g_ctx = seq_first(g_attn @ m.out_proj.weight.detach().to(g_attn.dtype))  # d ctx = d out · W_o
            outs, cots = [ctx], [g_ctx]
            if weights is not None and g_weights is not None:
                if g_weights.shape != weights.shape:
                    raise ValueError(f"GradNormScorer: {cap.label}: replaying it gave attention weights "
                                     f"{tuple(weights.shape)}, not {tuple(g_weights.shape)} as in the pass")
                outs.append(weights)
                cots.append(g_weights)
            got = torch.autograd.grad(outs, inner, cots, allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(inner, got)]
    by_block = dict(zip(needed, got[:len(needed)]))

    def batch_first(t):
        return t if m.batch_first else t.transpose(0, 1)

    return _Replayed(inputs={x: batch_first(t) for x, t in inputs.items()},
                     grads={x: batch_first(g) for x, g in by_block.items()},
                     ctx=ctx.detach().transpose(0, 1), grad_out=batch_first(g_attn),
                     bias_kv={n: g[0] for n, g in zip(kv_rows, got[len(needed):])})


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the same data (self-attention: query is key is value, detached apart by the capture)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _linear_sq(x: torch.Tensor, g: torch.Tensor, weight: bool, bias: bool, backend: str) -> torch.Tensor:
    """Per-example squared norm of a Linear map's weight and/or bias gradient: x (B, T, d), g (B, T, p)."""
    if weight:
        return linear_grad_sq_norms_impl(*linear_op_args(x, g, backend), bias, backend, "auto")
    return g.to(accumulation_dtype(g.dtype)).sum(1).square().sum(-1)


def mha_rule(cap: LayerCapture, grad_output, backend: str) -> torch.Tensor:
    r = _replay(cap, grad_output)
    acc = accumulation_dtype(r.grad_out.dtype)
    total = torch.zeros(r.grad_out.shape[0], dtype=acc, device=r.grad_out.device)
    w_out, b_out = cap.is_trainable("out_proj.weight"), cap.is_trainable("out_proj.bias")
    if w_out or b_out:
        total += _linear_sq(r.ctx, r.grad_out, w_out, b_out, backend).to(acc)
    w_names, bias = _weight_names(cap.module), cap.is_trainable("in_proj_bias")
    # Blocks sharing an input (self-attention) make one Linear problem with their G side by side: the packed
    # weight's per-example gradient is the row-concatenation of the blocks', so its squared norm is the sum.
    groups: list[tuple[torch.Tensor, list]] = []
    for x, g in r.grads.items():
        if not cap.is_trainable(w_names[x]):
            total += _linear_sq(r.inputs[x], g, False, bias, backend).to(acc)
            continue
        for a, gs in groups:
            if _same_tensor(a, r.inputs[x]):
                gs.append(g)
                break
        else:
            groups.append((r.inputs[x], [g]))
    for a, gs in groups:
        total += _linear_sq(a, gs[0] if len(gs) == 1 else torch.cat(gs, -1), True, bias, backend).to(acc)
    for g in r.bias_kv.values():
        total += g.to(acc).square().sum(-1)
    return total


def mha_grads(cap: LayerCapture, grad_output) -> dict[str, torch.Tensor]:
    """Per-example gradients {name: (B, *shape)} of the trainable parameters, for a parameter with several
    uses in one pass (the module called twice, a weight shared with another module)."""
    r = _replay(cap, grad_output)

    def weight(g, a):
        return torch.einsum("bto,bti->boi", g, a.to(g.dtype))

    out = {}
    if cap.is_trainable("out_proj.weight"):
        out["out_proj.weight"] = weight(r.grad_out, r.ctx)
    if cap.is_trainable("out_proj.bias"):
        out["out_proj.bias"] = r.grad_out.sum(1)
    w_names = _weight_names(cap.module)
    if cap.is_trainable("in_proj_weight"):
        out["in_proj_weight"] = torch.cat([weight(r.grads[x], r.inputs[x]) for x in _BLOCKS], 1)
    for x in _BLOCKS:
        if w_names[x] != "in_proj_weight" and cap.is_trainable(w_names[x]):
            out[w_names[x]] = weight(r.grads[x], r.inputs[x])
    if cap.is_trainable("in_proj_bias"):
        out["in_proj_bias"] = torch.cat([r.grads[x].sum(1) for x in _BLOCKS], 1)
    for n, g in r.bias_kv.items():
        out[n] = g.reshape(g.shape[0], 1, 1, -1)
    return out


register_rule(nn.MultiheadAttention, mha_rule, batch_dims=mha_batch_dims, owns_children=True, grads=mha_grads)


# -------------------------------------------------------------------- sequence-first Transformer layers

_TRANSFORMERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                 nn.TransformerDecoderLayer)
_CONTAINERS = (*_TRANSFORMERS, nn.ModuleList)
# Rules that act on each position alone, so on (T, B, ...) activations with the batch moved to dim 0.
_POSITIONWISE = (nn.Linear, nn.LayerNorm)


def _batch_first(module: nn.Module) -> bool:
    if type(module) is nn.Transformer:
        return module.batch_first
    if type(module) in (nn.TransformerEncoder, nn.TransformerDecoder):
        return len(module.layers) == 0 or module.layers[0].self_attn.batch_first
    return module.self_attn.batch_first


def _seq_first(module: nn.Module) -> bool:
    return not _batch_first(module)


def transformer_batch_dims(module: nn.Module, outputs: list) -> list:
    if outputs[0].dim() != 3:
        raise ValueError(f"GradNormScorer: a {type(module).__name__} was called on unbatched inputs "
                         f"{tuple(outputs[0].shape)}; call it on (T, B, E) or, with batch_first=True, "
                         "(B, T, E) inputs.")
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
           for m in module.modules()):
        raise ValueError(f"GradNormScorer: a sequence-first {type(module).__name__} runs in training mode "
                         "with dropout; its random masks cannot be replayed to take per-example gradients. "
                         "Score in eval mode (GradNormScorer(..., eval_mode=True), the default) or set "
                         "dropout=0.")
    return [0 if _batch_first(module) else 1] * len(outputs)


class _Mark(torch.autograd.Function):
    """Identity that puts its outputs in the replay's graph (through `anchor`), so that autograd.grad can
    be taken w.r.t. them though no parameter or input requires grad."""

    @staticmethod
    def forward(ctx, anchor, *outputs):
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


@dataclass
class _Call:
    rel: str
    module: nn.Module
    inputs: tuple
    kwargs: dict
    outputs: list  # the marked floating outputs
    single_output: bool


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _scored_children(cap: LayerCapture) -> list[tuple[str, nn.Module]]:
    """The owned submodules with trainable parameters that a rule scores: MultiheadAttention, Linear,
    LayerNorm, reached through PyTorch's Transformer containers only (their forwards are known to feed
    them (T, B, E) activations)."""
    trainable = [name for name, flag in cap.trainable.items() if flag]
    chosen: list[tuple[str, nn.Module]] = []
    for rel, sub in cap.module.named_modules():
        if not rel or any(rel.startswith(f"{c}.") for c, _ in chosen):
            continue
        if not any(name.startswith(f"{rel}.") for name in trainable):
            continue
        if type(sub) is nn.MultiheadAttention or type(sub) in _POSITIONWISE:
            chosen.append((rel, sub))
        elif type(sub) not in _CONTAINERS or any(name.count(".") == rel.count(".") + 1 and
                                                 name.startswith(f"{rel}.") for name in trainable):
            raise ValueError(
                f"GradNormScorer: {cap.label} is sequence-first (batch_first=False) and holds '{rel}' "
                f"({type(sub).__name__}) with trainable parameters, which the scorer can only follow inside "
                "PyTorch's own Transformer layers. Build it with batch_first=True (its children are then "
                "scored on their own), or freeze that module.")
    return chosen


def _replay_children(cap: LayerCapture, grad_output) -> tuple[list[_Call], list]:
    """The owner's forward on the captured call, recording each scored child's call; the gradient of the
    owner's output (the arriving one) w.r.t. every child's floating outputs."""
    children = _scored_children(cap)
    grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]
    anchor = torch.zeros((), device=grads[0].device, requires_grad=True)
    calls: list[_Call] = []

    def record(rel):
        def hook(module, inputs, kwargs, output):
            if any(c.module is module for c in calls):
                raise ValueError(f"GradNormScorer: {cap.label}: its submodule '{rel}' is called more than "
                                 "once in one forward; build the model with batch_first=True to score it.")
            flat, spec = tree_flatten(output)
            where = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            marked = _Mark.apply(anchor, *(flat[i] for i in where))
            for i, t in zip(where, marked):
                flat[i] = t
            calls.append(_Call(rel, module, tuple(_detached(i) for i in inputs),
                               {k: _detached(v) for k, v in kwargs.items()}, list(marked),
                               isinstance(output, torch.Tensor)))
            return tree_unflatten(flat, spec)
        return hook

    handles = [sub.register_forward_hook(record(rel), with_kwargs=True) for rel, sub in children]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # The fused paths skip the submodules' calls; training never takes them.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.enable_grad():
            output = cap.module(*cap.inputs, **cap.kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(outputs) != len(grads) or any(o.shape != g.shape for o, g in zip(outputs, grads)):
        raise ValueError(f"GradNormScorer: {cap.label}: replaying its forward gave outputs "
                         f"{[tuple(o.shape) for o in outputs]}, not {[tuple(g.shape) for g in grads]} as in "
                         "the pass")
    marked = [t for c in calls for t in c.outputs]
    got = torch.autograd.grad(outputs, marked, grads, allow_unused=True) if marked else []
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(marked, got)]
    per_call, start = [], 0
    for c in calls:
        per_call.append(got[start:start + len(c.outputs)])
        start += len(c.outputs)
    return calls, per_call


def transformer_rule(cap: LayerCapture, grad_output, backend: str) -> torch.Tensor:
    """A sequence-first Transformer layer, encoder, decoder or nn.Transformer: each scored child's rule on
    the replay's child calls, (T, B, ...) activations handed to position-wise rules batch-first."""
    calls, grads = _replay_children(cap, grad_output)
    g0 = grad_output[0] if isinstance(grad_output, (tuple, list)) else grad_output
    batch = g0.shape[1]
    total = torch.zeros(batch, dtype=accumulation_dtype(g0.dtype), device=g0.device)
    for c, g in zip(calls, grads):
        prefix = f"{c.rel}."
        sub = LayerCapture(f"{cap.name}.{c.rel}", c.module,
                           {n[len(prefix):]: f for n, f in cap.trainable.items() if n.startswith(prefix)},
                           c.inputs, c.kwargs, calls=1, single_output=c.single_output)
        if type(c.module) is nn.MultiheadAttention:
            sq = RULES[nn.MultiheadAttention].norm(sub, tuple(g), backend)
        else:
            x = sub.first_input()
            if x.dim() < 3 or x.shape[1] != batch or g[0].shape[:2] != x.shape[:2]:
                raise ValueError(f"GradNormScorer: {sub.label} saw {tuple(x.shape)} inside sequence-first "
                                 f"{cap.label}, not (T, B={batch}, ...)")
            sub.inputs = (x.movedim(1, 0), *c.inputs[1:])
            sq = RULES[type(c.module)].norm(sub, g[0].movedim(1, 0), backend)
        total += sq.to(total.dtype)
    return total


for _cls in _TRANSFORMERS:
    register_rule(_cls, transformer_rule, batch_dims=transformer_batch_dims, owns_children=_seq_first)
