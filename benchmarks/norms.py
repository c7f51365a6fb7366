"""Per-example gradient norm benchmarks: the model scorer, and the Linear and Conv ops per backend.

    python -m benchmarks --only scorer,linear,conv [--device cuda] [--quick]

The cases come from benchmarks/workloads.py, the providers from benchmarks/providers.py;
benchmarks/bench_scorer.py and bench_linear.py time the same cases with pytest-benchmark.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

import isgd_kernels
from benchmarks.harness import (
    figure,
    grouped_bars,
    measure,
    measure_side_by_side,
    peak_extra_memory_mb,
    synchronize,
    write_results,
)
from benchmarks.providers import NAIVE, STEP, max_rel_err, reference_norms, scorer_providers, timed_backends
from benchmarks.workloads import conv_shapes, linear_shapes, scorer_workloads

SCORER_CHECKED = 8  # examples checked against float64 per-example gradients
SCORER_TOLERANCE = 2e-3


def scorer_correct(got: torch.Tensor, ref: torch.Tensor) -> str:
    err = max_rel_err(got, ref)
    return "yes" if err <= SCORER_TOLERANCE else f"NO (max rel err {err:.2e})"


def run_scorer(device: torch.device, quick: bool = False) -> list[dict]:
    rows = []
    for case in scorer_workloads(device, quick):
        w = case.workload
        model, x, y = w.make(device)
        batch = w.batch
        fns = scorer_providers(model, x, y, vmap_chunk=case.vmap_chunk, naive_examples=case.naive_examples)
        # Correctness first: every provider's norms on this batch against a float64 per-example loop
        # on its first examples (a wrong-but-fast provider is reported as wrong).
        ref = reference_norms(model, x[:SCORER_CHECKED], y[:SCORER_CHECKED])
        for provider, (fn, timed) in fns.items():
            slow = provider in NAIVE
            ok = "" if provider == STEP else scorer_correct(fn(), ref)
            t = measure(fn, device, min_time=0.2 if slow else 1.0, min_reps=1 if slow else 5, warmup=not slow)
            if timed < batch:  # per-example cost is flat in the batch size: scale to the whole batch
                t = {k: v * batch / timed for k, v in t.items()}
            mem = None if slow else peak_extra_memory_mb(fn, device)
            rows.append({"workload": w.name, "batch": batch, "provider": provider, **t, "peak_extra_mb": mem,
                         "examples_timed": timed, "correct": ok})
            print(f"  {w.name} B={batch} {provider}: {t['median_ms']:.1f} ms {ok}", flush=True)
        step = next(r["median_ms"] for r in rows if r["workload"] == w.name and r["batch"] == batch
                    and r["provider"] == STEP)
        for r in rows:
            if r["workload"] == w.name and r["batch"] == batch:
                r["ratio_to_step"] = r["median_ms"] / step
    return rows


# -------------------------------------------------------------------------------- linear op
LINEAR_TOLERANCE = 1e-3


def linear_inputs(B: int, T: int, d_in: int, d_out: int, device: torch.device):
    """(x, grad_out, float64 reference norms) of one linear shape."""
    torch.manual_seed(0)
    x = torch.randn(B, T, d_in, device=device)
    g = torch.randn(B, T, d_out, device=device)
    return x, g, isgd_kernels.linear_grad_sq_norms(x.double(), g.double(), backend="torch")


def linear_variants(T: int, d_in: int, d_out: int, device: torch.device) -> list[tuple[str, str]]:
    """(backend, method) pairs timed on a shape: the cost rule's choice at T = 1, else both methods,
    on every backend that runs compiled on the device (the Triton interpreter is a test tool)."""
    auto_method = isgd_kernels.choose_method(T, d_in, d_out)
    out = []
    for backend in isgd_kernels.BACKENDS:
        if backend == "triton" and device.type != "cuda":
            continue
        for method in ["auto"] if T == 1 else ["ghost", "materialize"]:
            if all(isgd_kernels.backend_available(backend, device, f"_linear_sq_norms_{m}")
                   for m in ([auto_method] if method == "auto" else [method])):
                out.append((backend, method))
    return out


def copy_bandwidth_gbps(device) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written), the roofline ceiling."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * src.numel() / ms / 1e6


def matmul_peak_tflops(device, dtype: torch.dtype) -> float | None:
    """Measured matmul throughput of a large square product in `dtype` (fp32 with torch's default
    precision, i.e. no TF32 unless enabled), the compute ceiling of the roofline."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = measure(lambda: a @ b, device)["median_ms"]
    return 2 * n ** 3 / ms / 1e9


