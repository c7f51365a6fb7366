"""GradNormScorer: whole-model per-example gradient norms against torch.func.vmap(grad) in float64."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import isgd_kernels
from isgd_kernels import GradNormScorer, UnsupportedModuleError, per_example_grad_norms
from isgd_kernels.scorer import register_rule
from isgd_kernels.scorer.reference import per_example_grad_norms_vmap
from tests.utils import DEVICES, assert_close_rel

xent = nn.CrossEntropyLoss(reduction="none")


vmap_norms = per_example_grad_norms_vmap


def mlp(d_in=23, widths=(31, 17), d_out=5, dtype=torch.float64):
    layers, d = [], d_in
    for w in widths:
        layers += [nn.Linear(d, w), nn.Tanh()]
        d = w
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers).to(dtype)


class SequenceModel(nn.Module):
    """3-D Linear layers (B, T, d) with a residual add, mean pooling and a classifier."""

    def __init__(self, d=12, hidden=20, classes=4):
        super().__init__()
        self.embed = nn.Linear(7, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes, bias=False)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_mlp_matches_vmap(device, backend):
    torch.manual_seed(0)
    model = mlp().to(device)
    x, y = torch.randn(9, 23, dtype=torch.float64, device=device), torch.randint(0, 5, (9,), device=device)
    got = per_example_grad_norms(model, xent, x, y, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (9,)
    assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_float32_matches_float64_reference(device):
    torch.manual_seed(1)
    model = mlp(dtype=torch.float32).to(device)
    x, y = torch.randn(16, 23, device=device), torch.randint(0, 5, (16,), device=device)
    got = per_example_grad_norms(model, xent, x, y)
    expected = vmap_norms(model.double(), xent, x.double(), y)
    assert got.dtype == torch.float32
    assert_close_rel(got, expected, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_model_with_3d_linear(device):
    torch.manual_seed(2)
    model = SequenceModel().double().to(device)
    x = torch.randn(6, 11, 7, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (6,), device=device)
    got = GradNormScorer(model).norms(x, y, xent)
    assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10)


def test_triton_backend_in_scorer():
    torch.manual_seed(3)
    model = SequenceModel()
    x, y = torch.randn(5, 9, 7), torch.randint(0, 4, (5,))
    if not isgd_kernels.backend_available("triton", x.device, "_linear_sq_norms_ghost"):
        pytest.skip("Triton unavailable")
    got = GradNormScorer(model, backend="triton").norms(x, y, xent)
    assert_close_rel(got, vmap_norms(model.double(), xent, x.double(), y), 1e-4)


def test_mse_loss_and_returned_losses():
    torch.manual_seed(4)
    model = mlp(d_out=3)
    x, y = torch.randn(8, 23, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)

    def loss_fn(out, target):
        return (out - target).square().sum(1)

    norms, losses = GradNormScorer(model).norms(x, y, loss_fn, return_losses=True)
    assert_close_rel(norms, vmap_norms(model, loss_fn, x, y), 1e-10)
    assert_close_rel(losses, loss_fn(model(x), y), 1e-12)
    assert not norms.requires_grad and not losses.requires_grad


def test_grad_mode_and_flags_untouched():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).double()
    model.train()
    model[1].eval()  # a module kept in eval mode on purpose (e.g. frozen statistics) stays in eval
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    model[3].bias.requires_grad_(False)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with torch.no_grad():  # scoring works inside no_grad too
        got = per_example_grad_norms(model, xent, x, y)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[0].bias.grad is None and model[3].weight.grad is None
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    # Scored in eval mode (dropout off), frozen bias excluded.
    model.eval()
    assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10)


def test_frozen_layers_and_bias_only_training():
    torch.manual_seed(6)
    model = mlp()
    model[0].requires_grad_(False)      # a frozen first layer
    model[2].weight.requires_grad_(False)  # only the bias of the middle layer trains
    x, y = torch.randn(7, 23, dtype=torch.float64), torch.randint(0, 5, (7,))
    got = per_example_grad_norms(model, xent, x, y)
    assert_close_rel(got, vmap_norms(model, xent, x, y), 1e-10)


class _Gained(nn.Module):
    """A Linear times a learned gain: no rule of its own, so its child and its gain are scored apart."""

    def __init__(self):
        super().__init__()
        self.inner, self.gain = nn.Linear(23, 5), nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.inner(x) * self.gain


def test_one_scorer_follows_changes_to_the_model_between_passes():
    """The scorer keeps its plan between passes: replacing modules, tying a parameter, freezing or unfreezing a
    layer and registering a rule after the first pass must each be seen by the next pass."""
    from isgd_kernels.scorer.rules.fallback import autograd_fallback_rule

    torch.manual_seed(16)
    model = mlp()
    x, y = torch.randn(6, 23, dtype=torch.float64), torch.randint(0, 5, (6,))
    scorer = GradNormScorer(model)

    def check(factor=1.0):
        assert_close_rel(scorer.norms(x, y, xent), factor * vmap_norms(model, xent, x, y), 1e-10)

    check()
    model[2], model[4] = nn.Linear(31, 31).double(), nn.Linear(31, 5).double()  # modules replaced
    check()
    model[2].bias = model[0].bias  # a tied parameter: two uses
    check()
    model[0].requires_grad_(False)
    check()
    model[0].requires_grad_(True)
    check()

    model = _Gained().double()
    scorer = GradNormScorer(model)
    check()
    # A rule that owns the children (here the exact fallback, doubled so that its use shows) replaces the
    # child's rule and the op watch of the gain.
    # (_Gained is this test's own type: the rule stays registered without affecting any other test.)
    register_rule(_Gained, lambda cap, g, backend: 4 * autograd_fallback_rule(cap, g, backend), owns_children=True)
    check(2.0)


class CountMatmuls(TorchDispatchMode):
    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.MATMULS
        return func(*args, **(kwargs or {}))


def test_norms_only_backward_runs_no_weight_gradient_gemm():
    """4 Linear layers: forward 4 GEMMs + input-gradient GEMMs of layers 2..4 = 7; a full backward is 11."""
    model = mlp(widths=(40, 30, 20)).float()
    x, y = torch.randn(64, 23), torch.randint(0, 5, (64,))
    scorer = GradNormScorer(model, backend="cpu" if isgd_kernels.backend_available(
        "cpu", x.device, "_linear_sq_norms_outer") else "torch")
    with CountMatmuls() as counter:
        scorer.norms(x, y, xent)
    # The first pass also runs the layout probe's forward and the examples-separate check's weighted backward.
    assert counter.count == 4 + 4 + 3 + 3
    with CountMatmuls() as counter:
        scorer.norms(x, y, xent)
    assert counter.count == 4 + 3
    with CountMatmuls() as full:
        xent(model(x), y).sum().backward()
    assert full.count == 4 + 3 + 4


def test_unsupported_module_is_named_when_the_fallback_is_off():
    class Gate(nn.Module):  # a custom layer: no rule
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * torch.sigmoid(self.weight)

    model = nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match=r"module '1' \(Gate\).*\['weight'\]"):
        GradNormScorer(model, fallback=False)
    model[1].requires_grad_(False)  # frozen: fine
    GradNormScorer(model, fallback=False).norms(torch.randn(3, 4), torch.tensor([0, 1, 0]), xent)


def test_bare_parameter_on_a_container_is_exact_without_the_fallback():
    """A bare parameter of a module with submodules is scored op by op (uses.py), not by the fallback."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.randn(2))

        def forward(self, x):
            return self.fc(x) * self.scale

    torch.manual_seed(2)
    model = Scaled().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    assert_close_rel(GradNormScorer(model, fallback=False).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10)


