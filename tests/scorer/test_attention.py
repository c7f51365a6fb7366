"""nn.MultiheadAttention and the nn.Transformer* layers against float64 per-example references.

References are one autograd backward per example on the float64 model (or torch.func.vmap(grad)), with
fresh random inputs and small odd sizes; float32 scoring is compared with the float64 reference.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels import GradNormScorer
from isgd_kernels.scorer.reference import per_example_grad_norms_vmap
from tests.utils import DEVICES, assert_close_rel

F64 = torch.float64

# nn.Transformer's notes on its inference fast paths, a prototype-API note from one, vmap's on attention
pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
              pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet")]


def loop_norms(model, loss_fn, inputs: tuple, targets) -> torch.Tensor:
    """||grad_theta l_i|| by one float64 backward per example; inputs and targets sliced along dim 0."""
    return loop_norms_of(model, model, inputs, targets, loss_fn)


def loop_norms_of(fn, model, inputs: tuple, targets, loss_fn=None) -> torch.Tensor:
    loss_fn = loss_fn or weighted_loss
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(inputs[0].shape[0]):
        loss = loss_fn(fn(*(a[i:i + 1] for a in inputs)), targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum(g.double().square().sum() for g in grads if g is not None))
    return torch.stack(out).sqrt()


def weighted_loss(out, target):
    """Per-example loss of a (B, L, E) output, or of (output, weights): each position has its own gradient."""
    if isinstance(out, tuple):
        out, w = out
        return (out * target).flatten(1).sum(1) + (w.flatten(1) * torch.arange(w[0].numel(), dtype=w.dtype,
                                                                              device=w.device).cos()).sum(1)
    return (out * target).flatten(1).sum(1)


# ------------------------------------------------------------------------------ MultiheadAttention

E, HEADS, L, S = 6, 2, 5, 4

MODULES = {
    "packed": {},
    "no_bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim": dict(kdim=3, vdim=5),
}

# (self-attention, key_padding_mask, attn_mask, is_causal, need_weights, average_attn_weights,
#  the loss uses the weights)
CALLS = {
    "plain": (True, None, None, False, False, True, False),
    "cross": (False, None, None, False, False, True, False),
    "weights_used": (True, None, None, False, True, True, True),
    "weights_per_head_used": (False, None, None, False, True, False, True),
    "weights_unused": (True, None, None, False, True, True, False),
    "kpm_bool": (False, "bool", None, False, False, True, False),
    "kpm_float_weights": (True, "float", None, False, True, True, True),
    "mask2d_bool": (True, None, "2d_bool", False, False, True, False),
    "mask2d_float_weights": (False, None, "2d_float", False, True, True, True),
    "mask3d": (True, None, "3d", False, False, True, False),
    "mask3d_kpm_weights": (True, "bool", "3d", False, True, False, True),
    "causal": (True, None, "causal", True, False, True, False),
    "causal_kpm": (True, "float", "causal", True, False, True, False),
    "causal_weights": (True, None, "causal", True, True, True, True),
}


class Attend(nn.Module):
    """One MultiheadAttention on slices of a batch-first input x (B, L + S, F), with per-example masks built
    from a per-example random tensor r (B, L, S): the masks follow the examples wherever they are."""

    def __init__(self, module_kw, call, batch_first):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **module_kw)
        with torch.no_grad():  # non-zero biases, so that a missing bias term shows
            for name, p in self.mha.named_parameters():
                if "bias" in name:
                    p.uniform_(-0.5, 0.5)
        self.call = call
        self.batch_first = batch_first

    def forward(self, x, r):
        self_attn, kpm, mask, is_causal, need_weights, average, _ = self.call
        kdim, vdim = self.mha.kdim, self.mha.vdim
        if self_attn:
            q = k = v = x[:, :L, :E]
            src = L
        else:
            q, k, v = x[:, :L, :E], x[:, L:, :kdim], x[:, L:, :vdim]
            src = S
        if not self.batch_first:
            if self_attn:
                q = k = v = q.transpose(0, 1)  # query is key is value, as in self-attention
            else:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        r = r[:, :, :src]
        kw = {}
        if kpm is not None:
            pad = r[:, 0] > 0.3
            pad[:, 0] = False  # every row attends somewhere
            kw["key_padding_mask"] = pad if kpm == "bool" else pad.to(x.dtype) * -1e4 + r[:, 1] * 0.1
        if mask == "2d_bool":
            kw["attn_mask"] = torch.ones(L, src, dtype=torch.bool, device=x.device).triu(2)
        elif mask == "2d_float":
            kw["attn_mask"] = torch.linspace(-1, 1, L * src, dtype=x.dtype, device=x.device).view(L, src)
        elif mask == "3d":
            m3 = r > 0.5
            m3[:, :, 0] = False
            kw["attn_mask"] = m3.repeat_interleave(HEADS, 0)  # (B*heads, L, S), example-major as PyTorch's
        elif mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            kw["is_causal"] = is_causal
        out, w = self.mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
        out = out if self.batch_first else out.transpose(0, 1)
        return (out, w) if self.call[-1] else out


def _attend_case(module_name, call_name, batch_first, batch=4, dtype=F64):
    call = CALLS[call_name]
    kw = MODULES[module_name]
    if "kdim" in kw and call[0]:
        call = (False,) + call[1:]  # different key/value widths: cross-attention
    assert call[0] or call[2] != "causal", "a causal mask is square: self-attention only"
    model = Attend(kw, call, batch_first).to(dtype)
    x = torch.randn(batch, L + S, max(E, 5), dtype=dtype)
    r = torch.rand(batch, L, L, dtype=dtype)
    target = torch.randn(batch, L, E, dtype=dtype)
    return model, (x, r), target


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("module_name,call_name", [(m, c) for m in MODULES for c in CALLS
                                                   if not ("kdim" in MODULES[m] and CALLS[c][2] == "causal")])
def test_mha_matches_per_example_loop(module_name, call_name, batch_first):
    torch.manual_seed(hash((module_name, call_name, batch_first)) % 1000)
    model, inputs, target = _attend_case(module_name, call_name, batch_first)
    got = GradNormScorer(model).norms(inputs, target, weighted_loss)
    expected = loop_norms(model, weighted_loss, inputs, target)
    assert_close_rel(got, expected, 1e-10, f"{module_name}/{call_name}")


def test_mha_sequence_first_with_T_equal_to_B_is_exact():
    """(L, B, E) with L == B: the declared batch dim (1) is used, not refused and not mixed up with dim 0."""
    torch.manual_seed(1)
    model, inputs, target = _attend_case("packed", "weights_used", batch_first=False, batch=L)
    assert inputs[0].shape[0] == L
    got = GradNormScorer(model).norms(inputs, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, inputs, target), 1e-10)


@pytest.mark.parametrize("module_name,call_name", [("packed", "causal_kpm"), ("kdim_vdim", "weights_used"),
                                                   ("bias_kv_zero_attn", "mask3d_kpm_weights")])
def test_mha_float32_matches_float64(module_name, call_name):
    torch.manual_seed(2)
    model, inputs, target = _attend_case(module_name, call_name, True, batch=6, dtype=torch.float32)
    got = GradNormScorer(model).norms(inputs, target, weighted_loss)
    assert got.dtype == torch.float32
    model64 = copy.deepcopy(model).double()
    expected = loop_norms(model64, weighted_loss, tuple(t.double() for t in inputs), target.double())
    assert_close_rel(got, expected, 1e-4)


@pytest.mark.parametrize("trainable", [["out_proj.weight"], ["out_proj.bias"], ["in_proj_bias"],
                                       ["in_proj_weight"], ["bias_k", "bias_v"],
                                       ["q_proj_weight", "in_proj_bias"],
                                       ["k_proj_weight", "out_proj.weight"]])
def test_mha_with_some_parameters_frozen(trainable):
    torch.manual_seed(3)
    separate = any(n.startswith(("q_", "k_")) for n in trainable)
    model, inputs, target = _attend_case("kdim_vdim" if separate else "bias_kv", "kpm_float_weights", True)
    for name, p in model.mha.named_parameters():
        p.requires_grad_(name in trainable)
    got = GradNormScorer(model).norms(inputs, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, inputs, target), 1e-10)


class TwoCalls(nn.Module):
    """One MultiheadAttention called twice, and a second one sharing its packed in-projection weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(E, HEADS, batch_first=True, add_bias_kv=True)
        self.b = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.b.in_proj_weight = self.a.in_proj_weight

    def forward(self, x):
        h = x[:, :L, :E]
        h = h + self.a(h, h, h)[0]
        h = h + self.a(h, x[:, L:, :E], x[:, L:, :E], need_weights=False)[0]
        return self.b(h, h, h, need_weights=False)[0]


