"""The scoring forwards (registry.RuleSpec.forward) against the modules' own forwards, independent of norms.

During a scoring pass a module's forward is replaced by its rule's scoring forward (`mha_forward` for
nn.MultiheadAttention, `recurrent_forward` for nn.RNN / nn.LSTM / nn.GRU). If one computed anything but the
module's own function, the scorer would silently differentiate something else, so here each is run with an
identity tap and compared with the module itself: every output (the attention weights, h_n, c_n and a
PackedSequence's layout and indices included, None-ness included) and the gradient of a random linear
functional of all outputs w.r.t. the inputs (and initial states; for attention, the parameters too). For
the recurrent layers that gradient runs through `_Cell.backward`, the hand-written backpropagation through
time. Small odd sizes, fixed seeds, float64 with tight tolerances; float32 and bfloat16 recurrences against a
float64 run of the module.
"""
import copy
import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from isgd_kernels.scorer.registry import Scoring
from isgd_kernels.scorer.rules.attention import mha_forward
from isgd_kernels.scorer.rules.recurrent import recurrent_forward
from tests.utils import assert_close_rel

F64 = torch.float64

pytestmark = [pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask"),
              pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")]


def identity_scoring(module: nn.Module) -> Scoring:
    """A Scoring whose tap changes nothing, every parameter trainable (what a scoring pass of a fully
    trainable module hands its scoring forward, minus the norms)."""
    return Scoring(lambda t, norm, grads: t, trainable={n: True for n, _ in module.named_parameters()},
                   label=f"module 'x' ({type(module).__name__})")


def balanced_sweep(options: dict, cases: int, seed: int) -> list[dict]:
    """`cases` option sets: each option's values repeated evenly and shuffled on their own, so every value of
    every option occurs (about) equally often and the combinations are random."""
    rng = random.Random(seed)
    columns = {}
    for name, values in options.items():
        column = [values[i % len(values)] for i in range(cases)]
        rng.shuffle(column)
        columns[name] = column
    return [{name: columns[name][i] for name in options} for i in range(cases)]


# ------------------------------------------------------------------------------ MultiheadAttention

E, B, L, S = 6, 3, 5, 4

MHA_OPTIONS = {
    "batch_first": [False, True],
    "dims": [None, (3, 3), (3, 5)],  # (kdim, vdim); None: embed_dim
    "bias": [True, False],
    "add_bias_kv": [False, True],
    "add_zero_attn": [False, True],
    "heads": [1, 2, 3],
    "dropout": [0.0, 0.25],  # eval mode: no dropout either way
    # which of query, key, value are the same tensor object
    "same": ["qkv", "kv", "qk", "none"],
    "kpm": [None, "bool", "float"],
    # (kind, is_causal): 2-D / 3-D, bool / float, a causal (L, S) mask with and without the is_causal hint
    "mask": [(None, False), ("2d_bool", False), ("2d_float", False), ("3d_bool", False), ("3d_float", False),
             ("causal_bool", False), ("causal_float", False), ("causal_bool", True), ("causal_float", True)],
    "need_weights": [False, True],
    "average": [True, False],
}
MHA_CASES = balanced_sweep(MHA_OPTIONS, 72, seed=2024)


def _resolve_same(case) -> str:
    """The identity option the module's dims allow: query is key needs kdim = embed_dim, key is value
    kdim = vdim."""
    dims, same = case["dims"], case["same"]
    if dims is None:
        return same
    if same in ("qkv", "kv") and dims[0] == dims[1]:
        return "kv"
    return "none"


def _mha_id(i, case) -> str:
    mask, causal = case["mask"]
    return (f"{i}-{'bf' if case['batch_first'] else 'sf'}-dims{case['dims']}-h{case['heads']}"
            f"{'' if case['bias'] else '-nobias'}{'-biaskv' if case['add_bias_kv'] else ''}"
            f"{'-zeroattn' if case['add_zero_attn'] else ''}-same_{_resolve_same(case)}-kpm_{case['kpm']}"
            f"-mask_{mask}{'-is_causal' if causal else ''}"
            f"{('-weights' + ('_avg' if case['average'] else '_heads')) if case['need_weights'] else ''}")


def _bool_mask(shape, gen) -> torch.Tensor:
    """Random True (masked) entries, never in the last dim's first column (no fully masked row: NaN)."""
    mask = torch.rand(shape, generator=gen) < 0.35
    mask[..., 0] = False
    return mask


def _float_mask(shape, gen) -> torch.Tensor:
    """Random additive values with some -inf, never in the last dim's first column."""
    mask = torch.randn(shape, generator=gen, dtype=F64)
    mask[torch.rand(shape, generator=gen) < 0.25] = float("-inf")
    mask[..., 0] = 0.0
    return mask


def _mha_call(case, gen):
    """The module (eval mode, float64) and the call: (query, key, value) leaves with the case's identities
    (each batch-first or sequence-first as the module), the keyword arguments, and the leaves to
    differentiate."""
    kdim, vdim = case["dims"] or (None, None)
    m = nn.MultiheadAttention(E, case["heads"], dropout=case["dropout"], bias=case["bias"],
                              add_bias_kv=case["add_bias_kv"], add_zero_attn=case["add_zero_attn"], kdim=kdim,
                              vdim=vdim, batch_first=case["batch_first"]).double().eval()
    with torch.no_grad():  # nonzero biases (PyTorch zeroes in_proj_bias and out_proj.bias) and bias rows
        for p in m.parameters():
            if p.dim() == 1 or p.shape[:2] == (1, 1):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    same = _resolve_same(case)
    src = L if same in ("qkv", "qk") else S

    def leaf(t, width):
        shape = (B, t, width) if case["batch_first"] else (t, B, width)
        return torch.randn(shape, generator=gen, dtype=F64).requires_grad_()

    query = leaf(L, E)
    if same == "qkv":
        key = value = query
    elif same == "qk":
        key, value = query, leaf(src, E)
    elif same == "kv":
        key = value = leaf(src, kdim or E)
    else:
        key, value = leaf(src, kdim or E), leaf(src, vdim or E)
    leaves = list({id(t): t for t in (query, key, value)}.values())

    kwargs = {"need_weights": case["need_weights"], "average_attn_weights": case["average"]}
    if case["kpm"] == "bool":
        kwargs["key_padding_mask"] = _bool_mask((B, src), gen)
    elif case["kpm"] == "float":
        kwargs["key_padding_mask"] = _float_mask((B, src), gen)
    kind, is_causal = case["mask"]
    if kind is not None:
        shape = (L, src) if not kind.startswith("3d") else (B * case["heads"], L, src)
        if kind.startswith("causal"):
            mask = torch.ones(L, src, dtype=torch.bool).triu(1)
            if kind == "causal_float":
                mask = torch.zeros(L, src, dtype=F64).masked_fill(mask, float("-inf"))
        else:
            mask = _bool_mask(shape, gen) if kind.endswith("bool") else _float_mask(shape, gen)
        kwargs["attn_mask"] = mask
        kwargs["is_causal"] = is_causal
    return m, (query, key, value), kwargs, leaves


def _functional(outputs, gen):
    """A random linear functional of every tensor in `outputs` (None skipped)."""
    total = 0
    for t in outputs:
        if t is not None:
            total = total + (t * torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)).sum()
    return total


