"""Per-example gradient norms against the field: every provider on every workload, side by side.

    python -m benchmarks --only field [--device cuda] [--quick]
    python -m benchmarks --only models   (the same comparison on the models people train)

Per workload (benchmarks/workloads.py), in one process: a plain training step of the same model and
batch (forward, backward, Nesterov SGD step), and each provider (benchmarks/providers.py). A provider
is first checked against float64 per-example gradients of the first examples of the batch; a wrong
one is reported with its error and not timed. The right ones are timed together with the step, and
each is reported as a ratio to it. Writes field.{csv,json,md,png} to the run's output folder.
benchmarks/bench_field.py times the same providers on the same workloads with pytest-benchmark,
after the same check (`check_provider`).
"""
from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.harness import figure, grouped_bars, measure_side_by_side, peak_extra_memory_mb, write_results
from benchmarks.providers import STEP, Provider, Unsupported, max_rel_err, providers, reference_norms, train_step
from benchmarks.workloads import Workload, field_workloads

CHECKED = 4  # examples checked against the float64 reference
# Relative tolerance of the check. cuDNN convolutions use TF32 by default on GPUs (~1e-3 relative).
TOLERANCE = {"cpu": 1e-3, "cuda": 1e-2}
# Bytes of per-example fp32 gradients a provider that materializes them may hold at once: it is
# timed on one micro-batch of that many examples (Opacus' BatchMemoryManager does the same split).
MEMORY_BUDGET = {"cpu": 2**30, "cuda": 8 * 2**30}
# Examples the slow naive providers (loop, vmap) are timed on: ~0.1 s per paper-MLP example on 2 cores.
NAIVE_EXAMPLES = {("cpu", True): 8, ("cpu", False): 32, ("cuda", True): 64, ("cuda", False): 64}
# Interleaved timing rounds per workload on CPU: at least MIN_ROUNDS, more while under MIN_TIME seconds.
MIN_ROUNDS = {True: 5, False: 7}
MIN_TIME = {True: 8.0, False: 30.0}
COLUMNS = ["workload", "shape", "batch", "provider", "status", "rank", "median_ms", "p20_ms", "p80_ms",
           "ratio_to_step", "examples_timed", "peak_extra_mb", "max_rel_err", "version", "cpu_load", "note"]


def run(device: torch.device, quick: bool = False, workloads=field_workloads) -> list[dict]:
    provs, _ = providers(device)
    rows = []
    with warnings.catch_warnings():
        # Known and harmless: Opacus' full backward hooks on a first layer whose input needs no
        # gradient; functorch's slow fallback for CPU attention under vmap (it is timed as it is).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for workload in workloads(device, quick):
            rows += _run_workload(workload, provs, device, quick)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _run_workload(w: Workload, provs: list[Provider], device: torch.device, quick: bool) -> list[dict]:
    model, x, y = w.make(device)
    base = {"workload": w.name, "shape": w.shape, "batch": w.batch, "cpu_load": None}
    ref = reference_norms(model, x[:CHECKED], y[:CHECKED])
    step = train_step(model, x, y)
    step()  # warm-up; the providers' warm-up is their checked call
    rows = {STEP: _row(base, STEP, f"torch {torch.__version__}", "ok", examples_timed=w.batch)}
    timed = {STEP: (step, w.batch)}
    for p in provs:
        c = check_provider(p, model, x, y, ref, device, quick)
        rows[p.name] = _row(base, p.name, p.version(), c.status, max_rel_err=c.max_rel_err,
                            examples_timed=c.examples, note=c.note)
        if c.status == "ok":
            timed[p.name] = (c.call, c.examples)

    times = measure_side_by_side({name: fn for name, (fn, _) in timed.items()}, device, reference=STEP,
                                 min_time=MIN_TIME[quick], min_rounds=MIN_ROUNDS[quick])
    for name, (fn, n) in timed.items():
        scale = w.batch / n  # a micro-batch or a few examples timed: scaled to the batch
        rows[name].update({k: v * scale for k, v in times[name].items() if k != "ratio"})
        rows[name]["ratio_to_step"] = times[name]["ratio"] * scale
        rows[name]["peak_extra_mb"] = peak_extra_memory_mb(fn, device)  # of the call as timed (n examples)
    if device.type == "cpu":
        # 1-minute load average after timing: other jobs on a shared CPU slow the 2-thread GEMMs of the
        # step more than the small ops of the loop or vmap, so a high load skews those ratios.
        for r in rows.values():
            r["cpu_load"] = round(os.getloadavg()[0], 1)
    ranked = sorted((r for r in rows.values() if r["status"] == "ok" and r["provider"] != STEP),
                    key=lambda r: r["ratio_to_step"])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    for r in rows.values():
        shown = f"{r['ratio_to_step']:.3g}x" if r["ratio_to_step"] is not None else ""
        print(f"  {w.name} B={w.batch} {r['provider']}: {r['status']} {shown} {r['note']}", flush=True)
    return list(rows.values())


