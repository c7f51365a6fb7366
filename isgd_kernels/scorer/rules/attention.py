"""nn.MultiheadAttention, and the sequence-first nn.Transformer* layers.

MultiheadAttention's parameters are Linear maps over positions: the in-projections q = x_q W_qᵀ + b_q
(k and v alike; the three row blocks of a packed in_proj_weight), the out-projection
out = ctx W_oᵀ + b_o, and bias_k / bias_v, appended as one more key and value row. Per example, a
projection's weight gradient is G_iᵀ A_i (A its input, G the gradient w.r.t. its output), so the Linear
norm op gives its squared norm; the blocks of a packed weight (or separate weights) are disjoint rows,
so their squared norms add. Those G lie inside the attention: during a scoring pass the module runs
`mha_forward` instead of its own forward (the rule's scoring forward), F.multi_head_attention_forward's
computation written batch-first with the projections' outputs and the bias rows tapped, so each G is the
pass's own, taken as the backward reaches it; nothing is replayed. (PyTorch's functional runs the
in-projection on (T, B, E) views, which without weight gradients becomes T small GEMMs; batch-first it
is one.) MultiheadAttention never calls out_proj as a module (the functional reads its weight), so the
rule owns it.

The batch-first Transformer layers are scored through their children (MultiheadAttention, Linear,
LayerNorm). Sequence-first ones (batch_first=False) feed their Linear and LayerNorm children (T, B, E)
activations, which those rules do not take: such a layer, encoder, decoder or nn.Transformer owns its
children instead, replays its forward once (its attention children running mha_forward), takes each child's
output gradient and each attention piece's there, and hands each child to its rule with the batch moved
to dim 0 (exact for position-wise layers).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.scorer.parts import LinearPart, linear_sq_norms
from isgd_kernels.scorer.registry import RULES, LayerCapture, Scoring, register_rule


# ------------------------------------------------------------------------------ MultiheadAttention

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
    if mask is None:
        return None
    if mask.is_floating_point():
        return mask.to(dtype)
    if mask.dtype != torch.bool:
        raise ValueError(f"GradNormScorer: MultiheadAttention mask of dtype {mask.dtype}: only bool and "
                         "float masks are supported (as in PyTorch)")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _padded(g: torch.Tensor, span: tuple) -> torch.Tensor:
    """g (..., stop - start) placed at columns [start, stop) of (..., rows), zeros elsewhere."""
    start, stop, rows = span
    return g if (start, stop) == (0, rows) else F.pad(g, (start, rows - stop))


@dataclass
class _Projection:
    """One Linear map of the attention, x (B, T, in) -> (B, T, stop - start), on rows [start, stop) of its weight
    and bias parameters (the in-projections' row blocks of in_proj_weight / in_proj_bias; (0, rows, rows) for a
    whole parameter). Blocks of one parameter are disjoint rows, so their squared norms add."""

    x: torch.Tensor
    weight: str
    bias: str | None
    weight_span: tuple
    bias_span: tuple

    def norm(self, cap: LayerCapture, g: torch.Tensor, backend: str):
        w, b = cap.is_trainable(self.weight), self.bias is not None and cap.is_trainable(self.bias)
        return linear_sq_norms(self.x, g, w, b, backend) if w or b else None

    def grads(self, cap: LayerCapture, g: torch.Tensor) -> dict:
        out = {}
        if cap.is_trainable(self.weight):
            out[self.weight] = LinearPart(self.x, _padded(g, self.weight_span))
        if self.bias is not None and cap.is_trainable(self.bias):
            out[self.bias] = _padded(g.sum(1), self.bias_span)
        return out


@dataclass
class _Row:
    """bias_k or bias_v (1, 1, E), appended to every example's keys or values: (B, 1, E) rows."""

    name: str

    def norm(self, cap: LayerCapture, g: torch.Tensor, backend: str):
        return g.to(accumulation_dtype(g.dtype)).square().sum((1, 2)) if cap.is_trainable(self.name) else None

    def grads(self, cap: LayerCapture, g: torch.Tensor) -> dict:
        return {self.name: g.unsqueeze(1)} if cap.is_trainable(self.name) else {}


