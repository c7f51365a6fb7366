"""pytest-benchmark: the `sampler` group's methods (alias table vs torch.multinomial,
WeightedRandomSampler, numpy, searchsorted on a CDF) on its sizes
(`pytest benchmarks/bench_sampler.py --benchmark-only`). N = 1e8 runs on CUDA only.
The ISSGD-schedule cost and the targets: `python -m benchmarks --only sampler`."""
import functools

import pytest

from benchmarks.harness import default_device, synced
from benchmarks.sampler_report import BATCH, BIG_DRAW, METHODS, Method, is_slow, skip_reason
from benchmarks.workloads import sampler_sizes, sampler_weights

DEVICE = default_device()
SIZES = sampler_sizes(DEVICE, quick=False)
# (method, with importance weights): the alias table's draws with and without them.
DRAWS = [pytest.param(m, m == "alias+weights", id=m) for m in ["alias", "alias+weights", *METHODS[1:]]]


@functools.cache
def _weights(n):
    return sampler_weights(n, DEVICE)


@pytest.mark.parametrize("n", SIZES)
def test_alias_build(benchmark, n):
    m = Method("alias", DEVICE)
    m.build(_weights(n))
    benchmark(synced(lambda: m.build(_weights(n), in_place=True), DEVICE))
    benchmark.extra_info.update(N=n, what="in-place rebuild")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("draws", [BATCH, BIG_DRAW])
@pytest.mark.parametrize(("method", "with_weights"), DRAWS)
def test_draw(benchmark, n, draws, method, with_weights):
    name = method.split("+")[0]
    reason = skip_reason(name, n, DEVICE)
    if reason:
        pytest.skip(reason)
    m = Method(name, DEVICE)
    state = m.build(_weights(n))
    run = synced(lambda: m.draw(state, draws, with_weights=with_weights), DEVICE)
    if draws == BIG_DRAW and is_slow(name, n):  # seconds per call: one round
        out = benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        out = benchmark(run)
    assert len(out[0] if with_weights else out) == draws
    benchmark.extra_info.update(N=n, draws=draws, method=method)