def _row(base: dict, provider: str, version: str, status: str, *, max_rel_err=None, examples_timed=None,
         note: str = "") -> dict:
    return {**base, "provider": provider, "status": status, "rank": None, "median_ms": None, "p20_ms": None,
            "p80_ms": None, "ratio_to_step": None, "examples_timed": examples_timed, "peak_extra_mb": None,
            "max_rel_err": max_rel_err, "version": version, "note": note}


@dataclass
class Checked:
    """A provider checked on a workload: status 'ok' (then `call()` computes the norms of the first
    `examples` examples), 'skipped', 'unsupported' or 'wrong'."""
    status: str
    call: Callable[[], torch.Tensor] | None = None
    examples: int | None = None
    max_rel_err: float | None = None
    note: str = ""


def check_provider(p: Provider, model, x, y, ref: torch.Tensor, device: torch.device, quick: bool) -> Checked:
    """Builds p for the model and checks its norms of the first examples against `ref` (float64
    reference_norms of the first CHECKED examples); its checked call is its warm-up."""
    reason = p.skip_reason(device)
    if reason:
        return Checked("skipped", note=reason)
    n = examples_timed(p, model, len(x), device, quick)
    xs, ys = x[:n], y[:n]
    try:
        fn = p.build(model)
        got = fn(xs, ys)
    except Unsupported as exc:
        return Checked("unsupported", note=str(exc))
    except Exception as exc:  # noqa: BLE001  (a provider that cannot run this model is reported, not fatal)
        return Checked("unsupported", note=f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    err = max_rel_err(got, ref[:n])
    if not err <= TOLERANCE[device.type]:  # also catches NaN
        return Checked("wrong", examples=n, max_rel_err=err,
                       note=f"norms off by up to {err:.1%} from float64 per-example gradients")
    return Checked("ok", call=lambda: fn(xs, ys), examples=n, max_rel_err=err)


def examples_timed(p: Provider, model, batch: int, device: torch.device, quick: bool) -> int:
    if p.cost == "batch":
        return batch
    per_example = 4 * sum(q.numel() for q in model.parameters())  # one fp32 gradient per example
    fit = max(1, MEMORY_BUDGET[device.type] // per_example)
    if p.cost == "micro_batch":
        return min(batch, fit)
    return min(batch, fit, NAIVE_EXAMPLES[(device.type, quick)])


# ------------------------------------------------------------------------------------------ report
def report(rows: list[dict], device: torch.device, out_dir, name: str = "field",
           title: str = "Per-example gradient norms: isgd_kernels vs naive autograd, Opacus and BackPACK"):
    _, skipped_notes = providers(device)
    notes = [
        "ratio_to_step: median time / median time of a plain training step (forward, backward, Nesterov SGD "
        "step) of the same model and batch, measured in the same process"
        + (": providers and step run interleaved, one call each per round, and the ratio is the median over "
           "rounds of the ratio within a round (on a shared machine the absolute times drift with the load; "
           "the ratios are what is reported)." if device.type == "cpu" else ", each timed with CUDA events."),
        f"status: every provider's norms of the first {CHECKED} examples are checked against float64 per-example "
        f"gradients (one autograd backward per example) before timing; 'wrong' means a relative error above "
        f"{TOLERANCE[device.type]:g} and is not timed or ranked; 'unsupported': the provider has no rule for a "
        "layer of the model; 'skipped': not installed.",
        "cpu_load: the 1-minute load average of the machine after the workload's timing (2 cores: above ~2 "
        "other jobs competed for them).",
        "examples_timed < batch: 'micro_batch' providers (Opacus GradSampleModule holds a gradient per example) "
        f"are timed on one micro-batch whose gradients fit {MEMORY_BUDGET[device.type] / 2**30:g} GiB, the naive "
        "providers on a few examples; the time is scaled to the batch (peak_extra_mb is not: it is the call's).",
        "Opacus ghost clipping: the first of its two backward passes, which produces the norms (ghost norms for "
        "Linear/Embedding, per-sample gradients for the other layers). BackPACK and Opacus are run on a summed "
        "loss, so their norms are of the per-example gradients, not of gradient/B.",
        *skipped_notes,
    ]
    out = write_results(rows, name, out_dir, device, columns=COLUMNS, notes=notes, summary=_summary(rows),
                        title=title)
    _plot(rows, out / f"{name}.png", device)
    return out


def _cell(r: dict) -> str:
    if r["status"] == "ok":
        return f"{r['ratio_to_step']:.3g}x"
    if r["status"] == "wrong":
        return f"wrong ({r['max_rel_err']:.0%} off)"
    return r["status"]


def _summary(rows: list[dict]) -> list[str]:
    """Markdown matrix: one line per workload and batch, one column per provider, ratio to the step."""
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != STEP]
    lines = ["Time as a multiple of one training step (lower is better):", "",
             "| workload | batch | step (ms) | " + " | ".join(provs) + " |", "|---" * (len(provs) + 3) + "|"]
    for key in dict.fromkeys((r["workload"], r["batch"]) for r in rows):
        group = {r["provider"]: r for r in rows if (r["workload"], r["batch"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | {group[STEP]['median_ms']:.3g} | "
                     + " | ".join(_cell(group[p]) if p in group else "–" for p in provs) + " |")
    return lines


def _plot(rows: list[dict], path, device: torch.device) -> None:
    groups = list(dict.fromkeys((r["workload"], r["batch"]) for r in rows))
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != STEP]
    by_key = {(r["workload"], r["batch"], r["provider"]): r for r in rows}
    cells = {prov: [by_key.get((*grp, prov)) for grp in groups] for prov in provs}
    ok = [r["ratio_to_step"] for r in rows if r["status"] == "ok"]
    floor = 10 ** math.floor(math.log10(min(ok))) if ok else 0.1
    with figure(path, figsize=(max(10, 1.7 * len(groups)), 6.5)) as (fig, ax):
        positions = grouped_bars(
            ax, [f"{textwrap.fill(w, 16, break_long_words=False)}\nB={b}" for w, b in groups],
            {prov: [c["ratio_to_step"] if c and c["status"] == "ok" else float("nan") for c in cells[prov]]
             for prov in provs}, fontsize=8)
        for i, prov in enumerate(provs):  # why a bar is missing
            for xpos, c in zip(positions[prov], cells[prov]):
                if c and c["status"] != "ok":
                    ax.text(xpos, floor * 1.1, {"wrong": "wrong", "unsupported": "n/a"}.get(c["status"], "skip"),
                            rotation=90, ha="center", va="bottom", fontsize=7, color=f"C{i}")
        ax.axhline(1.0, color="k", lw=0.8, label="training step = 1")
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_ylabel("time / training step (log)")
        ax.set_title(f"Per-example gradient norms vs a training step, {device.type.upper()} "
                     "(no bar: n/a = unsupported, wrong = fails the float64 check)")
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))
