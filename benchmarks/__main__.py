"""Run the benchmark groups and write their tables (CSV, JSON, Markdown, PNG).

    python -m benchmarks [--device cpu|cuda] [--quick] [--only field,models,conv,scorer,linear,sampler,trainer,signals,transport]
                         [--out DIR | --publish]

Results go to runs/benchmarks/<device>/ (gitignored scratch) by default, or to --out DIR. Only
--publish writes the committed benchmarks/results/<device>/ that the READMEs quote (a full run: not
with --quick).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from benchmarks import field, harness, norms, sampler_report, signals_report, trainer_report, transport_report
from benchmarks.workloads import model_workloads

GROUPS = {
    "field": (field.run, field.report),
    "models": (functools.partial(field.run, workloads=model_workloads),
               functools.partial(field.report, name="models",
                                 title="Per-example gradient norms on the models people train: isgd_kernels vs "
                                       "naive autograd, Opacus and BackPACK")),
    "conv": (norms.run_conv, norms.report_conv),
    "scorer": (norms.run_scorer, norms.report_scorer),
    "linear": (norms.run_linear, norms.report_linear),
    "sampler": (sampler_report.run, sampler_report.report),
    "trainer": (trainer_report.run, trainer_report.report),
    "signals": (signals_report.run, signals_report.report),
    "transport": (transport_report.run, transport_report.report),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=harness.default_device().type)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller workloads")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {list(GROUPS)}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="folder to write the tables to (default: runs/benchmarks/<device>/, gitignored)")
    where.add_argument("--publish", action="store_true",
                       help="write the committed results, benchmarks/results/<device>/ (not with --quick)")
    args = parser.parse_args(argv)
    args.groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    if args.publish and args.quick:
        parser.error("--publish: --quick runs fewer and smaller cases and would drop rows of the committed "
                     "results; publish a full run, or give --out DIR")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    out_dir = harness.output_dir(device, out=args.out, publish=args.publish)
    kind = "committed results" if harness.is_published(out_dir) else "scratch; --publish writes the committed results"
    print(f"results go to {out_dir} ({kind})", flush=True)
    for group in args.groups:
        run, report = GROUPS[group]
        print(f"[{group}] on {device}", flush=True)
        report(run(device, quick=args.quick), device, out_dir)
        print(f"[{group}] results in {out_dir}", flush=True)
    print(f"results written to {out_dir} ({kind})", flush=True)


if __name__ == "__main__":
    main()