def test_mha_called_twice_and_shared_weights():
    """Several uses of one parameter (a call on itself, a cross-attention call, a weight tied to another
    module): the pieces' per-example gradients of every use, in-projection row blocks included, are summed
    before the norm."""
    torch.manual_seed(4)
    model = TwoCalls().double()
    x, target = torch.randn(5, L + S, E, dtype=F64), torch.randn(5, L, E, dtype=F64)
    got = GradNormScorer(model).norms(x, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, (x,), target), 1e-10)


def test_mha_dropout_in_training_mode_and_unbatched_input_are_refused():
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.1, batch_first=True)

    class Net(nn.Module):
        def __init__(self, unbatched=False):
            super().__init__()
            self.mha, self.unbatched = mha, unbatched

        def forward(self, x):
            if self.unbatched:
                return torch.stack([self.mha(t, t, t)[0] for t in x])
            return self.mha(x, x, x)[0]

    x, target = torch.randn(3, L, E), torch.randn(3, L, E)
    with pytest.raises(ValueError, match="training mode with dropout=0.1"):
        GradNormScorer(Net(), eval_mode=False).norms(x, target, weighted_loss)
    GradNormScorer(Net()).norms(x, target, weighted_loss)  # eval mode: dropout off
    with pytest.raises(ValueError, match="unbatched inputs"):
        GradNormScorer(Net(unbatched=True)).norms(x, target, weighted_loss)