def _project(scoring: Scoring, m: nn.MultiheadAttention, x: torch.Tensor, blocks: tuple) -> torch.Tensor:
    """x (B, T, in) through the in-projection rows of `blocks` (a run of "q", "k", "v"), tapped."""
    E = m.embed_dim
    start, stop = "qkv".index(blocks[0]) * E, ("qkv".index(blocks[-1]) + 1) * E
    if m._qkv_same_embed_dim:
        weight, weight_span = "in_proj_weight", (start, stop, 3 * E)
        w = m.in_proj_weight if (start, stop) == (0, 3 * E) else m.in_proj_weight[start:stop]
    else:
        weight, weight_span = f"{blocks[0]}_proj_weight", (0, E, E)
        w = getattr(m, weight)
    b = None
    if m.in_proj_bias is not None:
        b = m.in_proj_bias if (start, stop) == (0, 3 * E) else m.in_proj_bias[start:stop]
    piece = _Projection(x.detach(), weight, "in_proj_bias" if b is not None else None, weight_span,
                        (start, stop, 3 * E))
    return scoring.tap(F.linear(x, w, b), piece.norm, piece.grads)


def _in_projections(scoring: Scoring, m: nn.MultiheadAttention, query, key, value, same_qk: bool, same_kv: bool):
    """q, k, v (B, T, E): one Linear per distinct input (self-attention: one for the three, as PyTorch)."""
    if same_qk and same_kv and m._qkv_same_embed_dim:
        return _project(scoring, m, query, ("q", "k", "v")).chunk(3, -1)
    q = _project(scoring, m, query, ("q",))
    if same_kv and m._qkv_same_embed_dim:
        return (q, *_project(scoring, m, key, ("k", "v")).chunk(2, -1))
    return q, _project(scoring, m, key, ("k",)), _project(scoring, m, value, ("v",))


def mha_forward(m: nn.MultiheadAttention, scoring: Scoring, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward for a scoring pass: F.multi_head_attention_forward's computation (masks,
    bias_k / bias_v, zero attention, the is_causal hint, the explicit-softmax path when weights are returned
    and scaled_dot_product_attention otherwise), batch-first throughout, with the in-projections' outputs,
    the appended bias rows and the out-projection's output tapped. Their gradients are the pass's own: the
    rule replays nothing."""
    _check_call(m, query)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    same_qk, same_kv = query is key, key is value
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    B, L, E = query.shape
    heads, head_dim = m.num_heads, m.embed_dim // m.num_heads
    dtype = query.dtype
    kpm = _float_mask(key_padding_mask, dtype)
    sdpa_causal = bool(is_causal) and key_padding_mask is None and not need_weights
    mask = None if sdpa_causal else _float_mask(attn_mask, dtype)

    q, k, v = _in_projections(scoring, m, query, key, value, same_qk, same_kv)
    if m.bias_k is not None:
        rows = [scoring.tap(getattr(m, row.name).expand(B, 1, E), row.norm, row.grads)
                for row in (_Row("bias_k"), _Row("bias_v"))]
        k, v = torch.cat([k, rows[0]], 1), torch.cat([v, rows[1]], 1)
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    q = q.reshape(B, L, heads, head_dim).transpose(1, 2)
    k = k.reshape(B, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.reshape(B, v.shape[1], heads, head_dim).transpose(1, 2)
    if m.add_zero_attn:
        zeros = k.new_zeros(B, heads, 1, head_dim)
        k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    src_len = k.shape[2]
    if mask is not None:
        expected = (L, src_len) if mask.dim() == 2 else (B * heads, L, src_len)
        if tuple(mask.shape) != expected:
            raise RuntimeError(f"The shape of the {mask.dim()}D attn_mask is {tuple(mask.shape)}, but should be "
                               f"{expected}.")
        mask = mask.view(1, 1, L, src_len) if mask.dim() == 2 else mask.view(B, heads, L, src_len)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)
        attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        ctx = attn @ v
        weights = attn.mean(dim=1) if average_attn_weights else attn
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, mask, 0.0, sdpa_causal)
    ctx = ctx.transpose(1, 2).reshape(B, L, E)
    out_piece = _Projection(ctx.detach(), "out_proj.weight", "out_proj.bias" if m.out_proj.bias is not None
                            else None, (0, E, E), (0, E, E))
    out = scoring.tap(F.linear(ctx, m.out_proj.weight, m.out_proj.bias), out_piece.norm, out_piece.grads)
    return (out if m.batch_first else out.transpose(0, 1)), weights


register_rule(nn.MultiheadAttention, None, forward=mha_forward, batch_dims=mha_batch_dims, owns_children=True)


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


@dataclass
class _Tapped:
    """A piece an owned MultiheadAttention's scoring forward tapped during the replay."""

    rel: str
    module: nn.Module
    norm: object
    tensor: torch.Tensor  # marked


