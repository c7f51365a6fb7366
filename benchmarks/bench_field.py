"""pytest-benchmark: the `field` group's per-example gradient norm providers (isgd_kernels, naive
autograd, Opacus, BackPACK) and the training step, on its smallest CPU workloads
(`pytest benchmarks/bench_field.py --benchmark-only`).

Each provider goes through the `field` group's check first (benchmarks.field.check_provider): a
wrong or crashing isgd_kernels result fails, a wrong, unsupporting or absent anchor is skipped with
the reason. The side-by-side report with ratios to the step is `python -m benchmarks --only field`.
"""
import functools

import pytest

from benchmarks.field import CHECKED, check_provider
from benchmarks.harness import default_device, synced
from benchmarks.providers import STEP, providers, reference_norms, train_step
from benchmarks.workloads import field_workloads

DEVICE = default_device()
# The smallest batch of the paper MLP, the CNN and the grouped CNN (reversed: the first of a name wins).
WORKLOADS = {w.name: w for w in reversed(field_workloads(DEVICE, quick=True))
             if w.name.startswith(("paper MLP", "CNN", "grouped"))}
PROVIDERS = {p.name: p for p in providers(DEVICE)[0]}


@functools.cache
def _case(name):
    """(model, x, y, float64 reference norms of the first examples) of a workload, made once."""
    model, x, y = WORKLOADS[name].make(DEVICE)
    return model, x, y, reference_norms(model, x[:CHECKED], y[:CHECKED])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("provider", [STEP, *PROVIDERS])
def test_provider(benchmark, workload, provider):
    w = WORKLOADS[workload]
    model, x, y, ref = _case(workload)
    if provider == STEP:
        fn, n = train_step(model, x, y), w.batch
    else:
        checked = check_provider(PROVIDERS[provider], model, x, y, ref, DEVICE, quick=True)
        if checked.status != "ok":
            ours = provider.startswith("isgd_kernels")
            assert not (ours and (checked.status == "wrong" or checked.note.startswith("raised"))), \
                f"{provider}: {checked.status} {checked.note}"
            pytest.skip(f"{checked.status}: {checked.note}")
        fn, n = checked.call, checked.examples
    run = synced(fn, DEVICE)
    if n < w.batch:  # a slow provider timed on a few examples: one round is enough
        benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        benchmark(run)
    benchmark.extra_info.update(batch=w.batch, examples_timed=n)
