"""Shared benchmark harness: the timer, the device, where results go, the environment stamp, the
result writers and the charts. `python -m benchmarks` and the pytest-benchmark files both use it.

The timer is `issgd.timing` (re-exported here), the one the demo uses too: medians over repeats
(p20/p80 alongside); on CUDA `triton.testing.do_bench` times with CUDA events, on CPU
`time.perf_counter` after a warm-up. Ratios are always measured side by side in one process, never
against numbers from another run.

Results go to a scratch folder, runs/benchmarks/<device>/ (gitignored), unless a run is published
to the committed benchmarks/results/<device>/ (`python -m benchmarks --publish`).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from issgd.timing import measure, measure_side_by_side, peak_extra_memory_mb, quantiles, synchronize

__all__ = ["measure", "measure_side_by_side", "peak_extra_memory_mb", "quantiles", "synchronize"]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"  # committed: what the READMEs quote
SCRATCH_DIR = REPO_ROOT / "runs" / "benchmarks"  # gitignored (/runs/): quick and exploratory runs


# ------------------------------------------------------------------------------------ device
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synced(fn, device: torch.device):
    """fn followed by a device synchronization (for timers that read the host clock, pytest-benchmark's)."""
    def call():
        out = fn()
        synchronize(device)
        return out

    return call


# ------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name under benchmarks/results/ (and runs/benchmarks/): 'cpu' or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    commit = os.environ.get("ISGD_COMMIT")  # a copy of the tree without .git (e.g. on a lent GPU machine)
    try:
        if commit:
            raise OSError("commit given")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = commit or "unknown"
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


# ------------------------------------------------------------------------------ where results go
def output_dir(device: torch.device, *, out: str | Path | None = None, publish: bool = False) -> Path:
    """The folder a run writes its tables to: `out` as given; with publish, the committed
    benchmarks/results/<device>/; otherwise the scratch runs/benchmarks/<device>/."""
    if publish and out is not None:
        raise ValueError("give either an output folder or publish, not both")
    if publish:
        return RESULTS_DIR / device_slug(device)
    if out is not None:
        return Path(out)
    return SCRATCH_DIR / device_slug(device)


def is_published(path: Path) -> bool:
    """Whether `path` lies in the committed results, benchmarks/results/."""
    return Path(path).resolve().is_relative_to(RESULTS_DIR.resolve())


# ----------------------------------------------------------------------------------- writers
def write_results(rows: list[dict], name: str, out_dir: Path, device: torch.device, *, columns: list[str],
                  title: str, notes: list[str] | None = None, summary: list[str] | None = None) -> Path:
    """<out_dir>/<name>.{csv,json,md} (see output_dir); returns the folder. `summary`: Markdown
    lines put above the full table."""
    out_dir = Path(out_dir)
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
