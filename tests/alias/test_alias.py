"""Alias-table sampler: table correctness on adversarial weights, distribution tests, guarantees,
bad inputs, the DataLoader sampler, and opcheck of the custom ops -- on every backend that runs here.

Oracle: isgd_kernels/alias/reference.py. Tolerances: an implied mass (in units of 1/N) is exact up
to float64 rounding of prefix sums of magnitude <= N, i.e. 32 N eps (observed <= 6 N eps); items
with s < 1/2 are never alias targets, so their mass is their own threshold, exact to a few ulps.
"""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from isgd_kernels import _backend
from isgd_kernels.alias.reference import (
    alias_build_ref,
    alias_implied_mass,
    alias_sample_ref,
    alias_sample_weighted_ref,
)
from isgd_kernels.alias import AliasTable, alias_build, alias_sample, alias_sample_weighted
from isgd_kernels.alias.sampler import AliasSampler

from utils import DEVICES

EPS = 2.0**-52


def _backends():
    out = []
    for device in DEVICES:
        dev = torch.device(device)
        for b in ("cpu", "cuda", "triton", "torch"):
            if _backend.backend_unavailable_reason(b, dev, "_alias_build") is None:
                out.append((device, b))
    return out


BACKENDS = _backends()
backend_params = pytest.mark.parametrize("device,backend", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])


