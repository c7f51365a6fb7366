"""Transport group: what publishing the parameters to the scoring workers costs the master, and does the
paper-sized MLP train at full speed with 2 workers?

    python -m benchmarks --only transport [--quick]

1. Push cost (writes transport.{csv,json,md,png}). A model of 1 M, 19 M (the paper's MLP, 3072-2048x4-10)
   and 100 M float32 parameters; the master and 2 spawned workers on this machine (gloo over loopback).
   Each round pushes the parameters once with each transport, in turn, and waits until both workers have
   them in their model (they acknowledge through the store):
   * ``channels`` (what the trainer uses): ``ParameterPusher`` packs the parameters into one buffer and posts
     an asynchronous broadcast on each worker's two-rank gloo group; the master's cost is packing and posting;
   * ``group broadcast``: one asynchronous broadcast on a gloo group of all three ranks (a collective: one
     stopped worker would hold up every later push, so the trainer cannot use it);
   * ``store chunks``: the buffer ``set`` in the key-value store in values of at most 8 MiB (the store's
     limit), the workers ``get`` them: every byte goes through the store's thread in the master's process,
     and the master waits for its ``set``s. (``multi_set`` of the chunks is far slower still.)
   Reported per transport: the master's time per push (median over rounds; the time the training loop
   loses), the time until both workers have the parameters, and the ratio of the master's time to that of
   ``channels`` within each round (median).
2. Trainer (writes transport_trainer.{csv,json,md}): the paper's MLP on SVHN-shaped random data (3072
   inputs, 10 classes; written as .mat files to a temporary folder, read by the trainer's own SVHN loader),
   batch 128, K = 32, 1 master thread, no diagnostics: uniform SGD alone and ISSGD with 2 spawned scoring
   workers, in rounds one after the other in this process; the ratio of master steps/s is taken within a
   round. Targets: ISSGD >= 0.85 x uniform SGD's steps/s, push <= 5 % of the master's training time.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from tqdm import tqdm

from benchmarks.harness import figure, write_results

WORKERS = 2
STORE_CHUNK = 8 * 2**20 - 64  # the store takes at most 8 MiB in one value
TRANSPORTS = ("channels", "group broadcast", "store chunks")
SIZES = {"1 M": 10, "19 M (paper MLP)": 6, "100 M": 3}  # model -> rounds
QUICK_SIZES = {"1 M": 4, "19 M (paper MLP)": 3}


def build(size: str) -> nn.Module:
    from issgd.models import paper_mlp

    torch.manual_seed(0)
    if size.startswith("1 M"):
        return nn.Sequential(nn.Linear(1024, 1024))
    if size.startswith("19 M"):
        return paper_mlp()
    return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(24)])


def _group(store, rank: int):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=300)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore("bench/group/", store), rank, WORKERS + 1, opts)


def _ack(store, transport: str, rnd: int, rank: int) -> str:
    return f"bench/ack/{transport}/{rnd}/{rank}"


def _worker(local_index: int, port: int, size: str, rounds: int) -> None:
    """A worker that only takes in parameters: each round, one push per transport, in the master's order."""
    from issgd.distributed import ParameterLayout, ParameterReceiver, _broadcast_options

    rank = local_index + 1
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=600))
    model = build(size)
    layout = ParameterLayout(model)
    receiver = ParameterReceiver(store, rank, layout, "gloo", torch.device("cpu"), loopback=True,
                                 timeout=timedelta(seconds=300))
    group = _group(store, rank)
    buf = layout.buffer()
    opts = _broadcast_options(timedelta(seconds=600))
    for rnd in range(rounds):
        for transport in TRANSPORTS:
            if transport == "channels":
                while receiver.take(model) is None:
                    time.sleep(0.0005)
            elif transport == "group broadcast":
                group.broadcast([buf], opts).wait()
                layout.unpack(buf, model)
            else:
                count = int(store.get(f"bench/store/{rnd}"))  # waits until the master has set every chunk
                data = b"".join(store.get(f"bench/store/{rnd}/{i}") for i in range(count))
                buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                layout.unpack(buf, model)
            store.set(_ack(store, transport, rnd, rank), "1")
    store.wait(["bench/done"])  # the master closes the channels first: the standing receive ends
    receiver.close()


def _wait_for(store, keys: list[str], ctx) -> None:
    """Until every key is set; a worker that failed raises here, with its traceback."""
    while not store.check(keys):
        ctx.join(0)
        time.sleep(0.0005)


