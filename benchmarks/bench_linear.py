"""pytest-benchmark: linear_grad_sq_norms per backend and method on the `linear` group's shapes
(`pytest benchmarks/bench_linear.py --benchmark-only`; GB/s, TFLOP/s and the chart:
`python -m benchmarks --only linear`)."""
import functools

import pytest

import isgd_kernels
from benchmarks.harness import default_device, synced
from benchmarks.norms import LINEAR_TOLERANCE, linear_inputs, linear_variants
from benchmarks.providers import max_rel_err
from benchmarks.workloads import linear_shapes

DEVICE = default_device()
CASES = [pytest.param(shape, backend, method, id=f"B{shape[0]}-T{shape[1]}-d{shape[2]}-{backend}-{method}")
         for shape in linear_shapes(DEVICE, quick=False) for backend, method in linear_variants(*shape[1:], DEVICE)]


@pytest.mark.parametrize(("shape", "backend", "method"), CASES)
def test_linear_grad_sq_norms(benchmark, shape, backend, method):
    B, T, d_in, d_out = shape
    x, g, ref = linear_inputs(*shape, DEVICE)
    out = benchmark(synced(functools.partial(isgd_kernels.linear_grad_sq_norms, x, g, backend=backend,
                                             method=method), DEVICE))
    assert max_rel_err(out, ref) <= LINEAR_TOLERANCE
    benchmark.extra_info.update(B=B, T=T, d=d_in, method=isgd_kernels.choose_method(T, d_in, d_out, method))