def _interpreted(device, backend):
    return backend == "triton" and device == "cpu"


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _chi2_sf(stat: float, dof: int) -> float:
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # regularized upper incomplete gamma: Q(dof/2, stat/2)
        return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                             torch.tensor(stat / 2.0, dtype=torch.float64)))


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square GOF p-value; bins with expected count < 5 are merged (ordered by size)."""
    counts = counts.double().cpu()
    probs = probs.double().cpu()
    n = counts.sum()
    expected = probs * n
    assert counts[expected == 0].sum() == 0, "drew an item of probability 0"
    order = torch.argsort(expected)
    e, c = expected[order], counts[order]
    keep = e >= 5
    e_small, c_small = e[~keep], c[~keep]
    e_bins, c_bins = list(e[keep]), list(c[keep])
    # Merge small bins in order until each merged bin reaches 5.
    acc_e = acc_c = 0.0
    for ee, cc in zip(e_small.tolist(), c_small.tolist()):
        acc_e += ee
        acc_c += cc
        if acc_e >= 5:
            e_bins.append(torch.tensor(acc_e))
            c_bins.append(torch.tensor(acc_c))
            acc_e = acc_c = 0.0
    if acc_e > 0:
        if e_bins:
            e_bins[0] = e_bins[0] + acc_e
            c_bins[0] = c_bins[0] + acc_c
        else:
            e_bins.append(torch.tensor(acc_e))
            c_bins.append(torch.tensor(acc_c))
    e_t = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in e_bins])
    c_t = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in c_bins])
    stat = float(((c_t - e_t) ** 2 / e_t).sum())
    return _chi2_sf(stat, max(1, e_t.numel() - 1))


# ------------------------------------------------------------------------------------------------
# Adversarial weights
# ------------------------------------------------------------------------------------------------
def _power(n, alpha, shuffled, g):
    w = torch.arange(1, n + 1, dtype=torch.float64) ** (-alpha)
    return w[torch.randperm(n, generator=g)] if shuffled else w


def _cases(n, g):
    yield "uniform_random", torch.rand(n, generator=g)
    for alpha in (0.1, 1.0, 2.0, 3.0):
        yield f"power{alpha}_sorted", _power(n, alpha, False, g)
        yield f"power{alpha}_sorted_ascending", _power(n, alpha, False, g).flip(0)
        yield f"power{alpha}_shuffled", _power(n, alpha, True, g)
    one_heavy = torch.ones(n)
    one_heavy[n // 2] = 1e6 * n
    yield "one_heavy", one_heavy
    one_light = torch.ones(n, dtype=torch.float64)
    one_light[n // 3] = 1e-12
    yield "one_light", one_light
    span = torch.logspace(-30, 30, n, dtype=torch.float64)
    yield "span_1e-30_1e30", span[torch.randperm(n, generator=g)]
    zeros = torch.rand(n, generator=g, dtype=torch.float64)
    zeros[::2] = 0.0
    zeros[n // 2 if n % 4 == 3 else (1 if n > 1 else 0)] = 1.0  # at least one positive weight
    yield "zeros_interleaved", zeros
    tiny = torch.rand(n, generator=g)
    tiny[1::3] = 0.0
    tiny[0] = 1.0
    yield "zeros_and_float32", tiny


SIZES = [1, 2, 3, 2**5 - 1, 2**5 + 1, 2**10 - 1, 2**10 + 1, 2**14 + 1]


def _check_table(w, threshold, alias, what):
    n = w.numel()
    w64 = w.double().cpu()
    threshold = threshold.cpu()
    alias = alias.cpu().long()
    assert threshold.dtype == torch.float64 and threshold.shape == (n,)
    assert alias.shape == (n,) and ((alias >= 0) & (alias < n)).all(), f"{what}: alias out of range"
    assert ((threshold >= 0) & (threshold <= 1)).all(), f"{what}: threshold outside [0, 1]"
    zero = w64 == 0
    assert (threshold[zero] == 0).all(), f"{what}: a zero weight has a positive threshold"
    assert (w64[alias] > 0).all(), f"{what}: an alias points to a zero-weight item"
    s = w64 / w64.mean()
    mass = alias_implied_mass(threshold, alias)
    assert (mass[zero] == 0).all(), f"{what}: a zero weight receives mass"
    tol = 32 * n * EPS * s.clamp(min=1.0)
    err = (mass - s).abs()
    assert (err <= tol).all(), f"{what}: implied mass off by {float((err / tol).max()):.2f} x tolerance"
    small = s < 0.5
    assert (err[small] <= 16 * EPS * s[small]).all(), f"{what}: light item mass not exact"


@backend_params
@pytest.mark.parametrize("n", SIZES)
def test_table_reconstruction(device, backend, n):
    if _interpreted(device, backend) and n > 2**10 + 1:
        pytest.skip("Triton interpreter: small N only")
    g = torch.Generator().manual_seed(n)
    for name, w in _cases(n, g):
        w = w.to(device)
        t, a, mean = alias_build(w, backend=backend)
        assert t.device == w.device and a.device == w.device
        assert a.dtype == torch.int32  # N < 2^31
        _check_table(w, t, a, f"{backend} N={n} {name}")
        assert math.isclose(float(mean), float(w.double().mean()), rel_tol=1e-12)


@backend_params
@pytest.mark.parametrize("value", [1.0, 0.7, 3.3, 1e-300, 1e300])
def test_all_equal_weights_are_exactly_uniform(device, backend, value):
    for n in (1, 7, 1000, 4097):
        w = torch.full((n,), value, dtype=torch.float64, device=device)
        t, a, _ = alias_build(w, backend=backend)
        assert (t == 1.0).all(), f"N={n}: thresholds {t[t != 1][:5].tolist()}"


def test_matches_reference_table_exactly_triton():
    """The Triton build evaluates the reference's formulas on the same prefix sums: bit-identical."""
    if _backend.backend_unavailable_reason("triton", torch.device("cpu"), "_alias_build") is not None:
        pytest.skip("Triton not runnable here")
    g = torch.Generator().manual_seed(3)
    for name, w in _cases(300, g):
        t0, a0, m0 = alias_build_ref(w)
        t1, a1, m1 = alias_build(w, backend="triton")
        assert torch.equal(t0, t1) and torch.equal(a0, a1) and float(m0) == float(m1), name


_HAS_CPU_BUILD = _backend.backend_unavailable_reason("cpu", torch.device("cpu"), "_alias_build") is None
needs_cpu_build = pytest.mark.skipif(not _HAS_CPU_BUILD, reason="C++ CPU kernels not built")