def push_costs(size: str, rounds: int) -> list[dict]:
    from issgd.distributed import ParameterLayout, ParameterPusher, _broadcast_options, loopback_store

    model = build(size)
    params = sum(p.numel() for p in model.parameters())
    layout = ParameterLayout(model)
    store, port = loopback_store(600.0)
    ctx = mp.start_processes(_worker, args=(port, size, rounds), nprocs=WORKERS, join=False, start_method="spawn")
    try:
        pusher = ParameterPusher(store, layout, "gloo", torch.device("cpu"))
        for r in range(1, WORKERS + 1):
            pusher.connect(r, loopback=True, timeout=timedelta(seconds=300))
        group = _group(store, 0)
        buf = layout.buffer()
        opts = _broadcast_options(timedelta(seconds=600))
        times = {t: [] for t in TRANSPORTS}  # (master seconds, delivered seconds) per round
        for rnd in range(rounds):
            for transport in TRANSPORTS:
                while pusher.in_flight:  # the previous push has ended on the master's side too (untimed)
                    pusher.poll()
                    time.sleep(0.001)
                t0 = time.perf_counter()
                if transport == "channels":
                    pusher.push(model, rnd + 1)
                elif transport == "group broadcast":
                    layout.pack(model, rnd + 1, buf)
                    work = group.broadcast([buf], opts)
                else:
                    layout.pack(model, rnd + 1, buf)
                    chunks = range(0, layout.nbytes, STORE_CHUNK)
                    for i, start in enumerate(chunks):
                        store.set(f"bench/store/{rnd}/{i}", buf[start:start + STORE_CHUNK].numpy().tobytes())
                    store.set(f"bench/store/{rnd}", str(len(chunks)))
                t1 = time.perf_counter()
                _wait_for(store, [_ack(store, transport, rnd, r) for r in range(1, WORKERS + 1)], ctx)
                t2 = time.perf_counter()
                times[transport].append((t1 - t0, t2 - t0))
                if transport == "group broadcast":
                    work.wait()  # complete already
                if transport == "store chunks":
                    for i in range(len(chunks)):
                        store.delete_key(f"bench/store/{rnd}/{i}")
        pusher.release_idle()
        pusher.close()
        store.set("bench/done", "1")
        ctx.join(60)
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    rows = []
    mb = layout.nbytes / 1e6
    for transport in TRANSPORTS:
        master = [m for m, _ in times[transport]]
        delivered = [d for _, d in times[transport]]
        ratio = [m / c for (m, _), (c, _) in zip(times[transport], times["channels"])]
        rows.append({"model": size, "params_m": params / 1e6, "mb": mb, "transport": transport, "rounds": rounds,
                     "master_ms": 1e3 * statistics.median(master), "master_ms_min": 1e3 * min(master),
                     "master_ms_max": 1e3 * max(master),
                     "master_mb_per_s": mb / statistics.median(master),
                     "delivered_ms": 1e3 * statistics.median(delivered),
                     "delivered_mb_per_s": WORKERS * mb / statistics.median(delivered),
                     "master_ratio_to_channels": statistics.median(ratio)})
    return rows


