"""Run the benchmark groups and write benchmarks/results/<device>/.

    python -m benchmarks [--device cpu|cuda] [--quick] [--only field,conv,scorer,linear,sampler]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import field, norms, sampler_report, trainer_report

GROUPS = {
    "field": (field.run, field.report),
    "conv": (norms.run_conv, norms.report_conv),
    "scorer": (norms.run_scorer, norms.report_scorer),
    "linear": (norms.run_linear, norms.report_linear),
    "sampler": (sampler_report.run, sampler_report.report),
    "trainer": (trainer_report.run, trainer_report.report),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller workloads")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {list(GROUPS)}")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    device = torch.device(args.device)
    for group in groups:
        run, report = GROUPS[group]
        print(f"[{group}] on {device}", flush=True)
        out = report(run(device, quick=args.quick), device)
        print(f"[{group}] results in {out}", flush=True)


if __name__ == "__main__":
    main()
