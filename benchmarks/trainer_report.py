"""Trainer group: does distributed scoring slow the master down, and how fast do workers score?

Runs the same ISSGD job (digits MLP 64-256x2-10 by default, batch 128, K = 32, no diagnostics)
with W = 0 (inline scoring), 1 and 2 spawned scoring workers, next to uniform SGD (the master
alone: no scoring at all), all with the same number of master threads, one after the other in
this process. Reports master steps/s, the ratio to the master alone (target >= 0.90), the
scoring throughput and the staleness of the weights.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.harness import write_results

WORKERS = (0, 1, 2)


def run(device="cpu", quick: bool = False, dataset: str = "digits", model: str = "mlp") -> list[dict]:
    from issgd.trainer import TrainConfig, Trainer

    device = str(device)

    steps = 1500 if quick else 4000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(dataset=dataset, model=model, steps=steps, diag_every=0, progress=False, device=device,
                           master_threads=1, out=tmp)
        jobs = [("usgd", 0)] + [("issgd", w) for w in WORKERS]
        for mode, workers in tqdm(jobs, desc="trainer", leave=False):
            cfg = TrainConfig(**{**base.__dict__, "mode": mode, "workers": workers, "out": f"{tmp}/{mode}{workers}"})
            trainer = Trainer(cfg)
            s = trainer.run()
            rows.append({"mode": mode, "workers": workers, "steps": s["steps"], "master_threads": cfg.master_threads,
                         "worker_threads": cfg.worker_threads if workers else None,
                         "steps_per_second": s["steps_per_second"],
                         "scored_examples": s.get("scored_examples"),
                         "scoring_examples_per_second": s.get("scoring_examples_per_second"),
                         "scoring_examples_per_worker_second": s.get("scoring_examples_per_worker_second"),
                         "sync_ms_per_refresh": (1e3 * s["sync_seconds"] / (steps / cfg.refresh_every)
                                                 if s.get("sync_seconds") is not None else None),
                         "staleness_mean": trainer.board.staleness(trainer.step)["staleness_mean"]
                         if mode == "issgd" else None})
    alone = rows[0]["steps_per_second"]
    for r in rows:
        r["ratio_to_master_alone"] = r["steps_per_second"] / alone
    return rows


def report(rows: list[dict], device) -> Path:
    """Writes benchmarks/results/<device>/trainer.{csv,json,md}; returns the folder."""
    for r in rows:
        r["run"] = ("uniform SGD (master alone)" if r["mode"] == "usgd"
                    else "ISSGD, inline scoring" if r["workers"] == 0 else f"ISSGD, {r['workers']} scoring workers")
    columns = ["run", "steps_per_second", "ratio_to_master_alone", "scoring_examples_per_second",
               "scoring_examples_per_worker_second", "sync_ms_per_refresh", "staleness_mean"]
    notes = [("Same job one after the other in one process: digits MLP 64-256x2-10, batch 128, K = 32, "
              "1 master thread, 1 thread per (niced) scoring worker, no diagnostics."),
             "Target: master steps/s with W scoring workers >= 0.90 x the master alone."]
    return write_results(rows, "trainer", torch.device(device), columns=columns,
                         title="Trainer: master throughput with scoring workers", notes=notes)
