"""Plots and tables of training runs (records of ``metrics.jsonl``)."""
from __future__ import annotations

import json
from pathlib import Path

STYLE = {"issgd": {"color": "tab:red", "label": "ISSGD"}, "usgd": {"color": "tab:blue", "label": "uniform SGD"}}


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path} (written by `issgd train`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_to_reach(records: list[dict], loss: float) -> int | None:
    """First logged step whose training loss is <= ``loss`` (None if never)."""
    return next((r["step"] for r in records if r["train_loss"] <= loss), None)


def comparison(runs: dict[str, list[dict]], issgd_summary: dict) -> dict:
    """Figures of merit of ISSGD against uniform SGD (records keyed by mode, and the ISSGD run's
    summary, which holds its mean sqrt Tr S ratios)."""
    usgd, issgd = runs["usgd"], runs["issgd"]
    target = usgd[-1]["train_loss"]
    reached = steps_to_reach(issgd, target)
    return {"usgd_final_train_loss": target, "usgd_steps": usgd[-1]["step"],
            "issgd_steps_to_usgd_final_loss": reached,
            "steps_ratio": reached / usgd[-1]["step"] if reached is not None and usgd[-1]["step"] else None,
            "issgd_mean_ratio_actual_to_uniform": issgd_summary["mean_ratio_actual_to_uniform"],
            "issgd_mean_ratio_ideal_to_uniform": issgd_summary["mean_ratio_ideal_to_uniform"]}


def table(summaries: dict[str, dict]) -> str:
    """A Markdown table of the closing numbers of each run."""
    head = ("| run | steps | train s | steps/s | train loss | train err | valid loss | valid err "
            "| mean √TrΣ actual/uniform | mean √TrΣ ideal/uniform | mean staleness |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode, s in summaries.items():
        f = s["final"]
        stale = s.get("mean_staleness")
        rows.append(f"| {STYLE.get(mode, {'label': mode})['label']} | {s['steps']} | {s['train_seconds']:.1f} "
                    f"| {s['steps_per_second']:.0f} | {f['train_loss']:.4f} | {f['train_error']:.4f} "
                    f"| {f['valid_loss']:.4f} | {f['valid_error']:.4f} | {s['mean_ratio_actual_to_uniform']:.3f} "
                    f"| {s['mean_ratio_ideal_to_uniform']:.3f} | {'-' if stale is None else f'{stale:.1f}'} |")
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
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    main_mode = "issgd" if "issgd" in runs else next(iter(runs))
    recs = runs[main_mode]
    steps = [r["step"] for r in recs]
    for key, style, label in (("sqrt_tr_uniform", "-", "uniform SGD"), ("sqrt_tr_ideal", "--", "ideal ISSGD (fresh, c = 0)"),
                              ("sqrt_tr_actual", "-.", "actual ISSGD (stale, smoothed)")):
        if key in recs[0]:
            ax.plot(steps, [r[key] for r in recs], style, label=label)
    if main_mode == "issgd" and "usgd" in runs:
        u = runs["usgd"]
        ax.plot([r["step"] for r in u], [r["sqrt_tr_uniform"] for r in u], ":", color="gray",
                label="uniform SGD, along the USGD run")
    ax.set(xlabel="master step", ylabel=r"$\sqrt{\mathrm{Tr}\,\Sigma}$", yscale="log",
           title=f"Gradient-estimator spread along the {STYLE.get(main_mode, {'label': main_mode})['label']} run")
    ax.legend(fontsize=8)
    for ax, x_key, y_key, ylabel in ((axes[0, 1], "step", "train_loss", "training loss"),
                                     (axes[1, 0], "seconds", "train_loss", "training loss"),
                                     (axes[1, 1], "step", "valid_error", "validation error")):
        for mode, rs in runs.items():
            st = STYLE.get(mode, {"color": None, "label": mode})
            ax.plot([r[x_key] for r in rs], [r[y_key] for r in rs], color=st["color"], label=st["label"])
        ax.set(xlabel="master step" if x_key == "step" else "training wall-clock (s, diagnostics excluded)",
               ylabel=ylabel, yscale="log" if "loss" in y_key else "linear")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