def run_linear(device: torch.device, quick: bool = False) -> list[dict]:
    rows = []
    ceiling = copy_bandwidth_gbps(device)
    peaks = {dtype: matmul_peak_tflops(device, dtype) for dtype in (torch.float32, torch.bfloat16)}
    for B, T, d_in, d_out in linear_shapes(device, quick):
        x, g, ref = linear_inputs(B, T, d_in, d_out, device)
        auto_method = isgd_kernels.choose_method(T, d_in, d_out)
        for backend, method in linear_variants(T, d_in, d_out, device):
            fn = functools.partial(isgd_kernels.linear_grad_sq_norms, x, g, backend=backend, method=method)
            err = max_rel_err(fn(), ref)
            t = measure(fn, device)
            resolved = isgd_kernels.choose_method(T, d_in, d_out, method)
            bytes_moved = (x.numel() + g.numel()) * x.element_size()
            flops = 2 * B * T * T * (d_in + d_out) if resolved == "ghost" else 2 * B * T * d_in * d_out
            if resolved == "outer":
                flops = 2 * B * (d_in + d_out)
            gbps = bytes_moved / t["median_ms"] / 1e6
            rows.append({
                "B": B, "T": T, "d_in": d_in, "d_out": d_out, "backend": backend, "method": resolved,
                "chosen_by_cost_rule": resolved == auto_method, **t,
                "GB/s": gbps, "copy_bw_fraction": gbps / ceiling if ceiling else None,
                "TFLOP/s": flops / t["median_ms"] / 1e9,
                "matmul_peak_fraction": (flops / t["median_ms"] / 1e9 / peaks[x.dtype]
                                         if peaks.get(x.dtype) else None),
                "peak_extra_mb": peak_extra_memory_mb(fn, device), "max_rel_err": err,
            })
            print(f"  B={B} T={T} {backend}/{resolved}: {t['median_ms']:.3f} ms err {err:.1e}", flush=True)
            synchronize(device)
    return rows


# ---------------------------------------------------------------------------------------- conv op
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DW = "batch dW, db (convolution_backward)"


def conv_sq_norms_oracle(x, grad_out, weight_shape, args) -> torch.Tensor:
    """float64 ||dL_i/dW||^2 + ||dL_i/db||^2 of L_i = <conv(x_i; W, b), grad_out_i> by torch.func: the
    per-example weight gradient materialized, independently of isgd_kernels (L_i is linear in W, b)."""
    from torch.func import grad, vmap

    conv = _CONV[x.dim() - 2]
    w = torch.zeros(weight_shape, dtype=torch.float64, device=x.device)
    b = torch.zeros(weight_shape[0], dtype=torch.float64, device=x.device)

    def loss(w, b, xi, gi):
        return (conv(xi[None], w, b, **args) * gi[None]).sum()

    gw, gb = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x.double(), grad_out.double())
    return gw.flatten(1).square().sum(1) + gb.square().sum(1)


