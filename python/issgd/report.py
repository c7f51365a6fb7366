"""Plots and tables of training runs (records of ``metrics.jsonl``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

STYLE = {"issgd": {"color": "tab:red", "label": "ISSGD"}, "usgd": {"color": "tab:blue", "label": "uniform SGD"}}


def finite_or_none(obj):
    """`obj` with every non-finite float replaced by None, so that it is valid JSON (null, not NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def metrics_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def run_folders(path: str | Path) -> list[Path]:
    """The run folders a path names: itself (a run folder or its metrics.jsonl), or, for the output folder
    of `issgd train --mode both`, its runs (usgd/, issgd/) in that order."""
    path = Path(path)
    if path.is_dir() and not (path / "metrics.jsonl").exists():
        found = [sub for sub in (path / "usgd", path / "issgd") if (sub / "metrics.jsonl").exists()]
        found += sorted(p.parent for p in path.glob("*/metrics.jsonl") if p.parent not in found)
        if found:
            return found
    return [path.parent if path.name == "metrics.jsonl" else path]


def read_metrics(path: str | Path) -> list[dict]:
    path = metrics_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path} (written by `issgd train`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------- ISSGD against uniform SGD: the figures
FRACTIONS = (0.25, 0.5, 1.0)  # points of uniform SGD's run whose training loss ISSGD has to reach
SMOOTHING_POINTS = 5  # diagnostic points in each local fit of the log training loss
WARMUP_STEPS = 100  # sqrt Tr S ratios count after this step: before the first norms arrive the weights are uniform
VALID_WINDOWS = 4  # validation error is averaged over this many equal step windows of the run


def smoothed_log_loss(steps: list[float], losses: list[float], points: int = SMOOTHING_POINTS) -> list[float]:
    """log(loss) at each step, read off a least-squares line through the `points` diagnostic points
    nearest to it (centred, shifted inward at the two ends). A loss that falls exponentially is kept
    exactly; one noisy point moves the curve by at most about 1/points of its deviation."""
    n = len(steps)
    logs = [math.log(max(v, 1e-300)) for v in losses]
    w = max(1, min(points, n))
    out = []
    for i in range(n):
        lo = min(max(i - w // 2, 0), n - w)
        ts, ys = steps[lo:lo + w], logs[lo:lo + w]
        t_mean, y_mean = sum(ts) / w, sum(ys) / w
        spread = sum((t - t_mean) ** 2 for t in ts)
        slope = sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys)) / spread if spread else 0.0
        out.append(y_mean + slope * (steps[i] - t_mean))
    return out


def level_at(steps: list[float], levels: list[float], step: float) -> float:
    """The piecewise-linear curve through (steps, levels) at `step` (its end values outside its range)."""
    if step <= steps[0]:
        return levels[0]
    for (t0, y0), (t1, y1) in zip(zip(steps, levels), zip(steps[1:], levels[1:])):
        if step <= t1:
            return y0 + (y1 - y0) * (step - t0) / (t1 - t0)
    return levels[-1]


def first_step_down_to(steps: list[float], levels: list[float], level: float) -> float | None:
    """The first step at which the piecewise-linear curve through (steps, levels) comes down to `level`
    (None: it never does)."""
    if levels[0] <= level:
        return steps[0]
    for (t0, y0), (t1, y1) in zip(zip(steps, levels), zip(steps[1:], levels[1:])):
        if y1 <= level:
            return t0 + (t1 - t0) * (y0 - level) / (y0 - y1)
    return None


def steps_to_loss(usgd: list[dict], issgd: list[dict], fractions=FRACTIONS,
                  points: int = SMOOTHING_POINTS) -> list[dict]:
    """For each fraction f of uniform SGD's run (S steps): the smoothed training loss uniform SGD had
    at step f*S, the step at which ISSGD's smoothed training loss first came down to it, and the ratio
    of the two (None: ISSGD did not get there within its run, i.e. more than its S steps). Empty when a
    run has fewer than two diagnostics."""
    u, i = _log_loss_curve(usgd, points), _log_loss_curve(issgd, points)
    if u is None or i is None:
        return []
    out = []
    for f in fractions:
        at = f * u[0][-1]
        level = level_at(*u, at)
        reached = first_step_down_to(*i, level)
        out.append({"fraction": f, "usgd_step": at, "train_loss": math.exp(level), "issgd_step": reached,
                    "ratio": reached / at if reached is not None and at > 0 else None})
    return out


def _log_loss_curve(records: list[dict], points: int):
    kept = [r for r in records if r.get("train_loss") is not None]
    if len(kept) < 2:
        return None
    steps = [r["step"] for r in kept]
    return steps, smoothed_log_loss(steps, [r["train_loss"] for r in kept], points)


def sqrt_tr_ratio(records: list[dict], key: str, after_step: int = WARMUP_STEPS) -> float | None:
    """Mean over the diagnostics after `after_step` of sqrt Tr S of `key` ("sqrt_tr_actual" or
    "sqrt_tr_ideal") over sqrt Tr S of uniform sampling at the same parameters (None: no such record)."""
    kept = [r[key] / r["sqrt_tr_uniform"] for r in records
            if r["step"] > after_step and r.get(key) is not None and r.get("sqrt_tr_uniform")]
    return sum(kept) / len(kept) if kept else None


def window_means(records: list[dict], key: str, last_step: int, windows: int = VALID_WINDOWS) -> list[float | None]:
    """Mean of `key` over the records of each window ((k-1)/windows*S, k/windows*S], k = 1..windows, of a
    run of S = `last_step` steps (None: no record in the window)."""
    out = []
    for k in range(1, windows + 1):
        lo, hi = (k - 1) * last_step / windows, k * last_step / windows
        kept = [r[key] for r in records if lo < r["step"] <= hi and r.get(key) is not None]
        out.append(sum(kept) / len(kept) if kept else None)
    return out


def comparison(runs: dict[str, list[dict]], summaries: dict[str, dict]) -> dict:
    """Figures of merit of ISSGD against uniform SGD, from the records and summaries of a pair of runs
    keyed by mode. Without diagnostics (no records) the loss, variance and error figures are None or
    empty."""
    usgd, issgd = runs["usgd"], runs["issgd"]
    last_step = usgd[-1]["step"] if usgd else None
    windows = [[(k - 1) * last_step / VALID_WINDOWS, k * last_step / VALID_WINDOWS]
               for k in range(1, VALID_WINDOWS + 1)] if last_step else []
    return {"usgd_steps": last_step, "steps_to_loss": steps_to_loss(usgd, issgd),
            "warmup_steps": WARMUP_STEPS,
            "sqrt_tr_actual_to_uniform": sqrt_tr_ratio(issgd, "sqrt_tr_actual"),
            "sqrt_tr_ideal_to_uniform": sqrt_tr_ratio(issgd, "sqrt_tr_ideal"),
            "valid_error_windows": {"steps": windows, **{
                mode: window_means(runs[mode], "valid_error", last_step) if last_step else [] for mode in runs}},
            "final_train_loss": {mode: (s.get("final") or {}).get("train_loss") for mode, s in summaries.items()},
            "final_train_error": {mode: (s.get("final") or {}).get("train_error") for mode, s in summaries.items()},
            "steps_per_second": {mode: s.get("steps_per_second") for mode, s in summaries.items()}}


def median_range(values, missing_is_high: bool = False) -> dict:
    """Median, lowest and highest of `values`, with the values themselves. A None is dropped, or, with
    `missing_is_high` (e.g. a loss ISSGD did not reach: more steps than it had), counted as larger than
    every value (+inf: written as null in JSON, shown as 'not reached')."""
    values = list(values)
    kept = sorted(math.inf if v is None else v for v in values if v is not None or missing_is_high)
    out = {"values": values, "missing": sum(v is None for v in values)}
    if not kept:
        return {"median": None, "low": None, "high": None, **out}
    mid = len(kept) // 2
    median = kept[mid] if len(kept) % 2 else (kept[mid - 1] + kept[mid]) / 2
    return {"median": median, "low": kept[0], "high": kept[-1], **out}


def aggregate(comparisons: list[dict]) -> dict:
    """Median and range over paired seeds of each figure of `comparison`."""
    out = {"seeds": len(comparisons), "warmup_steps": WARMUP_STEPS, "steps_to_loss": []}
    for k, f in enumerate(FRACTIONS):
        rows = [c["steps_to_loss"][k] if len(c["steps_to_loss"]) > k else {} for c in comparisons]
        out["steps_to_loss"].append({"fraction": f,
                                     "ratio": median_range((r.get("ratio") for r in rows), missing_is_high=True),
                                     "train_loss": median_range(r.get("train_loss") for r in rows)})
    for key in ("sqrt_tr_actual_to_uniform", "sqrt_tr_ideal_to_uniform"):
        out[key] = median_range(c[key] for c in comparisons)
    windows = comparisons[0]["valid_error_windows"]["steps"] if comparisons else []
    out["valid_error_windows"] = []
    for k, steps in enumerate(windows):
        per_mode = {mode: [c["valid_error_windows"][mode][k] for c in comparisons] for mode in ("usgd", "issgd")}
        diff = [None if a is None or b is None else b - a for a, b in zip(per_mode["usgd"], per_mode["issgd"])]
        out["valid_error_windows"].append({"steps": steps, **{m: median_range(v) for m, v in per_mode.items()},
                                           "issgd_minus_usgd": median_range(diff)})
    for key in ("final_train_loss", "final_train_error", "steps_per_second"):
        out[key] = {mode: median_range(c[key].get(mode) for c in comparisons) for mode in ("usgd", "issgd")}
    return out


def seeds_table(agg: dict) -> str:
    """A Markdown table of `aggregate`: each figure's median, range and per-seed values."""
    n = agg["seeds"]
    rows = [f"| figure (over {n} paired seeds) | median | range | per seed |", "|---|---|---|---|"]

    def row(label, mr, spec, ratio=False):
        def show(v):
            return "not reached" if ratio and v == math.inf else fmt(v, spec)

        low, high = show(mr["low"]), show(mr["high"])
        rng = low if low == high else f"{low} – {high}"
        rows.append(f"| {label} | {show(mr['median'])} | {rng} | "
                    + ", ".join("not reached" if ratio and v is None else fmt(v, spec) for v in mr["values"]) + " |")

    for s in agg["steps_to_loss"]:
        pct = f"{100 * s['fraction']:.0f} %"
        row(f"steps ISSGD / uniform to uniform's training loss at {pct} of its run", s["ratio"], ".2f", ratio=True)
        row(f"… that loss (uniform SGD's smoothed training loss at {pct})", s["train_loss"], ".4f")
    after = f"steps > {agg['warmup_steps']}"
    row(f"√TrΣ actual ISSGD / uniform, along the ISSGD run, {after}", agg["sqrt_tr_actual_to_uniform"], ".3f")
    row(f"√TrΣ ideal ISSGD / uniform, along the ISSGD run, {after}", agg["sqrt_tr_ideal_to_uniform"], ".3f")
    for mode in ("usgd", "issgd"):
        row(f"final training loss, {STYLE[mode]['label']}", agg["final_train_loss"][mode], ".4f")
    for mode in ("usgd", "issgd"):
        row(f"final training error, {STYLE[mode]['label']}", agg["final_train_error"][mode], ".4f")
    for mode in ("usgd", "issgd"):
        row(f"master steps/s, {STYLE[mode]['label']}", agg["steps_per_second"][mode], ".0f")
    windows = agg["valid_error_windows"]
    if windows:
        rows += ["", "| validation error, median (range) | " + " | ".join(
            f"steps {w['steps'][0]:.0f}–{w['steps'][1]:.0f}" for w in windows) + " |", "|---" * (len(windows) + 1) + "|"]
        for key, label, spec in (("usgd", "uniform SGD", ".4f"), ("issgd", "ISSGD", ".4f"),
                                 ("issgd_minus_usgd", "ISSGD − uniform SGD (paired)", "+.4f")):
            rows.append(f"| {label} | " + " | ".join(
                f"{fmt(w[key]['median'], spec)} ({fmt(w[key]['low'], spec)} – {fmt(w[key]['high'], spec)})"
                for w in windows) + " |")
    return "\n".join(rows)


def fmt(value, spec: str) -> str:
    """`value` formatted, or '-' when it is missing (None)."""
    return "-" if value is None else format(value, spec)


def table(summaries: dict[str, dict]) -> str:
    """A Markdown table of the closing numbers of each run."""
    head = ("| run | steps | train s | steps/s | train loss | train err | valid loss | valid err "
            "| mean √TrΣ actual/uniform | mean √TrΣ ideal/uniform | mean staleness |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode, s in summaries.items():
        f = s.get("final") or {}
        cells = [STYLE.get(mode, {"label": mode})["label"], str(s["steps"]), fmt(s["train_seconds"], ".1f"),
                 fmt(s.get("steps_per_second"), ".0f"), fmt(f.get("train_loss"), ".4f"),
                 fmt(f.get("train_error"), ".4f"), fmt(f.get("valid_loss"), ".4f"), fmt(f.get("valid_error"), ".4f"),
                 fmt(s.get("mean_ratio_actual_to_uniform"), ".3f"), fmt(s.get("mean_ratio_ideal_to_uniform"), ".3f"),
                 fmt(s.get("mean_staleness"), ".1f")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Four panels: sqrt Tr S (uniform / ideal / actual) along the ISSGD run (or the only run),
    training loss vs step and vs training wall-clock, validation error vs step."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    runs = {mode: records for mode, records in runs.items() if records}
    if not runs:
        raise ValueError("no diagnostics records to plot (the runs were made with --diag-every 0)")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    main_mode = "issgd" if "issgd" in runs else next(iter(runs))
    recs = runs[main_mode]
    steps = [r["step"] for r in recs]
    for key, style, label in (("sqrt_tr_uniform", "-", "uniform SGD"), ("sqrt_tr_ideal", "--", "ideal ISSGD (fresh, c = 0)"),
                              ("sqrt_tr_actual", "-.", "actual ISSGD (stale, smoothed)")):
        if key in recs[0]:
            ax.plot(steps, [_value(r, key) for r in recs], style, label=label)
    if main_mode == "issgd" and "usgd" in runs:
        u = runs["usgd"]
        ax.plot([r["step"] for r in u], [_value(r, "sqrt_tr_uniform") for r in u], ":", color="gray",
                label="uniform SGD, along the USGD run")
    ax.set(xlabel="master step", ylabel=r"$\sqrt{\mathrm{Tr}\,\Sigma}$", yscale="log",
           title=f"Gradient-estimator spread along the {STYLE.get(main_mode, {'label': main_mode})['label']} run")
    ax.legend(fontsize=8)
    for ax, x_key, y_key, ylabel in ((axes[0, 1], "step", "train_loss", "training loss"),
                                     (axes[1, 0], "seconds", "train_loss", "training loss"),
                                     (axes[1, 1], "step", "valid_error", "validation error")):
        for mode, rs in runs.items():
            st = STYLE.get(mode, {"color": None, "label": mode})
            ax.plot([r[x_key] for r in rs], [_value(r, y_key) for r in rs], color=st["color"], label=st["label"])
        # Log scales for both: the first point (an untrained model) would otherwise flatten the rest.
        ax.set(xlabel="master step" if x_key == "step" else "training wall-clock (s, diagnostics excluded)",
               ylabel=ylabel, yscale="log")
        if y_key == "valid_error":
            ax.yaxis.set_major_formatter(FuncFormatter(_percent))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _percent(v) if _leading_digit(v) in (2, 3, 5) else ""))
        ax.legend(fontsize=8)
    return _save(fig, path, title)


def plot_seeds(pairs: list[dict[str, list[dict]]], comparisons: list[dict], path: str | Path, title: str = "") -> Path:
    """The runs of paired seeds (records keyed by mode, one dict per seed) and their figures: training
    loss, √Tr Σ ratios along the ISSGD runs and validation error against the step, each seed thin and the
    median over seeds thick; and the steps-to-loss ratios of every seed with their median."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    if not any(records for pair in pairs for records in pair.values()):
        raise ValueError("no diagnostics records to plot (the runs were made with --diag-every 0)")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = ((axes[0, 0], [(m, "train_loss", "-", STYLE[m]["label"]) for m in ("usgd", "issgd")], "training loss"),
              (axes[1, 0], [(m, "valid_error", "-", STYLE[m]["label"]) for m in ("usgd", "issgd")], "validation error"),
              (axes[0, 1], [("issgd", "actual", "-", "actual ISSGD / uniform"),
                            ("issgd", "ideal", "--", "ideal ISSGD / uniform")], r"$\sqrt{\mathrm{Tr}\,\Sigma}$ ratio"))
    for ax, lines, ylabel in panels:
        for mode, key, style, label in lines:
            color = STYLE[mode]["color"] if key not in ("ideal",) else "tab:purple"
            curves = [_series(pair.get(mode) or [], key) for pair in pairs]
            for steps, values in curves:
                ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
            steps, median = _median_curve(curves)
            ax.plot(steps, median, style, color=color, linewidth=2, label=f"{label} (median of {len(pairs)})")
        ax.set(xlabel="master step", ylabel=ylabel, yscale="linear" if ax is axes[0, 1] else "log")
        ax.legend(fontsize=8)
    axes[1, 0].yaxis.set_major_formatter(FuncFormatter(_percent))
    axes[1, 0].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _percent(v) if _leading_digit(v) in (2, 3, 5) else ""))
    ratio_ax = axes[0, 1]
    ratio_ax.axhline(1.0, color="gray", linewidth=0.8)
    ratio_ax.axvspan(0, WARMUP_STEPS, color="gray", alpha=0.12, label=f"warm-up (steps ≤ {WARMUP_STEPS}, not counted)")
    ratio_ax.set(title="Gradient-estimator spread along the ISSGD runs", ylim=(0, 1.05))
    ratio_ax.legend(fontsize=8)
    ax = axes[1, 1]
    ceiling = 1.15  # where a loss ISSGD did not reach is drawn
    unreached_shown = False
    for k, f in enumerate(FRACTIONS):
        ratios = [c["steps_to_loss"][k]["ratio"] if len(c["steps_to_loss"]) > k else None for c in comparisons]
        shown = [ceiling if r is None else r for r in ratios]
        xs = [k + 0.08 * (j - (len(shown) - 1) / 2) for j in range(len(shown))]
        ax.scatter(xs, shown, color="tab:red", alpha=0.6, s=22,
                   marker="o", label="one seed" if k == 0 else None)
        if any(r is None for r in ratios):
            ax.scatter([x for x, r in zip(xs, ratios) if r is None], [ceiling] * ratios.count(None), marker="^",
                       color="black", s=30, label=None if unreached_shown else f"not reached (drawn at {ceiling})")
            unreached_shown = True
        med = median_range(ratios, missing_is_high=True)["median"]
        if med is not None:
            ax.hlines(min(med, ceiling), k - 0.3, k + 0.3, color="tab:red", linewidth=2.5,
                      label="median" if k == 0 else None)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(FRACTIONS)), [f"uniform's loss at {100 * f:.0f} %" for f in FRACTIONS])
    ax.set(ylabel="steps to that loss, ISSGD / uniform SGD", ylim=(0, ceiling + 0.1),
           title="Steps to uniform SGD's training loss (< 1: ISSGD faster)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, title)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` along a run; "actual" and "ideal" are sqrt Tr S ratios to uniform sampling."""
    if key in ("actual", "ideal"):
        kept = [r for r in records if r.get(f"sqrt_tr_{key}") is not None and r.get("sqrt_tr_uniform")]
        return [r["step"] for r in kept], [r[f"sqrt_tr_{key}"] / r["sqrt_tr_uniform"] for r in kept]
    return [r["step"] for r in records], [_value(r, key) for r in records]


def _median_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The median over curves at each step that all of them have (paired runs log the same steps)."""
    import statistics

    common = sorted(set.intersection(*(set(steps) for steps, _ in curves))) if curves else []
    at = [dict(zip(steps, values)) for steps, values in curves]
    return common, [statistics.median(c[s] for c in at) for s in common]


def _value(record: dict, key: str) -> float:
    """A plotted value: NaN (a gap in the line) where the record has none (null in metrics.jsonl)."""
    value = record.get(key)
    return math.nan if value is None else value


def workers_phrase(workers: int) -> str:
    return f"{workers} scoring worker{'s' if workers != 1 else ''}" if workers else "inline scoring"


def _percent(fraction: float, _=None) -> str:
    return f"{100 * fraction:.3g}%"


def _leading_digit(value: float) -> int:
    return round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0


def _save(fig, path, title: str | None) -> Path:
    """Title, lay out, write and close a figure; the path written."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
