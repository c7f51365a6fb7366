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


def mean_grad_sq_norm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """||g_bar||^2 for the mean loss over (x, y), accumulated chunk by chunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(0, len(x), chunk):
        loss = XENT(model(x[i:i + chunk]), y[i:i + chunk]).sum()
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.double()
    return sum(float((acc / len(x)).square().sum()) for acc in total)


@torch.no_grad()
def loss_and_error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and classification error over (x, y)."""
    loss = err = 0.0
    for i in range(0, len(x), chunk):
        out = model(x[i:i + chunk])
        loss += float(XENT(out, y[i:i + chunk]).double().sum())
        err += float((out.argmax(1) != y[i:i + chunk]).sum())
    return loss / max(len(x), 1), err / max(len(x), 1)


def variance_diagnostics(model, scorer, x, y, weights: torch.Tensor) -> dict[str, float]:
    """sqrt Tr S (uniform, ideal, actual) at the current parameters over (x, y), whose sampling
    weights are ``weights``. Puts the model in eval mode and restores its mode."""
    with evaluating(model):
        norms = score_in_chunks(scorer, x, y)
        sd = sqrt_trace_covariances(norms, mean_grad_sq_norm(model, x, y), weights)
    return {f"sqrt_tr_{k}": v for k, v in sd.items()}