# ----------------------------------------------------------------------------------- the trainer
def _svhn_like(folder: Path, train: int, valid: int) -> None:
    """Random 32x32x3 images in the official SVHN .mat layout (X: 32x32x3xN uint8, y: Nx1 in 1..10)."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", train), ("test_32x32.mat", valid)):
        savemat(folder / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def trainer_runs(quick: bool) -> list[dict]:
    from issgd.trainer import TrainConfig, Trainer

    steps, rounds = (64, 1) if quick else (192, 2)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        _svhn_like(Path(tmp), 8192, 1024)
        base = dict(dataset="svhn", data_dir=tmp, hidden=(2048,) * 4, steps=steps, batch_size=128, refresh_every=32,
                    chunk_size=512, diag_every=0, progress=False, master_threads=1, startup_timeout=300.0)
        jobs = [(r, mode) for r in range(rounds) for mode in ("usgd", "issgd")]
        for rnd, mode in tqdm(jobs, desc="paper MLP", leave=False):
            workers = WORKERS if mode == "issgd" else 0
            cfg = TrainConfig(**base, mode=mode, workers=workers, out=f"{tmp}/{rnd}{mode}")
            trainer = Trainer(cfg)
            s = trainer.run()
            push_mb = s["push_bytes"] / 1e6 if "push_bytes" in s else None
            runs.append({"round": rnd, "mode": mode, "workers": workers, "steps": s["steps"],
                         "steps_per_second": s["steps_per_second"], "push_mb": push_mb,
                         "push_ms_per_refresh": s.get("push_ms_per_refresh"),
                         "push_mb_per_second": s.get("push_mb_per_second"),
                         "push_fraction": s.get("push_fraction"), "push_skipped": s.get("push_skipped"),
                         "scored_examples": s.get("scored_examples"),
                         "staleness_mean": trainer.board.staleness(trainer.step)["staleness_mean"]
                         if mode == "issgd" else None})
    for r in runs:
        alone = next(a["steps_per_second"] for a in runs if a["round"] == r["round"] and a["mode"] == "usgd")
        r["ratio_to_usgd"] = r["steps_per_second"] / alone
    rows = []
    for mode in ("usgd", "issgd"):
        mine = [r for r in runs if r["mode"] == mode]
        row = {k: v for k, v in mine[0].items() if k != "round"}
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = statistics.median(r[k] for r in mine)
        row["rounds"] = len(mine)
        row["ratio_min"] = min(r["ratio_to_usgd"] for r in mine)
        row["ratio_max"] = max(r["ratio_to_usgd"] for r in mine)
        row["run"] = "uniform SGD (master alone)" if mode == "usgd" else f"ISSGD, {WORKERS} scoring workers"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- group
def run(device="cpu", quick: bool = False) -> dict | None:
    if torch.device(device).type != "cpu":
        print("[transport] skipped: it measures gloo over loopback with CPU workers; run it with --device cpu",
              flush=True)
        return None
    pushes = []
    for size, rounds in tqdm(list((QUICK_SIZES if quick else SIZES).items()), desc="transport", leave=False):
        pushes += push_costs(size, rounds)
    return {"pushes": pushes, "trainer": trainer_runs(quick)}


def report(result: dict | None, device, out_dir: Path) -> Path:
    """Writes transport.{csv,json,md,png} and transport_trainer.{csv,json,md} to out_dir; returns it."""
    if result is None:  # not run on this device
        return Path(out_dir)
    device = torch.device(device)
    rows = result["pushes"]
    columns = ["model", "params_m", "mb", "transport", "master_ms", "master_ms_min", "master_ms_max",
               "master_mb_per_s", "delivered_ms", "delivered_mb_per_s", "master_ratio_to_channels", "rounds"]
    notes = [f"Master and {WORKERS} spawned workers on this machine, gloo over 127.0.0.1, 1 thread each; every "
             "round pushes once with each transport in turn and waits until both workers have the parameters "
             "in their model.",
             "master_ms: the master's time per push (median; _min/_max over rounds), what the training loop "
             "loses; master_mb_per_s: parameter MB per second of it. delivered_ms: until both workers have "
             "the parameters; delivered_mb_per_s counts both copies.",
             "master_ratio_to_channels: the master's time over that of `channels` in the same round (median).",
             "`channels` is what the trainer uses (an asynchronous broadcast on each worker's two-rank group: a "
             "stopped or dead worker holds up only its own channel); `group broadcast` is one collective over "
             "all ranks; `store chunks` sets <= 8 MiB values in the key-value store.",
             "The machine (2 cores) was shared with other jobs while this ran: absolute times are noisy, "
             "the ratios within a round less so."]
    out = write_results(rows, "transport", out_dir, device, columns=columns,
                        title="Transport: publishing the parameters to 2 scoring workers", notes=notes)
    _plot(rows, out / "transport.png")
    trows = result["trainer"]
    tcolumns = ["run", "steps_per_second", "ratio_to_usgd", "ratio_min", "ratio_max", "push_mb",
                "push_ms_per_refresh", "push_mb_per_second", "push_fraction", "push_skipped", "scored_examples",
                "staleness_mean"]
    tnotes = ["The paper's MLP (3072-2048x4-10, 19.0 M parameters) on SVHN-shaped random data (8192 training "
              "images), batch 128, K = 32, chunks of 512, 1 master thread, 1 thread per (niced) scoring worker, "
              "no diagnostics; uniform SGD alone and ISSGD with 2 spawned workers one after the other in this "
              "process.",
              f"{trows[0]['rounds']} round(s); ratio_to_usgd is the median over rounds of the ratio of master "
              "steps/s within a round (ratio_min / ratio_max: its range).",
              "push_ms_per_refresh: master time per refresh spent pushing; push_fraction: its share of the "
              "training time; push_skipped: pushes skipped because the worker had not taken in the previous "
              "one; staleness_mean: master steps since the parameters of each weight, at the end.",
              "Targets: ISSGD >= 0.85 x uniform SGD's master steps/s; push <= 5 % of the master's time.",
              "The machine (2 cores) was shared with other jobs while this ran."]
    write_results(trows, "transport_trainer", out_dir, device, columns=tcolumns,
                  title="Transport: the paper's MLP with 2 scoring workers", notes=tnotes)
    return out


def _plot(rows: list[dict], path: Path) -> None:
    """Master time per push by model and transport (log scale)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    with figure(path, figsize=(8, 4)) as (fig, ax):
        width = 0.8 / len(TRANSPORTS)
        for i, transport in enumerate(TRANSPORTS):
            values = [next(r["master_ms"] for r in rows if r["model"] == m and r["transport"] == transport)
                      for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=transport, color=f"C{i}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_yscale("log")
        ax.set_ylabel("master time per push (ms)")
        ax.set_title(f"Publishing the parameters to {WORKERS} workers (gloo, loopback)")
        ax.legend(fontsize=8)
