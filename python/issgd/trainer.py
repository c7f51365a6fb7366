"""The reference ISSGD trainer behind `issgd train` (docs/design.md, "The algorithm"): importance-sampled SGD as
in Alain et al., with the paper's variance diagnostics, checkpoints and a summary.

The trainer is a user of the library API: an ``ImportanceSampler`` draws its batches, scores (inline or with
workers) and refreshes the weights every ``refresh_every`` steps, and ``train_step`` takes each step on the
unbiased loss mean_m (l_{i_m} / (N q_{i_m})). ``mode="usgd"`` draws uniformly (with replacement) and is the
same in every other respect.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import isgd_kernels
from isgd_kernels.scorer import evaluating
from issgd.config import TrainConfig
from issgd.diagnostics import evaluate, loss_and_error, variance_diagnostics
from issgd.distributed import is_scoring_rank, launched_by_torchrun, refuse_in_bootstrap
from issgd.job import build_job
from issgd.report import to_json
from issgd.sampler import ImportanceSampler, train_step, weighted_mean
from issgd.sources import IndexedData
from issgd.threads import master_threads, usable_cores

__all__ = ["TrainConfig", "Trainer"]

log = logging.getLogger("issgd")

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the last one
METRICS = "metrics.jsonl"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, empty, not a checkpoint, a directory."""