def run_conv(device: torch.device, quick: bool = False) -> list[dict]:
    """conv_grad_sq_norms per backend, next to the batch weight gradient of the same convolution (what a
    training step computes for this layer: aten.convolution_backward for dW and db)."""
    rows = []
    for name, x_shape, c_out, k, args in conv_shapes(device, quick):
        torch.manual_seed(0)
        n = len(x_shape) - 2
        groups, ks = args.get("groups", 1), (k,) * n
        stride, pad = (args.get("stride", 1),) * n, (args.get("padding", 0),) * n
        x = torch.randn(x_shape, device=device)
        weight = torch.randn(c_out, x_shape[1] // groups, *ks, device=device)
        grad_out = torch.randn_like(_CONV[n](x, weight, **args))
        ref = conv_sq_norms_oracle(x[:4], grad_out[:4], weight.shape, args)
        T = math.prod(grad_out.shape[2:])
        d, p = x_shape[1] // groups * math.prod(ks), c_out // groups
        method = isgd_kernels.choose_method(T, d, p)
        flops = x_shape[0] * groups * (2 * T * T * (d + p) if method == "ghost" else 2 * T * d * p)
        base = {"conv": name, "x": "x".join(map(str, x_shape)), "C_out": c_out, "groups": groups, "method": method}

        def dw(x=x, grad_out=grad_out, weight=weight, stride=stride, pad=pad, groups=groups):
            return torch.ops.aten.convolution_backward(grad_out, x, weight, [weight.shape[0]], list(stride),
                                                       list(pad), [1] * len(stride), False, [0] * len(stride),
                                                       groups, [False, True, True])

        fns, entries = {DW: dw}, []
        entries.append({**base, "backend": DW, "method": "", "status": "ok",
                        "max_rel_err": None, "note": "the weight gradient a training step computes for this layer"})
        dw()
        for backend in timed_backends(device)[0]:
            row = {**base, "backend": backend, "status": "ok", "max_rel_err": None, "note": ""}
            fn = functools.partial(isgd_kernels.conv_grad_sq_norms, x, grad_out, kernel_size=k, backend=backend,
                                   **args)
            try:
                got = fn()
            except RuntimeError as exc:
                if "is unavailable" not in str(exc):
                    raise
                entries.append({**row, "status": "unsupported", "note": str(exc)})
                continue
            row["max_rel_err"] = err = max_rel_err(got, ref)
            tol = 1e-3 if device.type == "cpu" else 1e-2
            if not err <= tol:
                entries.append({**row, "status": "wrong"})
                continue
            fns[backend] = fn
            entries.append(row)
        times = measure_side_by_side(fns, device, reference=DW, min_time=3.0 if quick else 6.0)
        load = round(os.getloadavg()[0], 1) if device.type == "cpu" else None  # as in the field group
        for row in entries:
            t = times.get(row["backend"], {"median_ms": None, "p20_ms": None, "p80_ms": None, "ratio": None})
            row["ratio_to_dW"] = t.pop("ratio")
            row.update(t)
            ms = t["median_ms"]
            is_norm_op = ms and row["method"]
            row["GB/s"] = (x.numel() + grad_out.numel()) * x.element_size() / ms / 1e6 if is_norm_op else None
            row["TFLOP/s"] = flops / ms / 1e9 if is_norm_op else None
            row["peak_extra_mb"] = peak_extra_memory_mb(fns[row["backend"]], device) if ms else None
            row["cpu_load"] = load
            rows.append(row)
            print(f"  {name} {row['backend']}/{row['method']}: {row['status']} "
                  f"{ms if ms is None else round(ms, 3)} ms err {row['max_rel_err']}", flush=True)
        synchronize(device)
    return rows


# --------------------------------------------------------------------------------- reports
def report_scorer(rows, device, out_dir):
    out = write_results(
        rows, "scorer", out_dir, device, title="Per-example gradient norms of a whole model vs a training step",
        columns=["workload", "batch", "provider", "median_ms", "p20_ms", "p80_ms", "ratio_to_step",
                 "peak_extra_mb", "examples_timed", "correct"],
        notes=["ratio_to_step: median time / median time of a plain training step (forward, backward, "
               "Nesterov SGD step) of the same model and batch, measured in the same process.",
               "correct: norms of the first 8 examples within 2e-3 relative of a float64 per-example loop.",
               "examples_timed < batch: the provider was timed on that many examples of the batch and its time "
               "scaled by batch/examples_timed (its cost per example does not depend on the batch).",
               "Target (issue: foundation): GradNormScorer on the paper MLP, batch 512, CPU <= 0.70x."])
    _plot_scorer(rows, out / "scorer.png", device)
    return out


def report_linear(rows, device, out_dir):
    out = write_results(
        rows, "linear", out_dir, device, title="linear_grad_sq_norms per backend and method",
        columns=["B", "T", "d_in", "d_out", "backend", "method", "chosen_by_cost_rule", "median_ms",
                 "GB/s", "copy_bw_fraction", "TFLOP/s", "matmul_peak_fraction", "peak_extra_mb", "max_rel_err"],
        notes=["GB/s counts one read of x and grad_out. copy_bw_fraction: GB/s over a measured device-to-device "
               "copy (GPU only). TFLOP/s counts the chosen method's algorithmic FLOPs; matmul_peak_fraction: TFLOP/s "
               "over an 8192^3 matmul of the input dtype measured in the same run (GPU only).",
               "max_rel_err: against the float64 reference on the same inputs."])
    _plot_linear(rows, out / "linear.png", device)
    return out


def report_conv(rows, device, out_dir):
    _, left_out = timed_backends(device)
    out = write_results(
        rows, "conv", out_dir, device, title="conv_grad_sq_norms per backend vs the batch weight gradient",
        columns=["conv", "x", "C_out", "groups", "backend", "method", "status", "median_ms", "p20_ms", "p80_ms",
                 "ratio_to_dW", "GB/s", "TFLOP/s", "peak_extra_mb", "max_rel_err", "cpu_load", "note"],
        notes=["ratio_to_dW: time over that of aten.convolution_backward computing the batch's dW and db for the same "
               "convolution (the layer's share of a training step's backward), measured side by side (on CPU: "
               "interleaved, median over rounds of the ratio within a round).",
               "backends: 'cpu' is the C++ kernel (implicit im2col per thread, AVX-512 dot blocks or BLAS), "
               "'torch' the im2col reference chunked over the batch, 'cuda' the CUDA C++ kernel and 'triton' the "
               "fused Triton kernels (GPU only).",
               "method: ghost or materialize per group problem (T = output positions, d = C_in/groups * prod(k), "
               "p = C_out/groups) by isgd_kernels.choose_method. GB/s counts one read of x and grad_out; TFLOP/s "
               "the chosen method's algorithmic FLOPs.",
               "max_rel_err: first 4 examples against float64 per-example weight gradients from torch.func.",
               "cpu_load: the 1-minute load average after the shape's timing (2 cores: above ~2, other jobs "
               "competed; small ops such as the depthwise dW suffer the most).",
               *[f"backend '{b}': {why}." for b, why in left_out.items()]])
    _plot_conv(rows, out / "conv.png", device)
    return out


def _plot_scorer(rows, path, device):
    groups = sorted({(r["workload"], r["batch"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    with figure(path, figsize=(10, 4.5)) as (fig, ax):
        grouped_bars(ax, [f"{w}\nB={b}" for w, b in groups],
                     {prov: [next((r["ratio_to_step"] for r in rows if (r["workload"], r["batch"]) == grp
                                   and r["provider"] == prov), float("nan")) for grp in groups]
                      for prov in providers})
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / training step (log)")
        ax.set_title(f"Per-example gradient norms vs a training step — {device.type.upper()}")
        ax.legend(fontsize=8)


def _plot_linear(rows, path, device):
    with figure(path, figsize=(7, 4.5)) as (fig, ax):
        for key in sorted({(r["backend"], r["method"] if r["T"] > 1 else "ghost") for r in rows}):
            pts = sorted((r["T"], r["median_ms"] / r["B"] * 1e3) for r in rows
                         if r["backend"] == key[0] and (r["method"] == key[1] or r["T"] == 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} / {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (sequence positions)")
        ax.set_ylabel("µs per example")
        ax.set_title(f"linear_grad_sq_norms, d_in = d_out = {rows[0]['d_in']} — {device.type.upper()}")
        ax.legend(fontsize=8)


def _plot_conv(rows, path, device):
    convs = list(dict.fromkeys(r["conv"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["median_ms"] is not None))
    with figure(path, figsize=(9, 4.5)) as (fig, ax):
        grouped_bars(ax, convs,
                     {backend: [next((r["ratio_to_dW"] for r in rows if r["conv"] == c and r["backend"] == backend
                                      and r["ratio_to_dW"] is not None), float("nan")) for c in convs]
                      for backend in backends}, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("time / batch dW (log)")
        ax.set_title(f"conv_grad_sq_norms per backend vs the batch weight gradient, {device.type.upper()}")
        ax.legend(fontsize=8)
