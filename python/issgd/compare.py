"""ISSGD against uniform SGD: the same job run twice, then one table and one figure."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from issgd.report import comparison, fmt, plot_runs, table, to_json, workers_phrase
from issgd.threads import master_threads
from issgd.trainer import TrainConfig, Trainer


def run_comparison(config: TrainConfig) -> dict:
    """Runs ``usgd`` then ``issgd`` (same seed, initial parameters, threads and everything else;
    uniform SGD needs no scoring workers) under ``config.out``/<mode>; writes ``compare.png``,
    ``summary.md`` and ``summary.json`` there and returns the summary."""
    out = Path(config.out)
    # Both runs get the threads the ISSGD run's master has (the cores its local workers leave free), so
    # that their steps/s compare like with like.
    threads = (master_threads(config.master_threads, config.workers, config.worker_threads)
               if config.device.startswith("cpu") else config.master_threads)
    summaries, runs = {}, {}
    for mode in ("usgd", "issgd"):
        cfg = replace(config, mode=mode, out=str(out / mode), master_threads=threads,
                      workers=config.workers if mode == "issgd" else 0)
        trainer = Trainer(cfg)
        summaries[mode] = trainer.run()
        runs[mode] = trainer.records
    result = {"runs": summaries, "comparison": comparison(runs, summaries["issgd"])}
    (out / "summary.json").write_text(to_json(result, indent=1))
    text = table(summaries) + "\n\n" + comparison_text(result["comparison"], summaries)
    (out / "summary.md").write_text(text + "\n")
    if any(runs.values()):  # --diag-every 0 leaves nothing to plot
        plot_runs(runs, out / "compare.png", title=f"ISSGD vs uniform SGD on {config.dataset} ({config.model}, "
                                                   f"{workers_phrase(config.workers)}, c = {config.smoothing})")
    result["text"] = text
    return result


def comparison_text(c: dict, summaries: dict) -> str:
    lines = [f"- mean √TrΣ, actual ISSGD / uniform along the ISSGD run: {fmt(c['issgd_mean_ratio_actual_to_uniform'], '.3f')}",
             f"- mean √TrΣ, ideal ISSGD / uniform along the ISSGD run: {fmt(c['issgd_mean_ratio_ideal_to_uniform'], '.3f')}"]
    if c["usgd_final_train_loss"] is None:
        lines.append("- no diagnostics (--diag-every 0): no loss comparison")
    elif c["issgd_steps_to_usgd_final_loss"] is None:
        lines.append(f"- ISSGD did not reach uniform SGD's final training loss ({c['usgd_final_train_loss']:.4f}) "
                     f"within {c['usgd_steps']} steps")
    else:
        lines.append(f"- ISSGD reached uniform SGD's final training loss ({c['usgd_final_train_loss']:.4f}) at step "
                     f"{c['issgd_steps_to_usgd_final_loss']} of {c['usgd_steps']}: {c['steps_ratio']:.2f}x the steps")
    s = summaries["issgd"]
    if s.get("workers") and c["usgd_final_train_loss"] is not None:
        lines.append("  (scoring workers run asynchronously, so the weights, and with them this figure, differ "
                     "between runs of the same seed; `--workers 0` runs are bit-reproducible)")
    if s.get("scoring_examples_per_second"):
        lines.append(f"- scoring: {workers_phrase(s['workers'])} scored {s['scored_examples']} examples "
                     f"({s['scoring_examples_per_second']:.0f}/s of training time, "
                     f"{s['scoring_examples_per_worker_second']:.0f}/s per busy worker); master sync time "
                     f"{s['sync_seconds']:.2f} s; mean staleness {fmt(s['mean_staleness'], '.1f')} steps")
    if s.get("push_ms_per_refresh") is not None:
        share = s["push_fraction"] * 100 if s.get("push_fraction") is not None else None
        lines.append(f"- parameter push ({s['push_bytes'] / 1e6:.1f} MB): {s['push_ms_per_refresh']:.1f} ms of master "
                     f"time per refresh ({fmt(s.get('push_mb_per_second'), '.0f')} MB/s), {fmt(share, '.2f')} % of "
                     f"training time; {s['push_skipped']} pushes skipped (worker still taking in the previous one)")
    issgd_rate, usgd_rate = s["steps_per_second"], summaries["usgd"]["steps_per_second"]
    ratio = issgd_rate / usgd_rate if issgd_rate and usgd_rate else None
    lines.append(f"- master throughput: ISSGD {fmt(issgd_rate, '.0f')} steps/s, uniform SGD {fmt(usgd_rate, '.0f')} "
                 f"steps/s (ratio {fmt(ratio, '.2f')}){_threads_phrase(s)}")
    return "\n".join(lines)


def _threads_phrase(summary: dict) -> str:
    if not summary.get("device", "").startswith("cpu") or summary.get("master_threads") is None:
        return ""
    threads = summary["master_threads"]
    return f"; master {threads} CPU thread{'s' if threads != 1 else ''} of {summary['usable_cores']} usable cores"
