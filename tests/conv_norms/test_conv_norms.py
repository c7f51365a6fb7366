"""conv_grad_sq_norms and the Conv1d/2d/3d scorer rule against float64 torch.func per-example gradients."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import isgd_kernels
import isgd_kernels.conv_norms.reference
from isgd_kernels import _backend
from isgd_kernels.conv_norms import conv_grad_sq_norms, conv_output_size, resolve_padding
from isgd_kernels.conv_norms.reference import conv_grad_sq_norms_ref
from isgd_kernels.scorer.reference import per_example_grad_norms_vmap
from tests.utils import DEVICES, RTOL, assert_close_rel

# The float64 reference convs themselves warn that an even 'same' kernel pads a copy of the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
xent = nn.CrossEntropyLoss(reduction="none")


CPP_OP = "_conv_grad_sq_norms"
NO_CPU_KERNEL = "compiled extension (isgd_kernels._C) without the C++ CPU conv kernel"
# These tests run the CUDA C++ kernel against the float64 reference wherever a GPU and a CUDA build
# exist; without them it is compile-checked only (tests/test_cuda_sources.py).
NO_CUDA_KERNEL = ("needs a CUDA device and isgd_kernels._C built with the CUDA conv kernel "
                  "(torch with CUDA + nvcc)")


def has_cpp(device):
    return _backend.has_kernel(CPP_OP, "CUDA" if device == "cuda" else "CPU")


def backends_for(device):
    """Backends that can run on `device` here (for loops inside a test)."""
    out = ["torch"]
    if has_cpp(device):
        out.append("cpu" if device == "cpu" else "cuda")
    if isgd_kernels.backend_available("triton", torch.device(device), "conv_grad_sq_norms"):
        out.append("triton")
    return out


def cases():
    """(device, backend) parameters: the C++ backends always appear, skipped with a reason when absent."""
    for device in DEVICES:
        for backend in backends_for(device):
            if backend not in ("cpu", "cuda"):
                yield pytest.param(device, backend, id=f"{device}-{backend}")
    yield pytest.param("cpu", "cpu", id="cpu-cpu", marks=pytest.mark.skipif(not has_cpp("cpu"), reason=NO_CPU_KERNEL))
    cuda_ok = torch.cuda.is_available() and has_cpp("cuda")
    yield pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.skipif(not cuda_ok, reason=NO_CUDA_KERNEL))


def cpp_cases():
    return [p for p in cases() if p.values[1] in ("cpu", "cuda")]


def conv_module(x_shape, c_out, kw, bias=True):
    n = len(x_shape) - 2
    return CONV[n](x_shape[1], c_out, bias=bias, **kw).double()


def make_inputs(x_shape, c_out, kw, device="cpu", dtype=torch.float32):
    """Fresh x and a grad_out of the conv's output shape (computed by PyTorch itself)."""
    x = torch.randn(*x_shape, dtype=torch.float64)
    with torch.no_grad():
        out_shape = conv_module(x_shape, c_out, kw)(x).shape
    g = torch.randn(*out_shape, dtype=torch.float64)
    return x.to(device, dtype), g.to(device, dtype)


