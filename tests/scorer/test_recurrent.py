"""nn.RNN, nn.LSTM, nn.GRU rules of the scorer against per-example float64 references.

torch.func.vmap cannot run the fused recurrent ops, so the reference is the per-example autograd loop
(one backward per example on the model, float64). Inputs are fresh random draws with odd sizes.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from isgd_kernels import GradNormScorer
from isgd_kernels.scorer.reference import per_example_grad_norms_loop as loop_norms
from isgd_kernels.scorer.registry import RULES
from tests.utils import DEVICES, assert_close_rel

F64 = torch.float64
VOCAB, EMB, HIDDEN, CLASSES = 11, 5, 6, 7

# (module class, keyword options): every option the rule handles, each at least once.
CONFIGS = [
    (nn.LSTM, {}),
    (nn.GRU, {}),
    (nn.RNN, {}),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.GRU, {"num_layers": 3, "bidirectional": True}),
    (nn.RNN, {"num_layers": 2, "bidirectional": True, "bias": False}),
    (nn.LSTM, {"proj_size": 4}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 3, "bias": False}),
    (nn.GRU, {"bias": False}),
]


def _ids(configs):
    return [cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items()) for cls, kw in configs]


def _out_features(rnn: nn.RNNBase) -> int:
    return (getattr(rnn, "proj_size", 0) or rnn.hidden_size) * (2 if rnn.bidirectional else 1)


def _states(rnn_out):
    """h_n of (output, h_n) or of (output, (h_n, c_n))."""
    return rnn_out[1][0] if isinstance(rnn_out[1], tuple) else rnn_out[1]


class Tagger(nn.Module):
    """Embedding -> recurrent layer -> per-token logits; sequence-first inside when batch_first=False."""

    def __init__(self, cls, batch_first, **kw):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.rnn = cls(EMB, HIDDEN, batch_first=batch_first, **kw)
        self.head = nn.Linear(_out_features(self.rnn), CLASSES)

    def forward(self, tokens):
        e = self.emb(tokens)
        if not self.rnn.batch_first:
            e = e.transpose(0, 1)  # (T, B, E)
        out = self.rnn(e)[0]
        if not self.rnn.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out))


def tag_loss(logits, targets):
    """Per-example mean over tokens of the cross-entropy."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def xent(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


def _tokens(batch, steps, device="cpu"):
    return torch.randint(1, VOCAB, (batch, steps), device=device), torch.randint(0, CLASSES, (batch, steps),
                                                                                device=device)


