"""Embedding and normalization-layer rules of the scorer against per-example float64 references.

References are torch.func.vmap(grad) of each example's loss; where vmap cannot run the layer (an
in-place weight renorm, sparse gradients, a running-stat update in training mode) a per-example
autograd loop is used instead. Inputs are fresh random draws with odd sizes.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels import GradNormScorer
from isgd_kernels.scorer.reference import per_example_grad_norms_loop, per_example_grad_norms_vmap
from isgd_kernels.scorer.registry import RULES
from tests.utils import DEVICES, assert_close_rel

xent = nn.CrossEntropyLoss(reduction="none")
F64 = torch.float64


vmap_norms = per_example_grad_norms_vmap
loop_norms = per_example_grad_norms_loop


class Head(nn.Module):
    """A layer under test, then flatten + Linear: every position gets its own output gradient."""

    def __init__(self, layer, flat_features, classes=3):
        super().__init__()
        self.layer = layer
        self.fc = nn.Linear(flat_features, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.layer(x)).flatten(1))


def _targets(batch, classes=3, device="cpu"):
    return torch.randint(0, classes, (batch,), device=device)


def test_rules_registered():
    for cls in (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.RNN, nn.LSTM, nn.GRU):
        assert cls in RULES, cls.__name__


# ---------------------------------------------------------------------------------------- Embedding

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(9,), (7, 13), (5, 3, 4)])
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_matches_vmap(device, shape, padding_idx):
    torch.manual_seed(10)
    vocab, dim = 6, 5  # few tokens: many repeats within an example
    emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    positions = 1 if len(shape) == 1 else shape[1] * (shape[2] if len(shape) == 3 else 1)
    model = Head(emb, positions * dim).to(F64).to(device)
    idx = torch.randint(0, vocab, shape, device=device)
    if padding_idx is not None:
        idx.view(shape[0], -1)[:, 0] = emb.padding_idx  # every example has padding tokens
    if len(shape) > 1:
        idx.view(shape[0], -1)[0, 1:] = 1  # one example made of a single repeated (non-padding) token
        rest = idx.view(shape[0], -1)[1:]
        assert (rest[:, :, None] == rest[:, None, :]).sum() > rest.numel()  # repeats in other examples too
    y = _targets(shape[0], device=device)
    got = GradNormScorer(model).norms(idx, y, xent)
    assert got.dtype == F64
    assert_close_rel(got, vmap_norms(model, xent, idx, y), 1e-10, "embedding")


def test_embedding_float32_matches_float64():
    torch.manual_seed(11)
    model = Head(nn.Embedding(11, 8, padding_idx=0), 17 * 8)
    idx, y = torch.randint(0, 11, (6, 17)), _targets(6)
    got = GradNormScorer(model).norms(idx, y, xent)
    assert got.dtype == torch.float32
    assert_close_rel(got, vmap_norms(copy.deepcopy(model).double(), xent, idx, y), 1e-4, "embedding fp32")


@pytest.mark.parametrize("option", ["max_norm", "sparse"])
def test_embedding_max_norm_and_sparse(option):
    torch.manual_seed(12)
    kwargs = {"max_norm": 1.0} if option == "max_norm" else {"sparse": True}
    emb = nn.Embedding(7, 6, **kwargs)
    model = Head(emb, 9 * 6).double()
    idx, y = torch.randint(0, 7, (5, 9)), _targets(5)
    if option == "max_norm":
        assert emb.weight[idx.unique()].norm(dim=1).max() > 1.5  # the renorm will change these rows
    got = GradNormScorer(model).norms(idx, y, xent)
    if option == "max_norm":  # the scoring forward renormalized the rows in use, as any forward does
        assert emb.weight[idx.unique()].norm(dim=1).max() <= 1.0
    assert_close_rel(got, loop_norms(model, xent, idx, y), 1e-10, option)


def test_embedding_scale_grad_by_freq_is_refused():
    model = Head(nn.Embedding(5, 3, scale_grad_by_freq=True), 4 * 3)
    with pytest.raises(ValueError, match=r"'layer' \(Embedding\).*scale_grad_by_freq.*whole mini-batch"):
        GradNormScorer(model).norms(torch.randint(0, 5, (3, 4)), _targets(3), xent)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------- LayerNorm / RMSNorm

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalized_shape", [(7,), (3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_vmap(device, normalized_shape, bias):
    torch.manual_seed(20)
    norm = nn.LayerNorm(normalized_shape, bias=bias)
    x = torch.randn(9, 3, *normalized_shape, dtype=F64, device=device) * 2 + 0.5
    with torch.no_grad():  # non-trivial affine parameters
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    model = Head(norm, x[0].numel()).to(F64).to(device)
    y = _targets(9, device=device)
    got = GradNormScorer(model).norms(x, y, xent)
    assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10, "layernorm")


def test_layer_norm_frozen_weight_and_frozen_bias():
    torch.manual_seed(21)
    x, y = torch.randn(7, 5, 6, dtype=F64), _targets(7)
    for frozen in ("weight", "bias"):
        model = Head(nn.LayerNorm(6), 30).double()
        getattr(model.layer, frozen).requires_grad_(False)
        got = GradNormScorer(model).norms(x, y, xent)
        assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10, frozen)


def test_layer_norm_over_the_batch_dim_is_refused():
    model = Head(nn.LayerNorm((4, 3)), 3).double()  # (B=4, 3) input: B is inside normalized_shape
    with pytest.raises(ValueError, match="mixes examples"):
        GradNormScorer(model).norms(torch.randn(4, 3, dtype=F64), _targets(4), xent)


@pytest.mark.parametrize("normalized_shape", [(7,), (3, 5)])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_matches_vmap(normalized_shape, eps):
    torch.manual_seed(22)
    norm = nn.RMSNorm(normalized_shape, eps=eps)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(8, 3, *normalized_shape, dtype=F64) * 0.1
    model = Head(norm, x[0].numel()).double()
    y = _targets(8)
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10, "rmsnorm")


def test_rms_norm_float32_small_inputs_default_eps():
    """eps=None on float32 with tiny activations, where eps matters: checked against float64 math on
    the float32 eps (what PyTorch's float32 forward uses)."""
    torch.manual_seed(23)
    model = Head(nn.RMSNorm(6), 5 * 6)
    x, y = torch.randn(7, 5, 6) * 3e-4, _targets(7)
    got = GradNormScorer(model).norms(x, y, xent)
    ref = copy.deepcopy(model).double()
    ref.layer.eps = torch.finfo(torch.float32).eps
    assert_close_rel(got, vmap_norms(ref, xent, x.double(), y), 1e-4, "rmsnorm fp32")


# ------------------------------------------------------------------ GroupNorm / InstanceNorm / BatchNorm

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [(11,), (5, 7)])
def test_group_norm_matches_vmap(device, spatial):
    torch.manual_seed(30)
    norm = nn.GroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(7, 6, *spatial, dtype=F64, device=device) + 1
    model = Head(norm, x[0].numel()).to(F64).to(device)
    y = _targets(7, device=device)
    got = GradNormScorer(model).norms(x, y, xent)
    assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10, "groupnorm")


