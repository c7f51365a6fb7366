"""nn.RNN, nn.LSTM, nn.GRU: exact per-example gradient norms from the gate gradients of the pass itself.

Per layer and direction, every gate's pre-activation is gi_t + gh_t with gi_t = W_ih x_t + b_ih and
gh_t = W_hh h_{t-1} + b_hh. With dgi, dgh the gradients of example i's loss w.r.t. them, its weight
gradients are sum_t dgi_t x_t^T and sum_t dgh_t h_{t-1}^T, its bias gradients sum_t dgi_t and sum_t dgh_t:
each is the Linear problem (A = x or h_{t-1}, G = dgi or dgh), so the Linear op's ghost/materialize
kernels give the norms. RNN and LSTM add gi and gh before any nonlinearity, so dgh = dgi; GRU's n gate
reads r * gh_n, so there dgh_n = r * dgi_n. LSTM's projection (proj_size): h_t = W_hr (o * tanh(c_t)),
the Linear problem (A = o * tanh(c_t), G = gradient w.r.t. h_t).

The fused aten/cuDNN kernels keep no gate gradients, so during a scoring pass the module runs
`recurrent_forward` instead (the rule's scoring forward, see registry.ScoringForward): per layer and
direction one GEMM for every gi (tapped: its gradient is dgi), then `_Recurrence`, the recurrence with its
forward and backward written out step by step. The weights are constants of a scoring pass, so the
backward is the input-gradient half of backpropagation through time (no weight-gradient GEMMs, no
autograd graph per step), and the dgi it returns is the gate gradient itself. Nothing is replayed:
scoring costs about a forward and an input-gradient backward of the recurrence, in PyTorch ops, in the
accumulation dtype. Packed sequences run padded, each example's state frozen past its length, so padding
gets zero gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.scorer.parts import LinearPart, linear_sq_norms
from isgd_kernels.scorer.registry import LayerCapture, Scoring, register_rule

_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def _refuse_dropout(module: nn.Module, label: str) -> None:
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ValueError(
            f"GradNormScorer: {label} is in training mode with dropout={module.dropout} between its "
            "layers: the scorer cannot follow the random masks of its forward. Score in eval mode "
            "(eval_mode=True, the default), or set its dropout to 0.")


def _refuse_unbatched(module: nn.Module) -> None:
    raise ValueError(
        f"GradNormScorer: {type(module).__name__} {module!r} was called on an unbatched input (a 2-D sequence): "
        "per-example gradients need a batch. Pass (B, T, features) with batch_first=True, or (T, B, features).")


def recurrent_batch_dims(module: nn.Module, outputs: list) -> list:
    """output: dim 0 if batch_first else 1 (a PackedSequence's data and index tensors: none); h_n, c_n: dim 1."""
    states = 2 if isinstance(module, nn.LSTM) else 1
    if outputs[-states].dim() == 2:
        _refuse_unbatched(module)
    # A PackedSequence output brings data, batch_sizes[, sorted_indices, unsorted_indices].
    packed = len(outputs) > 1 + states
    first = [None] * (len(outputs) - states) if packed else [0 if module.batch_first else 1]
    return first + [1] * states


class _Cell:
    """One layer and direction: the recurrence's forward and input-gradient backward, step by step, on
    time-major (T, B, ...) buffers; what the forward keeps is what the backward and the rule's Linear
    problems read."""

    def __init__(self, mode: str, w_hh, b_hh, w_hr, mask, reverse: bool):
        self.mode, self.w_hh, self.b_hh, self.w_hr = mode, w_hh, b_hh, w_hr
        self.mask, self.reverse = mask, reverse  # mask (T, B, 1) bool: step t is within example b's length
        self.dgh = self.dh = self.a = None

    def _order(self, steps: int):
        return range(steps - 1, -1, -1) if self.reverse else range(steps)

    def _before(self, after: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The state entering each step, from the state after each step (T, B, ...) and the initial one."""
        if self.reverse:
            return torch.cat([after[1:], initial[None]])
        return torch.cat([initial[None], after[:-1]])

    def forward(self, gi, h0, c0):
        """gi (T, B, G*H) -> outputs (T, B, H_out) (the state after each step), h_n, c_n (LSTM) or None."""
        T, B, width = gi.shape
        # W_hhᵀ laid out for the per-step GEMM (a transposed view costs about a third more per step on CPU BLAS).
        mode, w_hh_t, mask = self.mode, self.w_hh.t().contiguous(), self.mask
        H = self.w_hh.shape[1] if self.w_hr is None else self.w_hr.shape[1]
        out = gi.new_empty(T, B, h0.shape[1])
        self.act = act_all = gi.new_empty(T, B, width)  # the gates after their nonlinearities
        if mode != "GRU" and self.b_hh is not None:
            gi = gi + self.b_hh  # added before any nonlinearity: fold it into gi once
        if mode == "LSTM":
            self.c = gi.new_empty(T, B, H)  # the cell state after each step
            if self.w_hr is not None:
                self.a = gi.new_empty(T, B, H)
        if mode == "GRU":
            self.gh_n = gi.new_empty(T, B, H)
        h, c = h0, c0
        for t in self._order(T):
            act = act_all[t]
            if mode == "LSTM":
                gates = torch.addmm(gi[t], h, w_hh_t)
                torch.sigmoid(gates, out=act)
                torch.tanh(gates[:, 2 * H:3 * H], out=act[:, 2 * H:3 * H])
                i, f, g, o = act.chunk(4, 1)
                if mask is None:
                    c = c_new = torch.mul(f, c, out=self.c[t]).addcmul_(i, g)
                else:  # past an example's length c_new is not its state; those steps get no gradient
                    c_new = (f * c).addcmul_(i, g)
                    c = torch.where(mask[t], c_new, c, out=self.c[t])
                if self.w_hr is not None:
                    h_new = torch.mul(o, torch.tanh(c_new), out=self.a[t]) @ self.w_hr.t()
                elif mask is None:
                    h = torch.mul(o, torch.tanh(c_new), out=out[t])
                    continue
                else:
                    h_new = o * torch.tanh(c_new)
            elif mode == "GRU":
                gh = torch.addmm(self.b_hh, h, w_hh_t) if self.b_hh is not None else h @ w_hh_t
                torch.add(gi[t, :, :2 * H], gh[:, :2 * H], out=act[:, :2 * H]).sigmoid_()
                self.gh_n[t] = gh[:, 2 * H:]
                r, z = act[:, :H], act[:, H:2 * H]
                n = torch.tanh(torch.addcmul(gi[t, :, 2 * H:], r, gh[:, 2 * H:]), out=act[:, 2 * H:])
                h_new = torch.lerp(n, h, z)  # (1 - z) n + z h
            else:
                pre = torch.addmm(gi[t], h, w_hh_t)
                h_new = torch.tanh(pre, out=act) if mode == "RNN_TANH" else torch.clamp(pre, min=0, out=act)
            h = torch.where(mask[t], h_new, h, out=out[t]) if mask is not None else out[t].copy_(h_new)
        self.prev = self._before(out, h0)
        if mode == "LSTM":
            self.c_prev = self._before(self.c, c0)
        # The final states are copies: the buffers are the backward's.
        return out, h.clone(), (c.clone() if c is not None else None)

    def backward(self, d_out, dh, dc):
        """Gradients w.r.t. the outputs (T, B, H_out), h_n, c_n -> dgi (T, B, G*H), dh0, dc0. Keeps dgh
        (GRU) and, with a projection, the gradient w.r.t. each projected h_t (dh)."""
        T, B, width = self.act.shape
        mode, act = self.mode, self.act
        H = width // {"LSTM": 4, "GRU": 3}.get(mode, 1)
        dgi = torch.empty_like(act)
        dh = dh.clone() if dh is not None else self.prev.new_zeros(self.prev.shape[1:])  # clone: updated in place
        # The derivative of each gate's nonlinearity, for all steps at once.
        if mode == "LSTM":
            deriv = torch.addcmul(act, act, act, value=-1)  # sigmoid': s - s^2
            deriv[..., 2 * H:3 * H] = 1 - act[..., 2 * H:3 * H].square()
            tc = torch.tanh(self.c)
            o = act[..., 3 * H:]
            o_dtanh = torch.addcmul(o, o * tc, tc, value=-1)  # o * tanh'(c)
            dc = dc.clone() if dc is not None else self.c.new_zeros(self.c.shape[1:])
            if self.w_hr is not None:
                self.dh = torch.empty_like(self.prev)
        elif mode == "GRU":
            deriv = torch.addcmul(act, act, act, value=-1)
            deriv[..., 2 * H:] = 1 - act[..., 2 * H:].square()
            self.dgh = torch.empty_like(act)
        else:
            deriv = 1 - act.square() if mode == "RNN_TANH" else (act > 0).to(act.dtype)
        for t in reversed(self._order(T)):
            if d_out is not None:
                dh += d_out[t]
            m = self.mask[t] if self.mask is not None else None
            dh_new = dh if m is None else dh * m
            dg = dgi[t]
            if mode == "LSTM":
                dc_new = dc if m is None else dc * m
                if self.w_hr is not None:
                    self.dh[t] = dh_new
                    dh_new = dh_new @ self.w_hr
                i, f, g, _ = act[t].chunk(4, 1)
                d_i, d_f, d_g, d_o = dg.chunk(4, 1)
                dct = torch.addcmul(dc_new, dh_new, o_dtanh[t])
                torch.mul(dct, g, out=d_i)
                torch.mul(dct, self.c_prev[t], out=d_f)
                torch.mul(dct, i, out=d_g)
                torch.mul(dh_new, tc[t], out=d_o)
                dg.mul_(deriv[t])
                dc_prev = dct * f
                dc = dc_prev if m is None else dc_prev + dc * ~m
                d_prev = dg @ self.w_hh
            elif mode == "GRU":
                r, z, n = act[t].chunk(3, 1)
                d_r, d_z, d_n = dg.chunk(3, 1)
                torch.mul(dh_new, (1 - z) * deriv[t, :, 2 * H:], out=d_n)  # through n's tanh
                torch.mul(dh_new, self.prev[t] - n, out=d_z).mul_(deriv[t, :, H:2 * H])
                torch.mul(d_n, self.gh_n[t], out=d_r).mul_(deriv[t, :, :H])
                dgh = self.dgh[t]
                dgh[:, :2 * H] = dg[:, :2 * H]
                torch.mul(d_n, r, out=dgh[:, 2 * H:])
                d_prev = torch.addmm(dh_new * z, dgh, self.w_hh)
            else:
                torch.mul(dh_new, deriv[t], out=dg)
                d_prev = dg @ self.w_hh
            dh = d_prev if m is None else d_prev + dh * ~m
        return dgi, dh, (dc if mode == "LSTM" else None)


class _Recurrence(torch.autograd.Function):
    """The recurrence of one layer and direction from its gi (T, B, G*H): (outputs (T, B, H_out), h_n[, c_n]).
    The weights are constants (a scoring pass differentiates no parameter), so backward returns gradients for
    gi, h0, c0 only."""

    @staticmethod
    def forward(ctx, gi, h0, c0, cell: _Cell):
        ctx.cell = cell
        ctx.set_materialize_grads(False)  # an output the loss does not use (the sequence, c_n) gets None: skipped
        out, h_n, c_n = cell.forward(gi, h0, c0)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn=None):
        dgi, dh0, dc0 = ctx.cell.backward(d_out, d_hn, d_cn)
        return dgi, dh0, dc0, None


def _sq_norm(a: torch.Tensor, g: torch.Tensor, weight: bool, biases: int, backend: str) -> torch.Tensor:
    """||sum_t g_t a_t^T||^2 (when `weight`) plus `biases` times ||sum_t g_t||^2; a, g time-major (T, B, *)."""
    a, g = a.transpose(0, 1), g.transpose(0, 1)
    total = linear_sq_norms(a, g, weight, biases > 0, backend)
    if biases > 1:  # b_ih and b_hh: one gradient, counted once per parameter
        total = total + (biases - 1) * linear_sq_norms(a, g, False, True, backend)
    return total


@dataclass
class _Direction:
    """The Linear problems of one layer and direction, scored when dgi arrives (after the cell's backward)."""

    suffix: str  # parameter-name suffix: "l0", "l1_reverse", ...
    x: torch.Tensor  # (T, B, in) the layer's input
    cell: _Cell

    def problems(self, dgi):
        """(weight name, bias name or None, A, G) of this direction's weights, time-major (T, B, ...)."""
        cell = self.cell
        out = [(f"weight_ih_{self.suffix}", f"bias_ih_{self.suffix}", self.x, dgi),
               (f"weight_hh_{self.suffix}", f"bias_hh_{self.suffix}", cell.prev,
                cell.dgh if cell.dgh is not None else dgi)]
        if cell.w_hr is not None:
            out.append((f"weight_hr_{self.suffix}", None, cell.a, cell.dh))
        return out

    def norm(self, cap: LayerCapture, dgi, backend: str):
        first, second, *rest = self.problems(dgi)
        (w_ih, b_ih, x, g), (w_hh, b_hh, prev, g_hh) = first, second
        if g_hh is g and cap.is_trainable(w_ih) and cap.is_trainable(w_hh):
            # RNN, LSTM: W_ih and W_hh see the same G, so [W_ih, W_hh] is one Linear problem on [x, h_{t-1}] (its
            # squared norm is the sum of theirs: one Gram of G instead of two), and b_ih, b_hh have one gradient.
            biases = sum(b is not None and cap.is_trainable(b) for b in (b_ih, b_hh))
            total = _sq_norm(torch.cat([x, prev], -1), g, True, biases, backend)
        else:
            total = None
            rest = [first, second] + rest
        for weight, bias, a, g in rest:
            with_weight, with_bias = cap.is_trainable(weight), bias is not None and cap.is_trainable(bias)
            if with_weight or with_bias:
                sq = _sq_norm(a, g, with_weight, int(with_bias), backend)
                total = sq if total is None else total + sq
        return total

    def grads(self, cap: LayerCapture, dgi) -> dict:
        out = {}
        for weight, bias, a, g in self.problems(dgi):
            if cap.is_trainable(weight):
                out[weight] = LinearPart(a.transpose(0, 1), g.transpose(0, 1))
            if bias is not None and cap.is_trainable(bias):
                out[bias] = g.sum(0)
        return out


def _refuse_unknown_parameters(module: nn.Module, scoring: Scoring) -> None:
    names = list(module._flat_weights_names)
    unknown = [n for n, t in scoring.trainable.items() if t and n not in names]
    if unknown:
        raise ValueError(
            f"GradNormScorer: {scoring.label} has trainable parameters {unknown} that its recurrence does not "
            f"read directly (a reparametrization such as weight_norm?); the rule knows {names}. Freeze them "
            "(requires_grad_(False)), or register a rule for this module with isgd_kernels.scorer.register_rule.")


def recurrent_forward(module: nn.RNNBase, scoring: Scoring, input, hx=None):
    """The module's forward for a scoring pass (see the module docstring): the same outputs, in the module's
    layout, from the gi GEMMs (tapped) and the written-out recurrence."""
    _refuse_unknown_parameters(module, scoring)
    if not torch.is_grad_enabled() or any(w.requires_grad for w in module._flat_weights if w is not None):
        # No gradient to take, or the scorer runs the call on stand-ins for its parameters (its outputs have
        # no batch): the module's own forward differentiates them.
        return type(module).forward(module, input, hx)
    _refuse_dropout(module, scoring.label)
    packed = isinstance(input, PackedSequence)
    if packed:
        x, lengths = pad_packed_sequence(input, batch_first=True)  # examples in their original order
    elif not isinstance(input, torch.Tensor) or input.dim() != 3:
        if isinstance(input, torch.Tensor) and input.dim() == 2:
            _refuse_unbatched(module)
        raise ValueError(f"GradNormScorer: {type(module).__name__} was called on {type(input).__name__}; "
                         "per-example gradients need (B, T, features) with batch_first=True, (T, B, features) "
                         "or a PackedSequence.")
    else:
        x, lengths = (input if module.batch_first else input.transpose(0, 1)), None
    lstm = isinstance(module, nn.LSTM)
    out_dtype = x.dtype
    acc = accumulation_dtype(x.dtype)
    w = {n: getattr(module, n).detach().to(acc) for n in module._flat_weights_names}
    batch, steps = x.shape[0], x.shape[1]
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    dirs = 2 if module.bidirectional else 1
    h_size = getattr(module, "proj_size", 0) or module.hidden_size
    mask = None if lengths is None else (
        torch.arange(steps, device=x.device)[:, None] < lengths.to(x.device)[None, :]).unsqueeze(-1)
    h_n, c_n = [], []
    with torch.autocast(x.device.type, enabled=False):
        # Time-major and contiguous: each step reads a contiguous (B, ...) slice, and the GEMM over all steps
        # is one (not one per step, as F.linear on a transposed view without weight gradients would be).
        x = x.to(acc).transpose(0, 1).contiguous()
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                h = h0[k].to(acc) if h0 is not None else x.new_zeros(batch, h_size)
                c = (c0[k].to(acc) if c0 is not None else x.new_zeros(batch, module.hidden_size)) if lstm else None
                cell = _Cell(module.mode, w[f"weight_hh_{sfx}"], w.get(f"bias_hh_{sfx}"), w.get(f"weight_hr_{sfx}"),
                             mask, reverse=bool(d))
                gi = F.linear(x, w[f"weight_ih_{sfx}"], w.get(f"bias_ih_{sfx}"))
                if any(scoring.is_trainable(f"{kind}_{sfx}") for kind in
                       ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")):
                    direction = _Direction(sfx, x.detach(), cell)
                    gi = scoring.tap(gi, direction.norm, direction.grads)
                result = _Recurrence.apply(gi, h, c if lstm else None, cell)
                outs.append(result[0])
                h_n.append(result[1])
                if lstm:
                    c_n.append(result[2])
            x = torch.cat(outs, -1) if dirs > 1 else outs[0]
    output = x.transpose(0, 1).to(out_dtype)  # (B, T, D * H_out)
    h_n = torch.stack(h_n).to(out_dtype)
    if packed:
        order = input.sorted_indices
        rows = output if order is None else output.index_select(0, order)
        data = pack_padded_sequence(rows, lengths if order is None else lengths[order.cpu()], batch_first=True).data
        output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    elif module.batch_first:
        output = output.contiguous()
    else:
        output = output.transpose(0, 1)
    return (output, (h_n, torch.stack(c_n).to(out_dtype))) if lstm else (output, h_n)


for _cls in _RECURRENT:
    register_rule(_cls, None, forward=recurrent_forward, batch_dims=recurrent_batch_dims)
