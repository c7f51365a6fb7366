"""Scoring signals (issgd.signals): "last_layer" against float64 torch.func per-example gradients of the last
layer alone, "loss" against the loss, and the errors for models and losses they cannot score."""
import pytest
import torch
import torch.nn.functional as F
from issgd.signals import SIGNALS, make_signal
from torch import nn
from torch.func import functional_call, grad, vmap

XENT = nn.CrossEntropyLoss(reduction="none")


def sequence_xent(logits, targets):  # (B, T, V), (B, T) -> (B,)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def nll_after_log_softmax(logits, targets):
    return F.nll_loss(logits, targets, reduction="none")


class LogSoftmaxHead(nn.Module):
    """Parameter-free ops after the last Linear (inside the model): its output gradient goes through them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        return torch.log_softmax(self.head(self.body(x)) * 2.0, dim=-1)


class TokenModel(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.emb(tokens))))


def cases():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return {
        "mlp (T = 1, bias)": (mlp, torch.randn(12, 6, generator=gen), torch.randint(0, 5, (12,), generator=gen), XENT,
                              mlp[4]),
        "log-softmax after a bias-free head": (LogSoftmaxHead(), torch.randn(12, 6, generator=gen),
                                               torch.randint(0, 5, (12,), generator=gen), nll_after_log_softmax,
                                               None),
        "sequence (T = 7)": (TokenModel(), torch.randint(0, 11, (9, 7), generator=gen),
                             torch.randint(0, 11, (9, 7), generator=gen), sequence_xent, None),
        "cnn then linear": (cnn, torch.randn(10, 2, 5, 5, generator=gen), torch.randint(0, 3, (10,), generator=gen),
                            XENT, cnn[3]),
    }


def last_layer_reference(model, layer, x, y, loss_fn) -> torch.Tensor:
    """||d l_i / d (W, b)|| of ``layer`` alone, per example, by torch.func in float64."""
    model = model.double().eval()
    names = {id(p): n for n, p in model.named_parameters()}
    mine = {names[id(p)]: p.detach() for p in layer.parameters()}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in mine}
    x = x.double() if x.is_floating_point() else x

    def loss(p, xi, yi):
        return loss_fn(functional_call(model, {**rest, **p}, (xi[None],)), yi[None]).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(mine, x, y)
    return torch.cat([t.reshape(len(x), -1) for t in g.values()], 1).norm(dim=1)


@pytest.mark.parametrize("name", list(cases()))
def test_last_layer_is_the_exact_gradient_norm_of_the_last_linear(name):
    model, x, y, loss_fn, layer = cases()[name]
    layer = layer if layer is not None else model.head
    model = model.double()
    xd = x.double() if x.is_floating_point() else x
    got = make_signal("last_layer", model)(xd, y, loss_fn)
    ref = last_layer_reference(model, layer, x, y, loss_fn)
    assert got.dtype == torch.float64 and got.shape == (len(x),)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_last_layer_t1_formula_and_dropout_is_off():
    """T = 1: sqrt(||d||^2 ||h||^2 + ||d||^2), scored in eval mode (dropout off) and the mode given back."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = make_signal("last_layer", model)(x, y, XENT)
    with torch.no_grad():
        h = model[0](x)  # in eval mode dropout is the identity
        d = torch.softmax(model[2](h), -1) - F.one_hot(y, 3)
    expected = (d.square().sum(1) * (h.square().sum(1) + 1)).sqrt()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    assert model.training and model[1].training


def test_loss_signal_is_the_loss_in_eval_mode():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    got = make_signal("loss", model)(x, y, XENT)
    with torch.no_grad():
        expected = XENT(model.eval()(x), y)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("score, model, loss_fn, message", [
    ("last_layer", nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), XENT,
     "score='last_layer' needs a final nn.Linear layer: the last module with trainable parameters that the forward "
     "calls is '0' (Conv2d)"),
    ("last_layer", nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.LayerNorm(3)), XENT, "is '2' (LayerNorm)"),
    ("last_layer", nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), lambda o, t: XENT(o, t).mean(),
     "loss_fn must return per-example losses of shape (B,) = (4,), got ()"),
    ("last_layer", nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), lambda o, t: XENT(o, t) - XENT(o, t).mean(),
     "score='last_layer': example i's loss depends on more than row i"),
    ("loss", nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), lambda o, t: -XENT(o, t),
     "score='loss' weights examples by their loss, which must be >= 0"),
    ("variance", nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), XENT, "score must be one of grad_norm, last_layer, loss"),
])
def test_signals_refuse_what_they_cannot_score(score, model, loss_fn, message):
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError) as info:
        make_signal(score, model)(x, y, loss_fn)
    assert message in str(info.value)


def test_every_signal_scores_the_same_examples_in_the_same_order():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = torch.randn(20, 5), torch.randint(0, 4, (20,))
    for score in SIGNALS:
        full = make_signal(score, model)(x, y, XENT)
        parts = torch.cat([make_signal(score, model)(x[i:i + 7], y[i:i + 7], XENT) for i in range(0, 20, 7)])
        assert full.shape == (20,) and bool((full >= 0).all())
        torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-7)
