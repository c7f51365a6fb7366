"""The trainer's configuration: one dataclass that the master, the spawned workers and the CLI share."""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("issgd", "usgd")


@dataclass
class TrainConfig:
    mode: str = "issgd"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
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
    diag_every: int = 100
    diag_examples: int = 10000
    checkpoint_every: int = 0
    resume: str | None = None
    out: str = "runs/issgd"
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    progress: bool = True
    slow_workers: tuple[tuple[int, float], ...] = field(default=())  # (rank, seconds per chunk): fault tests

    def validate(self) -> TrainConfig:
        checks = [(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
                  (self.steps >= 0, "steps must be >= 0"), (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.lr > 0, "lr must be > 0"), (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
                  (self.smoothing >= 0, "smoothing must be >= 0"), (self.refresh_every >= 1, "refresh-every must be >= 1"),
                  (self.workers >= 0, "workers must be >= 0"), (self.chunk_size >= 1, "chunk size must be >= 1"),
                  (self.diag_every >= 0, "diag-every must be >= 0"), (self.diag_examples >= 1, "diag-examples must be >= 1"),
                  (self.checkpoint_every >= 0, "checkpoint-every must be >= 0"),
                  (self.worker_threads >= 1, "worker threads must be >= 1"),
                  (self.master_threads is None or self.master_threads >= 1, "master threads must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self