def reference_sq_norms(x, grad_out, kw, bias=True):
    """||d l_i / d(W, b)||^2 with l_i = <conv(x_i), grad_out_i>, by vmap(grad) in float64."""
    x64, g64 = x.detach().double().cpu(), grad_out.detach().double().cpu()
    conv = conv_module(x64.shape, g64.shape[1], kw, bias)
    params = {k: v.detach() for k, v in conv.named_parameters()}

    def loss(p, xi, gi):
        return (functional_call(conv, p, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x64, g64)
    return sum(v.flatten(1).square().sum(1) for v in per_example.values())


# (x shape, C_out, conv kwargs). Odd sizes; strides, dilations, paddings (ints, tuples, 'same'
# with even kernels = asymmetric, 'valid'); groups 1, 2 and C_in (depthwise, with a multiplier).
CASES = [
    pytest.param((3, 4, 13), 6, dict(kernel_size=3, stride=2, padding=1), id="1d-s2"),
    pytest.param((2, 4, 11), 4, dict(kernel_size=4, padding="same", dilation=2, groups=2),
                 id="1d-same-even-g2"),
    pytest.param((2, 3, 9), 6, dict(kernel_size=5, padding="valid", groups=3), id="1d-valid-depthwise"),
    pytest.param((2, 3, 7, 9), 5, dict(kernel_size=3, padding=1), id="2d-g1"),
    pytest.param((2, 4, 9, 7), 6, dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                       groups=2), id="2d-tuples-g2"),
    pytest.param((2, 4, 6, 7), 4, dict(kernel_size=(4, 2), padding="same", groups=4),
                 id="2d-same-even-depthwise"),
    pytest.param((2, 2, 5, 4), 3, dict(kernel_size=(5, 4)), id="2d-T1"),  # one output position
    pytest.param((2, 4, 5, 6, 5), 4, dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1),
                                          groups=2), id="3d-g2"),
    pytest.param((2, 3, 4, 5, 4), 3, dict(kernel_size=2, padding="same", dilation=(1, 2, 1), groups=3),
                 id="3d-same-depthwise"),
]


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("x_shape,c_out,kw", CASES)
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_matches_torch_func(device, backend, x_shape, c_out, kw, method):
    x, g = make_inputs(x_shape, c_out, kw, device)
    for bias in (True, False):
        got = conv_grad_sq_norms(x, g, bias=bias, backend=backend, method=method, **kw)
        assert got.dtype == torch.float32 and got.device == x.device and got.shape == (x_shape[0],)
        assert_close_rel(got, reference_sq_norms(x, g, kw, bias), RTOL[torch.float32],
                         f"{backend}/{method}/bias={bias}")


@pytest.mark.parametrize("device,backend", list(cases()))
def test_auto_method_and_backend(device, backend):
    # Wide channels, few positions (ghost wins) and narrow channels, many positions (materialize wins).
    for x_shape, c_out, kw in [((2, 16, 4, 4), 32, dict(kernel_size=3, padding=1)),
                               ((2, 2, 12, 12), 2, dict(kernel_size=2, groups=2))]:
        x, g = make_inputs(x_shape, c_out, kw, device)
        expected = reference_sq_norms(x, g, kw)
        got = conv_grad_sq_norms(x, g, backend=backend, **kw)
        assert_close_rel(got, expected, RTOL[torch.float32], backend)
    assert_close_rel(conv_grad_sq_norms(x, g, **kw), expected, RTOL[torch.float32], "auto backend")


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_dtypes(device, backend, dtype, method):
    kw = dict(kernel_size=3, stride=2, padding=1, groups=2)
    x, g = make_inputs((2, 4, 7, 6), 6, kw, device, dtype)
    got = conv_grad_sq_norms(x, g, backend=backend, method=method, **kw)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Reference on the same (rounded) inputs: the tolerance covers accumulation, not input rounding.
    assert_close_rel(got, reference_sq_norms(x, g, kw), RTOL[dtype], f"{backend}/{dtype}")


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_non_contiguous(device, backend, method):
    kw = dict(kernel_size=(3, 2), padding=(1, 0), groups=2)
    x = torch.randn(2, 4, 14, 9, device=device)[:, :, ::2, 1:8]  # (2, 4, 7, 7), strided H, offset W
    g = torch.randn(2, 7, 6, 6, device=device).permute(0, 3, 1, 2)  # (2, 6, 7, 6), channel stride 1
    assert not x.is_contiguous() and not g.is_contiguous()
    got = conv_grad_sq_norms(x, g, backend=backend, method=method, **kw)
    assert_close_rel(got, reference_sq_norms(x, g, kw), RTOL[torch.float32], backend)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    got = conv_grad_sq_norms(x_cl, g, backend=backend, method=method, **kw)
    assert_close_rel(got, reference_sq_norms(x, g, kw), RTOL[torch.float32], f"{backend} channels_last")


# --------------------------------------------------------------- C++ kernels (cpu, cuda), fresh inputs

