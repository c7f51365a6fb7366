"""nn.RNN, nn.LSTM, nn.GRU: exact per-example gradient norms by replaying the recurrence.

Per layer and direction, every gate's pre-activation is gi_t + gh_t with gi_t = W_ih x_t + b_ih and
gh_t = W_hh h_{t-1} + b_hh (GRU: the n gate reads r * gh_n, so gi and gh are kept apart). With dgi, dgh
the gradients of example i's loss w.r.t. them, its weight gradients are sum_t dgi_t x_t^T and
sum_t dgh_t h_{t-1}^T, its bias gradients sum_t dgi_t and sum_t dgh_t: each is the Linear problem
(A = x or h_{t-1}, G = dgi or dgh), so the Linear op's ghost/materialize kernels give the norms.
LSTM's projection (proj_size): h_t = W_hr (o * tanh(c_t)), the Linear problem (A = o * tanh(c_t),
G = gradient w.r.t. h_t).

The model's forward runs the fused aten/cuDNN kernels, which keep no gate gradients. The rule replays
the recurrence from the captured input and initial state in PyTorch ops, in the accumulation dtype:
one GEMM for every gi of a layer, a Python loop over time for the rest; then one autograd.grad from the
replayed (output, h_n[, c_n]) with the arriving gradients gives every layer's dgi (and dgh, h_t) at
once, for all examples: they are independent rows. Cost: the replayed forward plus one backward through
it, in Python ops (no fused kernels). Packed sequences are replayed padded, with each example's state
frozen past its length, so padding gets zero gradients.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.linear_norms import linear_grad_sq_norms_impl, linear_op_args
from isgd_kernels.scorer.registry import LayerCapture, register_rule

_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


@dataclass
class _Direction:
    """One layer and direction of the replay: the operands of its Linear problems, (B, T, *) batch-first."""

    suffix: str  # parameter-name suffix: "l0", "l1_reverse", ...
    x: torch.Tensor  # layer input
    dgi: torch.Tensor
    prev: torch.Tensor  # state before each step, h_{t-1}
    dgh: torch.Tensor
    a: torch.Tensor | None = None  # o * tanh(c_t), the projection's input (proj_size > 0)
    dh: torch.Tensor | None = None  # gradient w.r.t. the projected h_t


def _refuse_dropout(module: nn.Module, label: str) -> None:
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ValueError(
            f"GradNormScorer: {label} is in training mode with dropout={module.dropout} between its "
            "layers: the scorer cannot replay the random masks its forward drew. Score in eval mode "
            "(eval_mode=True, the default), or set its dropout to 0.")


def recurrent_batch_dims(module: nn.Module, outputs: list) -> list:
    """output: dim 0 if batch_first else 1 (a PackedSequence's data and index tensors: none); h_n, c_n: dim 1.

    The scorer consults this on every call of the module, before it checks the layout: what cannot be scored
    is refused here, with its reason, rather than as a layout mismatch."""
    states = 2 if isinstance(module, nn.LSTM) else 1
    what = f"{type(module).__name__} {module!r}"
    _refuse_dropout(module, what)
    if outputs[-states].dim() == 2:
        raise ValueError(
            f"GradNormScorer: {what} was called on an unbatched input (a 2-D sequence): per-example "
            "gradients need a batch. Pass (B, T, features) with batch_first=True, or (T, B, features).")
    # A PackedSequence output brings data, batch_sizes[, sorted_indices, unsorted_indices].
    packed = len(outputs) > 1 + states
    first = [None] * (len(outputs) - states) if packed else [0 if module.batch_first else 1]
    return first + [1] * states


def _weights(cap: LayerCapture, acc: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's weights by name, detached, in the accumulation dtype; refuses parameters it does not
    know."""
    module = cap.module
    names = list(module._flat_weights_names)
    unknown = [n for n, t in cap.trainable.items() if t and n not in names]
    if unknown:
        raise ValueError(
            f"GradNormScorer: {cap.label} has trainable parameters {unknown} that its recurrence does not "
            f"read directly (a reparametrization such as weight_norm?); the rule knows {names}. Freeze them "
            "(requires_grad_(False)), or register a rule for this module with "
            "isgd_kernels.scorer.register_rule.")
    return {n: getattr(module, n).detach().to(acc) for n in names}


def _inputs(cap: LayerCapture, acc: torch.dtype):
    """x (B, T, in); lengths (B,) of a packed input, else None; the initial h0, c0 (L*D, B, *) or None."""
    module = cap.module
    x, hx = cap.argument(0, "input"), cap.argument(1, "hx")
    lengths = None
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x, batch_first=True)  # examples in their original order
    elif not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"GradNormScorer: {cap.label} was called on {got}; per-example gradients need a "
                         "batched input, (B, T, features) with batch_first=True or (T, B, features), or a "
                         "PackedSequence.")
    elif not module.batch_first:
        x = x.transpose(0, 1)
    if isinstance(module, nn.LSTM):
        h0, c0 = hx if hx is not None else (None, None)
    else:
        h0, c0 = hx, None
    prep = [t.detach().to(acc) if t is not None else None for t in (x, h0, c0)]
    return prep[0], lengths, prep[1], prep[2]