class Latents(nn.Module):
    """Perceiver / DETR-style queries: a bare parameter (N, E), the same for every example, attends to the
    input (cross-attention), then to itself; a positional table with no batch goes through an attention call
    of its own before it is added."""

    def __init__(self, n=3):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n, E))
        self.table = nn.Parameter(torch.randn(1, n, E))
        self.cross = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.mix = nn.MultiheadAttention(E, HEADS, batch_first=True, add_bias_kv=True)
        self.pos = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.detr = nn.MultiheadAttention(E, HEADS)  # sequence-first, as DETR's decoder

    def forward(self, x):
        q = self.latents.expand(x.shape[0], -1, -1)
        h = self.cross(q, x, x, need_weights=False)[0]
        h = h + self.pos(self.table, self.table, self.table, need_weights=False)[0]
        seq = x.transpose(0, 1)
        queries = self.latents.unsqueeze(1).repeat(1, x.shape[0], 1)  # (N, B, E): no batch in dim 0
        h = h + self.detr(queries, seq, seq)[0].transpose(0, 1)
        return self.mix(h, h, h)[0]


def test_mha_on_parameters_without_the_batch():
    """Parameters reach attention calls through their inputs: DETR's sequence-first queries are followed into
    the call (its query projection, batch-first, takes their gradient); a parameter passed as the input of a
    call with no batch (the positional table) is followed out of it to the add, where it is scored."""
    torch.manual_seed(8)
    model = Latents().double()
    x, target = torch.randn(4, 5, E, dtype=F64), torch.randn(4, 3, E, dtype=F64)
    got = GradNormScorer(model).norms(x, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, (x,), target), 1e-10)


# ------------------------------------------------------------------------------ whole models

class GPT(nn.Module):
    """GPT-2-like: token + learned positional embeddings, pre-norm blocks of causal nn.MultiheadAttention and
    a GELU MLP, final LayerNorm, head tied to the token embedding."""

    def __init__(self, vocab=17, d=12, heads=3, layers=2, max_len=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), attn=nn.MultiheadAttention(d, heads, batch_first=True), ln2=nn.LayerNorm(d),
            up=nn.Linear(d, 2 * d), down=nn.Linear(2 * d, d))) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.shape
        h = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device).expand(b, t))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device, dtype=h.dtype)
        for b in self.blocks:
            a = b["ln1"](h)
            h = h + b["attn"](a, a, a, attn_mask=causal, is_causal=True, need_weights=False)[0]
            h = h + b["down"](F.gelu(b["up"](b["ln2"](h))))
        return self.lm_head(self.ln_f(h))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_like_lm_matches_vmap(device):
    torch.manual_seed(5)
    model = GPT().double().to(device)
    idx, targets = torch.randint(0, 17, (5, 9), device=device), torch.randint(0, 17, (5, 9), device=device)
    got = GradNormScorer(model).norms(idx, targets, lm_loss)
    assert_close_rel(got, per_example_grad_norms_vmap(model, lm_loss, idx, targets), 1e-10)


