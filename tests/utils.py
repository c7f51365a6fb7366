"""Shared helpers for the tests: devices from availability, tolerances that travel with the dtype."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative tolerance of a squared norm computed from inputs of this dtype (fp32 accumulation).
# On a GPU, fp32 tl.dot runs as tf32x3 (near-fp32); fp16/bf16 carry their input rounding.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """Elementwise |a - e| <= rtol * |e| + rtol * max|e| (norms are >= 0, so scale by the largest)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + scale)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: max relative error {float((err / expected.abs().clamp_min(1e-30)).max()):.3e} > {rtol:.1e}\n"
        f"actual={actual[bad][:5].tolist()}\nexpected={expected[bad][:5].tolist()}"
    )


device_params = pytest.mark.parametrize("device", DEVICES)