@pytest.fixture
def num_threads():
    """Sets torch's intra-op thread count for one test and restores it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# The CPU build splits the merged light/heavy sequence into chunks of >= 2^16 items, swept in groups
# of up to 4 (with up to one thread per 2^18 items, 4 groups each): 2^17 + 1 gives one group of 2
# chunks, 3 * 2^16 + 1 one of 3, 9 * 2^16 + 5 with 2 threads groups of 4, 4 and 1, 2^20 + 4097 16
# chunks in groups of 4; chunk boundaries fall inside words and blocks.
CHUNKED_SIZES = [2**17 + 1, 3 * 2**16 + 1, 9 * 2**16 + 5, 2**20 + 4097]


@needs_cpu_build
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("n", CHUNKED_SIZES)
def test_chunked_cpu_build(num_threads, threads, n):
    """Every chunk boundary joins up: the table is valid on adversarial weights, and identical from
    one build to the next although chunk pairs go to whichever thread claims them first."""
    num_threads(threads)
    g = torch.Generator().manual_seed(n + threads)
    for name, w in _cases(n, g):
        t, a, mean = alias_build(w, backend="cpu")
        _check_table(w, t, a, f"cpu N={n} threads={threads} {name}")
        assert math.isclose(float(mean), float(w.double().mean()), rel_tol=1e-12)
        t2, a2, _ = alias_build(w, backend="cpu")
        assert torch.equal(t, t2) and torch.equal(a, a2), f"{name}: two builds differ"


@needs_cpu_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1000, 2**20 + 4097])
def test_cpu_build_weight_dtypes(num_threads, dtype, n):
    num_threads(2)
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(n, generator=g) ** 4 + 0.01).to(dtype)
    w[::5] = 0
    t, a, _ = alias_build(w, backend="cpu")
    _check_table(w, t, a, f"{dtype} N={n}")


@needs_cpu_build
@pytest.mark.parametrize("n", [1, 1000, 2**20 + 4097])
def test_cpu_build_into_int64_alias(num_threads, n):
    """int64 alias buffers (what N >= 2^31 needs) take the same build, with indices found bit by bit."""
    num_threads(2)
    g = torch.Generator().manual_seed(n)
    w = _power(n, 1.0, True, g)
    t = torch.empty(n, dtype=torch.float64)
    a = torch.empty(n, dtype=torch.int64)
    mean = torch.ops.isgd_kernels._alias_build_into(w, t, a)
    _check_table(w, t, a, f"int64 alias N={n}")
    t32, a32, mean32 = alias_build(w, backend="cpu")
    assert torch.equal(t, t32) and torch.equal(a, a32.long()) and float(mean) == float(mean32)


@needs_cpu_build
def test_rebuild_in_place_matches_fresh_build(num_threads):
    num_threads(2)
    g = torch.Generator().manual_seed(1)
    n = 2**20 + 4097
    w1, w2 = torch.rand(n, generator=g) ** 3, torch.rand(n, generator=g) ** 4 + 0.01
    table = AliasTable(w1, backend="cpu")
    ptr = table.threshold.data_ptr()
    table.rebuild_(w2)
    fresh = AliasTable(w2, backend="cpu")
    assert table.threshold.data_ptr() == ptr
    assert torch.equal(table.threshold, fresh.threshold) and torch.equal(table.alias, fresh.alias)
    assert float(table.mean) == float(fresh.mean)


def test_large_n_beyond_float32_categories():
    """N = 2^24 + 1 (torch.multinomial's limit is 2^24): the last item must be reachable."""
    n = 2**24 + 1
    w = torch.ones(n)
    w[-1] = float(n)  # about half the mass on index 2^24
    table = AliasTable(w, backend="cpu")
    _check_table(w, table.threshold, table.alias, "N=2^24+1")
    idx = table.sample(200_000, generator=_gen("cpu", 0))
    frac = float((idx == n - 1).double().mean())
    q = float(n) / (2 * n - 1)
    assert abs(frac - q) < 5 * math.sqrt(q * (1 - q) / 200_000)
    assert int(idx.max()) == n - 1 and idx.dtype == torch.int64
    others = idx[idx != n - 1]
    assert int(others.max()) > 2**24 - 2**20  # rows above 2^24 - 2^20 are drawn too


# ------------------------------------------------------------------------------------------------
# Draws
# ------------------------------------------------------------------------------------------------
@backend_params
def test_draw_kernels_match_reference(device, backend):
    """Same table, same random words: every draw kernel returns exactly the reference's indices."""
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 3, 1000):
        w = _power(n, 1.0, True, g).to(device)
        t, a, mean = alias_build_ref(w)
        bits = torch.empty((5000, 2), dtype=torch.int64, device=device).random_(-(2**63), None, generator=_gen(device, n))
        table = AliasTable(w, backend=backend)
        got = alias_sample(t, a, bits, backend=table.backend)
        assert torch.equal(got.cpu(), alias_sample_ref(t, a, bits).cpu())
        for dtype in (torch.float32, torch.float64):
            gi, giw = alias_sample_weighted(t, a, w.contiguous(), mean, bits, dtype, backend=table.backend)
            ri, riw = alias_sample_weighted_ref(t, a, w, mean, bits, dtype)
            assert torch.equal(gi.cpu(), ri.cpu()) and giw.dtype == dtype
            torch.testing.assert_close(giw.cpu(), riw.cpu(), rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=0)


