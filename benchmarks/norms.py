"""Per-example gradient norm benchmarks: the model scorer and the Linear op per backend.

    python -m benchmarks --only scorer,linear [--device cuda] [--quick]
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import isgd_kernels
from isgd_kernels.reference import per_example_grad_norms_loop, per_example_grad_norms_vmap
from benchmarks.harness import TokenMLP, measure, paper_mlp, peak_extra_memory_mb, synchronize, write_results

XENT = nn.CrossEntropyLoss(reduction="none")


# ------------------------------------------------------------------------------ providers
def vmap_norms(model, x, y, chunk_size):
    """torch.func per-example gradients reduced to norms chunk by chunk (vmap over the whole batch
    would hold B copies of the parameters: 56 GB for the paper MLP at B = 512)."""
    return per_example_grad_norms_vmap(model, XENT, x, y, chunk_size=chunk_size)


def loop_norms(model, x, y):
    return per_example_grad_norms_loop(model, XENT, x, y)


def scorer_workloads(device, quick):
    """(name, model, (x, y), vmap chunk, examples the naive providers are timed on)."""
    torch.manual_seed(0)
    naive = 32 if quick else 64  # the naive providers cost ~0.2 s per paper-MLP example on 2 cores
    yield "paper MLP 3072-2048x4-10", paper_mlp(), (torch.randn(512, 3072), torch.randint(0, 10, (512,))), 16, naive
    if not quick:
        yield ("paper MLP 3072-2048x4-10", paper_mlp(), (torch.randn(128, 3072), torch.randint(0, 10, (128,))), 16,
               naive)
    yield "token MLP d256 T128", TokenMLP(), (torch.randn(32, 128, 64), torch.randint(0, 10, (32,))), 8, 32


def run_scorer(device: torch.device, quick: bool = False) -> list[dict]:
    rows = []
    for name, model, (x, y), vmap_chunk, naive in scorer_workloads(device, quick):
        model, x, y = model.to(device), x.to(device), y.to(device)
        batch = x.shape[0]
        trained = copy.deepcopy(model)  # the step changes parameters: keep the scored model fixed
        opt = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.95, nesterov=True)

        def train_step():
            opt.zero_grad(set_to_none=True)
            XENT(trained(x), y).mean().backward()
            opt.step()

        scorer = isgd_kernels.GradNormScorer(model)
        providers = {
            "training step (fwd+bwd+SGD)": (train_step, None),
            "isgd_kernels GradNormScorer": (lambda: scorer.norms(x, y, XENT), None),
            "isgd_kernels GradNormScorer (torch backend)": (
                lambda: isgd_kernels.GradNormScorer(model, backend="torch").norms(x, y, XENT), None),
            "torch.func vmap(grad)": (lambda: vmap_norms(model, x[:naive], y[:naive], vmap_chunk), None),
            "per-example loop": (lambda: loop_norms(model, x[:naive], y[:naive]), None),
        }
        # Correctness first: every provider's norms on this batch against a float64 per-example loop
        # on its first 8 examples (a wrong-but-fast provider is reported as wrong).
        model64 = paper_mlp() if "paper" in name else TokenMLP()
        model64.load_state_dict(model.state_dict())
        model64 = model64.double().to(device)
        ref = loop_norms(model64, x[:8].double(), y[:8]).double()
        for provider, (fn, _) in providers.items():
            slow = provider in ("torch.func vmap(grad)", "per-example loop")
            if provider.startswith("training"):
                ok = ""
            else:
                got = fn()[:8].double()
                ok = "yes" if torch.allclose(got, ref, rtol=2e-3, atol=0) else f"NO (max rel err {((got - ref).abs() / ref).max():.2e})"
            t = measure(fn, device, min_time=0.2 if slow else 1.0, min_reps=1 if slow else 5, warmup=not slow)
            timed = naive if slow else batch
            if timed < batch:  # per-example cost is flat in the batch size: scale to the whole batch
                t = {k: v * batch / timed for k, v in t.items()}
            mem = None if slow else peak_extra_memory_mb(fn, device)
            rows.append({"workload": name, "batch": batch, "provider": provider, **t, "peak_extra_mb": mem,
                         "examples_timed": timed, "correct": ok})
            print(f"  {name} B={batch} {provider}: {t['median_ms']:.1f} ms {ok}", flush=True)
        step = next(r["median_ms"] for r in rows if r["workload"] == name and r["batch"] == batch
                    and r["provider"].startswith("training"))
        for r in rows:
            if r["workload"] == name and r["batch"] == batch:
                r["ratio_to_step"] = r["median_ms"] / step
    return rows


# -------------------------------------------------------------------------------- linear op
def linear_shapes(device, quick):
    d = 1024 if device.type == "cuda" else 256
    big = device.type == "cuda"
    # (B, T): roughly constant B*T so every row moves similar bytes.
    for T, B in ((1, 65536 if big else 8192), (64, 1024 if big else 64), (512, 128 if big else 16),
                 (2048, 32 if big else 4)):
        if quick and T == 2048 and not big:
            continue
        yield B, T, d, d


def copy_bandwidth_gbps(device) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written), the roofline ceiling."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * src.numel() / ms / 1e6


def run_linear(device: torch.device, quick: bool = False) -> list[dict]:
    rows = []
    ceiling = copy_bandwidth_gbps(device)
    for B, T, d_in, d_out in linear_shapes(device, quick):
        torch.manual_seed(0)
        x = torch.randn(B, T, d_in, device=device)
        g = torch.randn(B, T, d_out, device=device)
        ref = isgd_kernels.linear_grad_sq_norms(x.double(), g.double(), backend="torch")
        auto_method = isgd_kernels.choose_method(T, d_in, d_out)
        methods = ["auto"] if T == 1 else ["ghost", "materialize"]
        for backend in isgd_kernels.BACKENDS:
            for method in methods:
                if not all(isgd_kernels.backend_available(backend, device, f"_linear_sq_norms_{m}")
                           for m in ([auto_method] if method == "auto" else [method])):
                    continue
                if backend == "triton" and device.type != "cuda":
                    continue  # the interpreter is a test tool, not a benchmark
                fn = lambda: isgd_kernels.linear_grad_sq_norms(x, g, backend=backend, method=method)  # noqa: E731
                got = fn().double()
                err = float(((got - ref).abs() / ref).max())
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
                    "peak_extra_mb": peak_extra_memory_mb(fn, device), "max_rel_err": err,
                })
                print(f"  B={B} T={T} {backend}/{resolved}: {t['median_ms']:.3f} ms err {err:.1e}", flush=True)
                synchronize(device)
    return rows


# --------------------------------------------------------------------------------- reports
def report_scorer(rows, device):
    out = write_results(
        rows, "scorer", device, title="Per-example gradient norms of a whole model vs a training step",
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


def report_linear(rows, device):
    out = write_results(
        rows, "linear", device, title="linear_grad_sq_norms per backend and method",
        columns=["B", "T", "d_in", "d_out", "backend", "method", "chosen_by_cost_rule", "median_ms",
                 "GB/s", "copy_bw_fraction", "TFLOP/s", "peak_extra_mb", "max_rel_err"],
        notes=["GB/s counts one read of x and grad_out. copy_bw_fraction: GB/s over a measured device-to-device "
               "copy (GPU only). TFLOP/s counts the chosen method's algorithmic FLOPs.",
               "max_rel_err: against the float64 reference on the same inputs."])
    _plot_linear(rows, out / "linear.png", device)
    return out


def _plot_scorer(rows, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["workload"], r["batch"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        vals = [next((r["ratio_to_step"] for r in rows if (r["workload"], r["batch"]) == grp
                      and r["provider"] == prov), float("nan")) for grp in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=prov)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{w}\nB={b}" for w, b in groups])
    ax.set_ylabel("time / training step (log)")
    ax.set_title(f"Per-example gradient norms vs a training step — {device.type.upper()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_linear(rows, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
