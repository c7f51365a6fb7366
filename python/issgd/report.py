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


def steps_to_reach(records: list[dict], loss: float) -> int | None:
    """First logged step whose training loss is <= ``loss`` (None if never)."""
    return next((r["step"] for r in records if r.get("train_loss") is not None and r["train_loss"] <= loss), None)


def comparison(runs: dict[str, list[dict]], issgd_summary: dict) -> dict:
    """Figures of merit of ISSGD against uniform SGD (records keyed by mode, and the ISSGD run's
    summary, which holds its mean sqrt Tr S ratios). Without diagnostics (no records) the loss
    figures are None."""
    usgd, issgd = runs["usgd"], runs["issgd"]
    target = usgd[-1].get("train_loss") if usgd else None
    last_step = usgd[-1]["step"] if usgd else None
    reached = steps_to_reach(issgd, target) if target is not None else None
    return {"usgd_final_train_loss": target, "usgd_steps": last_step,
            "issgd_steps_to_usgd_final_loss": reached,
            "steps_ratio": reached / last_step if reached is not None and last_step else None,
            "issgd_mean_ratio_actual_to_uniform": issgd_summary["mean_ratio_actual_to_uniform"],
            "issgd_mean_ratio_ideal_to_uniform": issgd_summary["mean_ratio_ideal_to_uniform"]}


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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
