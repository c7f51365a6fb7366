"""Shared benchmark harness: workloads, timing, environment stamp and result writers.

Times are medians over repeats (p20/p80 alongside). On CUDA, `triton.testing.do_bench` times with
CUDA events; on CPU, `time.perf_counter` after warm-up. Ratios are always measured side by side in
one process, never against numbers from another run.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from issgd.models import paper_mlp  # noqa: F401  (re-exported for the benchmark modules)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------- workloads
class TokenMLP(nn.Module):
    """A sequence model made of 3-D Linear layers: embed, two residual MLP blocks, mean-pool, head."""

    def __init__(self, d_in: int = 64, d: int = 256, hidden: int = 1024, classes: int = 10, blocks: int = 2):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(1))


# ------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.5, max_reps: int = 50,
            min_reps: int = 3, warmup: bool = True) -> dict:
    """Median / p20 / p80 time of fn() in milliseconds, after one warm-up call (unless warmup=False)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)),
                                                quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    if warmup:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}


def peak_extra_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by fn() above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name under benchmarks/results/: 'cpu' or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------------- writers
def write_results(rows: list[dict], name: str, device: torch.device, *, columns: list[str],
                  title: str, notes: list[str] | None = None) -> Path:
    """benchmarks/results/<device>/<name>.{csv,json,md}; returns the folder."""
    out_dir = RESULTS_DIR / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + list(env.keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    lines = [f"# {title}", "", " | ".join(f"**{k}**: {v}" for k, v in env.items()), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out_dir


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