def _replay_children(cap: LayerCapture, grad_output) -> tuple[list[_Call], list[_Tapped], list]:
    """The owner's forward on the captured call, recording each scored child's call (a MultiheadAttention
    child runs its scoring forward, whose pieces are recorded instead); the gradient of the owner's output
    (the arriving one) w.r.t. every child's floating outputs and every piece."""
    children = _scored_children(cap)
    grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]
    anchor = torch.zeros((), device=grads[0].device, requires_grad=True)
    calls: list[_Call] = []
    pieces: list[_Tapped] = []
    called: set[int] = set()

    def record(rel):
        def hook(module, inputs, kwargs, output):
            if id(module) in called:
                raise ValueError(f"GradNormScorer: {cap.label}: its submodule '{rel}' is called more than "
                                 "once in one forward; build the model with batch_first=True to score it.")
            called.add(id(module))
            if type(module) is nn.MultiheadAttention:
                return None
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

    def piece_of(rel, module):
        def tap(tensor, norm, grads):
            marked = _Mark.apply(anchor, tensor)[0]
            pieces.append(_Tapped(rel, module, norm, marked))
            return marked
        return Scoring(tap, _child_trainable(cap, rel), f"module '{cap.name}.{rel}' ({type(module).__name__})")

    handles = [sub.register_forward_hook(record(rel), with_kwargs=True) for rel, sub in children]
    attention = [sub for _, sub in children if type(sub) is nn.MultiheadAttention]
    for rel, sub in children:
        if type(sub) is nn.MultiheadAttention:
            sub.forward = functools.partial(mha_forward, sub, piece_of(rel, sub))
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
        for sub in attention:
            del sub.forward
    outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(outputs) != len(grads) or any(o.shape != g.shape for o, g in zip(outputs, grads)):
        raise ValueError(f"GradNormScorer: {cap.label}: replaying its forward gave outputs "
                         f"{[tuple(o.shape) for o in outputs]}, not {[tuple(g.shape) for g in grads]} as in "
                         "the pass")
    marked = [t for c in calls for t in c.outputs] + [p.tensor for p in pieces]
    got = torch.autograd.grad(outputs, marked, grads, allow_unused=True) if marked else []
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(marked, got)]
    return calls, pieces, got


def _child_trainable(cap: LayerCapture, rel: str) -> dict[str, bool]:
    prefix = f"{rel}."
    return {n[len(prefix):]: f for n, f in cap.trainable.items() if n.startswith(prefix)}


def _child_capture(cap: LayerCapture, rel: str, module: nn.Module, inputs=(), kwargs=None,
                   single_output=True) -> LayerCapture:
    return LayerCapture(f"{cap.name}.{rel}", module, _child_trainable(cap, rel), inputs, kwargs or {}, calls=1,
                        single_output=single_output)


def transformer_rule(cap: LayerCapture, grad_output, backend: str) -> torch.Tensor:
    """A sequence-first Transformer layer, encoder, decoder or nn.Transformer: each scored child's rule on
    the replay's child calls, (T, B, ...) activations handed to position-wise rules batch-first, and the
    pieces of each MultiheadAttention (batch-first already)."""
    calls, pieces, got = _replay_children(cap, grad_output)
    g0 = grad_output[0] if isinstance(grad_output, (tuple, list)) else grad_output
    batch = g0.shape[1]
    total = torch.zeros(batch, dtype=accumulation_dtype(g0.dtype), device=g0.device)
    start = 0
    for c in calls:
        g = got[start:start + len(c.outputs)]
        start += len(c.outputs)
        sub = _child_capture(cap, c.rel, c.module, c.inputs, c.kwargs, c.single_output)
        x = sub.first_input()
        if x.dim() < 3 or x.shape[1] != batch or g[0].shape[:2] != x.shape[:2]:
            raise ValueError(f"GradNormScorer: {sub.label} saw {tuple(x.shape)} inside sequence-first "
                             f"{cap.label}, not (T, B={batch}, ...)")
        sub.inputs = (x.movedim(1, 0), *c.inputs[1:])
        total += RULES[type(c.module)].norm(sub, g[0].movedim(1, 0), backend).to(total.dtype)
    for p, g in zip(pieces, got[start:]):
        sq = p.norm(_child_capture(cap, p.rel, p.module), g, backend)
        if sq is not None:
            total += sq.to(total.dtype)
    return total


for _cls in _TRANSFORMERS:
    register_rule(_cls, transformer_rule, batch_dims=transformer_batch_dims, owns_children=_seq_first)
