"""ImportanceSampler: importance-sampled batches of any model and map-style data set, with their unbiasing
weights, and the scoring that keeps the weights fresh (docs/design.md, "The library API").

Every ``refresh_every`` (K) batches the sampler takes in new scores (scored inline, by spawned worker
processes, or by torchrun's ranks 1..), turns them into weights w_i = s_i + c, rebuilds the alias table
and, with workers, publishes the model's current parameters. Each batch is drawn with replacement from
q_i = w_i / sum_j w_j and carries the weights 1/(N q_i): the gradient of mean_m (l_{i_m} / (N q_{i_m}))
is an unbiased estimate of the full-data gradient whatever the (positive) weights. ``train_step`` is
the one place a step on that loss is taken (``issgd.fit`` and the CLI trainer both use it).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

import isgd_kernels
from issgd.distributed import ScoringPool, is_scoring_rank, launched_by_torchrun, refuse_in_bootstrap, run_worker
from issgd.job import WorkerJob
from issgd.scoring import ChunkCursor, ScoreBoard
from issgd.signals import SIGNALS, make_signal
from issgd.sources import Built, IndexedData, ensure_picklable, forward, resolve_datasets, resolve_model
from issgd.threads import usable_cores

__all__ = ["Batch", "ImportanceSampler", "train_step", "weighted_mean"]


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean_m w_m l_m (plain mean without weights): with w = 1/(N q), its gradient is an unbiased estimate of
    the full-data gradient."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"losses must be per-example, shape (B,), got {shape}: use reduction='none' (a mean "
                         "reduction cannot be reweighted)")
    if weights is None:
        return losses.mean()
    if weights.shape != losses.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} differ: one loss per "
                         "example of the batch, in the batch's order")
    return (losses * weights).mean()


class Batch(NamedTuple):
    """An importance-sampled batch: ``inputs`` and ``targets`` (collated, on the sampler's device), ``weights``
    1/(N q_i) (float32, (B,)) and the examples' dataset ``index`` (int64, (B,))."""

    inputs: Any
    targets: Any
    weights: torch.Tensor
    index: torch.Tensor

    def weighted_mean(self, losses: torch.Tensor) -> torch.Tensor:
        """The unbiased batch loss mean_m w_m l_m of this batch's per-example ``losses``."""
        return weighted_mean(losses, self.weights)


def train_step(model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, batch: Batch) -> torch.Tensor:
    """One optimizer step on ``batch``'s unbiased loss; returns the per-example losses (detached)."""
    losses = loss_fn(forward(model, batch.inputs), batch.targets)
    loss = batch.weighted_mean(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return losses.detach()


class ImportanceSampler:
    """Importance-sampled batches of ``dataset`` for training ``model``, scored with signal ``score``.

    Args:
        model: the ``nn.Module`` being trained (train it in place: the sampler scores its current
            parameters), a zero-argument factory returning one, or an import string
            ``"package.module:factory"``; ``sampler.model`` is the module.
        dataset: a map-style ``Dataset`` of ``(input, target)`` items, a pair of tensors
            ``(inputs, targets)``, or a zero-argument factory / import string returning a Dataset or a
            ``(train, valid)`` pair (then ``sampler.valid`` is the second).
        loss_fn: ``loss_fn(outputs, targets)`` -> per-example losses, shape (B,) (``reduction="none"``).
        batch_size: examples per batch, drawn with replacement.
        score: the scoring signal, ``"grad_norm"`` (default), ``"last_layer"`` or ``"loss"`` (issgd.signals).
        smoothing: c in w_i = s_i + c.
        refresh_every: K, batches between refreshes of the weights (and parameter pushes to the workers).
        workers: scoring processes to spawn (0: score ``chunk_size`` examples inline at each refresh). Under
            torchrun, ranks 1.. are the workers: there, constructing the sampler scores until rank 0 is done,
            then exits the process (``SystemExit(0)``), so one script serves every rank.
        device: where batches and inline scoring go (default: the model's device).
        seed: seed of the draws. uniform: draw uniformly with replacement (weights 1, no scoring), the
            baseline with everything else equal.
        collate_fn: turns a list of items into a batch (default: ``torch.utils.data.default_collate``).

    Spawned workers re-import the script that created the sampler, so it must keep its training code under
    ``if __name__ == "__main__":``; model, dataset, loss_fn and collate_fn travel to them pickled (module-level
    classes and functions, or import strings; a factory makes each worker build its own copy).

    Iterating yields ``Batch`` es forever (``batches(n)`` yields n); workers start with the first batch (or
    ``start()``). Use it as a context manager, or call ``close()``, to stop them.
    """

    def __init__(self, model, dataset, loss_fn: Callable, *, batch_size: int, score: str = "grad_norm",
                 smoothing: float = 0.1, refresh_every: int = 32, workers: int = 0, chunk_size: int = 2048,
                 worker_threads: int = 1, device: str | torch.device | None = None, backend: str = "auto",
                 seed: int = 0, uniform: bool = False, collate_fn: Callable | None = None,
                 startup_timeout: float = 120.0, worker_timeout: float = 60.0, slow_workers: tuple = ()):
        _check_arguments(loss_fn=loss_fn, batch_size=batch_size, score=score, smoothing=smoothing,
                         refresh_every=refresh_every, workers=workers, chunk_size=chunk_size,
                         worker_threads=worker_threads, startup_timeout=startup_timeout, worker_timeout=worker_timeout)
        self.distributed = launched_by_torchrun()
        workers = 0 if uniform else int(os.environ["WORLD_SIZE"]) - 1 if self.distributed else workers
        if workers and not self.distributed:
            refuse_in_bootstrap()  # a spawned worker re-running an unguarded script: fail fast, say why
        self.model = resolve_model(model)
        self.device = torch.device(device) if device is not None else _device_of(self.model)
        self.model.to(self.device)
        train, self.valid = resolve_datasets(dataset)
        self.dataset = train
        self.data = IndexedData(train, self.device, collate_fn)
        self.n = len(self.data)
        self.loss_fn, self.batch_size, self.score, self.uniform = loss_fn, batch_size, score, uniform
        self.refresh_every, self.backend, self.workers = refresh_every, backend, workers
        self.startup_timeout, self.worker_timeout, self.worker_threads = startup_timeout, worker_timeout, worker_threads
        job = WorkerJob(model=model, dataset=dataset, loss_fn=loss_fn, score=score,
                        device=str(device if device is not None else self.device), backend=backend,
                        chunk_size=chunk_size, worker_threads=worker_threads, startup_timeout=startup_timeout,
                        collate_fn=collate_fn, slow_workers=tuple(slow_workers))
        if is_scoring_rank():
            job.model, job.dataset = self.model, Built((train, self.valid), None)  # this rank's own objects
            run_worker(job)
            raise SystemExit(0)
        self.signal = None if uniform else make_signal(score, self.model, backend=backend)
        if self.signal is not None:  # refuse a signal that cannot score this model and loss now, not in a worker
            self.signal(*self.data.fetch(torch.arange(min(2, self.n))), loss_fn)
        self._job = _pickled(job) if workers and not self.distributed else None
        if self._job is not None and self.device.type == "cpu":
            _warn_if_oversubscribed(workers * worker_threads)
        self._device_spec = job.device  # "cuda" spreads spawned workers over the GPUs (rank_device)
        self.board = ScoreBoard(self.n, smoothing)
        self.cursor = ChunkCursor(torch.arange(self.n), chunk_size)  # inline scoring
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.table: isgd_kernels.AliasTable | None = None
        self.pool: ScoringPool | None = None
        self.step = 0  # batches drawn
        self._finalizer = None
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ batches
    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def batches(self, n: int) -> Iterator[Batch]:
        for _ in range(n):
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """Refresh the weights when K batches have passed, draw a batch and read its examples."""
        self.start()
        if not self.uniform and (self.step % self.refresh_every == 0 or self.table is None):
            self.refresh()
        index, weights = self.draw()
        self.step += 1
        inputs, targets = self.data.fetch(index)
        return Batch(inputs, targets, weights, index)

    def draw(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Example indices drawn with replacement from the current weights, and their 1/(N q_i); no refresh."""
        size = self.batch_size if batch_size is None else batch_size
        if self.uniform:
            index = torch.randint(self.n, (size,), generator=self.generator, device=self.device)
            return index, torch.ones(size, device=self.device)
        if self.table is None:
            self._rebuild()
        return self.table.sample_with_weights(size, generator=self.generator)

    def weights(self) -> torch.Tensor:
        """The weights w_i in use (float64, (N,)); the draws' probabilities are w / w.sum()."""
        return torch.ones(self.n, dtype=torch.float64) if self.uniform else self.board.weights()

    # ------------------------------------------------------------------ scoring
    def start(self) -> None:
        """Start the scoring workers and publish the first parameters (once; the first batch calls it)."""
        if self._start_error is not None:
            raise RuntimeError(f"the scoring workers did not start: {self._start_error}")
        if self.pool is not None or not self.workers:
            return
        kw = {"worker_timeout": self.worker_timeout, "examples": self.n, "startup_timeout": self.startup_timeout}
        self.pool = (ScoringPool.from_torchrun(self.device, **kw) if self.distributed
                     else ScoringPool.spawn(self._job, self.workers, self._device_spec, **kw))
        self._job = None
        self._finalizer = weakref.finalize(self, ScoringPool.close, self.pool)  # never leave workers behind
        try:
            self.pool.start(self.model, self.step)
        except BaseException as exc:
            self._start_error = exc
            self.close()
            raise

    def refresh(self) -> None:
        """Take in new scores (from the workers, or score the next chunk inline), rebuild the alias table and
        publish the parameters."""
        if self.pool is not None:
            for result in self.pool.collect():
                self.board.update(result.index, result.norms, result.version)
            self.pool.publish(self.model, self.step)
        elif self.signal is not None:
            index = self.cursor.next()
            inputs, targets = self.data.fetch(index)
            self.board.update(index, self.signal(inputs, targets, self.loss_fn), self.step)
        self._rebuild()

    def _rebuild(self) -> None:
        weights = self.board.weights().to(self.device)
        if self.table is None:
            self.table = isgd_kernels.AliasTable(weights, backend=self.backend)
        else:
            self.table.rebuild_(weights)

    def paused(self):
        """No scoring inside this block (e.g. while evaluating), so that staleness and scoring throughput
        count training time only."""
        return self.pool.paused() if self.pool is not None else contextlib.nullcontext()

    def stats(self) -> dict:
        """Scoring throughput and health of the workers (empty without workers)."""
        if self.pool is None:
            return {}
        return {"workers_alive": len(self.pool.alive()), "scored_examples": self.pool.scored_examples,
                "sync_seconds": self.pool.sync_seconds, "rejected_messages": self.pool.rejected,
                "worker_seconds": sum(self.pool.worker_seconds.values())}

    def push_stats(self, train_seconds: float) -> dict:
        """The parameter pushes' cost (ms per refresh, MB/s, share of ``train_seconds``); empty without workers."""
        return self.pool.push_stats(train_seconds) if self.pool is not None else {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"board": self.board.state_dict(), "cursor": self.cursor.position, "step": self.step,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.board.load_state_dict(state["board"])
        self.cursor.position = state["cursor"]
        self.step = state["step"]
        self.generator.set_state(state["generator"].cpu() if self.device.type == "cpu" else state["generator"])
        self.table = None
        if not self.uniform and self.step % self.refresh_every != 0:
            self._rebuild()  # the table is a pure function of the weights: exactly as it was

    def close(self) -> None:
        """Stop the scoring workers (never blocks on one)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> ImportanceSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ImportanceSampler(N={self.n}, batch_size={self.batch_size}, score={self.score!r}, "
                f"workers={self.workers}, device={self.device}, step={self.step})")


def _pickled(job: WorkerJob) -> bytes:
    """The job as the workers receive it; SpecError naming the argument that cannot travel."""
    for name in ("model", "dataset", "loss_fn", "collate_fn"):
        ensure_picklable(getattr(job, name), name)
    return pickle.dumps(job)


def _warn_if_oversubscribed(worker_threads: int) -> None:
    """More busy threads than cores slows every process down (OpenMP threads wait on each other), many times
    over on a loaded machine."""
    threads, cores = torch.get_num_threads(), usable_cores()
    if threads > 1 and threads + worker_threads > cores:
        warnings.warn(f"issgd: this process's {threads} CPU threads and the scoring workers' {worker_threads} exceed "
                      f"the {cores} usable cores; torch.set_num_threads({max(1, cores - worker_threads)}) before "
                      "training leaves the workers theirs", RuntimeWarning, stacklevel=3)


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _check_arguments(**given) -> None:
    if not callable(given["loss_fn"]):
        raise TypeError(f"loss_fn must be callable, loss_fn(outputs, targets) -> per-example losses (B,), got "
                        f"{type(given['loss_fn']).__name__}")
    if given["score"] not in SIGNALS:
        raise ValueError(f"score must be one of {', '.join(SIGNALS)}, got {given['score']!r}")
    rules = {"batch_size": (1, int), "refresh_every": (1, int), "workers": (0, int), "chunk_size": (1, int),
             "worker_threads": (1, int), "smoothing": (0, float), "startup_timeout": (0, float),
             "worker_timeout": (0, float)}
    for name, (low, kind) in rules.items():
        value = given[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
        strict = name.endswith("timeout")
        if not ok or (value <= low if strict else value < low):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'} "
                             f"{'>' if strict else '>='} {low}, got {value!r}")
