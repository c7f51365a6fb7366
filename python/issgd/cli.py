"""The `issgd` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="issgd", description="Importance-sampled SGD with isgd_kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="score per-example gradient norms on the digits data set and "
                                       "benchmark the scorer against a training step")
    demo.add_argument("--epochs", type=int, default=6, help="uniform-SGD epochs to train (default: 6)")
    demo.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    demo.add_argument("--lr", type=float, default=0.05, help="learning rate (default: 0.05)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="folder for the plot and the JSON summary")
    demo.add_argument("--no-bench", action="store_true", help="skip the microbenchmark table")
    demo.add_argument("--backend", default="auto", help="kernel backend: auto|triton|cuda|cpu|torch")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from issgd.demo import run_demo

        if args.epochs < 0 or args.batch_size < 1 or args.lr <= 0:
            parser.error("--epochs must be >= 0, --batch-size >= 1 and --lr > 0")
        sys.exit(run_demo(args))


if __name__ == "__main__":
    main()
