"""The one timer of the project: the benchmarks (`benchmarks/harness.py` re-exports it), their
pytest-benchmark files' checks and `issgd demo` all time with it.

Times are in milliseconds: median, p20 and p80 over repeats. On CUDA `triton.testing.do_bench`
times with CUDA events; on CPU `time.perf_counter` after a warm-up call. Ratios are measured side
by side in one process (`measure_side_by_side`), never against numbers from another run.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.5, max_reps: int = 50,
            min_reps: int = 3, warmup: bool = True) -> dict:
    """Median / p20 / p80 time of fn() in milliseconds, after one warm-up call (unless warmup=False).

    On CPU fn runs at least min_reps times, and more while under min_time seconds and max_reps calls."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)),
                                                quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    if warmup:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def measure_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, *, reference: str,
                         min_time: float = 2.0, min_rounds: int = 3, max_rounds: int = 30,
                         warmup: bool = False) -> dict[str, dict]:
    """measure() for functions compared with fns[reference]. Each result also has "ratio": its time
    over the reference's. With warmup=False the functions must already be warmed up.

    On CPU they run interleaved, one call of each per round (in a shuffled order), and "ratio" is the
    median over rounds of the ratio within a round: a change in the load of a shared machine hits
    both alike, so the ratios hold while the absolute times drift. On CUDA each is timed by do_bench
    (CUDA events) in turn and "ratio" is the ratio of medians.
    """
    if device.type == "cuda":
        out = {name: measure(fn, device) for name, fn in fns.items()}
        for res in out.values():
            res["ratio"] = res["median_ms"] / out[reference]["median_ms"]
        return out
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds, order = time.perf_counter(), 0, list(fns)
    while rounds < min_rounds or (time.perf_counter() - start < min_time and rounds < max_rounds):
        random.Random(rounds).shuffle(order)  # no function always runs right after the same other one
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    ref = torch.tensor(times[reference], dtype=torch.float64)
    return {name: {**quantiles(t), "ratio": float((torch.tensor(t, dtype=torch.float64) / ref).median())}
            for name, t in times.items()}


def quantiles(times_ms: list[float]) -> dict:
    """{"median_ms", "p20_ms", "p80_ms"} of a list of times in milliseconds."""
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}


def peak_extra_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by fn() above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
