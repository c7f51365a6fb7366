"""The fp64 path without tl.dot (Triton before 3.9; USE_DOT=False): broadcast multiply-sum tiles.

Runs the Triton launchers (the interpreter on CPU) with fp64_dot_supported forced either way and
compares with float64 references, so the fallback is tested whichever Triton is installed."""
import pytest
import torch

pytest.importorskip("triton")

from isgd_kernels.conv_norms.reference import conv_grad_sq_norms_ref  # noqa: E402
from isgd_kernels import _triton_common  # noqa: E402
from isgd_kernels._backend import triton_supports as supports  # noqa: E402
from isgd_kernels.conv_norms import triton as conv_norms  # noqa: E402
from isgd_kernels.linear_norms import triton as linear_norms  # noqa: E402
from tests.utils import DEVICES, RTOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if "cuda" in DEVICES else "cpu"


def _linear_ref(x, g, bias):
    grads = torch.einsum("btp,btd->bpd", g, x)
    out = grads.pow(2).sum((1, 2))
    if bias:
        out = out + g.sum(1).pow(2).sum(1)
    return out


@pytest.fixture(params=[False, True], ids=["no-fp64-dot", "fp64-dot"])
def fp64_dot(request, monkeypatch):
    monkeypatch.setattr(_triton_common, "fp64_dot_supported", lambda: request.param)
    return request.param


@pytest.mark.parametrize("T,D,P", [(1, 5, 3), (7, 37, 19), (40, 70, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_fp64(fp64_dot, T, D, P, bias):
    gen = torch.Generator().manual_seed(T * 1000 + D + P)
    x = torch.randn(3, T, D, generator=gen, dtype=torch.float64).to(DEVICE)
    g = torch.randn(3, T, P, generator=gen, dtype=torch.float64).to(DEVICE)
    assert linear_norms.ghost_config(T, D, P, torch.float64)["USE_DOT"] is fp64_dot
    assert linear_norms.materialize_config(T, D, P, torch.float64)["USE_DOT"] is fp64_dot
    want = _linear_ref(x, g, bias)
    for name, fn in (("ghost", linear_norms.linear_sq_norms_ghost_triton),
                     ("materialize", linear_norms.linear_sq_norms_materialize_triton)):
        got = fn(x, g, bias)
        assert got.dtype == torch.float64
        assert_close_rel(got, want, RTOL[torch.float64], f"{name} T={T} D={D} P={P} bias={bias}")


@pytest.mark.parametrize("case", [
    dict(x=(2, 4, 11), c_out=6, k=[3], s=[1], p=[1, 1], d=[1], groups=1),
    dict(x=(2, 6, 7, 9), c_out=4, k=[3, 2], s=[2, 1], p=[1, 0, 0, 1], d=[1, 2], groups=2),
    dict(x=(1, 2, 4, 5, 6), c_out=2, k=[2, 2, 3], s=[1, 2, 1], p=[0, 0, 1, 1, 1, 1], d=[1, 1, 1], groups=1),
])
@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_fp64(fp64_dot, case, method, bias):
    gen = torch.Generator().manual_seed(len(case["x"]) * 7 + case["c_out"])
    x = torch.randn(*case["x"], generator=gen, dtype=torch.float64).to(DEVICE)
    k, s, p, d = case["k"], case["s"], case["p"], case["d"]
    out_sp = [(n + p[2 * j] + p[2 * j + 1] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j, n in enumerate(case["x"][2:])]
    g = torch.randn(case["x"][0], case["c_out"], *out_sp, generator=gen, dtype=torch.float64).to(DEVICE)
    args = (case["k"], case["s"], case["p"], case["d"], case["groups"], bias)
    want = conv_grad_sq_norms_ref(x, g, *args)
    got = conv_norms.conv_sq_norms_triton(x, g, *args, method=method)
    assert got.dtype == torch.float64
    assert_close_rel(got, want, RTOL[torch.float64], f"conv {case} {method} bias={bias}")


def test_supports_gate():
    for family, methods in (("linear", ("outer", "ghost", "materialize")), ("conv", ("ghost", "materialize")),
                            ("alias", ("build", "sample"))):
        for method in methods:
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                assert supports(family, method, dtype)
    assert not supports("linear", "nonsense", torch.float32)
    assert not supports("linear", "ghost", torch.int32)