@backend_params
def test_chi_square_goodness_of_fit(device, backend):
    interp = _interpreted(device, backend)
    g = torch.Generator().manual_seed(11)
    n_draws = 100_000 if interp else 400_000
    for k, (n, w) in enumerate([(50, _power(50, 1.0, True, g)), (257, _power(257, 2.0, True, g)),
                                (1000, torch.rand(1000, generator=g) ** 4), (33, torch.ones(33))]):
        table = AliasTable(w.to(device), backend=backend)
        idx = table.sample(n_draws, generator=_gen(device, 100 + k))
        counts = torch.bincount(idx.cpu(), minlength=n)
        p = _chi2_pvalue(counts, w.double() / w.double().sum())
        assert p > 1e-3, f"N={n}: chi-square p-value {p:.2e}"


@backend_params
def test_rare_events(device, backend):
    """Items holding 1e-6 of the mass are drawn at their rate (z-test on 3e7 draws)."""
    if _interpreted(device, backend):
        pytest.skip("3e7 draws in the Triton interpreter take too long; the draw kernel is checked exactly above")
    n = 1000
    w = torch.ones(n, dtype=torch.float64)
    rare = torch.tensor([3, 500, 999])
    w[rare] = 0.0
    w[rare] = (1e-6 / 3) * w.sum() / (1 - 1e-6)  # each ~3.3e-7 of the total
    q_rare = float(w[rare].sum() / w.sum())
    table = AliasTable(w.to(device), backend=backend)
    g = _gen(device, 7)
    total, hits = 0, 0
    for _ in range(15):
        idx = table.sample(2_000_000, generator=g)
        hits += int(torch.isin(idx, rare.to(device)).sum())
        total += idx.numel()
    lam = q_rare * total
    z = (hits - lam) / math.sqrt(lam)
    assert abs(z) < 5, f"rare items: {hits} draws, expected {lam:.1f} (z = {z:.2f})"


@backend_params
def test_zero_weights_never_drawn(device, backend):
    interp = _interpreted(device, backend)
    g = torch.Generator().manual_seed(2)
    n = 1001
    w = torch.rand(n, generator=g, dtype=torch.float64)
    w[::3] = 0.0
    w[1::7] = 1e-300  # tiny but positive neighbours
    table = AliasTable(w.to(device), backend=backend)
    idx = table.sample(200_000 if interp else 2_000_000, generator=_gen(device, 1))
    assert not bool((w.to(device)[idx] == 0).any())