@pytest.mark.parametrize("mode", ["input_stats", "running_stats_eval", "running_stats_training"])
def test_instance_norm_2d_affine(mode):
    torch.manual_seed(31)
    norm = nn.InstanceNorm2d(5, affine=True, track_running_stats=mode != "input_stats")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(6, 5, 4, 7, dtype=F64) * 1.5 + 0.3
    model = Head(norm, x[0].numel()).double()
    y = _targets(6)
    if mode != "input_stats":
        model.train()
        for _ in range(3):  # set the running statistics away from (0, 1)
            model(torch.randn(6, 5, 4, 7, dtype=F64) * 2 + 1)
        assert norm.running_mean.abs().min() > 0.1
    if mode == "running_stats_training":  # training mode normalizes each instance by its own statistics
        got = GradNormScorer(model, eval_mode=False).norms(x, y, xent)
        assert_close_rel(got, loop_norms(model, xent, x, y), 1e-10, mode)
    else:
        got = GradNormScorer(model).norms(x, y, xent)
        assert_close_rel(got, vmap_norms(model.eval(), xent, x, y), 1e-10, mode)


def test_instance_norm_1d_and_3d():
    torch.manual_seed(32)
    for norm, shape in ((nn.InstanceNorm1d(4, affine=True), (5, 4, 9)),
                        (nn.InstanceNorm3d(3, affine=True), (5, 3, 2, 3, 5))):
        with torch.no_grad():
            norm.weight.normal_()
        x, y = torch.randn(*shape, dtype=F64), _targets(shape[0])
        model = Head(norm, x[0].numel()).double()
        assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10,
                         type(norm).__name__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (9, 6)), (nn.BatchNorm1d, (9, 6, 5)),
                                       (nn.BatchNorm2d, (7, 4, 3, 5)), (nn.BatchNorm3d, (5, 3, 2, 3, 3))])