def random_conv(gen):
    """x shape, C_out and conv kwargs of a random convolution: rank 1-3, odd sizes, strides, dilations,
    paddings (int, per-dim tuple, 'same' with even or odd kernels, 'valid'), groups 1, 2 or C_in."""
    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n = ri(1, 3)
    kind = ri(0, 2)
    c_in = (ri(1, 5), 2 * ri(1, 3), ri(2, 5))[kind]
    groups = (1, 2, c_in)[kind]
    c_out = groups * ri(1, 3)
    ks = tuple(ri(1, 4 if n < 3 else 3) for _ in range(n))
    dil = tuple(ri(1, 2) for _ in range(n))
    mode = ri(0, 3)
    if mode == 0:
        padding, stride = "same", 1
    else:
        stride = tuple(ri(1, 3) for _ in range(n))
        padding = ("valid", tuple(ri(0, 2) for _ in range(n)), ri(0, 2))[mode - 1]
    extra = {1: 14, 2: 7, 3: 3}[n]
    size = tuple(d * (k - 1) + 1 + ri(0, extra) for k, d in zip(ks, dil))
    kw = dict(kernel_size=ks, stride=stride, padding=padding, dilation=dil, groups=groups)
    return (ri(1, 3), c_in) + size, c_out, kw


@pytest.mark.parametrize("device,backend", cpp_cases())
@pytest.mark.parametrize("seed", range(8))
def test_cpp_random_convs(device, backend, seed):
    """Random geometries against float64 torch.func on fresh inputs, both methods, with and without bias."""
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(4):
        x_shape, c_out, kw = random_conv(gen)
        x, g = make_inputs(x_shape, c_out, kw, device)
        for bias in (True, False):
            expected = reference_sq_norms(x, g, kw, bias)
            for method in ("ghost", "materialize"):
                got = conv_grad_sq_norms(x, g, bias=bias, backend=backend, method=method, **kw)
                assert_close_rel(got, expected, RTOL[torch.float32], f"{x_shape} {c_out} {kw} {method} bias={bias}")


