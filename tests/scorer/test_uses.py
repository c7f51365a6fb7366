"""Parameters wherever they are used (scorer/uses.py): tied, shared, functional and bare parameters on the
models people train, against float64 per-example references; layouts the probe must refuse."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels import GradNormScorer, UnsupportedModuleError
from isgd_kernels.scorer.reference import per_example_grad_norms_loop, per_example_grad_norms_vmap
from tests.utils import assert_close_rel

xent = nn.CrossEntropyLoss(reduction="none")


def token_xent(logits, targets):
    """Mean next-token cross-entropy per sequence: (B, T, V), (B, T) -> (B,)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(1)


class SelfAttention(nn.Module):
    """Causal attention written by hand (nanoGPT style): one fused qkv Linear, SDPA or explicit softmax."""

    def __init__(self, d, heads, sdpa: bool):
        super().__init__()
        self.qkv, self.proj, self.heads, self.sdpa = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, sdpa

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), SelfAttention(d, heads, sdpa), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2-like: token embedding, learned positions (a bare parameter or an Embedding), pre-norm blocks,
    final LayerNorm, head tied to the token embedding (as a module or functionally)."""

    def __init__(self, vocab=17, d=8, T=6, layers=2, heads=2, sdpa=True, pos="parameter", tie="module"):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.pos_kind, self.tie = pos, tie
        if pos == "parameter":
            self.wpe = nn.Parameter(torch.randn(T, d) * 0.1)
        else:
            self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads, sdpa) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        if tie == "module":
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        T = idx.shape[1]
        pos = self.wpe[:T] if self.pos_kind == "parameter" else self.wpe(torch.arange(T, device=idx.device))
        x = self.wte(idx) + pos
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x) if self.tie == "module" else F.linear(x, self.wte.weight)


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("pos,tie", [("parameter", "module"), ("embedding", "functional")])
def test_gpt_like_lm_is_exact(sdpa, pos, tie):
    torch.manual_seed(0)
    model = GPT(sdpa=sdpa, pos=pos, tie=tie).double()
    idx, tgt = torch.randint(0, 17, (5, 6)), torch.randint(0, 17, (5, 6))
    expected = per_example_grad_norms_loop(model, token_xent, idx, tgt)
    scorer = GradNormScorer(model)
    assert_close_rel(scorer.norms(idx, tgt, token_xent), expected, 1e-9)
    assert_close_rel(scorer.norms(idx, tgt, token_xent), expected, 1e-9)  # later passes follow the probe
    # shorter sequences (T < max positions) in a later batch
    idx, tgt = idx[:, :4], tgt[:, :4]
    assert_close_rel(scorer.norms(idx, tgt, token_xent), per_example_grad_norms_loop(model, token_xent, idx, tgt),
                     1e-9)


def test_gpt_like_lm_float32_matches_float64():
    torch.manual_seed(1)
    model = GPT()
    idx, tgt = torch.randint(0, 17, (4, 6)), torch.randint(0, 17, (4, 6))
    expected = per_example_grad_norms_loop(copy.deepcopy(model).double(), token_xent, idx, tgt)
    assert_close_rel(GradNormScorer(model).norms(idx, tgt, token_xent).double(), expected, 1e-4)


class ViT(nn.Module):
    """ViT-like: Conv2d patch embedding, class token and positions as bare parameters, LayerScale gammas,
    pre-norm blocks with hand-written attention, head on the class token, a learnable temperature."""

    def __init__(self, d=8, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.block = Block(d, 2, sdpa=False)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.log_temp = nn.Parameter(torch.tensor(0.3))

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.gamma * self.block(x)
        return self.head(self.norm(x[:, 0])) / self.log_temp.exp()


def test_vit_like_model_is_exact():
    torch.manual_seed(2)
    model = ViT().double()
    img, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    assert_close_rel(GradNormScorer(model).norms(img, y, xent), per_example_grad_norms_vmap(model, xent, img, y), 1e-9)


class Tokens(nn.Module):
    """Learned tokens put in front of every example's sequence by broadcasting ops (class / register tokens),
    a table added to it and a per-feature scale: uses whose per-example gradients are taken in closed form."""

    def __init__(self, how, d=6):
        super().__init__()
        self.how, self.proj = how, nn.Linear(4, d)
        self.tok = nn.Parameter(torch.randn(2, d) if how == "broadcast_to" else torch.randn(1, 2, d))
        self.pos = nn.Parameter(torch.randn(5, d))
        self.scale = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.proj(x)
        B, d = h.shape[0], h.shape[2]
        if self.how == "expand":
            tok = self.tok.expand(B, -1, -1)
        elif self.how == "expand_as":
            tok = self.tok.expand_as(h[:, :2])
        else:
            tok = torch.broadcast_to(self.tok, (B, 2, d))
        h = self.scale * (torch.cat([tok, h], 1) + self.pos)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("how", ["expand", "expand_as", "broadcast_to"])
def test_tokens_broadcast_to_the_batch_are_exact(how):
    torch.manual_seed(6)
    model = Tokens(how).double()
    # B = 4: the table's 5 rows must not look like a batch, which would send it to the batched backward
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), per_example_grad_norms_vmap(model, xent, x, y), 1e-10)


class SharedBlock(nn.Module):
    """One block applied twice (weight-shared recurrence written in Python) and a tied projection."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(2):
            h = h + self.block(h)
        return self.out(h)