def test_mean_reduction_is_refused():
    model = mlp()
    x, y = torch.randn(4, 23, dtype=torch.float64), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(4,\), got \(\).*reduction='none'"):
        GradNormScorer(model).norms(x, y, nn.CrossEntropyLoss())


def test_non_finite_loss_is_reported():
    model = mlp()
    x, y = torch.randn(4, 23, dtype=torch.float64), torch.randint(0, 5, (4,))
    x[2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite losses for examples \[2\]"):
        GradNormScorer(model).norms(x, y, xent)


def test_layer_called_twice_is_exact_and_state_restored():
    """A shared layer's per-example gradient is the sum of both calls' (cross terms included)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(3)
    model = Twice().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert not model.fc._forward_hooks


def test_parameter_shared_by_two_modules_is_exact():
    torch.manual_seed(4)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10)


def test_uncalled_trainable_module_contributes_zero():
    """An auxiliary head the forward does not call has an exactly zero gradient; if its weight is used
    directly by other code instead, that use counts."""
    class Unused(nn.Module):
        def __init__(self, borrow: bool):
            super().__init__()
            self.fc = nn.Linear(4, 3).double()
            self.spare = nn.Linear(4, 3).double()
            self.borrow = borrow

        def forward(self, x):
            out = self.fc(x)
            return out + nn.functional.linear(x, self.spare.weight) if self.borrow else out

    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    model = Unused(borrow=False)
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10)
    model = Unused(borrow=True)
    assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="mixes examples"):
        GradNormScorer(model, eval_mode=False).norms(x, y, xent)
    GradNormScorer(model).norms(x, y, xent)  # eval mode uses running statistics: fine


def test_seq_first_layer_inside_is_scored_exactly():
    """A layer that sees (T, B, d) is not scored by its rule (which assumes dim 0 = batch): its output is
    followed to the first batch-first op, where its per-example gradients are taken."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):  # x (B, T, d) -> (T, B, d): the layer sees T in dim 0
            return self.fc(x.transpose(0, 1)).mean(0)

    torch.manual_seed(9)
    model = SeqFirst().double()
    for T in (5, 2):
        x, y = torch.randn(2, T, 4, dtype=torch.float64), torch.tensor([0, 1])
        assert_close_rel(GradNormScorer(model).norms(x, y, xent), vmap_norms(model, xent, x, y), 1e-10)


class InplaceCNN(nn.Module):
    """conv -> BatchNorm (eval) -> ReLU(inplace) -> conv -> ReLU(inplace) -> pool -> linear: in-place ops
    right after scored layers, as in torchvision ResNets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu_(self.bn1(self.conv1(x)))
        h = nn.functional.relu(self.conv2(h), inplace=True)
        return self.head(h.mean((2, 3)))


def test_inplace_ops_after_scored_layers():
    torch.manual_seed(5)
    model = InplaceCNN().double().eval()
    model.bn1.running_mean.uniform_(-1, 1)
    model.bn1.running_var.uniform_(0.5, 2)
    x, y = torch.randn(6, 3, 9, 9, dtype=torch.float64), torch.randint(0, 4, (6,))
    assert_close_rel(per_example_grad_norms(model, xent, x, y), vmap_norms(model, xent, x, y), 1e-10)


def test_input_that_requires_grad_is_left_alone():
    torch.manual_seed(6)
    model = mlp()
    x, y = torch.randn(5, 23, dtype=torch.float64, requires_grad=True), torch.randint(0, 5, (5,))
    got = per_example_grad_norms(model, xent, x, y)
    assert x.grad is None
    assert_close_rel(got, vmap_norms(model, xent, x.detach(), y), 1e-10)


def test_each_layer_is_scored_as_its_gradient_arrives():
    """The rules run inside backward, last layer first, and each frees its layer's activations before the
    next layer's gradient is computed: the pass never holds every layer's output gradient at once."""
    from isgd_kernels.scorer.rules.linear import linear_rule

    model = mlp(widths=(8, 7, 6)).float()
    seen = []

    def spying_rule(cap, grad_output, backend):
        # every call scored before this one has already let go of its activations
        seen.append((cap.name, [c.name for c in calls if c.inputs], bool(cap.inputs)))
        calls.append(cap)
        return linear_rule(cap, grad_output, backend)

    calls = []

    scorer = GradNormScorer(model)
    register_rule(nn.Linear, spying_rule)
    try:
        scorer.norms(torch.randn(4, 23), torch.randint(0, 5, (4,)), xent)
    finally:
        register_rule(nn.Linear, linear_rule)
    assert seen == [("6", [], True), ("4", [], True), ("2", [], True), ("0", [], True)]


def test_scoring_inside_inference_mode():
    """inference_mode would make every tensor of the pass non-differentiable (norms of 0): the pass
    turns it off for itself, and accepts inputs created under it."""
    torch.manual_seed(8)
    model = mlp()
    x, y = torch.randn(6, 23, dtype=torch.float64), torch.randint(0, 5, (6,))
    expected = vmap_norms(model, xent, x, y)
    with torch.inference_mode():
        x_inf = x.clone()
        got = per_example_grad_norms(model, xent, x_inf, y)
    assert x_inf.is_inference()
    assert_close_rel(got, expected, 1e-10)


def test_both_argument_orders_and_keywords_give_the_same_norms():
    """scorer.norms(inputs, targets, loss_fn) and per_example_grad_norms(model, inputs, targets, loss_fn) take one
    order; the earlier loss-first order is still understood (inputs are never callable)."""
    torch.manual_seed(11)
    model = mlp()
    x, y = torch.randn(5, 23, dtype=torch.float64), torch.randint(0, 5, (5,))
    expected = vmap_norms(model, xent, x, y)
    scorer = GradNormScorer(model)
    for got in (scorer.norms(x, y, xent), scorer.norms(xent, x, y), scorer(inputs=x, targets=y, loss_fn=xent),
                per_example_grad_norms(model, x, y, xent), per_example_grad_norms(model, xent, x, y),
                per_example_grad_norms(model, inputs=x, targets=y, loss_fn=xent)):
        assert_close_rel(got, expected, 1e-10)


def test_argument_types_are_checked_up_front():
    model = mlp()
    x, y = torch.randn(5, 23), torch.randint(0, 5, (5,))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        per_example_grad_norms(model, x, y, "cross_entropy")
    with pytest.raises(TypeError, match="inputs must be a batched tensor.*got list"):
        GradNormScorer(model).norms([[1.0] * 23], y, xent)
    with pytest.raises(TypeError, match="inputs must be a batched tensor.*0-d"):
        GradNormScorer(model).norms(torch.tensor(1.0), y, xent)


def test_losses_that_couple_examples_are_refused():
    """InfoNCE-style and batch-normalised losses are not per-example: refused, never a wrong number."""
    torch.manual_seed(12)
    model = mlp()
    x, y = torch.randn(6, 23, dtype=torch.float64), torch.randint(0, 5, (6,))

    def info_nce(out, _):  # each example's logit row against every other example's
        sim = out @ out.T
        return -torch.log_softmax(sim, dim=1).diagonal()

    def normalised(out, t):
        losses = xent(out, t)
        return losses / losses.sum().detach().clamp_min(1e-6) + losses / losses.sum()

    for loss_fn in (info_nce, normalised):
        with pytest.raises(ValueError, match="couples the examples"):
            GradNormScorer(model).norms(x, y, loss_fn)
    scorer = GradNormScorer(model)
    scorer.norms(x, y, xent)  # a per-example loss passes
    scorer.norms(x, y, xent)  # (checked once per loss function)
    with pytest.raises(ValueError, match="couples the examples"):  # another loss on a later pass: checked
        scorer.norms(x, y, info_nce)


def test_sequence_first_output_is_refused_even_when_T_equals_B():
    """A (T, B, V) output with T == B passes every size check; the row-scaling check still refuses it."""
    torch.manual_seed(13)
    T = B = 5
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    tokens = torch.randint(0, 11, (T, B))  # sequence-first, as in PyTorch's word-language-model example

    def loss_fn(out, tgt):  # out (T, B, V): per-example losses sum over T (dim 0)
        return nn.functional.cross_entropy(out.permute(1, 2, 0), tgt.T, reduction="none").sum(1)

    with pytest.raises(ValueError, match="sequence-first"):  # the layout probe (first pass) sees it
        GradNormScorer(model).norms(tokens, torch.randint(0, 11, (T, B)), loss_fn)


class _TiedLogits(nn.Module):
    """An Embedding whose weight also makes the logits, functionally (the GPT-2 pattern without a module)."""

    def __init__(self, functional: str):
        super().__init__()
        self.wte = nn.Embedding(13, 8)
        self.mix = nn.Linear(8, 8)
        self.functional = functional

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.wte(tokens))).mean(1)
        if self.functional == "linear":
            return nn.functional.linear(h, self.wte.weight)
        return h @ self.wte.weight.T


@pytest.mark.parametrize("functional", ["linear", "matmul"])
def test_a_parameter_used_outside_its_module_is_exact(functional):
    """Tied/functional uses add a gradient term no module rule sees (norms 4-32 % too low if it were left
    out): summed with the Embedding's own use, exact; frozen, the rest stays exact."""
    torch.manual_seed(14)
    model = _TiedLogits(functional).double()
    tokens, y = torch.randint(0, 13, (4, 6)), torch.randint(0, 13, (4,))
    assert_close_rel(GradNormScorer(model).norms(tokens, y, xent), vmap_norms(model, xent, tokens, y), 1e-10)
    model.wte.weight.requires_grad_(False)
    assert_close_rel(GradNormScorer(model).norms(tokens, y, xent), vmap_norms(model, xent, tokens, y), 1e-10)


def test_verify_agrees_on_a_supported_model_and_names_a_wrong_rule():
    """verify() compares each scored layer with float64 per-example gradients; a deliberately wrong rule
    (registered by the user) is named."""
    from isgd_kernels.scorer.rules.linear import linear_rule

    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 4))  # float32 model
    x, y = torch.randn(10, 7), torch.randint(0, 4, (10,))
    report = GradNormScorer(model).verify(x, y, xent, n=5)
    assert report.ok, str(report)
    assert "all layers agree" in str(report) and len(report.total) == 5

    register_rule(nn.Linear, lambda cap, g, backend: 1.1 * linear_rule(cap, g, backend))
    try:
        report = GradNormScorer(model).verify(x, y, xent)
    finally:
        register_rule(nn.Linear, linear_rule)
    assert not report.ok and report.disagreeing == ["0 (Linear)", "3 (Linear)"]
    assert "<-- disagrees" in str(report)