def _output_grads(cap: LayerCapture, grad_output, steps: int, acc: torch.dtype):
    """The arriving gradients: output (B, T, D*H_out) batch-first and padded, h_n, c_n (L*D, B, *)."""
    grads = [g.to(acc) for g in grad_output]
    x = cap.argument(0, "input")
    if isinstance(x, PackedSequence):  # the output is packed like the input
        packed = PackedSequence(grads[0], x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        grads[0] = pad_packed_sequence(packed, batch_first=True, total_length=steps)[0]
    elif not cap.module.batch_first:
        grads[0] = grads[0].transpose(0, 1)
    return grads[0], grads[1], grads[2] if len(grads) > 2 else None


def _step(mode: str, gi_t, gh, h, c, w_hr):
    """One step of the recurrence from gi_t and gh_t = W_hh h_{t-1} + b_hh: (h_t, c_t, a_t)."""
    if mode == "LSTM":
        i, f, g, o = (gi_t + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        a = torch.sigmoid(o) * torch.tanh(c)
        return (F.linear(a, w_hr) if w_hr is not None else a), c, a
    if mode == "GRU":
        ir, iz, in_ = gi_t.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return n + z * (h - n), None, None
    pre = gi_t + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None, None


def _replay(cap: LayerCapture, grad_output) -> list[_Direction]:
    """Replays the module's call and differentiates it once: the operands of every trainable layer's
    Linear problems, per direction."""
    module = cap.module
    _refuse_dropout(module, cap.label)
    grad_output = tuple(grad_output) if isinstance(grad_output, (tuple, list)) else (grad_output,)
    first = cap.argument(0, "input")  # a PackedSequence's .data too
    acc = accumulation_dtype(grad_output[0].dtype, first.data.dtype)
    w = _weights(cap, acc)
    x, lengths, h0, c0 = _inputs(cap, acc)
    batch, steps = x.shape[0], x.shape[1]
    d_out, d_hn, d_cn = _output_grads(cap, grad_output, steps, acc)
    mode, lstm = module.mode, isinstance(module, nn.LSTM)
    dirs = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    h_size = getattr(module, "proj_size", 0) or hidden
    gates = w["weight_ih_l0"].shape[0]  # G * hidden, per direction
    mask = None if lengths is None else (
        torch.arange(steps, device=x.device)[None, :] < lengths.to(x.device)[:, None]).unsqueeze(-1)
    # Layers below the lowest trainable one only make its input: no graph for them.
    lowest = min((int(re.search(r"_l(\d+)", n).group(1)) for n, t in cap.trainable.items() if t),
                 default=module.num_layers)

    outputs, out_grads = [], []  # what autograd.grad starts from
    wrt = []  # what it differentiates w.r.t.: each layer's gi; GRU's gh_t, the projected h_t (lists over t)
    # Per direction of a layer >= lowest: its suffix, input, direction, where its gi, gh_t, h_t are in wrt,
    # h_{t-1} and a_t.
    held = []
    with torch.autocast(x.device.type, enabled=False):
        for layer in range(module.num_layers):
            with torch.set_grad_enabled(layer >= lowest):
                sfx = [f"l{layer}" + ("_reverse" if d else "") for d in range(dirs)]
                # One GEMM for the input projections of every step and direction of the layer.
                gi = F.linear(x, torch.cat([w[f"weight_ih_{s}"] for s in sfx]),
                              torch.cat([w[f"bias_ih_{s}"] for s in sfx]) if module.bias else None)
                at_gi = len(wrt)
                if layer >= lowest:
                    if not gi.requires_grad:
                        gi.requires_grad_(True)
                    wrt.append(gi)
                layer_out = []
                for d, s in enumerate(sfx):
                    gis = gi[..., d * gates:(d + 1) * gates].unbind(1)
                    k = layer * dirs + d
                    h = h0[k] if h0 is not None else x.new_zeros(batch, h_size)
                    c = (c0[k] if c0 is not None else x.new_zeros(batch, hidden)) if lstm else None
                    w_hh, b_hh, w_hr = w[f"weight_hh_{s}"], w.get(f"bias_hh_{s}"), w.get(f"weight_hr_{s}")
                    outs, prevs, ghs, hps, acts = ([None] * steps for _ in range(5))
                    for t in (range(steps - 1, -1, -1) if d else range(steps)):
                        prevs[t] = h
                        ghs[t] = F.linear(h, w_hh, b_hh)
                        if mode == "GRU" and layer >= lowest and not ghs[t].requires_grad:
                            ghs[t].requires_grad_(True)  # from the initial state: a leaf of the replay
                        hps[t], c_new, acts[t] = _step(mode, gis[t], ghs[t], h, c, w_hr)
                        if mask is None:
                            h, c = hps[t], c_new
                        else:  # past an example's length its state stays as it was (packed semantics)
                            h = torch.where(mask[:, t], hps[t], h)
                            c = torch.where(mask[:, t], c_new, c) if lstm else None
                        outs[t] = h  # padding positions receive zero gradient
                    layer_out.append(torch.stack(outs, 1))
                    for final, grad in ((h, d_hn[k]), (c, d_cn[k] if lstm else None)):
                        if grad is not None and final is not None and final.requires_grad:
                            outputs.append(final)
                            out_grads.append(grad)
                    if layer >= lowest:
                        at_gh = at_h = None
                        if mode == "GRU":  # its n gate reads r * gh_n: dgh is not dgi
                            at_gh = len(wrt)
                            wrt.extend(ghs)
                        if w_hr is not None:
                            at_h = len(wrt)
                            wrt.extend(hps)
                        held.append((s, x, d, at_gi, at_gh, at_h, prevs, acts if w_hr is not None else None))
                x = torch.cat(layer_out, -1) if dirs > 1 else layer_out[0]
        for d in range(dirs):
            if layer_out[d].requires_grad:
                outputs.append(layer_out[d])
                out_grads.append(d_out[..., d * h_size:(d + 1) * h_size])
        grads = torch.autograd.grad(outputs, wrt, out_grads, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]

    result = []
    for s, inp, d, at_gi, at_gh, at_h, prevs, acts in held:
        dgi = grads[at_gi][..., d * gates:(d + 1) * gates]
        # RNN and LSTM add gi and gh before any nonlinearity: dgh = dgi.
        dgh = torch.stack(grads[at_gh:at_gh + steps], 1) if at_gh is not None else dgi
        result.append(_Direction(
            s, inp.detach(), dgi, torch.stack(prevs, 1).detach(), dgh,
            torch.stack(acts, 1).detach() if acts is not None else None,
            torch.stack(grads[at_h:at_h + steps], 1) if at_h is not None else None))
    return result


def _sq_norm(cap: LayerCapture, a: torch.Tensor, g: torch.Tensor, weight: str, bias: str | None,
             backend: str) -> torch.Tensor:
    """||sum_t g_t a_t^T||^2 (+ ||sum_t g_t||^2) over the trainable ones of `weight`, `bias`."""
    with_bias = bias is not None and cap.is_trainable(bias)
    if cap.is_trainable(weight):
        return linear_grad_sq_norms_impl(*linear_op_args(a, g, backend), with_bias, backend, "auto")
    if with_bias:
        return g.sum(1).square().sum(-1)
    return g.new_zeros(g.shape[0])


def recurrent_rule(cap: LayerCapture, grad_output, backend: str) -> torch.Tensor:
    total = None
    for r in _replay(cap, grad_output):
        sq = (_sq_norm(cap, r.x, r.dgi, f"weight_ih_{r.suffix}", f"bias_ih_{r.suffix}", backend)
              + _sq_norm(cap, r.prev, r.dgh, f"weight_hh_{r.suffix}", f"bias_hh_{r.suffix}", backend))
        if r.a is not None:
            sq = sq + _sq_norm(cap, r.a, r.dh, f"weight_hr_{r.suffix}", None, backend)
        total = sq if total is None else total + sq
    return total


def recurrent_grads(cap: LayerCapture, grad_output) -> dict[str, torch.Tensor]:
    """Per-example gradients (B, *shape): sum_t G_t A_t^T for the weights, sum_t G_t for the biases."""
    grads = {}
    for r in _replay(cap, grad_output):
        for name, a, g in (("weight_ih", r.x, r.dgi), ("weight_hh", r.prev, r.dgh), ("weight_hr", r.a, r.dh),
                           ("bias_ih", None, r.dgi), ("bias_hh", None, r.dgh)):
            name = f"{name}_{r.suffix}"
            if cap.is_trainable(name):
                grads[name] = g.sum(1) if a is None else torch.einsum("btp,btd->bpd", g, a)
    return grads


for _cls in _RECURRENT:
    register_rule(_cls, recurrent_rule, batch_dims=recurrent_batch_dims, grads=recurrent_grads)