@backend_params
def test_determinism_and_weights(device, backend):
    w = torch.tensor([1.0, 0.0, 3.0, 0.5, 6.0], device=device)
    table = AliasTable(w, backend=backend)
    a = table.sample(1000, generator=_gen(device, 42))
    b = table.sample(1000, generator=_gen(device, 42))
    c = table.sample(1000, generator=_gen(device, 43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.device == w.device
    idx, iw = table.sample_with_weights(1000, generator=_gen(device, 42))
    assert torch.equal(idx, a) and iw.dtype == torch.float32
    q = table.probs.cpu()
    torch.testing.assert_close(q, w.double().cpu() / w.double().sum().cpu(), rtol=1e-15, atol=0)
    torch.testing.assert_close(iw.cpu().double(), 1.0 / (5 * q[idx.cpu()]), rtol=1e-6, atol=0)
    torch.testing.assert_close(table.importance_weights(idx).cpu(), iw.cpu())
    t64 = AliasTable(w, dtype=torch.float64, backend=backend)
    _, iw64 = t64.sample_with_weights(10, generator=_gen(device, 0))
    assert iw64.dtype == torch.float64
    assert len(table) == 5 and table.device == w.device
    assert table.sample(0).shape == (0,)
    one = AliasTable(torch.tensor([2.5], device=device), backend=backend)
    i1, w1 = one.sample_with_weights(100)
    assert (i1 == 0).all() and (w1 == 1).all()


BAD = [
    (torch.tensor([1.0, float("nan"), 2.0]), r"weights\[1\] is NaN"),
    (torch.tensor([1.0, 2.0, float("inf")]), r"weights\[2\] is infinite"),
    (torch.tensor([float("-inf"), 1.0]), r"weights\[0\] is (infinite|negative)"),
    (torch.tensor([1.0, 0.0, -0.5, -1.0]), r"weights\[2\] is negative"),
    (torch.zeros(4), "all weights are zero"),
    (torch.zeros(0), "empty"),
    (torch.ones(2, 3), "1-D"),
    (torch.ones(3, dtype=torch.int64), "floating dtype"),
]


@backend_params
@pytest.mark.parametrize("weights,match", BAD, ids=["nan", "inf", "-inf", "negative", "all_zero", "empty", "2d", "int"])
def test_bad_weights_raise_value_error(device, backend, weights, match):
    with pytest.raises(ValueError, match=match):
        AliasTable(weights.to(device), backend=backend)


@backend_params
def test_bad_n_raises(device, backend):
    table = AliasTable(torch.ones(3, device=device), backend=backend)
    for n in (-1, 2.5, "3"):
        with pytest.raises(ValueError, match="n must be a non-negative integer"):
            table.sample(n)
        with pytest.raises(ValueError, match="n must be a non-negative integer"):
            table.sample_with_weights(n)


# ------------------------------------------------------------------------------------------------
# AliasSampler
# ------------------------------------------------------------------------------------------------
def test_sampler_is_a_weighted_random_sampler_drop_in():
    weights = [0.0, 1.0, 2.0, 0.0, 5.0]
    for w in (weights, np.array(weights), torch.tensor(weights)):
        s = AliasSampler(w, 40, generator=_gen("cpu", 0))
        ref = WeightedRandomSampler(w, 40)
        out = list(s)
        assert len(s) == len(ref) == 40 and len(out) == 40
        assert all(type(i) is int for i in out) and set(out) <= {1, 2, 4}
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        AliasSampler(weights, 10, replacement=False)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_samples"):
            AliasSampler(weights, bad)
    with pytest.raises(ValueError, match="NaN"):
        AliasSampler([1.0, float("nan")], 3)
    with pytest.raises(ValueError, match="1d"):
        AliasSampler([[1.0, 2.0]], 3)
    with pytest.raises(ValueError, match="batch_size"):
        AliasSampler(weights, 3, batch_size=0)


def test_sampler_dataloader_integration():
    data = TensorDataset(torch.arange(10))
    w = torch.zeros(10)
    w[[1, 4, 7]] = torch.tensor([1.0, 2.0, 3.0])
    loader = DataLoader(data, sampler=AliasSampler(w, 25, generator=_gen("cpu", 0)), batch_size=4)
    batches = [b[0] for b in loader]
    assert [len(b) for b in batches] == [4] * 6 + [1]
    assert set(torch.cat(batches).tolist()) <= {1, 4, 7}

    bs = AliasSampler(w, 25, batch_size=4, generator=_gen("cpu", 0))
    assert len(bs) == 7
    batches = [b[0] for b in DataLoader(data, batch_sampler=bs)]
    assert [len(b) for b in batches] == [4] * 6 + [1] and len(batches) == len(bs)
    bs_drop = AliasSampler(w, 25, batch_size=4, drop_last=True)
    assert len(bs_drop) == 6 and len(list(bs_drop)) == 6
    # Same seed, same draws, whether batched or not.
    flat = list(AliasSampler(w, 25, generator=_gen("cpu", 3)))
    batched = sum(list(AliasSampler(w, 25, batch_size=4, generator=_gen("cpu", 3))), [])
    assert flat == batched


@pytest.mark.parametrize("backend", [b for d, b in BACKENDS if d == "cpu"])
def test_sampler_update_weights(backend):
    n = 200
    g = torch.Generator().manual_seed(0)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    s = AliasSampler(w, 50_000, generator=_gen("cpu", 1), backend=backend)
    # Full refresh, same N: rebuilt in place.
    w2 = torch.rand(n, generator=g, dtype=torch.float64) ** 3
    w2[:10] = 0.0
    buf = s.table.threshold.data_ptr()
    s.update_weights(w2)
    if backend == "cpu":
        assert s.table.threshold.data_ptr() == buf
    counts = torch.bincount(torch.tensor(list(s)), minlength=n)
    assert counts[:10].sum() == 0
    assert _chi2_pvalue(counts, w2 / w2.sum()) > 1e-3
    # Subset refresh (what scoring workers send): zero some, revive others.
    idx = torch.tensor([0, 1, 2, 50, 51])
    vals = torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0], dtype=torch.float64)
    s.update_weights(vals, index=idx)
    w3 = w2.clone()
    w3[idx] = vals
    torch.testing.assert_close(s.weights, w3)
    counts = torch.bincount(torch.tensor(list(s)), minlength=n)
    assert counts[[50, 51]].sum() == 0 and (counts[[0, 1, 2]] > 0).all()
    assert _chi2_pvalue(counts, w3 / w3.sum()) > 1e-3
    _, iw = s.sample_with_weights(100)
    assert iw.dtype == torch.float32
    # Bad updates are refused before anything changes.
    with pytest.raises(ValueError, match="NaN"):
        s.update_weights(torch.tensor([float("nan")]), index=[3])
    with pytest.raises(ValueError, match="negative"):
        s.update_weights(-w3)
    torch.testing.assert_close(s.weights, w3)
    # New N: a new table.
    s.update_weights(torch.ones(7))
    assert set(s) <= set(range(7)) and len(s.table) == 7
    # All zero after subset updates: refused at the next draw.
    s.update_weights(torch.zeros(7), index=torch.arange(7))
    with pytest.raises(ValueError, match="all weights are zero"):
        list(s)