def test_block_called_twice_is_exact():
    torch.manual_seed(3)
    model = SharedBlock().double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), per_example_grad_norms_vmap(model, xent, x, y), 1e-10)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.down(x))
        h = torch.relu(self.mid(h)) + h
        return self.head(torch.cat([self.up(h), x], dim=1))


def test_unet_like_model_is_exact():
    torch.manual_seed(4)
    model = UNet().double()
    x, y = torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4, 8, 8))

    def pixel_xent(out, t):
        return F.cross_entropy(out, t, reduction="none").mean((1, 2))

    assert_close_rel(GradNormScorer(model).norms(x, y, pixel_xent), per_example_grad_norms_vmap(model, pixel_xent, x, y),
                     1e-10)


class SeqFirstInside(nn.Module):
    """Activations (T, B, d) inside, batch-first at the ends: with T == B only the probe can tell."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):  # x: (B, T, 3)
        h = self.emb(x).transpose(0, 1)  # (T, B, 4)
        h = torch.tanh(self.mix(h)).cumsum(0)  # a running sum over time, sequence-first
        return self.head(h.transpose(0, 1).mean(1))


@pytest.mark.parametrize("T", [4, 5])
def test_sequence_first_activation_is_exact_also_when_T_equals_B(T):
    """A shape test cannot tell (T, B, d) from (B, T, d) when T == B; the probe can: such calls are followed
    to the first batch-first op and scored there, exactly."""
    torch.manual_seed(5)
    model = SeqFirstInside().double()
    x, y = torch.randn(4, T, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), per_example_grad_norms_vmap(model, xent, x, y), 1e-10)


class PosSeqFirst(nn.Module):
    """A positional parameter added to a sequence-first activation: the op's output is not batch-first."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.head = nn.Linear(3, 4), nn.Parameter(torch.randn(4, 1, 4)), nn.Linear(4, 2)

    def forward(self, x):
        h = self.emb(x).transpose(0, 1) + self.pos  # (T, B, 4)
        return self.head(h.transpose(0, 1).mean(1))


def test_parameter_meeting_a_sequence_first_activation_is_exact():
    torch.manual_seed(6)
    model = PosSeqFirst().double()
    x, y = torch.randn(4, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), per_example_grad_norms_vmap(model, xent, x, y), 1e-10)


def test_a_pass_with_other_parameter_uses_is_probed_again():
    """A forward whose parameter uses change between batches (a switch, data-dependent control flow) does
    not follow the first pass's verdicts blindly: it is probed again, and stays exact."""
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.a, self.b = nn.Linear(3, 2), nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
            self.branch = 0

        def forward(self, x):
            h = self.fc(x)
            return h * self.a if self.branch == 0 else h + self.b * self.a

    torch.manual_seed(7)
    model = Switch().double()
    scorer = GradNormScorer(model)
    for branch, batch in ((0, 5), (1, 2), (0, 3), (1, 4)):  # (1, 2): b * a has the batch's size
        model.branch = branch
        x, y = torch.randn(batch, 3, dtype=torch.float64), torch.randint(0, 2, (batch,))
        assert_close_rel(scorer.norms(x, y, xent), per_example_grad_norms_vmap(model, xent, x, y), 1e-10)


def test_verify_names_parameters_used_outside_modules():
    torch.manual_seed(8)
    model = GPT(tie="functional").double()
    idx, tgt = torch.randint(0, 17, (4, 6)), torch.randint(0, 17, (4, 6))
    report = GradNormScorer(model).verify(idx, tgt, token_xent)
    assert report.ok, str(report)
    assert "<root>" in str(report) and "wte" in str(report)


def test_active_dropout_skips_the_probe_with_a_warning():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.warns(UserWarning, match="layout probe cannot run"):
        GradNormScorer(model, eval_mode=False).norms(x, y, xent)


class EncoderClassifier(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.layer = nn.TransformerEncoderLayer(12, 3, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_is_exact(norm_first):
    torch.manual_seed(11)
    model = EncoderClassifier(norm_first).double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), per_example_grad_norms_loop(model, xent, x, y), 1e-10)