def test_batch_norm_eval_matches_vmap(device, cls, shape):
    torch.manual_seed(33)
    norm = cls(shape[1])
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    model = Head(norm, torch.Size(shape[1:]).numel()).to(F64).to(device)
    model.train()
    for _ in range(3):  # running statistics away from (0, 1)
        model(torch.randn(*shape, dtype=F64, device=device) * 3 + 2)
    assert (norm.running_var - 1).abs().min() > 0.5
    x, y = torch.randn(*shape, dtype=F64, device=device), _targets(shape[0], device=device)
    got = GradNormScorer(model).norms(x, y, xent)  # eval_mode=True: running statistics
    assert model.training
    assert_close_rel(got, vmap_norms(model.eval(), xent, x, y), 1e-10, cls.__name__)


def test_batch_norm_without_running_stats_is_refused():
    model = Head(nn.BatchNorm1d(4, track_running_stats=False), 4).double()
    with pytest.raises(ValueError, match=r"'layer' \(BatchNorm1d\) has track_running_stats=False.*batch"):
        GradNormScorer(model).norms(torch.randn(5, 4, dtype=F64), _targets(5), xent)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_batch_norm_training_is_refused_by_rule():
    """The scorer refuses BatchNorm in training mode before the pass; the rule refuses too if called."""
    from isgd_kernels.scorer.registry import LayerCapture
    from isgd_kernels.scorer.rules.norm import batch_norm_rule

    bn = nn.BatchNorm2d(3).train()
    cap = LayerCapture("bn", bn, {"weight": True, "bias": True}, inputs=(torch.randn(2, 3, 4, 4),))
    with pytest.raises(ValueError, match="training mode.*mixes examples"):
        batch_norm_rule(cap, torch.randn(2, 3, 4, 4), "auto")


def test_unbatched_instance_norm_is_refused():
    model = nn.Sequential(nn.InstanceNorm1d(3, affine=True), nn.Flatten(0), nn.Linear(15, 3)).double()
    model[2].requires_grad_(False)  # scored, the flattened Linear would be refused first (rules run last layer first)

    def loss_fn(out, y):  # a (3,) output the scorer takes as 3 "examples"
        return out - y

    with pytest.raises(ValueError, match="unbatched"):
        GradNormScorer(model).norms(torch.randn(3, 5, dtype=F64), torch.zeros(3, dtype=F64), loss_fn)


# ------------------------------------------------------------------------------------ whole models