def test_mha_sweep_covers_every_option():
    """The sweep holds each option value, each identity case and the interplays of the is_causal hint
    (scaled_dot_product_attention's causal flag only without a key_padding_mask and without weights)."""
    for name, values in MHA_OPTIONS.items():
        for v in values:
            assert any(c[name] == v for c in MHA_CASES), (name, v)
    assert {_resolve_same(c) for c in MHA_CASES} == {"qkv", "kv", "qk", "none"}
    hinted = [c for c in MHA_CASES if c["mask"][1]]
    assert any(c["kpm"] is None and not c["need_weights"] for c in hinted)  # the sdpa causal path
    assert any(c["kpm"] is not None for c in hinted) and any(c["need_weights"] for c in hinted)
    assert any(c["add_bias_kv"] and c["add_zero_attn"] and c["kpm"] and c["mask"][0] for c in MHA_CASES)
    assert any(c["dims"] == (3, 3) and _resolve_same(c) == "kv" for c in MHA_CASES)


@pytest.mark.parametrize("case", MHA_CASES, ids=[_mha_id(i, c) for i, c in enumerate(MHA_CASES)])
def test_mha_forward_matches_module(case):
    gen = torch.Generator().manual_seed(7000 + MHA_CASES.index(case))
    m, (query, key, value), kwargs, leaves = _mha_call(case, gen)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # the training path, as in a scoring pass
        expected = m(query, key, value, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    got = mha_forward(m, identity_scoring(m), query, key, value, **kwargs)

    assert isinstance(got, tuple) and len(got) == 2
    (out, weights), (out_ref, weights_ref) = got, expected
    what = _mha_id(MHA_CASES.index(case), case)
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype, what
    assert_close_rel(out, out_ref, 1e-12, f"{what}: attn_output")
    assert (weights is None) == (weights_ref is None), f"{what}: weights None-ness"
    if weights_ref is not None:
        assert weights.shape == weights_ref.shape, what
        assert_close_rel(weights, weights_ref, 1e-12, f"{what}: attn_output_weights")

    # The same random functional of both; its gradient w.r.t. the inputs and every parameter.
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    wrt = leaves + list(m.parameters())
    g_got = torch.autograd.grad(_functional(got, torch.Generator().manual_seed(seed)), wrt, allow_unused=True)
    g_ref = torch.autograd.grad(_functional(expected, torch.Generator().manual_seed(seed)), wrt,
                                allow_unused=True)
    names = [f"input {i}" for i in range(len(leaves))] + [n for n, _ in m.named_parameters()]
    for name, a, e in zip(names, g_got, g_ref):
        assert (a is None) == (e is None), f"{what}: gradient w.r.t. {name} None-ness"
        if e is not None:
            assert_close_rel(a, e, 1e-12, f"{what}: gradient w.r.t. {name}")


# --------------------------------------------------------------------------- nn.RNN, nn.LSTM, nn.GRU

FEAT, HID, RB, RT = 3, 4, 4, 5

RNN_KINDS = {
    "RNN_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "LSTM": (nn.LSTM, {}),
    "LSTM_proj": (nn.LSTM, {"proj_size": 2}),
    "GRU": (nn.GRU, {}),
}
RNN_OPTIONS = {
    "layers": [1, 2, 3],
    "bidirectional": [False, True],
    "batch_first": [False, True],
    "bias": [True, False],
    "hx": [False, True],
    "input": ["tensor", "packed_unsorted", "packed_sorted"],
}
RNN_CASES = [dict(kind=kind, **opts) for i, kind in enumerate(RNN_KINDS)
             for opts in balanced_sweep(RNN_OPTIONS, 12, seed=300 + i)]


def _rnn_id(i, c) -> str:
    return (f"{i}-{c['kind']}-l{c['layers']}{'-bidir' if c['bidirectional'] else ''}"
            f"-{'bf' if c['batch_first'] else 'sf'}{'' if c['bias'] else '-nobias'}{'-hx' if c['hx'] else ''}"
            f"-{c['input']}" + "".join(f"-{k}{c[k]}" for k in ("batch", "steps", "dropout") if k in c))


def _rnn_module(case, dtype=F64) -> nn.RNNBase:
    cls, kw = RNN_KINDS[case["kind"]]
    m = cls(FEAT, HID, num_layers=case["layers"], bidirectional=case["bidirectional"],
            batch_first=case["batch_first"], bias=case["bias"], dropout=case.get("dropout", 0.0),
            **kw).to(dtype).eval()
    return m.requires_grad_(False)  # as in a scoring pass: recurrent_forward falls back otherwise


def _rnn_leaves(case, m: nn.RNNBase, gen, dtype=F64):
    """The leaves of a call: the input in the module's layout ((B, T, F) padded for a packed input, with its
    lengths) and the initial states (None without hx)."""
    packed = case["input"] != "tensor"
    batch, steps = case.get("batch", RB), case.get("steps", RT)
    shape = (batch, steps, FEAT) if (packed or case["batch_first"]) else (steps, batch, FEAT)
    x = torch.randn(shape, generator=gen, dtype=F64).to(dtype).requires_grad_()
    lengths = None
    if packed and (batch, steps) == (RB, RT):
        # sorted: a tie and a length 1; unsorted: the longest neither first nor last
        lengths = torch.tensor([RT, RT - 1, RT - 1, 1] if case["input"] == "packed_sorted" else [2, RT, 1, RT - 2])
    elif packed:
        lengths = torch.tensor([max(1, steps - i) for i in range(batch)])
        if case["input"] == "packed_unsorted":
            lengths = lengths.roll(1)
    states = None
    if case["hx"]:
        n = m.num_layers * (2 if m.bidirectional else 1)
        h0 = torch.randn(n, batch, getattr(m, "proj_size", 0) or HID, generator=gen, dtype=F64).to(dtype)
        states = [h0.requires_grad_()]
        if isinstance(m, nn.LSTM):
            states.append(torch.randn(n, batch, HID, generator=gen, dtype=F64).to(dtype).requires_grad_())
    return x, lengths, states


def _rnn_args(case, x, lengths, states):
    """(input, hx) for a call; a packed input is packed afresh for each call (its own graph)."""
    if case["input"] == "tensor":
        inp = x
    else:
        inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=case["input"] == "packed_sorted")
    hx = None if states is None else (tuple(states) if len(states) == 2 else states[0])
    return inp, hx