@pytest.mark.parametrize("device,backend", cpp_cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cpp_random_convs_dtypes(device, backend, dtype):
    gen = torch.Generator().manual_seed(2000)
    for _ in range(4):
        x_shape, c_out, kw = random_conv(gen)
        x, g = make_inputs(x_shape, c_out, kw, device, dtype)
        expected = reference_sq_norms(x, g, kw)
        for method in ("ghost", "materialize"):
            got = conv_grad_sq_norms(x, g, backend=backend, method=method, **kw)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert_close_rel(got, expected, RTOL[dtype], f"{x_shape} {c_out} {kw} {method} {dtype}")


@pytest.mark.parametrize("device,backend", cpp_cases())
def test_cpp_long_and_deep_inputs(device, backend):
    """Shapes that take the kernels' other branches: positions in several chunks with a short last one
    (300001 positions of a 1-D conv), Gram strips (ghost on 21 x 19 positions), 3-D outputs of more
    than 8 planes, a single example (the GEMMs then take the threads), non-contiguous x."""
    for x_shape, c_out, kw, method in [
        ((2, 2, 300001), 3, dict(kernel_size=3, padding="same", dilation=2), "materialize"),
        ((1, 3, 21, 19), 4, dict(kernel_size=3, padding=1, groups=1), "ghost"),
        ((2, 2, 11, 4, 5), 2, dict(kernel_size=(2, 3, 3), padding=(0, 1, 1), groups=2), "materialize"),
        ((2, 2, 11, 4, 5), 4, dict(kernel_size=(3, 1, 2), stride=(1, 2, 1), padding="valid"), "ghost"),
    ]:
        x, g = make_inputs(x_shape, c_out, kw, device)
        for bias in (True, False):
            got = conv_grad_sq_norms(x, g, bias=bias, backend=backend, method=method, **kw)
            assert_close_rel(got, reference_sq_norms(x, g, kw, bias), RTOL[torch.float32],
                             f"{x_shape} {method} bias={bias}")
    x = torch.randn(3, 5, 8, 9, device=device).transpose(1, 2)[:, 1:6]  # (3, 5, 5, 9), C stride 9
    kw = dict(kernel_size=2, stride=(1, 2), groups=5)
    g = torch.randn(3, 10, 4, 4, device=device)
    assert_close_rel(conv_grad_sq_norms(x, g, backend=backend, **kw), reference_sq_norms(x, g, kw),
                     RTOL[torch.float32], "strided x")


@pytest.mark.parametrize("device,backend", cpp_cases())
def test_cpp_kernel_paths(device, backend):
    """Sizes that pick each CPU materialize path: the AVX-512 outer-product blocks (rows of U^T and
    channels that are not multiples of a block, column blocks of 2 + 3 vectors, several chunks of
    positions, one split inside an output row, strides, dilations, asymmetric padding, 3-D, T = 4), the
    at::mm path (fewer items than threads), the dot loops (tiny problems); half inputs, an x with
    channel stride 1 and a grad_out with channel stride 1 (G gathered, not viewed)."""
    for x_shape, c_out, kw in [
        ((2, 3, 9, 11), 13, dict(kernel_size=3, padding=1)),             # T = 99, d + 1 = 28, p = 13
        ((1, 3, 9, 11), 13, dict(kernel_size=3, padding=1)),             # one item: threaded at::mm
        ((2, 4, 5000), 6, dict(kernel_size=3, stride=1, dilation=3)),   # T = 4994: 2 chunks
        ((2, 3, 29, 31), 80, dict(kernel_size=3, padding=1)),           # p = 80; 2 chunks of 450
        ((2, 16, 7, 7), 32, dict(kernel_size=3, padding=1, groups=2)),   # T = 49
        ((2, 16, 12, 10), 24, dict(kernel_size=(4, 2), padding="same", dilation=(1, 2), groups=2)),
        ((2, 32, 11, 11), 20, dict(kernel_size=2, stride=3)),            # stride > kernel
        ((2, 6, 5, 9, 8), 20, dict(kernel_size=(2, 3, 3), stride=(1, 2, 2), padding=(1, 0, 2),
                                   dilation=(2, 1, 2))),
        ((3, 32, 2, 2), 40, dict(kernel_size=3, padding=1)),             # T = 4
        ((3, 2, 6, 5), 2, dict(kernel_size=2, groups=2)),                # tiny
    ]:
        x, g = make_inputs(x_shape, c_out, kw, device)
        for bias in (True, False):
            got = conv_grad_sq_norms(x, g, bias=bias, backend=backend, method="materialize", **kw)
            assert_close_rel(got, reference_sq_norms(x, g, kw, bias), RTOL[torch.float32], f"{x_shape} bias={bias}")
        x_cl = x.transpose(1, -1).contiguous().transpose(1, -1)  # channel stride 1
        g_cl = g.transpose(1, -1).contiguous().transpose(1, -1)  # channel stride 1: G is gathered
        got = conv_grad_sq_norms(x_cl, g_cl, backend=backend, method="materialize", **kw)
        assert_close_rel(got, reference_sq_norms(x, g, kw), RTOL[torch.float32], f"{x_shape} channel-stride-1")
        xh, gh = x.half(), g.half()
        got = conv_grad_sq_norms(xh, gh, backend=backend, method="materialize", **kw)
        assert_close_rel(got, reference_sq_norms(xh, gh, kw), RTOL[torch.float16], f"{x_shape} float16")


@pytest.mark.parametrize("device,backend", cpp_cases())
def test_cpp_op_opcheck_and_determinism(device, backend):
    """The compiled op itself: fake kernel and schema (opcheck), B = 0, bitwise-repeatable results."""
    op = getattr(torch.ops.isgd_kernels, CPP_OP)
    for x_shape, c_out, op_args, method in [
        ((3, 4, 13), 6, ([3], [2], [1, 1], [1], 1), "materialize"),
        ((2, 4, 6, 7), 4, ([4, 2], [1, 1], [1, 2, 0, 1], [1, 1], 2), "ghost"),
        ((2, 4, 5, 6, 5), 4, ([2, 3, 2], [1, 2, 1], [1, 1, 0, 0, 1, 1], [1, 1, 2], 4), "materialize"),
        ((2, 3, 4, 4), 5, ([4, 4], [1, 1], [0, 0, 0, 0], [1, 1], 1), "outer"),
    ]:
        kernel_size, stride, padding, dilation, groups = op_args
        x = torch.randn(*x_shape, device=device)
        out = conv_output_size(x_shape[2:], kernel_size, stride, padding, dilation)
        g = torch.randn(x_shape[0], c_out, *out, device=device)
        args = (x, g, kernel_size, stride, padding, dilation, groups, True, method)
        torch.library.opcheck(op.default, args)
        got = op(*args)
        assert torch.equal(got, op(*args)), "repeated calls differ"
        expected = conv_grad_sq_norms_ref(x.double(), g.double(), kernel_size, stride, padding, dilation, groups)
        assert_close_rel(got, expected, RTOL[torch.float32], method)
        empty = op(x[:0], g[:0], *args[2:])
        assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.skipif(not has_cpp("cpu"), reason=NO_CPU_KERNEL)
def test_cpp_op_checks_its_arguments():
    op = getattr(torch.ops.isgd_kernels, CPP_OP)
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 6, 4, 4)
    good = ([3, 3], [1, 1], [0, 0, 0, 0], [1, 1], 2, True)
    with pytest.raises(RuntimeError, match="method must be 'ghost', 'materialize' or 'outer'"):
        op(x, g, *good, "auto")
    with pytest.raises(RuntimeError, match="method 'outer' needs one output position"):
        op(x, g, *good, "outer")
    with pytest.raises(RuntimeError, match="needs 2 kernel_size/stride/dilation values and 4 padding values"):
        op(x, g, [3, 3], [1, 1], [0, 0], [1, 1], 2, True, "ghost")
    with pytest.raises(RuntimeError, match="does not have the output size"):
        op(x, g, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 2, True, "ghost")
    with pytest.raises(RuntimeError, match="must be divisible by groups = 4"):
        op(x, g, [3, 3], [1, 1], [0, 0, 0, 0], [1, 1], 4, True, "ghost")
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, g.double(), *good, "ghost")


