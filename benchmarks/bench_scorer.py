"""pytest-benchmark: the `scorer` group (GradNormScorer vs a training step vs naive autograd) on its
quick workloads (`pytest benchmarks/bench_scorer.py --benchmark-only`).

The naive providers (vmap(grad), per-example loop) run on the first few examples only, one round:
their cost is per example, and the full batch would take minutes. `python -m benchmarks --only
scorer` reports ratios to the step, scaled to the batch.
"""
import functools

import pytest

from benchmarks.harness import default_device, synced
from benchmarks.norms import SCORER_CHECKED, scorer_correct
from benchmarks.providers import NAIVE, SCORER_PROVIDERS, STEP, reference_norms, scorer_providers
from benchmarks.workloads import scorer_workloads

DEVICE = default_device()
WORKLOADS = {case.workload.name: case for case in scorer_workloads(DEVICE, quick=True)}


@functools.cache
def _case(name):
    """(model, x, y, float64 reference norms of the first examples) of a workload, made once."""
    model, x, y = WORKLOADS[name].workload.make(DEVICE)
    return model, x, y, reference_norms(model, x[:SCORER_CHECKED], y[:SCORER_CHECKED])


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("provider", SCORER_PROVIDERS)
def test_scoring(benchmark, workload, provider):
    case = WORKLOADS[workload]
    model, x, y, ref = _case(workload)
    fn, n = scorer_providers(model, x, y, vmap_chunk=case.vmap_chunk,
                             naive_examples=case.naive_examples)[provider]
    run = synced(fn, DEVICE)
    out = benchmark.pedantic(run, rounds=1, iterations=1) if provider in NAIVE else benchmark(run)
    if provider != STEP:
        assert scorer_correct(out, ref) == "yes", provider
    benchmark.extra_info.update(batch=case.workload.batch, examples_timed=n)
