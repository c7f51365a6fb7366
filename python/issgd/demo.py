"""`issgd demo`: per-example gradient norms on the digits data set, with the paper's variance view.

1. Trains a small MLP on digits with plain (uniform) SGD; before every epoch, scores the whole
   training set with GradNormScorer and reports how much importance sampling by those norms would
   cut the gradient estimator's variance (sqrt Tr S, uniform vs ideal ISSGD).
2. Checks the scorer against torch.func.vmap(grad) per-example gradients.
3. Times, side by side in this process, a scoring pass against a plain training step of the same
   model and batch (and against vmap(grad) and a per-example loop), on the digits MLP and on the
   paper's 3072-2048x4-10 MLP.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import isgd_kernels
from isgd_kernels.scorer.reference import per_example_grad_norms_loop, per_example_grad_norms_vmap
from issgd.data import load_digits
from issgd.diagnostics import mean_grad_sq_norm, sqrt_trace_covariances
from issgd.models import mlp, paper_mlp
from issgd.scoring import XENT, score_in_chunks
from issgd.timing import measure_side_by_side

STEP = "training step (fwd+bwd+SGD)"


def vmap_norms(model, x, y):
    return per_example_grad_norms_vmap(model, XENT, x, y, chunk_size=64)


def loop_norms(model, x, y):
    return per_example_grad_norms_loop(model, XENT, x, y)


def microbenchmarks(device, backend, digits_x, digits_y):
    """Rows of (model, batch, provider, ms, ratio to a training step), measured side by side by the
    benchmarks' timer (issgd.timing: interleaved rounds on CPU, CUDA events on GPU)."""
    torch.manual_seed(0)
    workloads = [("digits MLP 64-256x2-10", mlp(64, [256, 256], 10), digits_x[:512], digits_y[:512], True),
                 ("paper MLP 3072-2048x4-10", paper_mlp(), torch.randn(512, 3072), torch.randint(0, 10, (512,)),
                  False)]
    rows = []
    for name, model, x, y, with_naive in tqdm(workloads, desc="microbenchmarks", leave=False):
        model, x, y = model.to(device), x.to(device), y.to(device)
        trained = mlp(64, [256, 256], 10) if "digits" in name else paper_mlp()
        trained.load_state_dict(model.state_dict())
        trained = trained.to(device)
        opt = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.95, nesterov=True)

        def step():
            opt.zero_grad(set_to_none=True)
            XENT(trained(x), y).mean().backward()
            opt.step()

        scorer = isgd_kernels.GradNormScorer(model, backend=backend)
        providers = {STEP: step, "GradNormScorer (norms-only)": lambda: scorer(x, y, XENT)}
        if with_naive:
            providers.update({"torch.func vmap(grad)": lambda: vmap_norms(model, x, y),
                              "per-example loop": lambda: loop_norms(model, x, y)})
        times = measure_side_by_side(providers, device, reference=STEP, min_time=len(providers), warmup=True)
        rows += [(name, len(x), label, t["median_ms"], t["ratio"]) for label, t in times.items()]
    return rows