def test_a_use_left_unscored_is_caught_by_the_accounting_check(monkeypatch):
    """On a probed pass the uses' per-example gradients must add up to each stand-in's batch gradient: a use
    that the op watch failed to tap (simulated here) raises instead of giving too small a norm."""
    from isgd_kernels.scorer import uses
    from isgd_kernels.scorer.registry import RULES

    # Without its rule, self_attn's parameters are scored through the op watch, the path under test.
    monkeypatch.delitem(RULES, nn.MultiheadAttention)
    classify = uses.ParameterUses._classify

    def forgetful(self, func, output, sources, *factors):
        if getattr(func, "__name__", "") == "transpose" and sources and self.record is None:
            return output  # as if this op's output had not been seen
        return classify(self, func, output, sources, *factors)

    monkeypatch.setattr(uses.ParameterUses, "_classify", forgetful)
    torch.manual_seed(12)
    model = EncoderClassifier(True).double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(RuntimeError, match="internal check failed.*'layer.self_attn"):
        GradNormScorer(model).norms(x, y, xent)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


def test_a_bare_parameter_used_by_a_custom_function_is_refused_not_left_out():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.w = nn.Linear(3, 4), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return _Scale.apply(self.fc(x), self.w)

    torch.manual_seed(13)
    model = Custom().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    with pytest.raises(UnsupportedModuleError, match="'<root>.w' is used by an operation that does not go"):
        GradNormScorer(model).norms(x, y, xent)


class EveryKindOfUse(nn.Module):
    """One weight used by a Linear call twice, an Embedding lookup twice (tied), and functionally: every
    pair of the parts' cross terms (scorer/parts.py) is exercised."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.proj = nn.Linear(6, 9, bias=False)
        self.proj.weight = self.emb.weight  # (9, 6): a lookup table and a map 6 -> 9
        self.mix = nn.Linear(9, 6)

    def forward(self, tokens):
        h = self.emb(tokens) + self.emb(tokens.flip(1))  # two lookups
        z = self.proj(torch.tanh(h))  # the tied map
        h2 = self.mix(z)
        z2 = self.proj(h2)  # called again
        return (z2 + F.linear(torch.sin(h2), self.emb.weight * 0.5)).mean(1)  # and a functional use


def test_every_pair_of_use_kinds_is_exact():
    torch.manual_seed(14)
    model = EveryKindOfUse().double()
    tokens, y = torch.randint(0, 9, (5, 4)), torch.randint(0, 9, (5,))
    assert_close_rel(GradNormScorer(model).norms(tokens, y, xent), per_example_grad_norms_loop(model, xent, tokens, y),
                     1e-10)


class _SeqFirstEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.pos = nn.Parameter(torch.randn(6, 1, 12) * 0.3)
        self.layer = nn.TransformerEncoderLayer(12, 3, 24, dropout=0.0)  # sequence-first
        self.out = _TransposeLinear(12, 4)

    def forward(self, x):  # x (B, T, 5)
        h = self.inp(x).transpose(0, 1) + self.pos  # (T, B, 12)
        return self.out(self.layer(h)).mean(1)


class _TransposeLinear(nn.Module):
    """A custom layer taking (T, B, d) and returning batch-first (B, T, out): scored by the fallback, with
    parameters of earlier layers reaching it through its sequence-first input."""

    def __init__(self, d, out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, out) * 0.3)

    def forward(self, h):
        return h.transpose(0, 1) @ self.weight


def test_sequence_first_layers_without_rules_are_followed_exactly(monkeypatch):
    """With the Transformer and attention rules removed, the sequence-first layer's parts are followed through
    LayerNorm and MultiheadAttention calls to the custom layer that puts the batch first again."""
    from isgd_kernels.scorer.registry import RULES

    for cls in [t for t in RULES if t.__name__.startswith("Transformer") or t is nn.MultiheadAttention]:
        monkeypatch.delitem(RULES, cls)
    torch.manual_seed(15)
    model = _SeqFirstEncoder().double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.warns(UserWarning, match="exact autograd fallback"):
        scorer = GradNormScorer(model)
    assert_close_rel(scorer.norms(x, y, xent), per_example_grad_norms_loop(model, xent, x, y), 1e-10)



class BatchStatsAffine(nn.Module):
    """A Linear layer whose output is normalized with the batch's statistics by a functional op (not a
    BatchNorm module): example i's loss depends on every example's activations."""

    def __init__(self, d=5):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.head((h - h.mean(0)) / h.std(0))


def test_a_model_that_mixes_the_examples_of_a_batch_is_refused():
    """Permuting the batch permutes the outputs, so the layout probe passes; the weighted backward of the probed
    pass finds the output gradient of 'lin' not per-example."""
    torch.manual_seed(70)
    model = BatchStatsAffine()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"output gradients of module 'lin' \(Linear\) are not per-example"):
        GradNormScorer(model).norms(x, y, xent)
    GradNormScorer(model, check_examples_separate=False).norms(x, y, xent)  # unchecked, as asked
