"""Trainer group: does distributed scoring slow the master down, and how fast do workers score?

Runs the same ISSGD job (digits MLP 64-256x2-10 by default, batch 128, K = 32, no diagnostics)
with W = 0 (inline scoring), 1 and 2 spawned scoring workers, next to uniform SGD (the master
alone: no scoring at all), all with the same number of master threads. The four runs are repeated
in rounds, one after the other in this process; each run's ratio to the master alone is taken
within its round and the median over rounds is reported, so that a drift of the machine's speed
between runs does not enter the ratios. Reports master steps/s, that ratio (target >= 0.90), the
scoring throughput and the staleness of the weights.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.harness import figure, write_results

WORKERS = (0, 1, 2)


def run(device="cpu", quick: bool = False, dataset: str = "digits", model: str = "mlp") -> list[dict]:
    from issgd.trainer import TrainConfig, Trainer

    device = str(device)

    steps, rounds = (1500, 2) if quick else (2000, 3)
    runs = []  # one row per (round, job)
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(dataset=dataset, model=model, steps=steps, diag_every=0, progress=False, device=device,
                           master_threads=1, out=tmp)
        jobs = [(r, mode, w) for r in range(rounds) for mode, w in [("usgd", 0)] + [("issgd", w) for w in WORKERS]]
        for rnd, mode, workers in tqdm(jobs, desc="trainer", leave=False):
            cfg = TrainConfig(**{**base.__dict__, "mode": mode, "workers": workers,
                                 "out": f"{tmp}/{rnd}{mode}{workers}"})
            trainer = Trainer(cfg)
            s = trainer.run()
            runs.append({"round": rnd, "mode": mode, "workers": workers, "steps": s["steps"],
                         "master_threads": cfg.master_threads,
                         "worker_threads": cfg.worker_threads if workers else None,
                         "steps_per_second": s["steps_per_second"],
                         "scored_examples": s.get("scored_examples"),
                         "scoring_examples_per_second": s.get("scoring_examples_per_second"),
                         "scoring_examples_per_worker_second": s.get("scoring_examples_per_worker_second"),
                         "sync_ms_per_refresh": (1e3 * s["sync_seconds"] / (steps / cfg.refresh_every)
                                                 if s.get("sync_seconds") is not None else None),
                         "staleness_mean": trainer.board.staleness(trainer.step)["staleness_mean"]
                         if mode == "issgd" else None})
    for r in runs:
        alone = next(a["steps_per_second"] for a in runs if a["round"] == r["round"] and a["mode"] == "usgd")
        r["ratio_to_master_alone"] = r["steps_per_second"] / alone
    rows = []  # per job: the median over rounds of every measured quantity
    for mode, workers in [("usgd", 0)] + [("issgd", w) for w in WORKERS]:
        mine = [r for r in runs if r["mode"] == mode and r["workers"] == workers]
        row = {k: v for k, v in mine[0].items() if k != "round"}
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = statistics.median(r[k] for r in mine)
        row["rounds"] = len(mine)
        row["ratio_min"] = min(r["ratio_to_master_alone"] for r in mine)
        row["ratio_max"] = max(r["ratio_to_master_alone"] for r in mine)
        rows.append(row)
    return rows


def report(rows: list[dict], device, out_dir: Path) -> Path:
    """Writes trainer.{csv,json,md,png} to out_dir; returns it."""
    for r in rows:
        r["run"] = ("uniform SGD (master alone)" if r["mode"] == "usgd"
                    else "ISSGD, inline scoring" if r["workers"] == 0
                    else f"ISSGD, {r['workers']} scoring worker{'s' if r['workers'] > 1 else ''}")
    columns = ["run", "steps_per_second", "ratio_to_master_alone", "ratio_min", "ratio_max",
               "scoring_examples_per_second", "scoring_examples_per_worker_second", "sync_ms_per_refresh", "staleness_mean"]
    notes = [("Same job one after the other in one process: digits MLP 64-256x2-10, batch 128, K = 32, "
              "1 master thread, 1 thread per (niced) scoring worker, no diagnostics."),
             (f"{rows[0]['rounds']} rounds of the four runs; ratio_to_master_alone is the median over rounds of "
              "the ratio within a round (ratio_min / ratio_max: its range), the other columns are medians."),
             "Target: master steps/s with W scoring workers >= 0.90 x the master alone."]
    out = write_results(rows, "trainer", out_dir, torch.device(device), columns=columns,
                        title="Trainer: master throughput with scoring workers", notes=notes)
    _plot(rows, out / "trainer.png", torch.device(device))
    return out


def _plot(rows: list[dict], path: Path, device: torch.device) -> None:
    """Master steps/s per run as a fraction of the master alone, with the 0.90 target line."""
    names = [r["run"] for r in rows]
    ratios = [r["ratio_to_master_alone"] for r in rows]
    colors = ["tab:gray" if r["mode"] == "usgd" else "tab:blue" for r in rows]
    with figure(path, figsize=(7, 3.8)) as (fig, ax):
        bars = ax.barh(names[::-1], ratios[::-1], color=colors[::-1])
        for bar, r in zip(bars, rows[::-1]):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2,
                    f"{r['ratio_to_master_alone']:.2f}  ({r['steps_per_second']:.0f} steps/s)", va="center",
                    fontsize=8)
        ax.axvline(0.9, color="tab:red", ls="--", lw=1, label="target 0.90")
        ax.set_xlim(0, 1.3)
        ax.set_xlabel("master steps/s / master alone")
        ax.set_title(f"ISSGD master throughput with scoring workers — {device.type.upper()}")
        ax.legend(loc="lower right", fontsize=8)
