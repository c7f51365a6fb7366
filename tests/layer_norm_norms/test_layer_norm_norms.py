"""layer_norm_sq_norms (the LayerNorm / RMSNorm op): every backend that can run here against float64 torch.func
per-example gradients of the layer itself."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import isgd_kernels
from isgd_kernels.layer_norm_norms import layer_norm_sq_norms
from tests.utils import DEVICES, RTOL, assert_close_rel


def backends_for(device):
    return [b for b in ("torch", "cpu") if isgd_kernels.backend_available(b, torch.device(device), "_layer_norm_sq_norms")]


CASES = [pytest.param(device, backend, id=f"{device}-{backend}") for device in DEVICES for backend in backends_for(device)]


def reference_sq_norms(x, grad_out, eps, rms, weight, bias):
    """||d l_i / d(w, b)||^2 of the layer on (R, P) rows, in float64: l_i = <layer(x_i), grad_out_i>."""
    P = x.shape[-1]
    layer = (nn.RMSNorm(P, eps=eps) if rms else nn.LayerNorm(P, eps=eps, bias=bias)).double()
    with torch.no_grad():  # away from 1 and 0: every term of the gradient matters
        for p in layer.parameters():
            p.normal_()
    params = {k: v.detach() for k, v in layer.named_parameters()
              if (k == "weight" and weight) or (k == "bias" and bias)}

    def loss(p, xi, gi):
        return (functional_call(layer, p, (xi,), strict=False) * gi).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.detach().double().cpu(),
                                                         grad_out.detach().double().cpu())
    return sum((g.flatten(1).square().sum(1) for g in per_example.values()),
               torch.zeros(x.shape[0], dtype=torch.float64))


def rand(*shape, device="cpu", dtype=torch.float32, loc=0.0):
    # a common offset per row: the mean must really be subtracted
    return (torch.randn(*shape, dtype=torch.float64) * 2 + loc).to(device=device, dtype=dtype)


SHAPES = [
    pytest.param((6, 13, 24), id="R13-P24"),
    pytest.param((3, 1, 37), id="R1-P37"),  # features not a multiple of the lanes
    pytest.param((1, 50, 16), id="B1"),  # fewer examples than threads: positions split in segments
    pytest.param((5, 3, 1), id="P1"),  # x_hat is 0 (LayerNorm) or +-1 (RMSNorm)
    pytest.param((2, 9, 200), id="P200"),
]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True)], ids=["wb", "w", "b"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_matches_float64_per_example_gradients(device, backend, shape, rms, weight, bias, dtype):
    if rms and bias:
        bias = False  # RMSNorm has no bias
    torch.manual_seed(hash((shape, rms, weight, bias)) % 2**31)
    x, g = rand(*shape, device=device, dtype=dtype, loc=3.0), rand(*shape, device=device, dtype=dtype)
    got = layer_norm_sq_norms(x, g, 1e-5, rms=rms, weight=weight, bias=bias, backend=backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the reference sees the same rounded inputs: the tolerance covers accumulation, not input rounding
    assert_close_rel(got, reference_sq_norms(x, g, 1e-5, rms, weight, bias), RTOL[dtype] if dtype in
                     (torch.float64, torch.float32) else 1e-4, f"{backend} {dtype}")


@pytest.mark.parametrize("device,backend", CASES)
def test_strided_and_mixed_dtype_inputs(device, backend):
    x = rand(4, 24, 10, device=device).transpose(1, 2)  # features strided
    g = rand(4, 10, 24, device=device)[:, :, :]
    want = reference_sq_norms(x, g, 1e-6, False, True, True)
    assert_close_rel(layer_norm_sq_norms(x, g, 1e-6, backend=backend), want, RTOL[torch.float32])
    # grad_out wider than x: both are taken in the accumulation dtype of the pair
    got = layer_norm_sq_norms(x.double(), g.float(), 1e-6, backend=backend)
    assert got.dtype == torch.float64
    assert_close_rel(got, want, RTOL[torch.float32])


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch_and_no_positions(device, backend):
    assert layer_norm_sq_norms(rand(0, 3, 4, device=device), rand(0, 3, 4, device=device), 1e-5,
                               backend=backend).shape == (0,)
    zero = layer_norm_sq_norms(rand(2, 0, 4, device=device), rand(2, 0, 4, device=device), 1e-5, backend=backend)
    assert torch.equal(zero.cpu(), torch.zeros(2))


def test_kernel_refuses_mismatched_shapes():
    if not isgd_kernels.backend_available("cpu", torch.device("cpu"), "_layer_norm_sq_norms"):
        pytest.skip("the C++ extension is not built")
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.isgd_kernels._layer_norm_sq_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1e-5, False, True,
                                                    True)
