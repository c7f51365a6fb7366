"""ISSGD against uniform SGD: the same job run twice per seed (paired), then tables and one figure.

One seed (``config.seeds == 1``): ``usgd/`` and ``issgd/`` under ``config.out``, the runs' table and
the pair's figures. Several: ``seed<k>/usgd`` and ``seed<k>/issgd`` for k = seed, seed+1, ..., each pair
with its own ``summary.json``, and at the top the median and range over seeds of every figure
(``report.aggregate``) and a figure with every seed's curves and their median. ``read_pairs`` reads such a
folder back (``issgd plot``), and ``seeds_summary`` and ``plot_pairs`` give its table and figure again.
"""
from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

from tqdm import tqdm

from issgd.report import (FRACTIONS, STYLE, aggregate, comparison, fmt, plot_runs, plot_seeds, read_metrics,
                          seeds_table, table, to_json, workers_phrase)
from issgd.threads import master_threads
from issgd.trainer import TrainConfig, Trainer


def run_comparison(config: TrainConfig) -> dict:
    """Runs ``usgd`` then ``issgd`` for each of ``config.seeds`` seeds (same seed, data split, initial
    parameters, threads and everything else within a pair; uniform SGD needs no scoring workers) under
    ``config.out``; writes ``compare.png``, ``summary.md`` and ``summary.json`` there and returns the
    summary, with its printable text under "text"."""
    out = Path(config.out)
    # Every run gets the threads the ISSGD run's master has (the cores its local workers leave free), so
    # that their steps/s compare like with like.
    threads = (master_threads(config.master_threads, config.workers, config.worker_threads)
               if config.device.startswith("cpu") else config.master_threads)
    seeds = [config.seed + k for k in range(config.seeds)]
    if len(seeds) == 1:
        return _single(replace(config, master_threads=threads), out)
    pairs = []
    # One bar over every step of every run; the runs' own bars stay off.
    with tqdm(total=2 * len(seeds) * config.steps, unit="step", disable=not config.progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for k, seed in enumerate(seeds):
            cfg = replace(config, seed=seed, seeds=1, master_threads=threads, progress=False)
            pairs.append(_run_pair(cfg, _seed_folder(out, seed), bar, f"seed {seed} ({k + 1}/{len(seeds)})"))
            _write(_seed_folder(out, seed), pairs[-1], _pair_text(pairs[-1], cfg))
            last = pairs[-1]["comparison"]["steps_to_loss"]
            if last:
                bar.set_postfix(end_ratio=fmt(last[-1]["ratio"], ".2f"), refresh=False)
    result, text = seeds_summary(pairs, config)
    _write(out, result, text)
    if any(records for p in pairs for records in p["records"].values()):
        plot_pairs(pairs, config, out / "compare.png")
    result["text"] = text
    return result


def seeds_summary(pairs: list[dict], config: TrainConfig) -> tuple[dict, str]:
    """The summary of paired seeds (``_run_pair``'s results, one per seed) with the median and range over them
    of every figure, and its printable text."""
    seeds = [p["seed"] for p in pairs]
    result = {"seeds": seeds, "aggregate": aggregate([p["comparison"] for p in pairs]),
              "per_seed": [{"seed": p["seed"], "comparison": p["comparison"], "runs": p["runs"]} for p in pairs]}
    text = (f"ISSGD against uniform SGD on {config.dataset} ({config.model}, {workers_phrase(config.workers)}, "
            f"c = {config.smoothing}, {config.steps} steps), {len(seeds)} paired seeds {seeds[0]}..{seeds[-1]}:\n\n"
            + seeds_table(result["aggregate"]) + "\n\n" + _seeds_notes(pairs[0], config))
    return result, text


def plot_pairs(pairs: list[dict], config: TrainConfig, path: str | Path) -> Path:
    """The figure of paired seeds: every seed's curves, their median and the steps-to-loss ratios."""
    return plot_seeds([p["records"] for p in pairs], [p["comparison"] for p in pairs], path,
                      title=_title(config, len(pairs)))


def _seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def seed_folders(out: str | Path) -> list[Path]:
    """The per-seed folders of a multi-seed comparison's output folder: those its summary.json lists once
    the comparison has finished, else every seed<k>/ there, by k (empty: not such a folder)."""
    out = Path(out)
    if not out.is_dir() or (out / "metrics.jsonl").exists():
        return []
    summary = out / "summary.json"
    listed = json.loads(summary.read_text()).get("seeds") if summary.exists() else None
    if isinstance(listed, list) and listed:
        return [_seed_folder(out, seed) for seed in listed]
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"seed\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len("seed"):]))


def read_pairs(out: str | Path) -> tuple[list[dict], TrainConfig]:
    """The paired runs under a multi-seed comparison's output folder as ``run_comparison`` holds them
    (records from each run's metrics.jsonl, summaries from its summary.json, each pair's figures computed
    again from them), and the configuration of its ISSGD runs. FileNotFoundError names a missing file."""
    pairs = []
    for folder in seed_folders(out):
        summaries, records = {}, {}
        for mode in ("usgd", "issgd"):
            records[mode] = read_metrics(folder / mode / "metrics.jsonl")
            summary = folder / mode / "summary.json"
            if not summary.exists():
                raise FileNotFoundError(f"no summary at {summary} (written when `issgd train` ends the run)")
            summaries[mode] = json.loads(summary.read_text())
        pairs.append({"seed": summaries["issgd"]["config"]["seed"], "runs": summaries, "records": records,
                      "comparison": comparison(records, summaries)})
    if not pairs:
        raise FileNotFoundError(f"no seed<k>/ runs under {out} (written by `issgd train --seeds N`)")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in pairs[0]["runs"]["issgd"]["config"].items() if k in known})
    return pairs, config


