"""The paper's variance diagnostics: trace of the covariance of the one-sample gradient estimator.

With per-example gradient norms n_i = ||g_i||, the mean gradient g_bar and sampling weights w_i:
  uniform SGD:          Tr S_U = (1/N) sum n_i^2 - ||g_bar||^2
  ideal ISSGD (w = n):  Tr S_I = ((1/N) sum n_i)^2 - ||g_bar||^2
  actual ISSGD:         Tr S_w = ((1/N) sum w_j) ((1/N) sum n_i^2 / w_i) - ||g_bar||^2
(sampling q_i = w_i / sum w, step g_i / (N q_i)). The square roots are what the paper plots.
"""
from __future__ import annotations

import torch


def sqrt_trace_covariances(norms: torch.Tensor, mean_grad_sq_norm: float | torch.Tensor,
                           weights: torch.Tensor | None = None) -> dict[str, float]:
    """sqrt(Tr S) for uniform, ideal and (when `weights` are given) actual importance sampling."""
    n = norms.double()
    gbar2 = float(mean_grad_sq_norm)
    out = {"uniform": n.square().mean().item() - gbar2, "ideal": n.mean().square().item() - gbar2}
    if weights is not None:
        w = weights.double()
        if (w <= 0).any():
            raise ValueError("weights must be positive to define the actual ISSGD variance")
        out["actual"] = (w.mean() * (n.square() / w).mean()).item() - gbar2
    # Rounding can push a zero-variance trace a hair below 0.
    return {k: max(v, 0.0) ** 0.5 for k, v in out.items()}