def test_gpt_like_lm_float32():
    torch.manual_seed(6)
    model = GPT()
    idx, targets = torch.randint(0, 17, (6, 11)), torch.randint(0, 17, (6, 11))
    got = GradNormScorer(model).norms(idx, targets, lm_loss)
    expected = per_example_grad_norms_vmap(copy.deepcopy(model).double(), lm_loss, idx, targets)
    assert_close_rel(got, expected, 1e-4)


class ViT(nn.Module):
    """ViT-like: Conv2d patches, a class-token parameter, a learned positional parameter, an
    nn.TransformerEncoder (pre-norm, GELU) with a final norm, a linear head on the class token."""

    def __init__(self, batch_first=True, d=8, heads=2, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.5)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, activation="gelu",
                                           batch_first=batch_first, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)
        self.batch_first = batch_first

    def forward(self, img):
        h = self.patch(img).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        if not self.batch_first:
            return self.head(self.encoder(h.transpose(0, 1))[0])
        return self.head(self.encoder(h)[:, 0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_like_model(batch_first):
    """Sequence-first with T == B (5 tokens, 5 images) too: exact, not refused."""
    torch.manual_seed(7)
    model = ViT(batch_first).double()
    img, y = torch.randn(5, 3, 8, 8, dtype=F64), torch.randint(0, 3, (5,))
    xent = nn.CrossEntropyLoss(reduction="none")
    got = GradNormScorer(model).norms(img, y, xent)
    assert_close_rel(got, loop_norms(model.eval(), xent, (img,), y), 1e-10)


class Seq2Seq(nn.Module):
    """A small nn.Transformer: source padding, causal target mask, memory padding; inputs batch-first."""

    def __init__(self, batch_first, d=8, heads=2, norm_first=False, activation="relu", bias=True):
        super().__init__()
        self.t = nn.Transformer(d, heads, 2, 1, 12, dropout=0.0, activation=activation,
                                batch_first=batch_first, norm_first=norm_first, bias=bias)
        self.batch_first = batch_first

    def forward(self, src, tgt, src_pad):
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=src.dtype)
        if not self.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        out = self.t(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_pad,
                     memory_key_padding_mask=src_pad, tgt_is_causal=True)
        return out if self.batch_first else out.transpose(0, 1)


def _seq2seq_inputs(batch, src_len=6, tgt_len=4, d=8, dtype=F64):
    src, tgt = torch.randn(batch, src_len, d, dtype=dtype), torch.randn(batch, tgt_len, d, dtype=dtype)
    pad = torch.arange(src_len) >= torch.randint(2, src_len + 1, (batch, 1))
    return (src, tgt, pad), torch.randn(batch, tgt_len, d, dtype=dtype)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first,activation,bias", [(False, "relu", True), (True, "gelu", False),
                                                         (False, F.silu, True)])
def test_encoder_decoder_transformer(batch_first, norm_first, activation, bias):
    """Sequence-first with T == B (4 target tokens, 4 examples): exact."""
    torch.manual_seed(8)
    model = Seq2Seq(batch_first, norm_first=norm_first, activation=activation, bias=bias).double()
    inputs, target = _seq2seq_inputs(4)
    got = GradNormScorer(model).norms(inputs, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, inputs, target), 1e-10)


def test_encoder_decoder_transformer_float32():
    torch.manual_seed(9)
    for batch_first in (True, False):
        model = Seq2Seq(batch_first, norm_first=True)
        inputs, target = _seq2seq_inputs(5, dtype=torch.float32)
        got = GradNormScorer(model).norms(inputs, target, weighted_loss)
        model64 = copy.deepcopy(model).double()
        expected = loop_norms(model64, weighted_loss, (inputs[0].double(), inputs[1].double(), inputs[2]),
                              target.double())
        assert_close_rel(got, expected, 1e-4)


class Layers(nn.Module):
    """A TransformerEncoderLayer (causal, padded) and a TransformerDecoderLayer over its output, called
    directly; batch-first inputs, the layers in either layout."""

    def __init__(self, batch_first, norm_first, activation, d=8):
        super().__init__()
        kw = dict(dim_feedforward=10, dropout=0.0, activation=activation, batch_first=batch_first,
                  norm_first=norm_first)
        self.enc = nn.TransformerEncoderLayer(d, 2, **kw)
        self.dec = nn.TransformerDecoderLayer(d, 2, **kw)
        self.batch_first = batch_first

    def forward(self, src, tgt, src_pad):
        mask = torch.ones(src.shape[1], src.shape[1], dtype=torch.bool).triu(1)  # bool, as the padding mask
        if not self.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        mem = self.enc(src, src_mask=mask, src_key_padding_mask=src_pad, is_causal=True)
        out = self.dec(tgt, mem, memory_key_padding_mask=src_pad)
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", torch.tanh])
def test_transformer_layers(batch_first, norm_first, activation):
    torch.manual_seed(10)
    model = Layers(batch_first, norm_first, activation).double()
    inputs, target = _seq2seq_inputs(3)
    got = GradNormScorer(model).norms(inputs, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, inputs, target), 1e-10)