class Trainer:
    """Runs one training job; ``run()`` returns its summary. ``on_step(trainer, step, index)`` is
    called after every master step with the batch's example indices (used by tests).

    SIGINT (Ctrl-C) in the main thread stops training at the end of the current step: a checkpoint is
    written (with ``checkpoint_every`` set), then a partial summary (``"interrupted": true``), then
    ``run()`` raises KeyboardInterrupt."""

    def __init__(self, config: TrainConfig, *, on_step=None):
        self.config = config.validate()
        if config.mode == "issgd" and config.workers > 0 and not launched_by_torchrun():
            refuse_in_bootstrap()  # a spawned worker re-running an unguarded script: fail fast, say why
        self.on_step = on_step
        self.out = Path(config.out)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")
        self.distributed = launched_by_torchrun()
        self.workers = int(os.environ["WORLD_SIZE"]) - 1 if self.distributed else config.workers
        if self.device.type == "cpu" and not is_scoring_rank():  # a scoring rank sets its own threads
            # Local scoring workers (spawned, on this machine's CPU) get their own cores; under torchrun the
            # ranks are placed by the launcher.
            if self.distributed:  # torchrun's ranks on this machine, less the master itself
                local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1
            else:
                local_workers = config.workers if config.mode == "issgd" else 0
            self.threads = master_threads(config.master_threads, local_workers, config.worker_threads)
            torch.set_num_threads(self.threads)
            log.info("master: %d CPU threads (%d usable cores)", self.threads, usable_cores())
        else:
            self.threads = torch.get_num_threads()
        job = build_job(config)
        self.data, self.loss_fn = job.data, job.loss_fn  # data: the built-in data set's tensors (None if imported)
        # Under torchrun, a scoring rank serves inside this constructor and exits when the master is done.
        self.sampler = ImportanceSampler(
            job.model, job.dataset, job.loss_fn, batch_size=config.batch_size, score=config.score,
            smoothing=config.smoothing, refresh_every=config.refresh_every, workers=config.workers,
            chunk_size=config.chunk_size, worker_threads=config.worker_threads, device=config.device,
            backend=config.backend, seed=config.seed + 1, uniform=config.mode == "usgd",
            startup_timeout=config.startup_timeout, worker_timeout=config.worker_timeout,
            slow_workers=config.slow_workers)
        self.model, self.n = self.sampler.model, self.sampler.n
        self.scorer = isgd_kernels.GradNormScorer(self.model, backend=config.backend)  # diagnostics' fresh norms
        self.valid = IndexedData(self.sampler.valid, self.device) if self.sampler.valid is not None else None
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.momentum > 0)
        self.step = 0
        self.seconds = 0.0  # training wall-clock: excludes diagnostics and checkpoints
        self.records: list[dict] = []
        self.resume_changes: list[dict] = []  # hyper-parameters a --resume changed, applied from its step on
        self.interrupted = False
        self._losses: list[torch.Tensor] = []
        diag = torch.randperm(self.n, generator=torch.Generator().manual_seed(config.seed + 2))
        self.diag_index = diag[:config.diag_examples].sort().values.to(self.device)
        self._diag_batch = None  # the diagnostics' examples, read once

    # The sampler's state, under the names the tests and the fault hooks use.
    board = property(lambda self: self.sampler.board)
    generator = property(lambda self: self.sampler.generator)
    pool = property(lambda self: self.sampler.pool)
    table = property(lambda self: self.sampler.table, lambda self, table: setattr(self.sampler, "table", table))

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self._load_checkpoint(Path(cfg.resume) if cfg.resume != "auto" else self.out / CHECKPOINT)
        else:
            (self.out / METRICS).write_text("")
        try:
            self.sampler.start()
            if self.step == 0 and cfg.diag_every:
                with self._workers_paused():
                    self._diagnose()
            self.model.train()  # once: scoring and diagnostics give every module its mode back
            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.mode, unit="step", disable=not cfg.progress,
                       dynamic_ncols=True, mininterval=0.5)
            with bar, _sigint_sets_flag() as interrupt:  # from here on Ctrl-C stops at the end of a step
                tick = time.perf_counter()
                while self.step < cfg.steps and not interrupt.is_set():
                    self._train_step()
                    bar.update(1)
                    if interrupt.is_set():
                        break
                    if (cfg.diag_every and self.step % cfg.diag_every == 0) or self.step == cfg.steps or (
                            cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        self.seconds += time.perf_counter() - tick
                        with self._workers_paused():
                            if cfg.diag_every and (self.step % cfg.diag_every == 0 or self.step == cfg.steps):
                                rec = self._diagnose()
                                bar.set_postfix(loss=f"{rec['train_loss']:.4f}",
                                                valid_err=f"{rec['valid_error']:.3f}", refresh=False)
                            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                                self._save_checkpoint()
                        tick = time.perf_counter()
                if interrupt.is_set():
                    self.seconds += time.perf_counter() - tick
                    self.interrupted = True
                    if cfg.checkpoint_every:
                        self._save_checkpoint()
        finally:
            self.sampler.close()
        summary = self.summary()
        (self.out / "summary.json").write_text(to_json(summary, indent=1))
        if self.interrupted:
            raise KeyboardInterrupt(f"interrupted at step {self.step}"
                                    + (f"; checkpoint {self.out / CHECKPOINT}" if cfg.checkpoint_every else "")
                                    + f"; partial summary {self.out / 'summary.json'}")
        return summary

    def _workers_paused(self):
        """Workers start no chunk while the master is away from training (diagnostics, checkpoints)."""
        return self.sampler.paused()

    def _train_step(self) -> None:
        batch = self.sampler.next_batch()
        losses = train_step(self.model, self.loss_fn, self.optimizer, batch)
        self._losses.append(losses.mean())
        self.step += 1
        if self.on_step is not None:
            self.on_step(self, self.step - 1, batch.index)

    def draw_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """M example indices drawn with replacement from the current weights, with their 1/(N q_i)."""
        return self.sampler.draw()

    @staticmethod
    def batch_loss(losses: torch.Tensor, iw: torch.Tensor | None) -> torch.Tensor:
        """mean_m l_{i_m} / (N q_{i_m}): its gradient is an unbiased estimate of the full gradient."""
        return weighted_mean(losses, iw)

    # ------------------------------------------------------------------ diagnostics
    def _diagnose(self) -> dict:
        cfg = self.config
        if self._diag_batch is None:
            self._diag_batch = self.sampler.data.fetch(self.diag_index)
        x, y = self._diag_batch
        weights = self.sampler.weights()
        rec = {"step": self.step, "epoch": self.step * cfg.batch_size / self.n, "seconds": self.seconds}
        rec.update(variance_diagnostics(self.model, self.scorer, x, y, weights.to(self.device)[self.diag_index],
                                        loss_fn=self.loss_fn))
        with evaluating(self.model):
            rec["train_loss"], rec["train_error"] = loss_and_error(self.model, x, y, loss_fn=self.loss_fn)
        no_valid = (float("nan"), float("nan"))
        rec["valid_loss"], rec["valid_error"] = (evaluate(self.model, self.valid, self.loss_fn)
                                                 if self.valid is not None else no_valid)
        rec["batch_loss"] = float(torch.stack(self._losses).mean()) if self._losses else float("nan")
        self._losses.clear()
        if cfg.mode == "issgd":
            rec.update(self.board.staleness(self.step))
        stats = self.sampler.stats()
        if stats:
            rec.update(sync_seconds=stats["sync_seconds"], scored_examples=stats["scored_examples"],
                       workers_alive=stats["workers_alive"])
        if not all(map(_finite, (rec["train_loss"], rec["sqrt_tr_uniform"]))):
            raise FloatingPointError(f"training diverged at step {self.step} (train loss {rec['train_loss']}); "
                                     "lower --lr or raise --smoothing")
        self.records.append(rec)
        with open(self.out / METRICS, "a") as f:
            f.write(to_json(rec) + "\n")
        return rec

    def summary(self) -> dict:
        cfg = self.config
        recs = [r for r in self.records if r["step"] > 0] or self.records
        last = self.records[-1] if self.records else {}
        out = {"config": asdict(cfg), "steps": self.step, "train_seconds": self.seconds,
               "steps_per_second": self.step / self.seconds if self.seconds else None,
               "final": last, "mean_sqrt_tr_uniform": _mean(r.get("sqrt_tr_uniform") for r in recs),
               "mean_ratio_ideal_to_uniform": _mean(_ratio(r, "sqrt_tr_ideal") for r in recs),
               "mean_ratio_actual_to_uniform": _mean(_ratio(r, "sqrt_tr_actual") for r in recs),
               "mean_staleness": _mean(r.get("staleness_mean") for r in recs) if cfg.mode == "issgd" else None,
               "score": cfg.score if cfg.mode == "issgd" else None,
               "device": str(self.device), "workers": self.workers if cfg.mode == "issgd" else 0,
               "master_threads": self.threads, "usable_cores": usable_cores(),
               "torch": torch.__version__, "interrupted": self.interrupted, "resume_changes": self.resume_changes}
        stats = self.sampler.stats()
        if stats:
            busy, scored = stats["worker_seconds"], stats["scored_examples"]
            out.update(sync_seconds=stats["sync_seconds"], scored_examples=scored,
                       rejected_messages=stats["rejected_messages"],
                       scoring_examples_per_second=scored / self.seconds if self.seconds else None,
                       scoring_examples_per_worker_second=scored / busy if busy else None)
            out.update(self.sampler.push_stats(self.seconds))
        return out

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        state = {"config": asdict(self.config), "step": self.step, "seconds": self.seconds,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "sampler": self.sampler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "losses": [float(x) for x in self._losses], "records": self.records,
                 "resume_changes": self.resume_changes}
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        if path.is_file():
            os.replace(path, self.out / PREVIOUS)  # keep one previous checkpoint to fall back on
        os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoints intact

    def _load_checkpoint(self, path: Path) -> None:
        previous = path.parent / PREVIOUS
        fallback = (f"resume from the previous one (--resume {previous}) or start a fresh run without --resume"
                    if previous.is_file() and previous != path else "start a fresh run without --resume")
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (written by --checkpoint-every)"
                                    + (f"; {fallback}" if previous.is_file() else ""))
        try:
            if path.is_dir():
                raise IsADirectoryError("a directory")
            # weights_only: a checkpoint is tensors and plain data, never code to run.
            state = torch.load(path, map_location=self.device, weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}")
            if "sampler" not in state and {"board", "cursor"} <= set(state):  # written before the sampler held these
                state["sampler"] = {"board": state["board"], "cursor": state["cursor"], "step": state.get("step"),
                                    "generator": state.get("rng", {}).get("sampler")}
            missing = {"config", "step", "seconds", "model", "optimizer", "sampler", "rng", "losses",
                       "records"} - set(state)
            if missing:
                raise KeyError(f"lacks {', '.join(sorted(missing))}")
        except Exception as exc:  # noqa: BLE001  (whatever is wrong with the file, the answer is the same)
            raise CheckpointError(f"--resume: {path} is not a usable checkpoint ({_one_line(exc)}); "
                                  f"{fallback}") from None
        saved = state["config"]
        for key in ("mode", "dataset", "model", "hidden", "batch_size", "smoothing", "refresh_every", "seed", "score"):
            was = saved.get(key, "grad_norm" if key == "score" else None)  # checkpoints before --score: grad_norm
            if _as_plain(was) != _as_plain(getattr(self.config, key)):
                raise ValueError(f"--resume: checkpoint {path} was written with {key}={was!r}, "
                                 f"this run has {key}={getattr(self.config, key)!r}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"--resume: {path} does not fit this model and data ({_one_line(exc)}); "
                                  f"{fallback}") from None
        self.step, self.seconds = state["step"], state["seconds"]
        self.resume_changes = list(state.get("resume_changes", []))
        self._apply_hyperparameters(path)
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._losses = [torch.tensor(x) for x in state["losses"]]
        self.records = state["records"]
        with open(self.out / METRICS, "w") as f:  # drop what was logged after the checkpoint
            f.writelines(to_json(r) + "\n" for r in self.records)
        log.info("resumed from %s at step %d", path, self.step)

    def _apply_hyperparameters(self, path: Path) -> None:
        """--resume with another --lr / --momentum: the optimizer takes this run's values from the resumed
        step on (its momentum buffers are kept), and summary.json records the change."""
        cfg = self.config
        wanted = {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.momentum > 0}
        changed = {}
        for group in self.optimizer.param_groups:
            for key, value in wanted.items():
                if group[key] != value:
                    changed[key] = [group[key], value]
                    group[key] = value
        if changed:
            self.resume_changes.append({"step": self.step, **changed})
            log.warning("--resume: %s changed from the checkpoint %s; applied from step %d on",
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), path, self.step)


@contextlib.contextmanager
def _sigint_sets_flag():
    """Within the block, SIGINT sets the yielded event instead of raising (in the main thread only); a
    second SIGINT raises KeyboardInterrupt at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


def _ratio(record: dict, key: str) -> float | None:
    return record[key] / record["sqrt_tr_uniform"] if key in record and record["sqrt_tr_uniform"] > 0 else None


def _mean(values) -> float | None:
    """Mean of the finite values (None when there are none)."""
    kept = [v for v in values if v is not None and _finite(v)]
    return sum(kept) / len(kept) if kept else None


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _as_plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value