def test_recurrent_rules_registered():
    for cls in (nn.RNN, nn.LSTM, nn.GRU):
        assert cls in RULES and RULES[cls].batch_dims is not None and RULES[cls].forward is not None


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=_ids(CONFIGS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_tagger_matches_per_example_loop(cls, kw, batch_first):
    torch.manual_seed(50)
    model = Tagger(cls, batch_first, **kw).double()
    tokens, targets = _tokens(5, 9)
    got = GradNormScorer(model).norms(tokens, targets, tag_loss)
    assert got.dtype == F64
    assert_close_rel(got, loop_norms(model, tag_loss, tokens, targets), 1e-10, f"{cls.__name__} {kw}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_lstm_on_each_device_and_backend(device, backend):
    torch.manual_seed(51)
    model = Tagger(nn.LSTM, True, num_layers=2, bidirectional=True).double().to(device)
    tokens, targets = _tokens(6, 13, device)
    got = GradNormScorer(model, backend=backend).norms(tokens, targets, tag_loss)
    assert_close_rel(got, loop_norms(model, tag_loss, tokens, targets), 1e-10, f"{device} {backend}")


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_float32_matches_float64(cls):
    torch.manual_seed(52)
    kw = {"num_layers": 2, "bidirectional": True} | ({"proj_size": 4} if cls is nn.LSTM else {})
    model = Tagger(cls, False, **kw)
    tokens, targets = _tokens(7, 11)
    got = GradNormScorer(model).norms(tokens, targets, tag_loss)
    assert got.dtype == torch.float32
    expected = loop_norms(copy.deepcopy(model).double(), tag_loss, tokens, targets)
    assert_close_rel(got, expected, 1e-4, cls.__name__)


def test_bfloat16_model_accumulates_in_float32():
    torch.manual_seed(52)
    model = Tagger(nn.LSTM, True, num_layers=2).to(torch.bfloat16)
    tokens, targets = _tokens(5, 7)
    got = GradNormScorer(model).norms(tokens, targets, tag_loss)
    assert got.dtype == torch.float32
    expected = loop_norms(copy.deepcopy(model).double(), tag_loss, tokens, targets)
    assert_close_rel(got, expected, 5e-2, "bf16")


class StateClassifier(nn.Module):
    """A classifier reading the final states only (h_n, and c_n when `cell`), never the output sequence."""

    def __init__(self, cls, batch_first, cell=False, **kw):
        super().__init__()
        self.rnn = cls(EMB, HIDDEN, batch_first=batch_first, **kw)
        self.cell = cell
        layers = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        width = layers * ((getattr(self.rnn, "proj_size", 0) or HIDDEN) + (HIDDEN if cell else 0))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):  # x (B, T, E)
        out = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        states = [out[1][0], out[1][1]] if self.cell else [_states(out)]
        return self.head(torch.cat([s.transpose(0, 1).flatten(1) for s in states], 1))


@pytest.mark.parametrize("cls,kw,cell", [(nn.LSTM, {"num_layers": 2, "bidirectional": True}, False),
                                         (nn.LSTM, {"num_layers": 2, "proj_size": 3}, True),
                                         (nn.GRU, {"num_layers": 2, "bidirectional": True}, False),
                                         (nn.RNN, {}, False)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_classifier_on_final_states(cls, kw, cell, batch_first):
    """The gradient arrives through h_n (and c_n) only; the output sequence's gradient is zero."""
    torch.manual_seed(53)
    model = StateClassifier(cls, batch_first, cell, **kw).double()
    x, y = torch.randn(6, 8, EMB, dtype=F64), torch.randint(0, CLASSES, (6,))
    got = GradNormScorer(model).norms(x, y, xent)
    assert_close_rel(got, loop_norms(model, xent, x, y), 1e-10, cls.__name__)


class WithInitialState(nn.Module):
    """h0 (and c0) computed from the example by a Linear layer: the state's gradient flows back to it."""

    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(EMB, HIDDEN, batch_first=True, **kw)
        self.layers = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.h_size = getattr(self.rnn, "proj_size", 0) or HIDDEN
        self.init_h = nn.Linear(EMB, self.layers * self.h_size)
        self.init_c = nn.Linear(EMB, self.layers * HIDDEN) if cls is nn.LSTM else None
        self.head = nn.Linear(_out_features(self.rnn), CLASSES)

    def initial_state(self, ctx):
        """h0, or (h0, c0) for an LSTM, (layers, B, *) from a per-example summary ctx (B, E)."""
        h0 = torch.tanh(self.init_h(ctx)).view(-1, self.layers, self.h_size).transpose(0, 1).contiguous()
        if self.init_c is None:
            return h0
        return h0, self.init_c(ctx).view(-1, self.layers, HIDDEN).transpose(0, 1).contiguous()

    def forward(self, x):  # x (B, T, E); its mean over time sets the initial state
        out, _ = self.rnn(x, self.initial_state(x.mean(1)))
        return self.head(out.mean(1))


STATE_CONFIGS = [(nn.LSTM, {"num_layers": 2, "bidirectional": True}), (nn.LSTM, {"proj_size": 4}),
                 (nn.GRU, {"num_layers": 2}), (nn.RNN, {"bidirectional": True})]


@pytest.mark.parametrize("cls,kw", STATE_CONFIGS, ids=_ids(STATE_CONFIGS))
def test_initial_state_passed(cls, kw):
    torch.manual_seed(54)
    model = WithInitialState(cls, **kw).double()
    x, y = torch.randn(5, 7, EMB, dtype=F64), torch.randint(0, CLASSES, (5,))
    got = GradNormScorer(model).norms(x, y, xent)
    assert_close_rel(got, loop_norms(model, xent, x, y), 1e-10, cls.__name__)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_sequence_first_with_T_equal_to_B_is_exact(cls):
    """(T, B, ...) activations with T == B: the declared layout is checked by the probe, and accepted."""
    torch.manual_seed(55)
    model = Tagger(cls, False, num_layers=2, bidirectional=True).double()
    tokens, targets = _tokens(6, 6)
    got = GradNormScorer(model).norms(tokens, targets, tag_loss)
    assert_close_rel(got, loop_norms(model, tag_loss, tokens, targets), 1e-10, cls.__name__)


class PackedTagger(nn.Module):
    """Padded tokens (0 = padding) packed by length, a recurrent layer, unpacked; per-token logits and a
    classifier on h_n."""

    def __init__(self, cls, batch_first, enforce_sorted=False, **kw):
        super().__init__()
        self.enforce_sorted = enforce_sorted
        self.emb = nn.Embedding(VOCAB, EMB, padding_idx=0)
        self.rnn = cls(EMB, HIDDEN, batch_first=batch_first, **kw)
        self.head = nn.Linear(_out_features(self.rnn), CLASSES)
        layers = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.cls_head = nn.Linear(layers * (getattr(self.rnn, "proj_size", 0) or HIDDEN), CLASSES)

    def forward(self, tokens):
        steps, lengths = tokens.shape[1], (tokens != 0).sum(1).cpu()
        e = self.emb(tokens)
        if not self.rnn.batch_first:
            e = e.transpose(0, 1)
        packed = pack_padded_sequence(e, lengths, batch_first=self.rnn.batch_first,
                                      enforce_sorted=self.enforce_sorted)
        out = self.rnn(packed)
        seq = pad_packed_sequence(out[0], batch_first=True, total_length=steps)[0]
        return self.head(seq), self.cls_head(_states(out).transpose(0, 1).flatten(1))


def packed_loss(outputs, targets):
    """Mean cross-entropy over each example's own tokens, plus the classifier's loss on the first target."""
    logits, cls_logits = outputs
    valid = (targets >= 0).to(logits.dtype)
    tok = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (tok * valid).sum(1) / valid.sum(1) + xent(cls_logits, targets[:, 0])


PACKED_CONFIGS = [(nn.LSTM, {"num_layers": 2, "bidirectional": True}),
                  (nn.LSTM, {"bidirectional": True, "proj_size": 4}),
                  (nn.GRU, {"num_layers": 2, "bidirectional": True}), (nn.RNN, {})]


@pytest.mark.parametrize("cls,kw", PACKED_CONFIGS, ids=_ids(PACKED_CONFIGS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_sequences(cls, kw, batch_first):
    """Examples of different lengths, unsorted: each example's recurrence runs over its own tokens only."""
    torch.manual_seed(56)
    model = PackedTagger(cls, batch_first, **kw).double()
    tokens, targets = _tokens(5, 8)
    lengths = torch.tensor([3, 8, 1, 5, 6])
    pad = torch.arange(8)[None, :] >= lengths[:, None]
    tokens[pad], targets[pad] = 0, -1
    got = GradNormScorer(model).norms(tokens, targets, packed_loss)
    assert_close_rel(got, loop_norms(model, packed_loss, tokens, targets), 1e-10, cls.__name__)


class PackedStates(WithInitialState):
    """Packed examples of different lengths, the initial state computed from the example, a classifier on the
    final states h_n and c_n: their gradients pass through each example's padding steps unchanged."""

    def __init__(self, cls, **kw):
        super().__init__(cls, **kw)
        self.head = nn.Linear(self.layers * (self.h_size + (HIDDEN if cls is nn.LSTM else 0)), CLASSES)

    def forward(self, x, lengths):  # x (B, T, E), zero past each example's length
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, final = self.rnn(packed, self.initial_state(x.sum(1)))
        final = final if isinstance(final, tuple) else (final,)
        return self.head(torch.cat([f.transpose(0, 1).flatten(1) for f in final], 1))


@pytest.mark.parametrize("cls,kw", PACKED_CONFIGS, ids=_ids(PACKED_CONFIGS))
def test_packed_final_states_and_initial_state(cls, kw):
    torch.manual_seed(58)
    model = PackedStates(cls, **kw).double()
    lengths = torch.tensor([3, 7, 1, 5, 6])
    x = torch.randn(5, 7, EMB, dtype=F64) * (torch.arange(7)[None, :, None] < lengths[:, None, None])
    y = torch.randint(0, CLASSES, (5,))
    got = GradNormScorer(model).norms((x, lengths), y, xent)
    assert_close_rel(got, loop_norms(model, xent, (x, lengths), y), 1e-10, cls.__name__)


def test_packed_sorted_batch():
    """enforce_sorted=True (no index tensors in the PackedSequence) on a batch sorted by length: exact. The
    scorer's check forward on the batch in reverse order breaks the sorting, so that check must be off."""
    torch.manual_seed(56)
    model = PackedTagger(nn.LSTM, True, enforce_sorted=True, num_layers=2, bidirectional=True).double()
    tokens, targets = _tokens(4, 6)
    pad = torch.arange(6)[None, :] >= torch.tensor([6, 4, 4, 2])[:, None]
    tokens[pad], targets[pad] = 0, -1
    with pytest.raises(ValueError, match="layout probe runs the model once on the batch in reverse order.*"
                                         "enforce_sorted=False"):
        GradNormScorer(model).norms(tokens, targets, packed_loss)
    got = GradNormScorer(model, check_examples_separate=False).norms(tokens, targets, packed_loss)
    assert_close_rel(got, loop_norms(model, packed_loss, tokens, targets), 1e-10, "sorted")


class Siamese(nn.Module):
    """One LSTM encoder called on both halves of the input, then a GRU called twice, the second call
    starting from the first call's final state."""

    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(EMB, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.dec = nn.GRU(2 * HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):  # x (B, 2T, E)
        half = x.shape[1] // 2
        a, b = self.enc(x[:, :half])[0], self.enc(x[:, half:])[0]
        _, h = self.dec(a.transpose(0, 1))
        out, _ = self.dec(b.transpose(0, 1), h)
        return self.head(out[-1])


def test_layer_called_twice_is_exact():
    torch.manual_seed(57)
    model = Siamese().double()
    x, y = torch.randn(5, 10, EMB, dtype=F64), torch.randint(0, CLASSES, (5,))
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), loop_norms(model, xent, x, y), 1e-10, "twice")


def test_weight_tied_across_two_lstms_is_exact():
    torch.manual_seed(58)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.LSTM(EMB, HIDDEN, batch_first=True), nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
            self.b.weight_hh_l0 = self.a.weight_hh_l0  # one recurrent matrix for both
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            return self.head(self.b(self.a(x)[0])[0].mean(1))

    model = Tied().double()
    x, y = torch.randn(6, 7, EMB, dtype=F64), torch.randint(0, CLASSES, (6,))
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), loop_norms(model, xent, x, y), 1e-10, "tied")


@pytest.mark.parametrize("frozen", [["weight_ih_l0"], ["weight_hh_l1_reverse", "bias_ih_l1"],
                                    ["weight_hr_l0", "weight_hr_l1_reverse"],
                                    [f"{w}_l0{d}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                            "weight_hr") for d in ("", "_reverse")]])
def test_frozen_parameters(frozen):
    """Any subset frozen, down to a whole frozen first layer (replayed without a graph)."""
    torch.manual_seed(59)
    model = Tagger(nn.LSTM, True, num_layers=2, bidirectional=True, proj_size=4).double()
    for name in frozen:
        getattr(model.rnn, name).requires_grad_(False)
    tokens, targets = _tokens(5, 6)
    assert_close_rel(GradNormScorer(model).norms(tokens, targets, tag_loss),
                     loop_norms(model, tag_loss, tokens, targets), 1e-10, str(frozen))


def test_verify_on_a_recurrent_model():
    torch.manual_seed(60)
    model = Tagger(nn.GRU, False, num_layers=2, bidirectional=True)
    tokens, targets = _tokens(8, 10)
    report = GradNormScorer(model).verify(tokens, targets, tag_loss)
    assert report.ok, str(report)


def test_dropout_between_layers_in_training_is_refused():
    torch.manual_seed(61)
    model = Tagger(nn.LSTM, True, num_layers=2, dropout=0.3).double()
    tokens, targets = _tokens(4, 5)
    with pytest.raises(ValueError, match=r"LSTM.*training mode with dropout=0.3.*eval_mode=True"):
        GradNormScorer(model, eval_mode=False).norms(tokens, targets, tag_loss)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    got = GradNormScorer(model).norms(tokens, targets, tag_loss)  # eval mode: no dropout, exact
    assert_close_rel(got, loop_norms(model.eval(), tag_loss, tokens, targets), 1e-10, "eval")


def test_unbatched_input_is_refused():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(EMB, HIDDEN)
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):  # x (T, E): one sequence
            return self.head(self.rnn(x)[0])

    with pytest.raises(ValueError, match=r"GRU.*unbatched input.*batch_first=True"):
        GradNormScorer(Unbatched()).norms(torch.randn(5, EMB), torch.randint(0, CLASSES, (5,)), xent)


def test_reparametrized_weights_are_refused():
    """Old-style weight_norm replaces weight_hh_l0 by two parameters the recurrence does not read directly:
    refused by the parameter-use watch, and by the rule when that check is off."""
    torch.manual_seed(62)
    model = Tagger(nn.GRU, True)
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model.rnn, "weight_hh_l0")
    tokens, targets = _tokens(4, 5)
    with pytest.raises(ValueError, match=r"weight_hh_l0_g"):
        GradNormScorer(model).norms(tokens, targets, tag_loss)
    with pytest.raises(ValueError, match=r"'rnn' \(GRU\).*weight_hh_l0_g.*Freeze them"):
        GradNormScorer(model, check_examples_separate=False).norms(tokens, targets, tag_loss)