def _rnn_outputs(result) -> list:
    """The floating tensors a recurrent call returns: output (a PackedSequence's data), h_n[, c_n]."""
    out, hidden = result
    data = out.data if isinstance(out, PackedSequence) else out
    return [data, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _check_rnn_structure(got, expected, what):
    """The returned structure: a PackedSequence's batch_sizes and indices, (h_n, c_n) for an LSTM."""
    out, hidden = got
    out_ref, hidden_ref = expected
    assert type(out) is type(out_ref) and type(hidden) is type(hidden_ref), what
    if isinstance(hidden_ref, tuple):
        assert len(hidden) == len(hidden_ref), what
    if isinstance(out_ref, PackedSequence):
        assert torch.equal(out.batch_sizes, out_ref.batch_sizes), f"{what}: batch_sizes"
        for name in ("sorted_indices", "unsorted_indices"):
            a, e = getattr(out, name), getattr(out_ref, name)
            assert (a is None) == (e is None), f"{what}: {name} None-ness"
            if e is not None:
                assert torch.equal(a, e), f"{what}: {name} {a} != {e}"
    for a, e in zip(_rnn_outputs(got), _rnn_outputs(expected)):
        assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"


def _rnn_compare(case, m, ref, dtype, rtol_out, rtol_grad, uses=None, seed=0):
    """recurrent_forward on `m` (dtype) vs `ref` (the module in float64, or `m` itself) on the same values:
    outputs, and the gradient of a random functional of the outputs in `uses` (indices into output, h_n, c_n;
    all by default) w.r.t. the input and initial states."""
    assert not any(p.requires_grad for p in m.parameters())  # else recurrent_forward runs the module's own
    gen = torch.Generator().manual_seed(seed)
    x, lengths, states = _rnn_leaves(case, m, gen, dtype)
    x_ref = x if ref is m else x.detach().double().requires_grad_()
    states_ref = states if (ref is m or states is None) else [s.detach().double().requires_grad_() for s in states]
    expected = ref(*_rnn_args(case, x_ref, lengths, states_ref))
    got = recurrent_forward(m, identity_scoring(m), *_rnn_args(case, x, lengths, states))
    what = _rnn_id(RNN_CASES.index(case) if case in RNN_CASES else -1, case)
    _check_rnn_structure(got, expected, what)
    outs, outs_ref = _rnn_outputs(got), _rnn_outputs(expected)
    for name, a, e in zip(["output", "h_n", "c_n"], outs, outs_ref):
        assert a.dtype == dtype, f"{what}: {name} dtype {a.dtype}"
        assert_close_rel(a, e, rtol_out, f"{what}: {name}")

    uses = range(len(outs)) if uses is None else uses
    weights = [torch.randn(outs_ref[i].shape, generator=gen, dtype=F64) for i in uses]
    if dtype != F64:
        weights = [w.to(dtype) for w in weights]  # the same values for both runs
    f_got = sum((outs[i] * w).sum() for i, w in zip(uses, weights))
    f_ref = sum((outs_ref[i] * w.double()).sum() for i, w in zip(uses, weights))
    wrt, wrt_ref = [x, *(states or [])], [x_ref, *(states_ref or [])]
    g_got = torch.autograd.grad(f_got, wrt, allow_unused=True)
    g_ref = torch.autograd.grad(f_ref, wrt_ref, allow_unused=True)
    for name, leaf, a, e in zip(["input", "h0", "c0"], wrt, g_got, g_ref):
        a = torch.zeros_like(leaf) if a is None else a
        e = torch.zeros_like(leaf, dtype=F64) if e is None else e
        assert a.dtype == dtype, f"{what}: gradient w.r.t. {name} dtype {a.dtype}"
        if not e.abs().max() > 0:
            assert torch.equal(a, torch.zeros_like(a)), f"{what}: gradient w.r.t. {name} should be zero"
            continue
        assert_close_rel(a, e, rtol_grad, f"{what}: gradient w.r.t. {name}")


def test_rnn_sweep_covers_every_option():
    for kind in RNN_KINDS:
        cases = [c for c in RNN_CASES if c["kind"] == kind]
        for name, values in RNN_OPTIONS.items():
            assert {c[name] for c in cases} == set(values), (kind, name)


@pytest.mark.parametrize("case", RNN_CASES, ids=[_rnn_id(i, c) for i, c in enumerate(RNN_CASES)])
def test_recurrent_forward_matches_module(case):
    torch.manual_seed(400 + RNN_CASES.index(case))
    m = _rnn_module(case)
    _rnn_compare(case, m, m, F64, 1e-12, 1e-12, seed=500 + RNN_CASES.index(case))


# Gradients reaching only some outputs: _Recurrence's backward gets None for the others.
PARTIAL = [
    (dict(kind="LSTM", layers=2, bidirectional=True, batch_first=True, bias=True, hx=True, input="tensor"), (1,)),
    (dict(kind="LSTM_proj", layers=1, bidirectional=False, batch_first=False, bias=True, hx=True,
          input="packed_unsorted"), (2,)),
    (dict(kind="LSTM", layers=1, bidirectional=True, batch_first=False, bias=False, hx=False, input="tensor"), (0,)),
    (dict(kind="GRU", layers=2, bidirectional=True, batch_first=False, bias=True, hx=True,
          input="packed_unsorted"), (1,)),
    (dict(kind="GRU", layers=1, bidirectional=False, batch_first=True, bias=True, hx=True, input="tensor"), (0,)),
    (dict(kind="RNN_tanh", layers=3, bidirectional=False, batch_first=True, bias=True, hx=True,
          input="packed_sorted"), (1,)),
]


@pytest.mark.parametrize("case,uses", PARTIAL, ids=[f"{_rnn_id(i, c)}-uses{u}" for i, (c, u) in enumerate(PARTIAL)])
def test_recurrent_forward_gradient_of_some_outputs(case, uses):
    torch.manual_seed(600)
    m = _rnn_module(case)
    _rnn_compare(case, m, m, F64, 1e-12, 1e-12, uses=uses, seed=601)


def _edge(kind, input, batch, steps, **kw):
    return dict(kind=kind, layers=2, bidirectional=True, batch_first=False, bias=True, hx=True, input=input,
                batch=batch, steps=steps, **kw)


# One step, one example, both; inter-layer dropout in eval mode (the module drops nothing; nor may the scoring
# forward).
EDGE = [_edge(kind, inp, b, t) for kind in RNN_KINDS for inp, b, t in
        (("tensor", 1, 1), ("packed_unsorted", 3, 1), ("packed_sorted", 1, 3))] + \
       [_edge(kind, "packed_unsorted", 3, 4, dropout=0.5) for kind in ("LSTM_proj", "GRU", "RNN_relu")]


@pytest.mark.parametrize("case", EDGE, ids=[_rnn_id(i, c) for i, c in enumerate(EDGE)])
def test_recurrent_forward_edge_shapes_and_eval_dropout(case):
    torch.manual_seed(650)
    m = _rnn_module(case)
    _rnn_compare(case, m, m, F64, 1e-12, 1e-12, seed=651)


LOW = [
    (torch.float32, dict(kind="LSTM_proj", layers=2, bidirectional=True, batch_first=False, bias=True, hx=True,
                         input="packed_unsorted"), 1e-5, 1e-5),
    (torch.float32, dict(kind="GRU", layers=2, bidirectional=True, batch_first=True, bias=True, hx=True,
                         input="tensor"), 1e-5, 1e-5),
    (torch.bfloat16, dict(kind="LSTM", layers=2, bidirectional=True, batch_first=True, bias=True, hx=True,
                          input="packed_unsorted"), 1e-2, 2e-2),
    (torch.bfloat16, dict(kind="GRU", layers=2, bidirectional=False, batch_first=False, bias=True, hx=True,
                          input="tensor"), 1e-2, 2e-2),
]


@pytest.mark.parametrize("dtype,case,rtol_out,rtol_grad", LOW,
                         ids=[f"{str(d).split('.')[-1]}-{_rnn_id(i, c)}" for i, (d, c, _, _) in enumerate(LOW)])
def test_recurrent_forward_low_precision_against_float64_module(dtype, case, rtol_out, rtol_grad):
    """float32 and bfloat16 modules and inputs (bfloat16 computes in float32 inside): against the float64
    module on the same (rounded) weights and inputs."""
    torch.manual_seed(700)
    m = _rnn_module(case, dtype)
    ref = copy.deepcopy(m).double()
    _rnn_compare(case, m, ref, dtype, rtol_out, rtol_grad, seed=701)