@pytest.mark.parametrize("backend", [b for d, b in BACKENDS if d == "cpu"])
def test_sampler_update_weights_any_dtype(backend):
    """A full update builds from the weights as given (no float64 copy first) and keeps a float64 copy
    of them; the caller's tensors are never written into."""
    n = 1000
    g = torch.Generator().manual_seed(3)
    mine = torch.rand(n, dtype=torch.float64, generator=g)
    keep = mine.clone()
    s = AliasSampler(mine, 200, generator=_gen("cpu", 0), backend=backend)
    w32 = torch.rand(n, generator=g)
    s.update_weights(w32)
    assert s.weights.dtype == torch.float64 and torch.equal(s.weights, w32.double())
    assert s.table._weights is s.weights
    _check_table(w32, s.table.threshold, s.table.alias, "update from float32")
    torch.testing.assert_close(s.table.probs, w32.double() / w32.double().sum(), rtol=1e-12, atol=0)
    s.update_weights(torch.arange(n) % 3)  # integer weights, as WeightedRandomSampler accepts
    assert s.weights.dtype == torch.float64 and all(i % 3 for i in s)
    s.update_weights(torch.zeros(2), index=[1, 2])
    s.sample_with_weights(10)
    assert torch.equal(mine, keep)


# ------------------------------------------------------------------------------------------------
# Custom ops: schemas, fake kernels
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", [d for d in DEVICES if _backend.has_kernel("_alias_build", d.upper())])
def test_opcheck(device):
    ops = torch.ops.isgd_kernels
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(97, generator=g) ** 2).to(device)
    w[3] = 0
    torch.library.opcheck(ops._alias_build, (w,))
    t, a, mean = ops._alias_build(w)
    torch.library.opcheck(ops._alias_build_into, (w, t.clone(), a.clone()))
    bits = torch.empty((64, 2), dtype=torch.int64, device=device).random_(-(2**63), None)
    torch.library.opcheck(ops._alias_sample, (t, a, bits))
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(ops._alias_sample_weighted, (t, a, w, mean, bits, dtype))