def test_padding_resolution_matches_pytorch():
    # 'same' pads dilation*(k-1) in total, the odd element on the right, as F.conv does.
    assert resolve_padding("same", (4, 3), (1, 1), (1, 2)) == [1, 2, 2, 2]
    assert resolve_padding("valid", (4, 3), (2, 2), (1, 1)) == [0, 0, 0, 0]
    assert resolve_padding((1, 2), (3, 3), (1, 1), (1, 1)) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="'same' needs stride 1"):
        resolve_padding("same", (3,), (2,), (1,))


def test_torch_backend_chunks_the_batch(monkeypatch):
    kw = dict(kernel_size=3, padding=1, groups=2)
    x, g = make_inputs((7, 4, 6, 5), 4, kw)
    expected = reference_sq_norms(x, g, kw)
    monkeypatch.setattr(isgd_kernels.conv_norms.reference, "TORCH_CHUNK_ELEMENTS", 1000)  # ~1 example per chunk
    for method in ("ghost", "materialize"):
        assert_close_rel(conv_grad_sq_norms(x, g, backend="torch", method=method, **kw), expected,
                         RTOL[torch.float32], method)


@pytest.mark.parametrize("device", DEVICES)
def test_groups_are_summed_not_mixed(device):
    """A grouped conv is not the dense conv with zero blocks nor one big Linear: its norm only pairs
    each group's input patches with that group's output channels."""
    kw = dict(kernel_size=3, padding=1, groups=2)
    x, g = make_inputs((3, 4, 5, 5), 4, kw, device, torch.float64)
    expected = reference_sq_norms(x, g, kw)
    dense = conv_grad_sq_norms(x, g, kernel_size=3, padding=1, groups=1, backend="torch")
    assert not torch.allclose(dense.cpu(), expected, rtol=1e-3)
    for backend in backends_for(device):
        got = conv_grad_sq_norms(x, g, backend=backend, **kw)
        assert_close_rel(got, expected, RTOL[torch.float64], backend)


