"""The reference ISSGD trainer (docs/design.md, "The algorithm"): importance-sampled SGD as in Alain et al.

Every ``refresh_every`` (K) master steps the master takes in the norms the scorers have produced
(inline, or from the distributed workers), turns them into weights w_i = ||g_i|| + c, rebuilds the
alias table and publishes its parameters. Each step draws a batch of M examples with replacement
from q_i = w_i / sum_j w_j and minimizes mean_m (l_{i_m} / (N q_{i_m})): an unbiased estimate of
the full-batch gradient whatever the (positive) weights. ``mode="usgd"`` draws uniformly (with
replacement) and is the same in every other respect.
"""
from __future__ import annotations

import contextlib
import json
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
from issgd.diagnostics import loss_and_error, variance_diagnostics
from issgd.distributed import ScoringPool, launched_by_torchrun, refuse_in_bootstrap
from issgd.job import build_job
from issgd.report import to_json
from issgd.scoring import XENT, ChunkCursor, ScoreBoard
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
        if self.device.type == "cpu":
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
        job = build_job(config, self.device)
        self.data, self.model, self.scorer = job.data, job.model, job.scorer
        self.n = len(self.data.x_train)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.momentum > 0)
        self.board = ScoreBoard(self.n, config.smoothing)
        self.cursor = ChunkCursor(torch.arange(self.n), config.chunk_size)  # inline scoring (workers = 0)
        self.generator = torch.Generator(self.device).manual_seed(config.seed + 1)
        self.table: isgd_kernels.AliasTable | None = None
        self.pool: ScoringPool | None = None
        self.step = 0
        self.seconds = 0.0  # training wall-clock: excludes diagnostics and checkpoints
        self.records: list[dict] = []
        self.resume_changes: list[dict] = []  # hyper-parameters a --resume changed, applied from its step on
        self.interrupted = False
        self._losses: list[torch.Tensor] = []
        diag = torch.randperm(self.n, generator=torch.Generator().manual_seed(config.seed + 2))
        self.diag_index = diag[:config.diag_examples].sort().values.to(self.device)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self._load_checkpoint(Path(cfg.resume) if cfg.resume != "auto" else self.out / CHECKPOINT)
        else:
            (self.out / METRICS).write_text("")
        try:
            if cfg.mode == "issgd" and self.workers > 0:
                kw = {"worker_timeout": cfg.worker_timeout, "examples": self.n}
                self.pool = (ScoringPool.from_torchrun(self.device, startup_timeout=cfg.startup_timeout, **kw)
                             if self.distributed else ScoringPool.spawn(cfg, self.workers, self.device, **kw))
                self.pool.start(self.model, self.step)
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
            if self.pool is not None:
                self.pool.close()
        summary = self.summary()
        (self.out / "summary.json").write_text(to_json(summary, indent=1))
        if self.interrupted:
            raise KeyboardInterrupt(f"interrupted at step {self.step}"
                                    + (f"; checkpoint {self.out / CHECKPOINT}" if cfg.checkpoint_every else "")
                                    + f"; partial summary {self.out / 'summary.json'}")
        return summary

    def _workers_paused(self):
        """Workers start no chunk while the master is away from training (diagnostics, checkpoints)."""
        return self.pool.paused() if self.pool is not None else contextlib.nullcontext()

    def _train_step(self) -> None:
        if self.config.mode == "issgd" and (self.step % self.config.refresh_every == 0 or self.table is None):
            self._refresh()
        index, iw = self.draw_batch()
        losses = XENT(self.model(self.data.x_train[index]), self.data.y_train[index])
        loss = self.batch_loss(losses, iw)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._losses.append(losses.detach().mean())
        self.step += 1
        if self.on_step is not None:
            self.on_step(self, self.step - 1, index)

    def draw_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """M example indices drawn with replacement, with their loss scales 1/(N q_i) (None: uniform)."""
        if self.config.mode == "issgd":
            return self.table.sample_with_weights(self.config.batch_size, generator=self.generator)
        return torch.randint(self.n, (self.config.batch_size,), generator=self.generator, device=self.device), None

    @staticmethod
    def batch_loss(losses: torch.Tensor, iw: torch.Tensor | None) -> torch.Tensor:
        """mean_m l_{i_m} / (N q_{i_m}): its gradient is an unbiased estimate of the full gradient."""
        return losses.mean() if iw is None else (losses * iw).mean()

    def _refresh(self) -> None:
        """Take in new norms, rebuild the alias table, publish the parameters (every K steps)."""
        if self.pool is not None:
            for result in self.pool.collect():
                self.board.update(result.index, result.norms, result.version)
            self.pool.publish(self.model, self.step)
        else:
            index = self.cursor.next()
            dev_index = index.to(self.device)
            norms = self.scorer.norms(self.data.x_train[dev_index], self.data.y_train[dev_index], XENT)
            self.board.update(index, norms, self.step)
        weights = self.board.weights().to(self.device)
        if self.table is None:
            self.table = isgd_kernels.AliasTable(weights, backend=self.config.backend)
        else:
            self.table.rebuild_(weights)

    # ------------------------------------------------------------------ diagnostics
    def _diagnose(self) -> dict:
        cfg = self.config
        x, y = self.data.x_train[self.diag_index], self.data.y_train[self.diag_index]
        weights = (self.board.weights() if cfg.mode == "issgd" else torch.ones(self.n, dtype=torch.float64))
        rec = {"step": self.step, "epoch": self.step * cfg.batch_size / self.n, "seconds": self.seconds}
        rec.update(variance_diagnostics(self.model, self.scorer, x, y, weights.to(self.device)[self.diag_index]))
        with evaluating(self.model):
            rec["train_loss"], rec["train_error"] = loss_and_error(self.model, x, y)
            rec["valid_loss"], rec["valid_error"] = loss_and_error(self.model, self.data.x_valid, self.data.y_valid)
        rec["batch_loss"] = float(torch.stack(self._losses).mean()) if self._losses else float("nan")
        self._losses.clear()
        if cfg.mode == "issgd":
            rec.update(self.board.staleness(self.step))
        if self.pool is not None:
            rec.update(sync_seconds=self.pool.sync_seconds, scored_examples=self.pool.scored_examples,
                       workers_alive=len(self.pool.alive()))
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
               "device": str(self.device), "workers": self.workers if cfg.mode == "issgd" else 0,
               "master_threads": self.threads, "usable_cores": usable_cores(),
               "torch": torch.__version__, "interrupted": self.interrupted, "resume_changes": self.resume_changes}
        if self.pool is not None:
            busy = sum(self.pool.worker_seconds.values())
            out.update(sync_seconds=self.pool.sync_seconds, scored_examples=self.pool.scored_examples,
                       rejected_messages=self.pool.rejected,
                       scoring_examples_per_second=self.pool.scored_examples / self.seconds if self.seconds else None,
                       scoring_examples_per_worker_second=self.pool.scored_examples / busy if busy else None)
            out.update(self.pool.push_stats(self.seconds))
        return out

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        state = {"config": asdict(self.config), "step": self.step, "seconds": self.seconds,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "board": self.board.state_dict(), "cursor": self.cursor.position,
                 "rng": {"torch": torch.get_rng_state(), "sampler": self.generator.get_state(),
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
            missing = {"config", "step", "seconds", "model", "optimizer", "board", "cursor", "rng", "losses",
                       "records"} - set(state)
            if missing:
                raise KeyError(f"lacks {', '.join(sorted(missing))}")
        except Exception as exc:  # noqa: BLE001  (whatever is wrong with the file, the answer is the same)
            raise CheckpointError(f"--resume: {path} is not a usable checkpoint ({_one_line(exc)}); "
                                  f"{fallback}") from None
        saved = state["config"]
        for key in ("mode", "dataset", "model", "hidden", "batch_size", "smoothing", "refresh_every", "seed"):
            if _as_plain(saved[key]) != _as_plain(getattr(self.config, key)):
                raise ValueError(f"--resume: checkpoint {path} was written with {key}={saved[key]!r}, "
                                 f"this run has {key}={getattr(self.config, key)!r}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.board.load_state_dict(state["board"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"--resume: {path} does not fit this model and data ({_one_line(exc)}); "
                                  f"{fallback}") from None
        self.cursor.position = state["cursor"]
        self.step, self.seconds = state["step"], state["seconds"]
        self.resume_changes = list(state.get("resume_changes", []))
        self._apply_hyperparameters(path)
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["sampler"].cpu() if self.device.type == "cpu" else state["rng"]["sampler"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._losses = [torch.tensor(x) for x in state["losses"]]
        self.records = state["records"]
        if self.config.mode == "issgd" and self.step % self.config.refresh_every != 0:
            # The table is a pure function of the weights: rebuild it exactly as it was.
            self.table = isgd_kernels.AliasTable(self.board.weights().to(self.device), backend=self.config.backend)
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
