"""``issgd.fit``: a training loop on ImportanceSampler for users without their own (docs/design.md, "The
library API")."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from issgd.diagnostics import evaluate
from issgd.sampler import Batch, ImportanceSampler, train_step
from issgd.sources import IndexedData


@dataclass
class FitResult:
    model: nn.Module  # the trained model (the one given, or the one its factory built)
    losses: list[float]  # per step: the batch's unbiased estimate of the training loss, mean of l_i / (N q_i)
    steps: int
    seconds: float
    valid_loss: float | None = None  # with a (train, valid) dataset factory
    valid_error: float | None = None  # classification error there (NaN when targets are not class indices)
    scoring: dict = field(default_factory=dict)  # the workers' throughput and health (sampler.stats())


def fit(model, dataset, loss_fn: Callable, optimizer, *, steps: int, batch_size: int, score: str = "grad_norm",
        workers: int = 0, progress: bool = True, callback: Callable | None = None, **sampler_options) -> FitResult:
    """Train ``model`` for ``steps`` importance-sampled SGD steps.

    ``model``, ``dataset``, ``loss_fn``, ``batch_size``, ``score``, ``workers`` and ``sampler_options``
    (smoothing, refresh_every, chunk_size, device, seed, ...) are ImportanceSampler's. ``optimizer`` is a
    ``torch.optim`` optimizer over the model's parameters, or a callable ``params -> optimizer`` (needed when
    ``model`` is a factory). ``callback(step, batch, losses)`` runs after every step. With workers, call it
    under ``if __name__ == "__main__":``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    with ImportanceSampler(model, dataset, loss_fn, batch_size=batch_size, score=score, workers=workers,
                           **sampler_options) as sampler:
        model = sampler.model
        optimizer = _optimizer(optimizer, model)
        model.train()
        losses: list[float] = []
        bar = tqdm(total=steps, desc=f"fit ({score}, {workers} workers)", unit="step", disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        started = time.perf_counter()
        with bar:
            for step, batch in enumerate(sampler.batches(steps)):
                batch_losses = train_step(model, loss_fn, optimizer, batch)
                losses.append(float(batch.weighted_mean(batch_losses)))
                if callback is not None:
                    callback(step, batch, batch_losses)
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        seconds = time.perf_counter() - started
        result = FitResult(model, losses, steps, seconds, scoring=sampler.stats())
        if sampler.valid is not None:
            with sampler.paused():
                result.valid_loss, result.valid_error = evaluate(model, IndexedData(sampler.valid, sampler.device),
                                                                 loss_fn)
    return result


def _optimizer(optimizer, model: nn.Module) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable params -> optimizer, got "
                            f"{type(optimizer).__name__}")
        optimizer = optimizer(model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(optimizer).__name__}, expected a "
                            "torch.optim.Optimizer")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters()):
        raise ValueError("optimizer holds none of the model's parameters: build it on model.parameters(), or pass a "
                         "callable such as lambda params: torch.optim.SGD(params, lr=0.1) (needed when model is a "
                         "factory)")
    return optimizer


__all__ = ["Batch", "FitResult", "fit"]