def run_demo(args) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("issgd demo: --device cuda but torch sees no CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    x_train, y_train, x_valid, y_valid = (t.to(device) for t in load_digits(args.seed))
    model = mlp(64, [256, 256], 10).to(device)
    scorer = isgd_kernels.GradNormScorer(model, backend=args.backend)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    N = len(x_train)
    print(f"digits: {N} training / {len(x_valid)} validation examples, model 64-256x2-10, device {device}")

    history = []
    for epoch in tqdm(range(args.epochs + 1), desc="score, then train an epoch"):
        model.eval()
        norms = score_in_chunks(scorer, x_train, y_train)
        gbar2 = mean_grad_sq_norm(model, x_train, y_train)
        with torch.no_grad():
            train_loss = XENT(model(x_train), y_train).mean().item()
            valid_err = (model(x_valid).argmax(1) != y_valid).float().mean().item()
        sd = sqrt_trace_covariances(norms, gbar2)
        history.append({"epoch": epoch, "train_loss": train_loss, "valid_error": valid_err,
                        "mean_norm": norms.mean().item(), "max_norm": norms.max().item(),
                        "sqrt_tr_uniform": sd["uniform"], "sqrt_tr_ideal": sd["ideal"]})
        if epoch == args.epochs:  # scored after the last epoch: nothing left to train (the bar still completes)
            continue
        model.train()
        perm = torch.randperm(N, device=device)
        for i in range(0, N, args.batch_size):
            idx = perm[i:i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            XENT(model(x_train[idx]), y_train[idx]).mean().backward()
            opt.step()

    print("\nPer-example gradient norms of the whole training set, before each epoch of uniform SGD")
    print(f"{'epoch':>5} {'train loss':>10} {'valid err':>9} {'mean |g_i|':>10} {'max |g_i|':>9} "
          f"{'sqrtTr uniform':>14} {'sqrtTr ideal IS':>15} {'ratio':>6}")
    for h in history:
        print(f"{h['epoch']:>5} {h['train_loss']:>10.4f} {h['valid_error']:>9.3f} {h['mean_norm']:>10.4f} "
              f"{h['max_norm']:>9.3f} {h['sqrt_tr_uniform']:>14.4f} {h['sqrt_tr_ideal']:>15.4f} "
              f"{h['sqrt_tr_ideal'] / max(h['sqrt_tr_uniform'], 1e-30):>6.3f}")

    # Correctness, on this model and data: scorer vs torch.func per-example gradients, both in float64
    # (in float32 the loss gradient of a confidently classified example, p - y, is mostly rounding).
    model.eval()
    model64 = mlp(64, [256, 256], 10)
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().to(device)
    ref = vmap_norms(model64, x_train[:256].double(), y_train[:256])
    got = isgd_kernels.GradNormScorer(model64, backend=args.backend).norms(x_train[:256].double(), y_train[:256], XENT)
    max_rel_err = ((got.double() - ref).abs() / ref.clamp_min(1e-30)).max().item()
    print(f"\nscorer vs torch.func vmap(grad) in float64 on 256 examples: max relative error {max_rel_err:.2e}")

    bench = [] if args.no_bench else microbenchmarks(device, args.backend, x_train, y_train)
    if bench:
        print(f"\nMicrobenchmarks ({isgd_kernels._backend.resolve_backend(args.backend, device, ('_linear_sq_norms_outer',))} "
              f"backend, {device}, {torch.get_num_threads()} threads; median times, measured side by side)")
        print(f"{'model':<26} {'batch':>5} {'provider':<30} {'ms':>9} {'x step':>7}")
        for name, batch, label, ms, ratio in bench:
            print(f"{name:<26} {batch:>5} {label:<30} {ms:>9.2f} {ratio:>7.2f}")

    _plot(history, norms, out / "demo.png")
    summary = {"history": history, "scorer_vs_vmap_max_rel_err": max_rel_err,
               "microbenchmarks": [dict(zip(("model", "batch", "provider", "median_ms", "ratio_to_step"), r))
                                   for r in bench],
               "device": str(device), "torch": torch.__version__, "seconds": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out / 'demo.png'} and {out / 'summary.json'} ({summary['seconds']:.0f} s)")
    return 0 if max_rel_err < 1e-3 else 1


def _plot(history, norms, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["sqrt_tr_uniform"] for h in history], marker="o", label="uniform SGD")
    ax1.plot(epochs, [h["sqrt_tr_ideal"] for h in history], marker="o", label="ideal importance sampling")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(r"$\sqrt{\mathrm{Tr}\,\Sigma}$ of the one-example gradient estimator")
    ax1.set_title("Gradient-estimator spread on digits")
    ax1.legend()
    ax2.hist(norms.cpu().numpy(), bins=60, log=True)
    ax2.set_xlabel(r"$\|\nabla_\theta \ell_i\|$")
    ax2.set_ylabel("examples (log)")
    ax2.set_title("Per-example gradient norms after training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
