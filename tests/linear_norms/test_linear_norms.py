"""linear_grad_sq_norms: every backend that can run here against float64 torch.func references."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

import isgd_kernels
from isgd_kernels import _backend
from isgd_kernels.cost import choose_method, use_ghost_norm
from tests.utils import DEVICES, RTOL, assert_close_rel

BACKENDS = ["torch", "cpu", "triton", "cuda"]


def backends_for(device):
    out = []
    for b in BACKENDS:
        if isgd_kernels.backend_available(b, torch.device(device), "_linear_sq_norms_ghost"):
            out.append(b)
    return out


def cases():
    for device in DEVICES:
        for backend in backends_for(device):
            yield pytest.param(device, backend, id=f"{device}-{backend}")


def reference_sq_norms(x, grad_out, bias=True):
    """||d l_i / d(W, b)||^2 from torch.func per-example gradients, in float64.

    The per-example loss l_i = <layer(x_i), grad_out_i> has gradient grad_out_i w.r.t. the output.
    """
    x64, g64 = x.detach().double().cpu(), grad_out.detach().double().cpu()
    layer = torch.nn.Linear(x.shape[-1], grad_out.shape[-1], bias=bias).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi, gi):
        return (functional_call(layer, p, (xi,)) * gi).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x64, g64)
    return sum(g.flatten(1).square().sum(1) for g in per_example.values())


def rand(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=torch.float64).to(dtype)


SHAPES = [
    pytest.param((7, 37), (7, 19), id="T1-2d"),
    pytest.param((7, 1, 37), (7, 1, 19), id="T1-3d"),
    pytest.param((7, 13, 37), (7, 13, 19), id="T13"),
    pytest.param((3, 70, 5), (3, 70, 6), id="T70-narrow"),  # crosses a 64-row tile
    pytest.param((4, 2, 3, 17), (4, 2, 3, 33), id="4d"),
]


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("x_shape,g_shape", SHAPES)
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_func_fp32(device, backend, x_shape, g_shape, method, bias):
    x, g = rand(*x_shape, device=device), rand(*g_shape, device=device)
    got = isgd_kernels.linear_grad_sq_norms(x, g, bias=bias, backend=backend, method=method)
    assert got.dtype == torch.float32 and got.device == x.device
    assert_close_rel(got, reference_sq_norms(x, g, bias), RTOL[torch.float32], f"{backend}/{method}")


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 9])
def test_dtypes(device, backend, dtype, T):
    x, g = rand(5, T, 24, device=device, dtype=dtype), rand(5, T, 40, device=device, dtype=dtype)
    got = isgd_kernels.linear_grad_sq_norms(x, g, backend=backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Reference on the same (rounded) inputs: the tolerance covers accumulation, not input rounding.
    assert_close_rel(got, reference_sq_norms(x, g), RTOL[dtype], f"{backend}/{dtype}")


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_non_contiguous(device, backend, method):
    base_x = rand(6, 20, 2 * 31, device=device)
    base_g = rand(23, 6, 20, device=device)  # transposed below: batch stride is not the largest
    x = base_x[:, ::2, ::2]  # (6, 10, 31), strided in T and d
    g = base_g.permute(1, 2, 0)[:, ::2, :]  # (6, 10, 23), feature stride != 1
    assert not x.is_contiguous() and not g.is_contiguous()
    got = isgd_kernels.linear_grad_sq_norms(x, g, backend=backend, method=method)
    assert_close_rel(got, reference_sq_norms(x, g), RTOL[torch.float32], backend)
    x1, g1 = base_x[:, 0, ::2], base_g[:, :, 0].t()  # T = 1, strided rows
    got = isgd_kernels.linear_grad_sq_norms(x1, g1, backend=backend)
    assert_close_rel(got, reference_sq_norms(x1, g1), RTOL[torch.float32], backend)


@pytest.mark.parametrize("device,backend", list(cases()))
def test_empty_batch_and_large_width(device, backend):
    x, g = rand(0, 5, 8, device=device), rand(0, 5, 3, device=device)
    assert isgd_kernels.linear_grad_sq_norms(x, g, backend=backend).shape == (0,)
    x, g = rand(3, 5000, device=device), rand(3, 3001, device=device)  # large d, T = 1
    assert_close_rel(isgd_kernels.linear_grad_sq_norms(x, g, backend=backend), reference_sq_norms(x, g),
                     RTOL[torch.float32], backend)


@pytest.mark.parametrize("device,backend", list(cases()))
def test_fresh_inputs_many_shapes(device, backend):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(4):
        B, T, d, p = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (9, 40, 50, 50))
        x, g = rand(B, T, d, device=device), rand(B, T, p, device=device)
        got = isgd_kernels.linear_grad_sq_norms(x, g, backend=backend)
        assert_close_rel(got, reference_sq_norms(x, g), RTOL[torch.float32], f"{backend} B{B} T{T} d{d} p{p}")


def test_cost_rule():
    assert use_ghost_norm(T=16, d_in=1024, d_out=1024)       # 16*2048 < 1M
    assert not use_ghost_norm(T=2048, d_in=64, d_out=64)     # 2048*128 > 4096
    assert not use_ghost_norm(T=256, d_in=512, d_out=512)    # 256*1024 == 512*512: materialize
    assert use_ghost_norm(T=255, d_in=512, d_out=512)
    assert choose_method(1, 5, 5) == "outer"
    assert choose_method(1, 5, 5, "ghost") == "outer"
    assert choose_method(100, 5, 5) == "materialize"
    assert choose_method(100, 5, 5, "ghost") == "ghost"
    with pytest.raises(ValueError, match="method"):
        choose_method(4, 5, 5, "fast")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    f = isgd_kernels.linear_grad_sq_norms
    x, g = rand(4, 5, 8, device=device), rand(4, 5, 3, device=device)
    with pytest.raises(ValueError, match=r"x \(4, 5, 8\) and grad_out \(3, 5, 3\)"):
        f(x, g[:3])
    with pytest.raises(ValueError, match=r"x \(4, 5, 8\) and grad_out \(4, 4, 3\)"):
        f(x, g[:, :4])
    with pytest.raises(ValueError, match="batch dim and a feature dim"):
        f(x[0, 0], g[0, 0])
    with pytest.raises(ValueError, match="must agree"):
        f(x, g[:, 0])
    with pytest.raises(ValueError, match="x must be a floating-point tensor.*torch.int64"):
        f(x.long(), g)
    with pytest.raises(ValueError, match="grad_out must be a floating-point tensor"):
        f(x, g.int())
    with pytest.raises(TypeError, match="grad_out must be a torch.Tensor"):
        f(x, [1.0])
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, g, backend="fast")
    with pytest.raises(ValueError, match="method must be one of"):
        f(x, g, method="fast")
    with pytest.raises(ValueError, match="x is on .* but grad_out is on meta"):
        f(x, g.to("meta"))


def test_unavailable_backend_says_how_to_get_it():
    x, g = rand(2, 3, 4), rand(2, 3, 5)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable.*CUDA"):
        isgd_kernels.linear_grad_sq_norms(x, g, backend="cuda")


def test_mixed_dtypes_promote():
    x, g = rand(3, 4, 5, dtype=torch.float16), rand(3, 4, 6, dtype=torch.float32)
    got = isgd_kernels.linear_grad_sq_norms(x, g, backend="torch")
    assert_close_rel(got, reference_sq_norms(x, g), RTOL[torch.float32])


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("T", [1, 6])
def test_opcheck(device, backend, T):
    x = rand(5, T, 12, device=device).requires_grad_(False)
    g = rand(5, T, 7, device=device)
    torch.library.opcheck(torch.ops.isgd_kernels.linear_grad_sq_norms.default, (x, g, True, backend, "auto"))


@pytest.mark.skipif(_backend._C is None, reason="compiled extension not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["_linear_sq_norms_outer", "_linear_sq_norms_ghost", "_linear_sq_norms_materialize"])
def test_opcheck_extension_ops(device, op):
    key = "CPU" if device == "cpu" else "CUDA"
    if not _backend.has_kernel(op, key):
        pytest.skip(f"{op} has no {key} kernel")
    T = 1 if op.endswith("outer") else 5
    x, g = rand(4, T, 9, device=device), rand(4, T, 6, device=device)
    torch.library.opcheck(getattr(torch.ops.isgd_kernels, op).default, (x, g, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def norms(x, w, target):
        out = x @ w.t()  # the rest of a compiled step around the op
        g = 2 * (out - target)
        return isgd_kernels.linear_grad_sq_norms(x, g, bias=False).sqrt()

    x, w, target = rand(6, 3, 8, device=device), rand(5, 8, device=device), rand(6, 3, 5, device=device)
    got = norms(x, w, target)
    expected = reference_sq_norms(x, 2 * (x @ w.t() - target), bias=False).sqrt()
    assert_close_rel(got, expected, RTOL[torch.float32])


def test_missing_extension_is_reported_not_fatal(monkeypatch):
    """Without the compiled extension, "auto" falls back to torch and an explicit C++ backend says how to build."""
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "EXTENSION_ERROR", ImportError("no _C"))
    monkeypatch.setattr(_backend, "_RESOLVED", {})  # resolutions are memoized per process
    x, g = rand(3, 4, 5), rand(3, 4, 6)
    assert_close_rel(isgd_kernels.linear_grad_sq_norms(x, g), reference_sq_norms(x, g), RTOL[torch.float32])
    with pytest.raises(RuntimeError, match=r"failed to load \(no _C\).*pip install --no-build-isolation"):
        isgd_kernels.linear_grad_sq_norms(x, g, backend="cpu")


# The CPU materialize kernel's AVX-512 outer-product path (fp32/fp16/bf16, B >= threads): G read in place
# (fp32, p a multiple of 16) or copied with rows zero-padded (other p, fp16/bf16; g with strided features
# runs the bmm fallback), column
# blocks of 1-4 vectors of 16, d not a multiple of a row block, T = 2, 3, and T long enough that positions
# run in chunks with W in memory (T > 1024 at 64 columns, > 4096 at 16). Elsewhere the same shapes run the
# bmm fallback, so the test holds on any CPU.
OUTER_SHAPES = [(4, 2, 5, 16), (3, 3, 13, 17), (4, 7, 29, 64), (2, 5, 37, 80), (3, 9, 7, 200),
                (5, 40, 100, 256), (2, 1100, 19, 64), (2, 4200, 3, 16), (1, 6, 10, 32)]


@pytest.mark.skipif(_backend._C is None, reason="compiled extension not built")
@pytest.mark.parametrize("B,T,d,p", OUTER_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_materialize_blocks(B, T, d, p, bias):
    x, g = rand(B, T, d), rand(B, T, p)
    got = torch.ops.isgd_kernels._linear_sq_norms_materialize(x, g, bias)
    assert got.dtype == torch.float32
    assert_close_rel(got, reference_sq_norms(x, g, bias), RTOL[torch.float32], f"B{B} T{T} d{d} p{p}")


@pytest.mark.skipif(_backend._C is None, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [32, 21])
def test_cpu_materialize_blocks_layouts(dtype, p):
    base_x = rand(5, 2 * 11, 3 * 23, dtype=dtype)
    base_g = rand(5, 11, p + 16, dtype=dtype)
    layouts = {
        "contiguous": (rand(5, 11, 23, dtype=dtype), rand(5, 11, p, dtype=dtype)),
        "strided x, g rows wider than p": (base_x[:, ::2, ::3], base_g[:, :, :p]),
        "x (T, d) transposed, g strided": (base_x[:, :11, :23].transpose(1, 2).contiguous().transpose(1, 2),
                                           base_g.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 3:p + 3]),
        "batch not outermost": (rand(11, 5, 23, dtype=dtype).transpose(0, 1), rand(11, 5, p, dtype=dtype).transpose(0, 1)),
    }
    for name, (x, g) in layouts.items():
        for bias in (True, False):
            got = torch.ops.isgd_kernels._linear_sq_norms_materialize(x, g, bias)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert_close_rel(got, reference_sq_norms(x, g, bias), RTOL[dtype], f"{dtype} p{p} {name} bias={bias}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_long_sequences_take_the_gemm_path(monkeypatch, dtype, bias):
    """From _CPU_GEMM_MIN_T positions on, the CPU materialize path runs on BLAS GEMMs, in chunks of examples."""
    import isgd_kernels.linear_norms as linear_norms

    monkeypatch.setattr(linear_norms, "_GEMM_CHUNK_BYTES", 2 * 13 * 17 * 8)  # two examples per chunk
    T = linear_norms._CPU_GEMM_MIN_T
    x, g = rand(5, T, 13, dtype=dtype), rand(5, T, 17, dtype=dtype)
    got = isgd_kernels.linear_grad_sq_norms(x, g, bias=bias, backend="auto", method="materialize")
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(got, reference_sq_norms(x, g, bias), RTOL[dtype], f"{dtype} bias={bias}")