def test_empty_batch():
    x, g = torch.randn(0, 2, 5, 5), torch.randn(0, 4, 3, 3)
    for backend in backends_for("cpu"):
        assert conv_grad_sq_norms(x, g, kernel_size=3, backend=backend).shape == (0,)


# The op's own arguments: lists for kernel_size/stride/dilation, padding per side [lo_0, hi_0, ...].
OPCHECK_CASES = [
    pytest.param((3, 4, 13), 6, ([3], [2], [1, 1], [1], 1), id="1d"),
    pytest.param((2, 4, 6, 7), 4, ([4, 2], [1, 1], [1, 2, 0, 1], [1, 1], 2), id="2d-same-even-g2"),
    pytest.param((2, 4, 5, 6, 5), 4, ([2, 3, 2], [1, 2, 1], [1, 1, 0, 0, 1, 1], [1, 1, 2], 4), id="3d-dw"),
]


@pytest.mark.parametrize("device,backend", list(cases()))
@pytest.mark.parametrize("x_shape,c_out,op_args", OPCHECK_CASES)
def test_opcheck(device, backend, x_shape, c_out, op_args):
    kernel_size, stride, padding, dilation, groups = op_args
    x = torch.randn(*x_shape, device=device)
    out = conv_output_size(x_shape[2:], kernel_size, stride, padding, dilation)
    g = torch.randn(x_shape[0], c_out, *out, device=device)
    args = (x, g, kernel_size, stride, padding, dilation, groups, True, backend, "auto")
    torch.library.opcheck(torch.ops.isgd_kernels.conv_grad_sq_norms.default, args)
    expected = conv_grad_sq_norms_ref(x.double(), g.double(), kernel_size, stride, padding, dilation, groups)
    assert_close_rel(torch.ops.isgd_kernels.conv_grad_sq_norms(*args), expected, RTOL[torch.float32], backend)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    kw = dict(kernel_size=3, padding="same", groups=2)

    @torch.compile(fullgraph=True)
    def norms(x, g):
        return conv_grad_sq_norms(x, 2 * g, **kw).sqrt()

    x, g = make_inputs((3, 4, 6, 5), 6, kw)
    assert_close_rel(norms(x, g), reference_sq_norms(x, 2 * g, kw).sqrt(), RTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    f = conv_grad_sq_norms
    x, g = make_inputs((2, 4, 7, 7), 6, dict(kernel_size=3), device)
    with pytest.raises(ValueError, match=r"x \(2, 4, 7, 7\) is a 2-D convolution input but grad_out \(2, 6"):
        f(x, g[:, :, 0], kernel_size=3)
    with pytest.raises(ValueError, match=r"1, 2 or 3 spatial dims, got x \(7, 7\)"):
        f(x[0, 0], g[0, 0], kernel_size=3)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a sequence of 2 ints"):
        f(x, g, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match=r"C_in = 4 of x \(2, 4, 7, 7\) is not divisible by groups = 3"):
        f(x, g, kernel_size=3, groups=3)
    with pytest.raises(ValueError, match=r"C_out = 6 of grad_out \(2, 6, 5, 5\) is not divisible by groups"):
        f(x, g, kernel_size=3, groups=4)
    with pytest.raises(ValueError, match=r"has spatial size \(5, 5\), but a convolution.*outputs \(3, 3"):
        f(x, g, kernel_size=3, stride=2)
    with pytest.raises(ValueError, match=r"grad_out \(2, 6, 5, 5\).*outputs \(7, 7\)"):
        f(x, g, kernel_size=3, padding="same")
    with pytest.raises(ValueError, match="smaller than the kernel"):
        f(x, g, kernel_size=9)
    with pytest.raises(ValueError, match="differ in batch size"):
        f(x, g[:1], kernel_size=3)
    with pytest.raises(ValueError, match="x must be a floating-point tensor.*torch.int64"):
        f(x.long(), g, kernel_size=3)
    with pytest.raises(ValueError, match="grad_out must be a floating-point tensor"):
        f(x, g.int(), kernel_size=3)
    with pytest.raises(ValueError, match="padding must be an int.*'full'"):
        f(x, g, kernel_size=3, padding="full")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        f(x, g, kernel_size=3, padding=-1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f(x, g, kernel_size=3, stride=0)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        f(x, g, kernel_size=3, groups=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, g, kernel_size=3, backend="fast")
    with pytest.raises(ValueError, match="method must be one of"):
        f(x, g, kernel_size=3, method="fast")
    with pytest.raises(ValueError, match="x is on .* but grad_out is on meta"):
        f(x, g.to("meta"), kernel_size=3)


def test_unavailable_backends_say_so():
    kw = dict(kernel_size=3)
    x, g = make_inputs((2, 3, 5, 5), 4, kw)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        conv_grad_sq_norms(x, g, backend="cuda", **kw)

    def resolve(backend, device, ops=("_conv_grad_sq_norms",)):
        return _backend.resolve_backend(backend, torch.device(device), ops)

    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable.*needs CUDA tensors"):
        resolve("cuda", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable.*needs CPU tensors"):
        resolve("cpu", "cuda")
    if _backend._C is not None:
        assert resolve("auto", "cpu") == "cpu"
    # A stale build of the extension that predates an op: "auto" falls back, an explicit request says why.
    assert resolve("auto", "cpu", ("_op_from_a_newer_checkout",)) == "torch"
    with pytest.raises(RuntimeError, match="has no CPU kernel for _op_from_a_newer_checkout.*rebuild"):
        resolve("cpu", "cpu", ("_op_from_a_newer_checkout",))


def test_mixed_dtypes_promote():
    kw = dict(kernel_size=2, groups=2)
    x, g = make_inputs((2, 4, 5, 5), 4, kw)
    got = conv_grad_sq_norms(x.half(), g, backend="torch", **kw)
    assert got.dtype == torch.float32
    assert_close_rel(got, reference_sq_norms(x.half(), g, kw), RTOL[torch.float32])


# ------------------------------------------------------------------------------------------ scorer

class SmallCNN(nn.Module):
    """Conv + GroupNorm + depthwise conv (reflect padding) + strided grouped conv + Linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8, padding_mode="reflect")
        self.conv2 = nn.Conv2d(8, 6, (2, 3), stride=2, groups=2, bias=False)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv1(x)))
        h = torch.tanh(self.dw(h))
        h = self.conv2(h)
        return self.head(h.mean((2, 3)))


class ResBlock(nn.Module):
    """conv-norm-relu-conv-norm plus a 1x1 projection shortcut, residual add."""

    def __init__(self, c_in=4, c=6, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.gn2 = nn.GroupNorm(3, c)
        self.proj = nn.Conv2d(c_in, c, 1, stride=1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = torch.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        h = torch.relu(h + self.proj(x))
        return self.head(h.mean((2, 3)))


class Seq1d3d(nn.Module):
    """Conv1d (circular padding) and Conv3d (replicate padding, dilation) in one model."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=2, dilation=2, padding_mode="circular")
        self.c3 = nn.Conv3d(1, 2, (2, 2, 3), padding=(1, 0, 1), padding_mode="replicate", groups=1)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x):
        a = self.c1(x.flatten(2, 3)[:, :2])           # (B, 2, 20) -> (B, 4, 20)
        b = self.c3(x[:, :1].unsqueeze(1))            # (B, 1, 1, 4, 5) as a 3-D volume
        return self.head(torch.cat([a.mean(2), b.flatten(2).mean(2)], 1))


def scorer_backends():
    out = ["torch", "cpu"]
    if isgd_kernels.backend_available("triton", torch.device("cpu"), "conv_grad_sq_norms"):
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", scorer_backends())
@pytest.mark.parametrize("model_cls,x_shape", [(SmallCNN, (4, 3, 7, 6)), (ResBlock, (3, 4, 5, 6)),
                                               (Seq1d3d, (3, 2, 4, 5))])
def test_scorer_matches_vmap(backend, model_cls, x_shape):
    torch.manual_seed(0)
    model = model_cls().double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (x_shape[0],))
    got = isgd_kernels.per_example_grad_norms(model, xent, x, y, backend=backend)
    assert got.dtype == torch.float64
    assert_close_rel(got, per_example_grad_norms_vmap(model, xent, x, y), 1e-10, backend)


def test_scorer_float32_and_partially_frozen_convs():
    torch.manual_seed(1)
    model = SmallCNN()
    model.conv1.weight.requires_grad_(False)  # only conv1's bias trains
    model.dw.bias.requires_grad_(False)       # only dw's weight trains
    x, y = torch.randn(5, 3, 7, 6), torch.randint(0, 3, (5,))
    got = isgd_kernels.per_example_grad_norms(model, xent, x, y)
    assert got.dtype == torch.float32
    assert_close_rel(got, per_example_grad_norms_vmap(model.double(), xent, x.double(), y), 1e-4)


def test_scorer_refuses_unbatched_conv_input():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 2)

        def forward(self, x):  # (B, L) with B = C_in: Conv1d takes it as one unbatched (C, L) input
            return self.conv(x)

    # The layout probe sees that the losses do not follow the batch order (dim 0 is the conv's channels).
    with pytest.raises(ValueError, match=r"per-example losses are not the same losses in reverse order.*unbatched"):
        isgd_kernels.per_example_grad_norms(Unbatched(), lambda o, t: o.sum(1), torch.randn(3, 5), None)
    # Unchecked, the Conv1d rule still refuses the 2-D input itself.
    with pytest.raises(ValueError, match=r"module 'conv' \(Conv1d\) got a 2-D input"):
        isgd_kernels.GradNormScorer(Unbatched(), check_examples_separate=False).norms(
            torch.randn(3, 5), None, lambda o, t: o.sum(1))