class _Conv1D(nn.Module):
    """GPT-2's Conv1D: a Linear with a transposed weight, through addmm (no rule: the fallback's case)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class _LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update, the LoRA pattern."""

    def __init__(self, d_in, d_out, rank=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(d_out, rank) * 0.3)

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


class _TokenModel(nn.Module):
    """A bare positional-embedding parameter on the root, a Conv1D and a LoRA layer over (B, T, d)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.pos = nn.Parameter(torch.randn(5, 6) * 0.2)
        self.proj = _Conv1D(7, 6)
        self.lora = _LoRALinear(7, 4)

    def forward(self, tokens):
        h = torch.tanh(self.proj(self.emb(tokens) + self.pos))
        return self.lora(h).mean(1)


def test_exact_fallback_for_layers_without_a_rule():
    """Custom layers (GPT-2's Conv1D, LoRA) and a bare root parameter go through the exact autograd fallback,
    with a one-time warning; the norms equal float64 vmap's, also with a chunk smaller than the batch."""
    import isgd_kernels.scorer.rules.fallback as fallback

    torch.manual_seed(16)
    model = _TokenModel().double()
    tokens, y = torch.randint(0, 11, (6, 5)), torch.randint(0, 4, (6,))
    expected = vmap_norms(model, xent, tokens, y)
    with pytest.warns(UserWarning, match="exact autograd fallback"):
        scorer = GradNormScorer(model)
    assert_close_rel(scorer.norms(tokens, y, xent), expected, 1e-10)
    chunk = fallback._CHUNK_ELEMENTS
    fallback._CHUNK_ELEMENTS = 2 * 5 * 7  # two examples' output gradient at a time
    try:
        assert_close_rel(scorer.norms(tokens, y, xent), expected, 1e-10)
    finally:
        fallback._CHUNK_ELEMENTS = chunk
    report = scorer.verify(tokens, y, xent)
    assert report.ok, str(report)


class _CheckpointedNet(nn.Module):
    """Blocks under torch.utils.checkpoint (imported by name, as model zoos do), after a trainable first
    layer, with a bare LayerScale parameter used inside the checkpointed function."""

    def __init__(self, reentrant: bool, first_trainable: bool = True):
        super().__init__()
        self.first = nn.Linear(7, 8).requires_grad_(first_trainable)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.gamma = nn.Parameter(torch.full((8,), 0.7))
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.first(x)
        for block in self.blocks:
            h = h + checkpoint(lambda t, block=block: self.gamma * block(t), h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("first_trainable", [True, False])
def test_activation_checkpointing_gives_the_exact_norm(reentrant, first_trainable):
    """Checkpointed regions run as plain calls during a scoring pass (same values and gradients, no
    recomputation in backward), so both forms are exact, with a bare parameter used inside the region."""
    torch.manual_seed(17)
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    model = _CheckpointedNet(reentrant, first_trainable).double()
    expected = []  # .backward() per example: what a training step gives, also for reentrant checkpoints
    for i in range(5):  # (whose blocks get no gradient at all when no input of theirs requires grad)
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant checkpoint: "None of the inputs have requires_grad"
            xent(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        expected.append(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None).sqrt())
    scorer = GradNormScorer(model)
    for _ in range(2):
        assert_close_rel(scorer.norms(x, y, xent), torch.stack(expected), 1e-10)
    assert torch.utils.checkpoint.CheckpointFunction.__name__ == "CheckpointFunction"  # given back
    assert torch.utils.checkpoint._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"


class _Tagged(torch.Tensor):
    """A tensor subclass that only carries its type through the model (as units or metadata wrappers do)."""


def test_tensor_subclass_inputs_keep_their_type_through_scored_layers():
    """The scorer's own ops in its hooks stay out of its op watch without switching torch function handling
    off: a subclass input still reaches the loss as that subclass, on the probed pass and after."""
    torch.manual_seed(17)
    model = mlp()
    x, y = torch.randn(6, 23, dtype=torch.float64), torch.randint(0, 5, (6,))
    seen = []

    def loss_fn(out, target):
        seen.append(type(out))
        return xent(out, target)

    scorer = GradNormScorer(model)
    for _ in range(2):
        got = scorer.norms(x.as_subclass(_Tagged), y, loss_fn)
        assert_close_rel(got.as_subclass(torch.Tensor), vmap_norms(model, xent, x, y), 1e-10)
    assert seen and all(t is _Tagged for t in seen)
