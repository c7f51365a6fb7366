"""Signals group: which scoring signal (issgd.signals) buys how much variance reduction, at what scoring cost?

    python -m benchmarks --only signals [--quick]

For each data set and seed, the same job (MLP 256x2, batch 128, K = 32, c = 0.1, Nesterov SGD lr 0.01, inline
scoring so that every run is reproducible, 1 master thread) runs with uniform SGD, then ISSGD with each
signal, from the same initial parameters and draws. Reported per (data set, signal), over the seeds:

* the mean after step 100 of sqrt Tr S actual / uniform: the spread of the one-example gradient estimator with
  the weights the signal really gave, over uniform sampling's, both from fresh full-gradient norms at the
  current parameters (docs/design.md, "The algorithm");
* the steps ISSGD needed to reach the training loss uniform SGD had at 50 % and at 100 % of its run, over
  those steps, on smoothed loss curves (issgd.report.steps_to_loss, the figure `--seeds` reports);
* scoring examples/s per worker: one process with 1 thread (a worker's setting) scoring chunks of 2048
  examples with each signal, the signals interleaved (issgd.timing.measure_side_by_side).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.harness import figure, measure_side_by_side, write_results

DATASETS = ("digits", "synthetic", "longtail")
CHUNK = 2048


def run(device="cpu", quick: bool = False) -> list[dict]:
    from issgd.report import sqrt_tr_ratio, steps_to_loss
    from issgd.signals import SIGNALS
    from issgd.trainer import TrainConfig, Trainer

    device = str(device)
    steps, seeds = (600, (0,)) if quick else (2000, (0, 1, 2))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(d, s, score) for d in DATASETS for s in seeds for score in (None,) + SIGNALS]
        for dataset, seed, score in tqdm(jobs, desc="signals", leave=False):
            cfg = TrainConfig(dataset=dataset, mode="usgd" if score is None else "issgd", score=score or "grad_norm",
                              steps=steps, diag_every=50, diag_examples=2048, seed=seed, device=device,
                              master_threads=1, progress=False, out=f"{tmp}/{dataset}{seed}{score}")
            trainer = Trainer(cfg)
            trainer.run()
            runs[dataset, seed, score] = trainer.records
    rows = []
    for dataset in DATASETS:
        throughput = scoring_throughput(dataset, device)
        for score in SIGNALS:
            ratios, half, full, losses = [], [], [], []
            for seed in seeds:
                uniform, mine = runs[dataset, seed, None], runs[dataset, seed, score]
                ratios.append(sqrt_tr_ratio(mine, "sqrt_tr_actual"))
                reached = {r["fraction"]: r["ratio"] for r in steps_to_loss(uniform, mine)}
                half.append(reached.get(0.5))
                full.append(reached.get(1.0))
                losses.append((mine[-1]["train_loss"], uniform[-1]["train_loss"]))
            rows.append({
                "dataset": dataset, "score": score, "seeds": len(seeds), "steps": steps,
                "ratio_actual_to_uniform": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "steps_ratio_half": _median_or_none(half), "steps_ratio_half_each": _each(half),
                "steps_ratio_full": _median_or_none(full), "steps_ratio_full_each": _each(full),
                "final_train_loss": statistics.median(a for a, _ in losses),
                "uniform_final_train_loss": statistics.median(b for _, b in losses),
                "scoring_examples_per_worker_second": throughput[score],
            })
    return rows


def _median_or_none(values: list) -> float | None:
    """The median, a run that never got there (None) ranked slowest: None when that is the median."""
    ranked = sorted(values, key=lambda v: float("inf") if v is None else v)
    return ranked[(len(ranked) - 1) // 2]


def _each(values: list) -> str:
    return " ".join("-" if v is None else f"{v:.2f}" for v in values)


def scoring_throughput(dataset: str, device: str) -> dict[str, float]:
    """Examples/s of each signal on chunks of CHUNK examples of the data set, 1 thread, side by side."""
    from issgd.job import BuiltinModel
    from issgd.data import load_dataset
    from issgd.scoring import cross_entropy
    from issgd.signals import SIGNALS, make_signal

    data = load_dataset(dataset, flatten=True, seed=0)
    x, y = data.x_train, data.y_train
    idx = torch.arange(CHUNK) % len(x)
    x, y = x[idx].to(device), y[idx].to(device)
    torch.manual_seed(0)
    model = BuiltinModel("mlp", data.image_shape, data.classes, (256, 256))().to(device)
    signals = {score: make_signal(score, model) for score in SIGNALS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = measure_side_by_side({s: (lambda f=f: f(x, y, cross_entropy)) for s, f in signals.items()},
                                     torch.device(device), reference=SIGNALS[0], min_time=3.0, warmup=True)
    finally:
        torch.set_num_threads(threads)
    return {score: CHUNK / (t["median_ms"] / 1e3) for score, t in times.items()}


def report(rows: list[dict], device, out_dir: Path) -> Path:
    """Writes signals.{csv,json,md,png} to out_dir; returns it."""
    columns = ["dataset", "score", "ratio_actual_to_uniform", "ratio_min", "ratio_max", "steps_ratio_half",
               "steps_ratio_half_each", "steps_ratio_full", "steps_ratio_full_each", "final_train_loss",
               "uniform_final_train_loss", "scoring_examples_per_worker_second"]
    r0 = rows[0]
    notes = [(f"Per data set: uniform SGD, then ISSGD with each signal, {r0['steps']} steps each, for "
              f"{r0['seeds']} seed(s) (same data split, initial parameters and draws per seed); MLP 256x2, batch 128, "
              "K = 32, c = 0.1, Nesterov SGD lr 0.01 momentum 0.95, inline scoring (chunks of 2048), 1 master "
              "thread, diagnostics every 50 steps on 2048 training examples."),
             ("ratio_actual_to_uniform: median over seeds of the mean, after step 100, of sqrt Tr S actual / uniform "
              "(issgd.report.sqrt_tr_ratio; ratio_min, ratio_max: its range; lower is better)."),
             ("steps_ratio_half / _full: the steps ISSGD needed to reach the training loss uniform SGD had at 50 % / "
              "100 % of its run, over those steps, on smoothed loss curves (issgd.report.steps_to_loss, as "
              "`issgd train --mode both --seeds N`); median over seeds, each seed's in *_each ('-': not reached "
              "within the run, counted as the slowest); below 1 is faster."),
             ("scoring_examples_per_worker_second: one process, 1 thread (a scoring worker's setting), chunks of "
              f"{CHUNK} examples of the untrained model, the three signals interleaved; median over rounds."),
             "The machine was shared with other jobs while this ran: absolute speeds move between runs."]
    out = write_results(rows, "signals", out_dir, torch.device(device), columns=columns,
                        title="Scoring signals: variance reduction and scoring cost", notes=notes)
    _plot(rows, out / "signals.png")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    with figure(path, figsize=(10, 3.8), ncols=2) as (fig, (ax1, ax2)):
        for i, dataset in enumerate(datasets):
            mine = [r for r in rows if r["dataset"] == dataset]
            xs = [j + 0.4 * i for j in range(len(mine))]
            ax1.bar(xs, [r["ratio_actual_to_uniform"] for r in mine], 0.4, label=dataset, color=f"C{i}")
            ax1.errorbar(xs, [r["ratio_actual_to_uniform"] for r in mine],
                         yerr=[[r["ratio_actual_to_uniform"] - r["ratio_min"] for r in mine],
                               [r["ratio_max"] - r["ratio_actual_to_uniform"] for r in mine]], fmt="none", color="k")
            ax2.bar(xs, [r["scoring_examples_per_worker_second"] for r in mine], 0.4, label=dataset, color=f"C{i}")
        labels = [r["score"] for r in rows if r["dataset"] == datasets[0]]
        for ax in (ax1, ax2):
            ax.set_xticks([j + 0.2 * (len(datasets) - 1) for j in range(len(labels))], labels)
            ax.legend(fontsize=8)
        ax1.axhline(1.0, color="gray", lw=1, ls="--")
        ax1.set_ylabel("mean √TrΣ actual / uniform (lower is better)")
        ax2.set_ylabel("scoring examples/s per worker (1 thread)")
        fig.suptitle("Scoring signals")
