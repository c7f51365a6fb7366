"""pytest-benchmark: linear_grad_sq_norms per backend over T (`pytest benchmarks --benchmark-only`)."""
import pytest
import torch

import isgd_kernels

T_VALUES = [1, 64, 512, 2048]


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("backend", isgd_kernels.BACKENDS)
def test_linear_grad_sq_norms(benchmark, device, backend, T):
    if not isgd_kernels.backend_available(backend, device, "_linear_sq_norms_ghost") or (
            backend == "triton" and device.type != "cuda"):
        pytest.skip(f"backend {backend} does not run compiled on {device}")
    d = 1024 if device.type == "cuda" else 256
    B = max(1, (65536 if device.type == "cuda" else 8192) // T)
    x, g = torch.randn(B, T, d, device=device), torch.randn(B, T, d, device=device)
    ref = isgd_kernels.linear_grad_sq_norms(x.double(), g.double(), backend="torch")

    def run():
        out = isgd_kernels.linear_grad_sq_norms(x, g, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=0)
    benchmark.extra_info.update(B=B, T=T, d=d, method=isgd_kernels.choose_method(T, d, d))
