"""The paper's variance diagnostics: trace of the covariance of the one-sample gradient estimator.

With per-example gradient norms n_i = ||g_i||, the mean gradient g_bar and sampling weights w_i:
  uniform SGD:          Tr S_U = (1/N) sum n_i^2 - ||g_bar||^2
  ideal ISSGD (w = n):  Tr S_I = ((1/N) sum n_i)^2 - ||g_bar||^2
  actual ISSGD:         Tr S_w = ((1/N) sum w_j) ((1/N) sum n_i^2 / w_i) - ||g_bar||^2
(sampling q_i = w_i / sum w, step g_i / (N q_i)). The square roots are what the paper plots.
All three use fresh norms of the current parameters; "actual" uses the weights the sampler is
really using (stale, smoothed). Over a subset of the training set, the formulas are those of the
subset's own empirical distribution, with the same relative weights.
"""
from __future__ import annotations

import torch

from isgd_kernels.scorer import evaluating
from issgd.scoring import XENT, score_in_chunks
from issgd.sources import forward, rows


def sqrt_trace_covariances(norms: torch.Tensor, mean_grad_sq_norm: float | torch.Tensor,
                           weights: torch.Tensor | None = None) -> dict[str, float]:
    """sqrt(Tr S) for uniform, ideal and (when `weights` are given) actual importance sampling."""
    n = norms.double()
    gbar2 = float(mean_grad_sq_norm)
    out = {"uniform": n.square().mean().item() - gbar2, "ideal": n.mean().square().item() - gbar2}
    if weights is not None:
        w = weights.double().to(n.device)
        if (w <= 0).any():
            raise ValueError("weights must be positive to define the actual ISSGD variance")
        out["actual"] = (w.mean() * (n.square() / w).mean()).item() - gbar2
    # Rounding can push a zero-variance trace a hair below 0.
    return {k: max(v, 0.0) ** 0.5 for k, v in out.items()}


def mean_grad_sq_norm(model: torch.nn.Module, x, y: torch.Tensor, chunk: int = 2048, loss_fn=XENT) -> float:
    """||g_bar||^2 for the mean loss over (x, y), accumulated chunk by chunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(0, len(y), chunk):
        loss = loss_fn(forward(model, rows(x, i, i + chunk)), y[i:i + chunk]).sum()
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g.double()
    return sum(float((acc / len(y)).square().sum()) for acc in total)


@torch.no_grad()
def loss_and_error(model: torch.nn.Module, x, y: torch.Tensor, chunk: int = 4096, loss_fn=XENT) -> tuple[float, float]:
    """Mean loss and classification error over (x, y). The error is the fraction of wrong argmax predictions
    (over the last dim, per position for sequence outputs), NaN when the targets are not class indices."""
    loss = err = 0.0
    for i in range(0, len(y), chunk):
        out, target = forward(model, rows(x, i, i + chunk)), y[i:i + chunk]
        loss += float(loss_fn(out, target).double().sum())
        if target.dtype.is_floating_point or out.shape[:-1] != target.shape:
            err = float("nan")
        else:
            err += float((out.argmax(-1) != target).double().reshape(len(target), -1).mean(1).sum())
    return loss / max(len(y), 1), err / max(len(y), 1)


def variance_diagnostics(model, scorer, x, y, weights: torch.Tensor, loss_fn=XENT) -> dict[str, float]:
    """sqrt Tr S (uniform, ideal, actual) at the current parameters over (x, y), whose sampling
    weights are ``weights``. Puts the model in eval mode and restores its mode."""
    with evaluating(model):
        norms = score_in_chunks(scorer, x, y, loss_fn=loss_fn)
        sd = sqrt_trace_covariances(norms, mean_grad_sq_norm(model, x, y, loss_fn=loss_fn), weights)
    return {f"sqrt_tr_{k}": v for k, v in sd.items()}


def evaluate(model: torch.nn.Module, data, loss_fn=XENT, chunk: int = 4096) -> tuple[float, float]:
    """Mean loss and error (as ``loss_and_error``) over every example of ``data`` (an issgd.sources.IndexedData),
    read chunk by chunk, in eval mode."""
    loss = err = 0.0
    with evaluating(model):
        for start in range(0, len(data), chunk):
            index = torch.arange(start, min(start + chunk, len(data)))
            x, y = data.fetch(index)
            chunk_loss, chunk_err = loss_and_error(model, x, y, chunk, loss_fn)
            loss, err = loss + chunk_loss * len(index), err + chunk_err * len(index)
    return loss / max(len(data), 1), err / max(len(data), 1)