def test_batch_first_layers_are_scored_through_their_children_and_sequence_first_ones_whole():
    scorer = GradNormScorer(Layers(True, False, "relu"))
    kinds = {type(c.module).__name__ for c in scorer.layers}
    assert kinds == {"MultiheadAttention", "Linear", "LayerNorm"}
    scorer = GradNormScorer(Layers(False, False, "relu"))
    assert [c.name for c in scorer.layers] == ["enc", "dec"]
    assert "self_attn.out_proj.weight" in scorer.layers[0].trainable


def test_encoder_fast_paths_are_not_taken_while_scoring():
    """In eval mode without autograd, an nn.TransformerEncoder with a padding mask runs on nested tensors
    through the fused layer kernel, skipping the submodules' calls (padded positions come out as zeros).
    The scoring pass runs the modules' own forwards, the function training differentiates: exact."""
    torch.manual_seed(11)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).double().eval()
    (src, _, pad), _ = _seq2seq_inputs(4)
    pad[0, -2:] = True
    with torch.no_grad():
        fused = model(src, src_key_padding_mask=pad)
    assert (fused[0, -2:] == 0).all()  # the nested path was taken
    target = torch.randn_like(src)
    got = GradNormScorer(model).norms((src, None, pad), target, weighted_loss)

    def padded(src, pad):
        return model(src, src_key_padding_mask=pad)

    assert_close_rel(got, loop_norms_of(padded, model, (src, pad), target), 1e-10)


def test_sequence_first_layer_called_twice_is_exact():
    """A sequence-first layer applied twice (shared weights): the exact replay of the whole layer gives each
    call's per-example gradients, summed before the norm."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 10, dropout=0.0)

        def forward(self, x):
            h = x.transpose(0, 1)
            return self.layer(self.layer(h)).transpose(0, 1)

    torch.manual_seed(12)
    model = Twice().double()
    x, target = torch.randn(4, 4, 8, dtype=F64), torch.randn(4, 4, 8, dtype=F64)
    got = GradNormScorer(model).norms(x, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, (x,), target), 1e-10)


@pytest.mark.filterwarnings("ignore:.*so the layout probe cannot run")
def test_sequence_first_transformer_with_dropout_in_training_mode_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 10, dropout=0.1)

        def forward(self, x):
            return self.layer(x.transpose(0, 1)).transpose(0, 1)

    x, target = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="sequence-first TransformerEncoderLayer runs in training mode"):
        GradNormScorer(Net(), eval_mode=False).norms(x, target, weighted_loss)


def test_sequence_first_transformer_with_a_custom_trainable_part_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(8))

        def forward(self, x, *args, **kwargs):
            return x * self.g

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(8, 2, 1, 1, 10, dropout=0.0, custom_encoder=Scale())

        def forward(self, src, tgt):
            return self.t(src.transpose(0, 1), tgt.transpose(0, 1)).transpose(0, 1)

    inputs, target = _seq2seq_inputs(3)
    with pytest.raises(ValueError, match=r"holds 'encoder' \(Scale\)"):
        GradNormScorer(Net().double()).norms(inputs[:2], target, weighted_loss)


class DirectForward(nn.Module):
    """An attention layer and an LSTM each called through the module and by `.forward(...)` directly (no hooks)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.lstm = nn.LSTM(E, E, batch_first=True)

    def forward(self, x):
        h = x[:, :L, :E]
        h = h + self.mha.forward(h, h, h, need_weights=False)[0] + self.mha(h, h, h)[0]
        return self.lstm.forward(h)[0] + self.lstm(h)[0]


def test_direct_forward_calls_are_scored_by_the_op_watch():
    torch.manual_seed(9)
    model = DirectForward().double()
    x, target = torch.randn(4, L + S, E, dtype=F64), torch.randn(4, L, E, dtype=F64)
    got = GradNormScorer(model).norms(x, target, weighted_loss)
    assert_close_rel(got, loop_norms(model, weighted_loss, (x,), target), 1e-10)
