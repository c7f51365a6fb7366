"""Alias-table sampler vs the weighted samplers people use, side by side in one process.

    python -m benchmarks --only sampler [--device cuda] [--quick]

Methods: AliasTable (this package), torch.multinomial(w, n, replacement=True), WeightedRandomSampler,
numpy.random.Generator.choice(p=...), torch.searchsorted on a prebuilt float64 CDF.
Per N: build time (fresh, and in-place rebuild for the alias table), time to draw 128 and 1e6
indices, and the ISSGD schedule (weights refreshed every 32 steps, batch 128 per step): the total
sampler cost per step, measured end to end over whole refresh cycles. For the alias table the
per-step draws include the importance weights 1/(N q_i) (sample_with_weights); the other methods
are charged for indices only.

Writes sampler.{csv,json,md,png} to the run's output folder. benchmarks/bench_sampler.py times the
same methods (`Method`) on the same sizes with pytest-benchmark.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from benchmarks.harness import environment, figure, measure, write_results
from benchmarks.workloads import sampler_sizes, sampler_weights
from isgd_kernels import AliasTable

BATCH = 128
REFRESH_EVERY = 32
BIG_DRAW = 1_000_000
METHODS = ["alias", "multinomial", "weighted_random_sampler", "numpy_choice", "searchsorted_cdf"]


def skip_reason(name: str, n: int, device: torch.device) -> str | None:
    """Why a method is not run at N categories on the device, or None."""
    if name == "numpy_choice" and device.type == "cuda":
        return "numpy draws on the host only"
    if name in ("multinomial", "weighted_random_sampler") and n > 2**24:
        return "torch.multinomial refuses more than 2^24 categories"
    return None


def is_slow(name: str, n: int) -> bool:
    """Methods whose big draws at this N take seconds: timed with fewer repeats."""
    return name in ("multinomial", "weighted_random_sampler", "numpy_choice") and n >= 10**7


class Method:
    """build(w) -> state (on refresh); draw(state, n) -> indices."""

    def __init__(self, name, device):
        self.name = name
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.rng = np.random.default_rng(0)
        self.table = None

    def build(self, w: torch.Tensor, in_place: bool = False):
        if self.name == "alias":
            if in_place and self.table is not None and len(self.table) == w.numel():
                return self.table.rebuild_(w)
            self.table = AliasTable(w)
            return self.table
        if self.name == "multinomial":
            return w  # nothing to build: every call scans all N weights
        if self.name == "weighted_random_sampler":
            return WeightedRandomSampler(w, BATCH, replacement=True, generator=self.gen)
        if self.name == "numpy_choice":
            p = w.double().cpu().numpy()
            return p / p.sum()  # choice(p=...) wants probabilities summing to 1
        if self.name == "searchsorted_cdf":
            cdf = torch.cumsum(w.double(), 0)
            return cdf, cdf[-1:]
        raise ValueError(self.name)

    def draw(self, state, n: int, with_weights: bool = False):
        if self.name == "alias":
            return state.sample_with_weights(n, generator=self.gen) if with_weights else state.sample(n, generator=self.gen)
        if self.name == "multinomial":
            return torch.multinomial(state, n, replacement=True, generator=self.gen)
        if self.name == "weighted_random_sampler":
            state.num_samples = n
            return list(state)
        if self.name == "numpy_choice":
            return self.rng.choice(state.shape[0], size=n, replace=True, p=state)
        if self.name == "searchsorted_cdf":
            cdf, total = state
            u = torch.rand(n, dtype=torch.float64, device=cdf.device, generator=self.gen) * total
            return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
        raise ValueError(self.name)


def _issgd_step_ms(method: Method, weights: list[torch.Tensor], cycles: int) -> float:
    """Sampler cost per training step: refresh (rebuild) every REFRESH_EVERY steps, draw a batch of
    BATCH each step; the median over `cycles` whole refresh cycles, per step. Weights alternate
    between two vectors so every refresh sees new values."""
    method.build(weights[0])  # not timed: the first build happens before training
    refresh = itertools.count(1)

    def cycle():
        state = method.build(weights[next(refresh) % len(weights)], in_place=True)
        for _ in range(REFRESH_EVERY):
            method.draw(state, BATCH, with_weights=True)

    t = measure(cycle, method.device, min_time=0.0, min_reps=cycles, max_reps=cycles, warmup=False)
    return t["median_ms"] / REFRESH_EVERY


def run(device: torch.device, quick: bool) -> list[dict]:
    min_time = 0.2 if quick else 0.5
    rows = []
    for n in sampler_sizes(device, quick):
        weights = [sampler_weights(n, device, 0), sampler_weights(n, device, 1)]
        w = weights[0]
        for name in METHODS:
            if skip_reason(name, n, device):
                continue
            m = Method(name, device)
            state = m.build(w)

            def fresh_build():
                m.table = None
                return m.build(w)

            build = measure(fresh_build, device, min_time=min_time, max_reps=20)["median_ms"]
            rebuild = None
            if name == "alias":
                m.build(w)
                rebuild = measure(lambda: m.build(w, in_place=True), device, min_time=min_time, max_reps=20)["median_ms"]
                state = m.table
            d128 = measure(lambda: m.draw(state, BATCH), device, min_time=min_time, max_reps=2000)["median_ms"]
            slow = is_slow(name, n)
            dbig = measure(lambda: m.draw(state, BIG_DRAW), device, min_time=min_time,
                           max_reps=3 if slow else 20, min_reps=1 if slow else 3)["median_ms"]
            cycles = 1 if (slow or quick) else 2
            step = _issgd_step_ms(m, weights, cycles)
            rows.append({"N": n, "method": name, "build_ms": build, "rebuild_in_place_ms": rebuild,
                         "draw128_us": d128 * 1e3, "draw1e6_ms": dbig, "issgd_step_us": step * 1e3})
            print(f"N={n:>9} {name:>24}: build {build:9.3f} ms  draw128 {d128 * 1e3:9.1f} us  "
                  f"draw1e6 {dbig:9.2f} ms  ISSGD/step {step * 1e3:9.1f} us", flush=True)
    return rows


def _targets(rows: list[dict], device: torch.device) -> list[str]:
    notes = []
    n_t = 10**7 if device.type == "cpu" else 10**8
    by = {(r["N"], r["method"]): r for r in rows}
    if (n_t, "alias") not in by:
        return ["targets are evaluated at N = 1e7 (CPU); not measured in --quick mode"]
    a = by[(n_t, "alias")]
    if (n_t, "multinomial") in by:
        mu = by[(n_t, "multinomial")]
        r = mu["draw128_us"] / a["draw128_us"]
        notes.append(f"draw 128 at N={n_t:.0e}: {r:,.0f}x faster than torch.multinomial (target >= 1000x): "
                     f"{'MET' if r >= 1000 else 'MISSED'}")
        mult_ms = mu["draw128_us"] / 1e3
        notes.append(f"fresh build {a['build_ms']:.1f} ms / in-place rebuild {a['rebuild_in_place_ms']:.1f} ms vs one "
                     f"multinomial(w,128) call {mult_ms:.1f} ms (target: build no slower): fresh "
                     f"{'MET' if a['build_ms'] <= mult_ms else 'MISSED'} ({a['build_ms'] / mult_ms:.2f}x), "
                     f"rebuild {'MET' if a['rebuild_in_place_ms'] <= mult_ms else 'MISSED'} "
                     f"({a['rebuild_in_place_ms'] / mult_ms:.2f}x)")
    s = by.get((n_t, "searchsorted_cdf"))
    if s:
        r = s["draw128_us"] / a["draw128_us"]
        notes.append(f"draw 128 at N={n_t:.0e}: {r:.1f}x faster than searchsorted on a prebuilt float64 CDF "
                     f"(target >= 3x): {'MET' if r >= 3 else 'MISSED'}")
    others = [by[(n_t, m)]["issgd_step_us"] for m in METHODS if m != "alias" and (n_t, m) in by]
    if others:
        best = min(others)
        notes.append(f"ISSGD schedule at N={n_t:.0e}: {a['issgd_step_us']:.0f} us/step vs best alternative "
                     f"{best:.0f} us/step (target: lower than every alternative): "
                     f"{'MET' if a['issgd_step_us'] < best else 'MISSED'}")
    return notes


def plot(rows: list[dict], path: Path, title: str) -> None:
    with figure(path, figsize=(15, 4.2), ncols=3, dpi=110) as (fig, axes):
        for ax, key, label in zip(axes, ["draw128_us", "draw1e6_ms", "issgd_step_us"],
                                  ["draw 128 indices (us)", "draw 1e6 indices (ms)",
                                   f"ISSGD: sampler cost per step (us)\nrefresh every {REFRESH_EVERY}, batch {BATCH}"]):
            for m in METHODS:
                pts = sorted((r["N"], r[key]) for r in rows if r["method"] == m and r[key] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (categories)")
            ax.set_title(label, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title, fontsize=9)


def report(rows: list[dict], device: torch.device, out_dir: Path) -> Path:
    """Targets, CSV/JSON/Markdown table and chart in out_dir."""
    notes = _targets(rows, device)
    notes.append(f"ISSGD step = (rebuild every {REFRESH_EVERY} steps + {BATCH} draws per step) / steps, measured "
                 "end to end over whole refresh cycles (median); alias draws include the importance weights, the "
                 "others indices only")
    notes.append("build: alias = fresh AliasTable(w) (incl. allocating the 12 B/row table); multinomial = none; "
                 "WeightedRandomSampler = constructor; numpy = normalising p; searchsorted = float64 cumsum")
    for n in notes:
        print(n)
    env = environment(device)
    out = write_results(rows, "sampler", out_dir, device,
                        columns=["N", "method", "build_ms", "rebuild_in_place_ms", "draw128_us", "draw1e6_ms",
                                 "issgd_step_us"],
                        title=f"Alias sampler vs weighted samplers ({device.type.upper()})", notes=notes)
    plot(rows, out / "sampler.png", f"{env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}")
    return out
