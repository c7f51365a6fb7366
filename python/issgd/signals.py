"""Scoring signals: what an example's sampling weight w_i = s_i + c is made of (docs/design.md, "Scoring
signals"). Inline scoring, the scoring workers and the benchmarks all build them here.

* ``grad_norm``  s_i = ||grad_theta l_i|| over all trainable parameters (the paper's; ``GradNormScorer``).
* ``last_layer`` s_i = the exact gradient norm of the last nn.Linear's weight (and bias) only: with that
  layer's input h_i and the gradient d_i of l_i w.r.t. its output, ||d_i h_i^T||^2 + ||sum_t d_i[t]||^2,
  i.e. sqrt(||d_i||^2 ||h_i||^2 + ||d_i||^2) for T = 1 (``linear_grad_sq_norms`` for (B, T, d)). It
  costs a forward and the loss's gradient w.r.t. that layer's output: no backward through the model.
* ``loss``       s_i = l_i (a forward only).

Every signal scores in eval mode (as ``GradNormScorer`` does) and returns (B,) non-negative scores; the
sampler reweights every one of them the same way, by 1/(N q_i), so each step stays unbiased whatever the
signal: the signal only changes the variance.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import isgd_kernels
from isgd_kernels.scorer import _check_examples_separate, evaluating
from issgd.sources import as_args

SIGNALS = ("grad_norm", "last_layer", "loss")


def make_signal(score: str, model: nn.Module, *, backend: str = "auto"):
    """The scorer of signal ``score`` for ``model``: ``signal(inputs, targets, loss_fn) -> (B,)`` scores."""
    if score == "grad_norm":
        return GradNormSignal(model, backend)
    if score == "last_layer":
        return LastLayerSignal(model, backend)
    if score == "loss":
        return LossSignal(model)
    raise ValueError(f"score must be one of {', '.join(SIGNALS)}, got {score!r}")


class GradNormSignal:
    name = "grad_norm"

    def __init__(self, model: nn.Module, backend: str = "auto"):
        self.scorer = isgd_kernels.GradNormScorer(model, backend=backend)

    def __call__(self, inputs, targets, loss_fn) -> torch.Tensor:
        return self.scorer.norms(inputs, targets, loss_fn)


class LossSignal:
    name = "loss"

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, inputs, targets, loss_fn) -> torch.Tensor:
        args = as_args(inputs)
        with evaluating(self.model), torch.no_grad():
            losses = loss_fn(self.model(*args), targets)
        _check_losses(losses, args[0].shape[0], "loss")
        if bool((losses < 0).any()):
            raise ValueError("score='loss' weights examples by their loss, which must be >= 0; this loss_fn returned "
                             f"{float(losses.min()):.4g}: use score='grad_norm' or shift the loss")
        return losses


class LastLayerSignal:
    name = "last_layer"

    def __init__(self, model: nn.Module, backend: str = "auto"):
        self.model, self.backend = model, backend
        self.layer: nn.Linear | None = None  # found on the first call: the last module with parameters called

    def __call__(self, inputs, targets, loss_fn) -> torch.Tensor:
        args = as_args(inputs)
        batch = args[0].shape[0]
        if self.layer is None:
            self.layer = self._find_layer(args)
        layer = self.layer
        captured = {}

        def take_output(module, module_args, output):
            # The layer's output becomes a leaf: autograd then records only what comes after it (the loss,
            # any parameter-free ops), so the loss gradient below never runs a backward through the model.
            captured["h"] = module_args[0].detach()
            captured["z"] = output.detach().requires_grad_(True)
            return captured["z"]

        # _call_order before _frozen: it watches the modules whose parameters are trainable.
        with evaluating(self.model), _call_order(self.model) as order, _frozen(self.model), \
                torch.inference_mode(False), torch.enable_grad():
            handle = layer.register_forward_hook(take_output)
            try:
                outputs = self.model(*args)
            finally:
                handle.remove()
            self._check_last(order)
            losses = loss_fn(outputs, targets)
            _check_losses(losses, batch, "last_layer")
            z = captured["z"]
            try:
                _check_examples_separate(z, losses, batch)  # the scorer's own check, on the layer's output
            except ValueError as exc:
                raise ValueError(str(exc).replace("GradNormScorer:", "score='last_layer':").split(" (check_")[0]) \
                    from None
            (grad_out,) = torch.autograd.grad(losses.sum(), z, allow_unused=True)
        if grad_out is None:
            raise ValueError(f"score='last_layer': the output of the last nn.Linear ('{self._label(layer)}') does not "
                             "reach the loss; use score='grad_norm'")
        sq = isgd_kernels.linear_grad_sq_norms(captured["h"], grad_out, backend=self.backend,
                                               bias=layer.bias is not None and layer.bias.requires_grad)
        return sq.sqrt()

    def _find_layer(self, args) -> nn.Linear:
        with evaluating(self.model), _call_order(self.model) as order, torch.no_grad():
            self.model(*(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args))
        if not order:
            raise ValueError("score='last_layer': the model calls no module with trainable parameters")
        last = order[-1]
        if not isinstance(last, nn.Linear):
            raise ValueError(f"score='last_layer' needs a final nn.Linear layer: the last module with trainable "
                             f"parameters that the forward calls is '{self._label(last)}' ({type(last).__name__}); "
                             "use score='grad_norm' or 'loss'")
        if not last.weight.requires_grad:
            raise ValueError(f"score='last_layer': the weight of the last nn.Linear ('{self._label(last)}') is frozen; "
                             "use score='grad_norm'")
        return last

    def _check_last(self, order: list) -> None:
        if not order or order[-1] is not self.layer or order.count(self.layer) != 1:
            raise ValueError(f"score='last_layer': the last nn.Linear ('{self._label(self.layer)}') was not the last "
                             "module with trainable parameters of this forward, or was called more than once; "
                             "use score='grad_norm'")

    def _label(self, module: nn.Module) -> str:
        return next((name for name, m in self.model.named_modules() if m is module), "?") or "<root>"


def _check_losses(losses, batch: int, score: str) -> None:
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"score={score!r}: loss_fn must return per-example losses of shape (B,) = ({batch},), got "
                         f"{shape}; use reduction='none' and average any other dims per example")
    if not bool(torch.isfinite(losses.detach()).all()):
        raise FloatingPointError(f"score={score!r}: loss_fn returned non-finite losses: the model has diverged")


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """No parameter requires grad inside the block (flags restored after)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def _call_order(model: nn.Module):
    """The modules with trainable direct parameters, in the order the forward calls them."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda module, a, o: order.append(module))
               for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()
