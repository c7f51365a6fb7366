"""The trainer's configuration: one dataclass that the master, the spawned workers and the CLI share."""
from __future__ import annotations

from dataclasses import dataclass, field

from issgd.data import DATASETS
from issgd.models import MODELS
from issgd.signals import SIGNALS
from issgd.sources import is_import_string

MODES = ("issgd", "usgd")


@dataclass
class TrainConfig:
    mode: str = "issgd"
    score: str = "grad_norm"  # the scoring signal (issgd.signals)
    dataset: str = "digits"  # a built-in name or an import string "package.module:factory" (issgd.sources)
    data_dir: str | None = None
    model: str = "mlp"  # likewise
    hidden: tuple[int, ...] = (256, 256)
    steps: int = 2000
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.95
    smoothing: float = 0.1
    refresh_every: int = 32
    workers: int = 0
    chunk_size: int = 2048
    worker_threads: int = 1
    master_threads: int | None = None
    worker_timeout: float = 60.0
    startup_timeout: float = 120.0  # seconds for every worker to come up before StartupError
    diag_every: int = 100
    diag_examples: int = 10000
    checkpoint_every: int = 0
    resume: str | None = None
    out: str = "runs/issgd"
    seed: int = 0
    seeds: int = 1  # a comparison (`issgd train --mode both`) runs paired seeds seed, seed+1, ..., seed+seeds-1
    device: str = "cpu"
    backend: str = "auto"
    progress: bool = True
    slow_workers: tuple[tuple[int, float], ...] = field(default=())  # (rank, seconds per chunk): fault tests

    def validate(self) -> TrainConfig:
        """Raises ConfigError naming the first field out of range."""
        checks = [("mode", self.mode in MODES, f"must be one of {MODES}, got {self.mode!r}"),
                  ("score", self.score in SIGNALS, f"must be one of {', '.join(SIGNALS)}, got {self.score!r}"),
                  ("model", self.model in MODELS or is_import_string(self.model),
                   f"must be one of {', '.join(MODELS)} or an import string 'package.module:factory', got "
                   f"{self.model!r}"),
                  ("dataset", self.dataset in DATASETS or is_import_string(self.dataset),
                   f"must be one of {', '.join(DATASETS)} or an import string 'package.module:factory', got "
                   f"{self.dataset!r}"),
                  ("steps", self.steps >= 0, "must be >= 0"), ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("lr", self.lr > 0, "must be > 0"), ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
                  ("smoothing", self.smoothing >= 0, "must be >= 0"),
                  ("refresh_every", self.refresh_every >= 1, "must be >= 1"),
                  ("workers", self.workers >= 0, "must be >= 0"), ("chunk_size", self.chunk_size >= 1, "must be >= 1"),
                  ("diag_every", self.diag_every >= 0, "must be >= 0"),
                  ("diag_examples", self.diag_examples >= 1, "must be >= 1"),
                  ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
                  ("worker_threads", self.worker_threads >= 1, "must be >= 1"),
                  ("master_threads", self.master_threads is None or self.master_threads >= 1, "must be >= 1"),
                  ("worker_timeout", self.worker_timeout > 0, "must be > 0"),
                  ("startup_timeout", self.startup_timeout > 0, "must be > 0"),
                  ("seeds", self.seeds >= 1, "must be >= 1")]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(name, f"{name} {message}, got {getattr(self, name)!r}"
                                  if "got" not in message else f"{name} {message}")
        return self


class ConfigError(ValueError):
    """A TrainConfig field out of range; `field` names it (the CLI turns it into its --flag)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