def _single(config: TrainConfig, out: Path) -> dict:
    pair = _run_pair(config, out)
    result = {"runs": pair["runs"], "comparison": pair["comparison"]}
    text = _pair_text(pair, config)
    _write(out, result, text)
    if any(pair["records"].values()):  # --diag-every 0 leaves nothing to plot
        plot_runs(pair["records"], out / "compare.png", title=_title(config, 1))
    result["text"] = text
    return result


def _run_pair(config: TrainConfig, out: Path, bar: tqdm | None = None, label: str = "") -> dict:
    """Uniform SGD, then ISSGD, with `config` (its seed) under out/usgd and out/issgd."""
    summaries, records = {}, {}
    for mode in ("usgd", "issgd"):
        cfg = replace(config, mode=mode, out=str(out / mode), workers=config.workers if mode == "issgd" else 0)
        if bar is not None:
            bar.set_description(f"{label} {STYLE[mode]['label']}")
        trainer = Trainer(cfg, on_step=(lambda *_: bar.update(1)) if bar is not None else None)
        summaries[mode] = trainer.run()
        records[mode] = trainer.records
    return {"seed": config.seed, "runs": summaries, "records": records, "comparison": comparison(records, summaries)}


def _write(out: Path, result: dict, text: str) -> None:
    (out / "summary.json").write_text(to_json({k: v for k, v in result.items() if k != "records"}, indent=1))
    (out / "summary.md").write_text(text + "\n")


def _title(config: TrainConfig, seeds: int) -> str:
    return (f"ISSGD vs uniform SGD on {config.dataset} ({config.model}, {workers_phrase(config.workers)}, "
            f"c = {config.smoothing}" + (f", {seeds} paired seeds" if seeds > 1 else "") + ")")


def _pair_text(pair: dict, config: TrainConfig) -> str:
    return table(pair["runs"]) + "\n\n" + comparison_text(pair["comparison"], pair["runs"], config)


def comparison_text(c: dict, summaries: dict, config: TrainConfig) -> str:
    """The figures of one pair of runs, one line each."""
    lines = [f"- mean √TrΣ along the ISSGD run after step {c['warmup_steps']}: actual ISSGD / uniform "
             f"{fmt(c['sqrt_tr_actual_to_uniform'], '.3f')}, ideal ISSGD / uniform "
             f"{fmt(c['sqrt_tr_ideal_to_uniform'], '.3f')}"]
    if not c["steps_to_loss"]:
        lines.append("- no diagnostics (--diag-every 0): no loss comparison")
    for s in c["steps_to_loss"]:
        where = f"uniform SGD's training loss at {100 * s['fraction']:.0f} % of its run ({s['train_loss']:.4f}, smoothed)"
        if s["issgd_step"] is None:
            lines.append(f"- ISSGD did not reach {where} within its {c['usgd_steps']} steps")
        else:
            lines.append(f"- ISSGD reached {where} at step {s['issgd_step']:.0f} instead of {s['usgd_step']:.0f}: "
                         f"{s['ratio']:.2f}x the steps")
    s = summaries["issgd"]
    if s.get("workers") and c["steps_to_loss"]:
        lines.append(_ASYNC)
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


_ASYNC = ("  (scoring workers run asynchronously, so the weights, and with them these figures, differ between runs "
          "of the same seed; `--workers 0` runs are bit-reproducible)")


def _seeds_notes(pair: dict, config: TrainConfig) -> str:
    """What the figures of a multi-seed comparison rest on."""
    lines = [f"- each seed trains both runs from the same data split, initial parameters and sampler seed; "
             f"steps-to-loss ratios are read off smoothed training-loss curves at "
             f"{', '.join(f'{100 * f:.0f} %' for f in FRACTIONS)} of uniform SGD's run ('not reached': ISSGD "
             "needed more steps than the run had); each seed's own tables: seed<k>/summary.md"]
    if config.workers and config.diag_every:
        lines.append(_ASYNC)
    threads = _threads_phrase(pair["runs"]["issgd"])
    if threads:
        lines.append(f"- every run: {threads.lstrip('; ')}")
    return "\n".join(lines)


def _threads_phrase(summary: dict) -> str:
    if not summary.get("device", "").startswith("cpu") or summary.get("master_threads") is None:
        return ""
    threads = summary["master_threads"]
    return f"; master {threads} CPU thread{'s' if threads != 1 else ''} of {summary['usable_cores']} usable cores"