class Block(nn.Module):
    """Token + position Embedding, one pre-LayerNorm attention block (q/k/v/o Linear, manual causal
    attention) with an MLP, final LayerNorm and a language-model head; batch-first."""

    def __init__(self, vocab=13, d=12, heads=3, hidden=20, max_len=16):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        b, t = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device).expand(b, t))
        a = self.ln1(h)
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(self.ln_f(h))


def lm_loss(logits, targets):
    """Per-example sum over tokens of the next-token cross-entropy."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_block_matches_vmap(device):
    torch.manual_seed(40)
    model = Block().double().to(device)
    idx = torch.randint(0, 13, (5, 11), device=device)
    idx[:, -3:] = 0  # padding
    targets = torch.randint(0, 13, (5, 11), device=device)
    got = GradNormScorer(model).norms(idx, targets, lm_loss)
    assert_close_rel(got, vmap_norms(model, lm_loss, idx, targets), 1e-10, "block fp64")


def test_transformer_block_float32():
    torch.manual_seed(41)
    model = Block()
    idx, targets = torch.randint(0, 13, (6, 9)), torch.randint(0, 13, (6, 9))
    got = GradNormScorer(model).norms(idx, targets, lm_loss)
    assert got.dtype == torch.float32
    expected = vmap_norms(copy.deepcopy(model).double(), lm_loss, idx, targets)
    assert_close_rel(got, expected, 1e-4, "block fp32")


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_with_layer_norm_matches_vmap(device):
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(13, 21), nn.LayerNorm(21), nn.ReLU(), nn.Linear(21, 17),
                          nn.LayerNorm(17, bias=False), nn.Tanh(), nn.Linear(17, 5)).double().to(device)
    x, y = torch.randn(11, 13, dtype=F64, device=device), _targets(11, 5, device)
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10, "mlp+ln")


class _Recommender(nn.Module):
    """An EmbeddingBag recommender: bags of item ids (2-D, or flat with offsets) -> scores."""

    def __init__(self, mode, padding_idx, flat):
        super().__init__()
        self.bag = nn.EmbeddingBag(17, 6, mode=mode, padding_idx=padding_idx).double()
        self.head = nn.Linear(6, 3).double()
        self.flat = flat

    def forward(self, items, weights=None):
        if self.flat:  # bags of varying length, flat ids + offsets, as keyword arguments
            lengths = (items >= 0).sum(1)
            ids = items[items >= 0]
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
            w = None if weights is None else weights[items >= 0]
            return self.head(self.bag(ids, offsets=offsets, per_sample_weights=w))
        return self.head(self.bag(items, per_sample_weights=weights))


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("flat", [False, True])
def test_embedding_bag_matches_per_example_loop(mode, weighted, padding_idx, flat):
    """sum/mean/max, per_sample_weights (sum only, as in PyTorch), padding_idx, 2-D and flat+offsets bags."""
    torch.manual_seed(40)
    model = _Recommender(mode, padding_idx, flat)
    items = torch.randint(0, 17, (6, 5))
    items[0, 1] = items[0, 3]  # a repeated item within a bag
    items[1] = 0  # a bag of padding only (when padding_idx = 0)
    if flat:
        items[2, 3:] = -1  # shorter bags
        items[4, 1:] = -1
    weights = torch.rand(6, 5, dtype=torch.float64) + 0.5 if weighted else None
    y = torch.randint(0, 3, (6,))
    args = (items,) if weights is None else (items, weights)
    got = GradNormScorer(model).norms(args, y, xent)
    params = [p for p in model.parameters()]
    expected = []
    for i in range(6):
        one = (items[i:i + 1],) if weights is None else (items[i:i + 1], weights[i:i + 1])
        grads = torch.autograd.grad(xent(model(*one), y[i:i + 1]).sum(), params)
        expected.append(sum(g.square().sum() for g in grads).sqrt())
    assert_close_rel(got, torch.stack(expected), 1e-10, f"{mode} pad={padding_idx} flat={flat}")
