"""pytest-benchmark: alias-table build and draws vs torch.multinomial / searchsorted
(`pytest benchmarks/bench_sampler.py --benchmark-only`). N = 1e8 runs on CUDA only."""
import pytest
import torch

from isgd_kernels import AliasTable

SIZES = [10**5, 10**6, 10**7, pytest.param(10**8, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="N = 1e8 is a GPU-only size"))]


def _weights(n, device):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, generator=g) ** 4 + 0.01).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n", SIZES)
def test_alias_build(benchmark, device, n):
    w = _weights(n, device)
    table = AliasTable(w)

    def run():
        table.rebuild_(w)
        _sync(device)

    benchmark(run)
    benchmark.extra_info.update(N=n, what="in-place rebuild")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("draws", [128, 10**6])
@pytest.mark.parametrize("method", ["alias", "alias_with_weights", "multinomial", "searchsorted_cdf"])
def test_draw(benchmark, device, n, draws, method):
    if method == "multinomial" and (n > 2**24 or (n >= 10**7 and draws > 128)):
        pytest.skip("torch.multinomial: at most 2^24 categories; 1e6 draws at N=1e7 take too long here")
    w = _weights(n, device)
    g = torch.Generator(device=device).manual_seed(0)
    if method.startswith("alias"):
        table = AliasTable(w)
        fn = (lambda: table.sample_with_weights(draws, generator=g)) if method == "alias_with_weights" else (
            lambda: table.sample(draws, generator=g))
    elif method == "multinomial":
        fn = lambda: torch.multinomial(w, draws, replacement=True, generator=g)  # noqa: E731
    else:
        cdf = torch.cumsum(w.double(), 0)
        fn = lambda: torch.searchsorted(  # noqa: E731
            cdf, torch.rand(draws, dtype=torch.float64, device=device, generator=g) * cdf[-1:], right=True)

    def run():
        out = fn()
        _sync(device)
        return out

    benchmark(run)
    benchmark.extra_info.update(N=n, draws=draws, method=method)
