"""pytest-benchmark: per-example gradient norm providers (isgd_kernels, naive autograd, Opacus, BackPACK)
and a training step on small workloads (`pytest benchmarks/bench_field.py --benchmark-only`).

Each provider is checked against float64 per-example gradients first: a wrong isgd_kernels result
fails, a wrong or unsupporting anchor is skipped with the reason. The full side-by-side report with
ratios to the step is `python -m benchmarks --only field`.
"""
import functools

import pytest
import torch

from benchmarks.field import CHECKED, TOLERANCE, examples_timed, reference_norms, train_step
from benchmarks.providers import Unsupported, providers
from benchmarks.workloads import field_workloads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The smallest batch of the paper MLP, the CNN and the grouped CNN.
WORKLOADS = {w.name: w for w in reversed(field_workloads(DEVICE, quick=True))
             if w.name.startswith(("paper MLP", "CNN", "grouped"))}
PROVIDERS = ["training step"] + [p.name for p in providers(DEVICE)[0]]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider(benchmark, workload, provider):
    w = WORKLOADS[workload]
    model, x, y = w.make(DEVICE)
    if provider == "training step":
        fn, n = train_step(model, x, y), w.batch
    else:
        p = next(p for p in providers(DEVICE)[0] if p.name == provider)
        if p.skip_reason(DEVICE):
            pytest.skip(p.skip_reason(DEVICE))
        n = examples_timed(p, model, w.batch, DEVICE, quick=True)
        xs, ys = x[:n], y[:n]
        try:
            norms = p.build(model)
            got = norms(xs, ys)
        except Unsupported as exc:
            pytest.skip(f"unsupported: {exc}")
        k = min(CHECKED, n)
        ref = reference_norms(model, x[:k], y[:k])
        err = float(((got[:k].double() - ref).abs() / ref).max())
        if not err <= TOLERANCE[DEVICE.type]:
            assert not provider.startswith("isgd_kernels"), f"{provider} is wrong by {err:.2e}"
            pytest.skip(f"wrong: max relative error {err:.2e}")
        fn = functools.partial(norms, xs, ys)

    def run():
        out = fn()
        _sync()
        return out

    if n < w.batch:  # a slow provider timed on a few examples: one round is enough
        benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        benchmark(run)
    benchmark.extra_info.update(batch=w.batch, examples_timed=n)