@pytest.mark.parametrize("n, kw", [
    (1, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    (2, dict(kernel_size=4, stride=2, padding=1, groups=2)),
    (2, dict(kernel_size=3, stride=1, padding=2, dilation=2, output_padding=1)),  # op < dilation: extra outputs
    (3, dict(kernel_size=2, stride=2, output_padding=(1, 0, 1))),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_conv_transpose_rule_matches_vmap(n, kw, backend):
    """ConvTranspose1d/2d/3d (stride, padding, output_padding, dilation, groups) through the conv op with
    input and output exchanged, in a U-Net-like up/down model, against float64 vmap."""
    torch.manual_seed(20 + n)
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n]
    down = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    model = nn.Sequential(down(2, 4, 3, padding=1), nn.Tanh(), cls(4, 6, **kw), nn.Tanh(), nn.Flatten(),
                          nn.LazyLinear(3)).double()
    x = torch.randn(5, 2, *([7, 6, 5][:n]), dtype=torch.float64)
    model(x)  # materialize the lazy layer
    y = torch.randint(0, 3, (5,))
    got = isgd_kernels.per_example_grad_norms(model, x, y, xent, backend=backend)
    assert_close_rel(got, per_example_grad_norms_vmap(model, xent, x, y), 1e-10, f"{n}-D {kw}")
    model[2].weight.requires_grad_(False)  # bias only
    got = isgd_kernels.per_example_grad_norms(model, x, y, xent, backend=backend)
    assert_close_rel(got, per_example_grad_norms_vmap(model, xent, x, y), 1e-10, "bias only")


@pytest.mark.parametrize("num_parameters, shape", [(1, (6, 5)), (4, (6, 4)), (4, (6, 4, 3, 2))])
def test_prelu_rule_matches_vmap(num_parameters, shape):
    torch.manual_seed(30 + num_parameters)
    model = nn.Sequential(nn.PReLU(num_parameters, init=0.3), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 3, (shape[0],))
    assert_close_rel(isgd_kernels.per_example_grad_norms(model, x, y, xent),
                     per_example_grad_norms_vmap(model, xent, x, y), 1e-10)
