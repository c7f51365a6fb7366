"""Shared benchmark harness: timing, environment stamp, result writers and charts.

Times are medians over repeats (p20/p80 alongside). On CUDA, `triton.testing.do_bench` times with
CUDA events; on CPU, `time.perf_counter` after warm-up. Ratios are always measured side by side in
one process, never against numbers from another run.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    return _quantiles(times)


def measure_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, *, reference: str,
                         min_time: float = 2.0, min_rounds: int = 3, max_rounds: int = 30) -> dict[str, dict]:
    """measure() for functions compared with fns[reference], each already warmed up. Each result also
    has "ratio": its time over the reference's.

    On CPU they run interleaved, one call of each per round (in a shuffled order), and "ratio" is the
    median over rounds of the ratio within a round: a change in the load of a shared machine hits
    both alike, so the ratios hold while the absolute times drift. On CUDA each is timed by do_bench
    (CUDA events) in turn and "ratio" is the ratio of medians.
    """
    if device.type == "cuda":
        out = {name: measure(fn, device) for name, fn in fns.items()}
        for res in out.values():
            res["ratio"] = res["median_ms"] / out[reference]["median_ms"]
        return out
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds, order = time.perf_counter(), 0, list(fns)
    while rounds < min_rounds or (time.perf_counter() - start < min_time and rounds < max_rounds):
        random.Random(rounds).shuffle(order)  # no function always runs right after the same other one
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    ref = torch.tensor(times[reference], dtype=torch.float64)
    return {name: {**_quantiles(t), "ratio": float((torch.tensor(t, dtype=torch.float64) / ref).median())}
            for name, t in times.items()}


def _quantiles(times_ms: list[float]) -> dict:
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
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
                  title: str, notes: list[str] | None = None, summary: list[str] | None = None) -> Path:
    """benchmarks/results/<device>/<name>.{csv,json,md}; returns the folder. `summary`: Markdown
    lines put above the full table."""
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
    if summary:
        lines += summary + [""]
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


# ------------------------------------------------------------------------------------ charts
@contextlib.contextmanager
def figure(path: Path, *, figsize: tuple[float, float], ncols: int = 1, dpi: int = 120):
    """A headless matplotlib figure, (fig, ax) or (fig, axes) with ncols > 1, saved to `path` and
    closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def grouped_bars(ax, tick_labels: list[str], series: dict[str, list[float]], *, fontsize=None) -> dict[str, list]:
    """One bar per (group, series), series side by side within a group; returns each series' x positions."""
    width = 0.8 / len(series)
    positions = {}
    for i, (label, values) in enumerate(series.items()):
        positions[label] = [j + i * width for j in range(len(tick_labels))]
        ax.bar(positions[label], values, width, label=label, color=f"C{i}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tick_labels))], tick_labels, fontsize=fontsize)
    return positions
