"""The `issgd` command line: `issgd train`, `issgd plot`, `issgd demo`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from isgd_kernels import BACKENDS
from issgd.data import DATASETS
from issgd.models import MODELS
from issgd.signals import SIGNALS
from issgd.sources import is_import_string

BACKEND_CHOICES = ("auto",) + BACKENDS
DEVICE_CHOICES = ("cpu", "cuda")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 256,256; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return values


def _builtin_or_import_string(names: tuple[str, ...]):
    def parse(text: str) -> str:
        if text in names or is_import_string(text):
            return text
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)} or an import string "
                                         f"'package.module:factory', got {text!r}")
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except the None of an option that is simply unset."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train with importance-sampled SGD (and/or uniform SGD), with the paper's "
                                     "variance diagnostics", formatter_class=_HelpFormatter)
    g = p.add_argument_group("algorithm")
    g.add_argument("--mode", choices=("issgd", "usgd", "both"), default="issgd",
                   help="importance-sampled SGD, uniform SGD, or both one after the other with a comparison")
    g.add_argument("--seeds", type=int, default=1,
                   help="with --mode both: compare paired runs of seeds SEED, SEED+1, ... and report each figure's "
                        "median and range over them")
    g.add_argument("--steps", type=int, default=2000, help="master steps (SGD updates)")
    g.add_argument("--batch-size", type=int, default=128, help="examples per master step (drawn with replacement)")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate")
    g.add_argument("--momentum", type=float, default=0.95, help="Nesterov momentum (0: plain SGD)")
    g.add_argument("--score", choices=SIGNALS, default="grad_norm",
                   help="scoring signal s_i: the gradient norm of all parameters (the paper's), of the last "
                        "nn.Linear only (a forward and the loss gradient), or the loss (a forward)")
    g.add_argument("--smoothing", type=float, default=0.1, help="c in the proposal w_i = s_i + c")
    g.add_argument("--refresh-every", type=int, default=32,
                   help="K: master steps between weight refreshes and parameter pushes")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", type=_builtin_or_import_string(DATASETS), default="digits",
                   metavar="NAME|MODULE:FACTORY",
                   help=f"one of {', '.join(DATASETS)} (digits is bundled with scikit-learn; longtail and synthetic are "
                        "generated; mnist and svhn read the official files from --data-dir), or an import string package.module:factory naming a "
                        "zero-argument factory that returns a map-style Dataset of (input, target) items or a "
                        "(train, valid) pair of them")
    g.add_argument("--data-dir", help="folder with the official mnist / svhn files")
    g.add_argument("--model", type=_builtin_or_import_string(MODELS), default="mlp",
                   metavar="NAME|MODULE:FACTORY",
                   help=f"one of {', '.join(MODELS)} (a flattened MLP or a 3-layer CNN on a built-in data set's "
                        "images), or an import string package.module:factory naming an nn.Module or a "
                        "zero-argument factory returning one; trained with per-example cross-entropy over the "
                        "output's last dim")
    g.add_argument("--hidden", type=_int_list, default="256,256", help="MLP hidden widths, comma-separated")
    g = p.add_argument_group("scoring")
    g.add_argument("--workers", type=int, default=0,
                   help="scoring worker processes to spawn (0: score inline); ignored under torchrun, where "
                        "ranks 1.. are the workers")
    g.add_argument("--chunk-size", type=int, default=2048, help="examples a scorer scores per chunk")
    g.add_argument("--worker-threads", type=int, default=1, help="CPU threads per scoring worker")
    g.add_argument("--master-threads", type=int, default=None,
                   help="CPU threads of the master (unset: torch's, or the cores the workers leave free)")
    g.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds without norms for the latest parameters before a worker is reported as silent")
    g.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds for every scoring worker to start and report ready; past it, or as soon as one "
                        "exits, training stops with an error naming the worker")
    g = p.add_argument_group("diagnostics, checkpoints, output")
    g.add_argument("--diag-every", type=int, default=100, help="steps between diagnostics (0: none)")
    g.add_argument("--diag-examples", type=int, default=10000,
                   help="diagnostics use the whole training set up to this size, else a fixed random subset")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: none); OUT/checkpoint.pt is the last, checkpoint.prev.pt "
                        "the one before; Ctrl-C also writes one")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a checkpoint (without PATH: OUT/checkpoint.pt). A --lr or --momentum "
                        "different from the checkpoint's is applied to the optimizer from the resumed step on "
                        "and recorded in summary.json (resume_changes); the model, data and sampling flags "
                        "must match")
    g.add_argument("--out", default="runs/issgd", help="output folder (metrics.jsonl, plots, summary)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data split, initial parameters and draws")
    g.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where the master trains")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="kernel backend of the scorer")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="log workers and refreshes")
    return p


def _add_plot(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="plot the metrics of finished runs")
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files) written by `issgd train`, "
                                           "or one output folder of `issgd train --mode both --seeds N` (its "
                                           "figure and table over seeds)")
    p.add_argument("--out", default="runs/plot.png", help="PNG file to write")
    return p


def _add_demo(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo", help="score per-example gradient norms on the digits data set and "
                                       "benchmark the scorer against a training step")
    demo.add_argument("--epochs", type=int, default=6, help="uniform-SGD epochs to train (default: 6)")
    demo.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    demo.add_argument("--lr", type=float, default=0.05, help="learning rate (default: 0.05)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="folder for the plot and the JSON summary")
    demo.add_argument("--no-bench", action="store_true", help="skip the microbenchmark table")
    demo.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                      help="kernel backend of the scorer (default: auto)")
    demo.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="cpu or cuda (default: cpu)")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="issgd", description="Importance-sampled SGD with isgd_kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(subparsers={"train": _add_train(sub), "plot": _add_plot(sub), "demo": _add_demo(sub)})
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.subparsers[args.command]  # errors print the subcommand's usage, not the top level's
    if args.command == "train":
        sys.exit(_train(command, args))
    if args.command == "plot":
        sys.exit(_plot(command, args))
    from issgd.demo import run_demo

    for flag, ok, rule in (("--epochs", args.epochs >= 0, ">= 0"), ("--batch-size", args.batch_size >= 1, ">= 1"),
                           ("--lr", args.lr > 0, "> 0")):
        if not ok:
            command.error(f"argument {flag}: must be {rule}")
    sys.exit(run_demo(args))


def _train(parser: argparse.ArgumentParser, args) -> int:
    import os

    from issgd.compare import run_comparison
    from issgd.config import ConfigError
    from issgd.distributed import StartupError, launched_by_torchrun
    from issgd.sources import SpecError
    from issgd.trainer import TrainConfig, Trainer

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    fields = ("score", "steps", "batch_size", "lr", "momentum", "smoothing", "refresh_every", "dataset", "data_dir", "model",
              "hidden", "workers", "chunk_size", "worker_threads", "master_threads", "worker_timeout", "startup_timeout", "diag_every",
              "diag_examples", "checkpoint_every", "resume", "out", "seed", "seeds", "device", "backend")
    values = {f: getattr(args, f) for f in fields}
    try:
        config = TrainConfig(mode="issgd" if args.mode == "both" else args.mode, progress=not args.no_progress,
                             **values).validate()
    except ConfigError as exc:
        parser.error(f"argument --{exc.field.replace('_', '-')}: {str(exc).split(' ', 1)[1]}")
    if args.seeds > 1 and args.mode != "both":
        parser.error("argument --seeds: paired seeds compare ISSGD with uniform SGD: use it with --mode both")
    if args.mode == "both" and args.resume:
        parser.error("--resume continues one run: resume OUT/issgd or OUT/usgd with --mode issgd|usgd")
    problem = _unwritable(Path(config.out))
    if problem:
        parser.error(f"argument --out: {config.out} {problem}")
    if launched_by_torchrun() and args.mode != "issgd":
        parser.error("under torchrun use --mode issgd (ranks 1.. are its scoring workers)")
    if os.getcwd() not in sys.path:  # import strings name modules of the current folder, as with `python -m`
        sys.path.insert(0, os.getcwd())
    try:
        if args.mode == "both":
            result = run_comparison(config)
            print("\n" + result["text"])
            runs = (f"{config.out}/usgd and {config.out}/issgd" if config.seeds == 1
                    else f"{config.out}/seed<k>/usgd and issgd, k = {config.seed}..{config.seed + config.seeds - 1}")
            print(f"\nwrote {Path(config.out) / 'compare.png'}, summary.md, summary.json and per-run metrics under {runs}")
        else:
            from issgd.report import plot_runs, table

            trainer = Trainer(config)
            summary = trainer.run()
            plot_runs({config.mode: trainer.records}, Path(config.out) / "metrics.png") if trainer.records else None
            print("\n" + table({config.mode: summary}))
            if summary["device"].startswith("cpu"):
                print(f"master: {summary['master_threads']} CPU threads of {summary['usable_cores']} usable cores "
                      "(--master-threads to change)")
            print(f"\nwrote {config.out}/metrics.jsonl, " + ("metrics.png and " if trainer.records else "")
                  + "summary.json")
    except SpecError as exc:
        print(f"issgd train: error: argument --{exc.argument.replace('_', '-')}: {exc.detail}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, FloatingPointError) as exc:
        print(f"issgd train: error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"issgd train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"issgd train: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if str(exc).startswith("isgd_kernels: backend"):  # e.g. --backend triton on a machine without CUDA
            print(f"issgd train: error: argument --backend: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


def _unwritable(out: Path) -> str | None:
    """Why the output folder cannot be used (None: it can): it is a file, lies under a file, or cannot be
    created or written."""
    import os
    import tempfile

    if out.exists() and not out.is_dir():
        return "is an existing file, not a folder"
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            return f"lies under {parent}, which is a file"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".issgd-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc})"
    return None


def _plot(parser: argparse.ArgumentParser, args) -> int:
    from issgd.compare import seed_folders
    from issgd.report import plot_runs, read_metrics, run_folders

    seeded = [given for given in args.runs if seed_folders(given)]
    if seeded and len(args.runs) > 1:
        parser.error(f"{seeded[0]} holds the runs of several seeds: plot it on its own")
    if seeded:
        return _plot_seeds(parser, seeded[0], args.out)
    runs = {}
    for run in (folder for given in args.runs for folder in run_folders(given)):
        try:
            records = read_metrics(run)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        if not records:
            parser.error(f"{run}: no diagnostics records (still starting, or trained with --diag-every 0)")
        mode = run_label(run)
        runs[mode if mode not in runs else str(run)] = records
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot_runs(runs, args.out)}")
    return 0


def _plot_seeds(parser: argparse.ArgumentParser, folder: str, out: str) -> int:
    """The figure and the table over seeds that `issgd train --mode both --seeds N` made, from its folder."""
    from issgd.compare import plot_pairs, read_pairs, seeds_summary

    try:
        pairs, config = read_pairs(folder)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        written = plot_pairs(pairs, config, out)
    except ValueError as exc:  # no diagnostics records in any run
        parser.error(f"{folder}: {exc}")
    print("\n" + seeds_summary(pairs, config)[1])
    print(f"\nwrote {written}")
    return 0


def run_label(run: Path) -> str:
    """The mode a run folder was trained with (from its summary.json), else the folder's name."""
    import json

    summary = run / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text()).get("config", {}).get("mode", run.name)
    return run.name


if __name__ == "__main__":
    main()
