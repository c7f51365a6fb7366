"""Ahead-of-time compilation of every Triton kernel launch the package's launchers can make (no GPU).

Run as a script (`python tests/triton_aot.py --json out.json`); tests/test_triton_compile.py runs it in
a subprocess with TRITON_INTERPRET unset (tests/conftest.py turns the interpreter on for the whole
pytest session, and with it @triton.jit yields interpreter objects that cannot be compiled).

Enumeration: the real launchers run on "meta" tensors (shapes and strides, no data) with each kernel
replaced by a recorder, over a grid of shapes that crosses every clamp of every tile rule
(the *_config rules of isgd_kernels/<family>/triton.py). So the launches are the launchers' own: their tile rule, their
argument lists, their constexprs. Each recorded launch goes through Triton's own argument binder
(the one JITFunction.run uses, for a GPUTarget instead of the active device), which yields Triton's
exact specialisation (ints equal to 1 become constants, 16-divisible ints and pointers get
tt.divisibility); launches with the same specialisation and options are one compile.

Each unique launch is compiled for sm_80 and sm_90 and checked: a cubin comes out; metadata.shared is
within the per-block shared-memory limit (opt-in maximum: 163 KiB on sm_80, 227 KiB on sm_90 --
CUDA programming guide, "Technical Specifications per Compute Capability"); and the cubin's resource
usage (cuobjdump --dump-resource-usage, the copy Triton ships) shows no local memory (LOCAL:0) and no
stack (STACK:0), i.e. ptxas spilled nothing. The PTX's own `.local` declarations are recorded too.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CAPS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (opt-in), bytes
DTYPES = ("float16", "bfloat16", "float32", "float64")
# Every power of two up to past the largest clamp of any tile rule (1024): each tile() bucket, both
# clamps. The reached set of configurations is checked against the rules in the test.
SIZES = tuple(2 ** k for k in range(12))

_KERNELS = {
    "linear_norms": ("_linear_sq_norms_outer_kernel", "_linear_sq_norms_ghost_kernel",
                     "_linear_sq_norms_materialize_kernel"),
    "conv_norms": ("_conv_sq_norms_ghost_kernel", "_conv_sq_norms_materialize_kernel"),
    "alias": ("_alias_split_kernel", "_alias_sweep_kernel", "_alias_sample_kernel"),
}


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, args, kwargs))
        return launch


def _cheap_key(name, args, kwargs):
    """A superset of what Triton specialises on; the binder then dedupes exactly."""
    def cls(a):
        if hasattr(a, "dtype") and hasattr(a, "data_ptr"):
            return ("t", str(a.dtype))
        if isinstance(a, bool):
            return ("b", a)
        if isinstance(a, int):
            return ("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
        return ("o", repr(a))
    return (name, tuple(cls(a) for a in args), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def _record(torch, launch_fns):
    """Run the launchers with every kernel recorded instead of launched; unique launches."""
    from isgd_kernels.alias import triton as alias
    from isgd_kernels.conv_norms import triton as conv_norms
    from isgd_kernels.linear_norms import triton as linear_norms
    modules = {"linear_norms": linear_norms, "conv_norms": conv_norms, "alias": alias}
    calls = []
    saved = {}
    for mod_name, names in _KERNELS.items():
        for n in names:
            saved[(mod_name, n)] = getattr(modules[mod_name], n)
            setattr(modules[mod_name], n, _Recorder(n, calls))
    try:
        for fn in launch_fns:
            fn(torch, linear_norms, conv_norms, alias)
    finally:
        for (mod_name, n), k in saved.items():
            setattr(modules[mod_name], n, k)
    unique = {}
    for name, args, kwargs in calls:
        unique.setdefault(_cheap_key(name, args, kwargs), (name, args, kwargs))
    jit = {n: saved[(m, n)] for (m, n) in saved}
    return [(name, jit[name], args, kwargs) for name, args, kwargs in unique.values()]


def _linear_launches(torch, L, C, A):
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        for bias in (False, True):
            for D, P in itertools.product(SIZES, SIZES):
                x1 = torch.empty(2, 1, D, dtype=dtype, device="meta")
                g1 = torch.empty(2, 1, P, dtype=dtype, device="meta")
                L.linear_sq_norms_outer_triton(x1, g1, bias)
                for T in SIZES:
                    x = torch.empty(2, T, D, dtype=dtype, device="meta")
                    g = torch.empty(2, T, P, dtype=dtype, device="meta")
                    L.linear_sq_norms_ghost_triton(x, g, bias)
                    L.linear_sq_norms_materialize_triton(x, g, bias)
            # Non-contiguous operands (strides not divisible by 16, no unit stride).
            x = torch.empty(2, 100, 3 * 37, dtype=dtype, device="meta")[:, :, ::3]
            g = torch.empty(2, 100, 2 * 45, dtype=dtype, device="meta")[:, :, ::2]
            L.linear_sq_norms_ghost_triton(x, g, bias)
            L.linear_sq_norms_materialize_triton(x, g, bias)
            L.linear_sq_norms_outer_triton(x[:, :1], g[:, :1], bias)


def _conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_call(torch, C, dtype, B, c_in, c_out, spatial, k, s, p, d, groups, bias, method):
    rank = len(spatial)
    out = [_conv_out(n, k, s, p, d) for n in spatial]
    x = torch.empty(B, c_in, *spatial, dtype=dtype, device="meta")
    g = torch.empty(B, c_out, *out, dtype=dtype, device="meta")
    C.conv_sq_norms_triton(x, g, [k] * rank, [s] * rank, [p, p] * rank, [d] * rank, groups, bias, method)


def _conv_launches(torch, L, C, A):
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        for bias, method in itertools.product((False, True), ("ghost", "materialize", "auto")):
            # Tile buckets: 1-D, kernel 1, one group: T = length, K = C_in, p = C_out ("auto" picks
            # one of the two explicit methods, so only the special shapes below run it).
            for T, K, PG in itertools.product(SIZES, SIZES, SIZES) if method != "auto" else ():
                _conv_call(torch, C, dtype, 2, K, PG, (T,), 1, 1, 0, 1, 1, bias, method)
            # Ranks, groups, strides, padding, dilation (other int specialisations).
            for spatial, k, s, p, d, groups, c_in, c_out in (
                ((50,), 3, 1, 1, 1, 1, 8, 16), ((50,), 5, 2, 2, 2, 4, 16, 32),
                ((9, 11), 3, 1, 1, 1, 1, 3, 16), ((16, 16), 3, 2, 1, 1, 2, 32, 64),
                ((15, 15), 3, 1, 2, 2, 32, 32, 32),  # depthwise
                ((5, 6, 7), 3, 1, 1, 1, 1, 4, 8), ((8, 8, 8), 2, 2, 0, 1, 4, 16, 16),
            ):
                _conv_call(torch, C, dtype, 2, c_in, c_out, spatial, k, s, p, d, groups, bias, method)


def _alias_launches(torch, L, C, A):
    for n in (1, 5, 64, 1000):
        w = torch.rand(n, dtype=torch.float64) + 0.1
        A.alias_build_triton(w)
        A.alias_build_triton(w, alias=torch.empty(n, dtype=torch.int64))  # the int64 index table
    thr = torch.rand(64, dtype=torch.float64)
    bits = torch.zeros(10, 2, dtype=torch.int64)
    for idx in (torch.int32, torch.int64):
        al = torch.zeros(64, dtype=idx)
        A.alias_sample_triton(thr, al, bits)
        for wdt in (torch.float32, torch.float64):
            for iw in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                mean = torch.tensor(1.0, dtype=torch.float64)
                A.alias_sample_weighted_triton(thr, al, torch.rand(64, dtype=wdt), mean,
                                               bits, dtype=iw)


def _aot_parts(jitfn, args, kwargs, cap):
    """Triton's own binding of a launch (as JITFunction.run does it) for a GPUTarget. Same code on
    Triton 3.6 -- 3.9: create_function_from_signature + _pack_args + ASTSource(fn, signature,
    constexprs, attrs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jitfn.signature, jitfn.params, backend)
    kwargs = dict(kwargs)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jitfn._pack_args(backend, kwargs, bound, spec, opts)
    return target, ASTSource(jitfn, signature, constexprs, attrs), options


def _spec_key(jitfn, args, kwargs):
    _, src, options = _aot_parts(jitfn, args, kwargs, CAPS[0])
    return repr((src.name, sorted(src.signature.items()), sorted(src.constants.items(), key=repr),
                 sorted(src.attrs.items(), key=repr), sorted(options.__dict__.items(), key=repr)))


def _describe(name, args, kwargs):
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if hasattr(a, "dtype")})
    consts = {k: (str(v) if not isinstance(v, (int, bool, str)) else v) for k, v in kwargs.items()}
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    return {"kernel": name, "dtypes": dtypes, "constexprs": consts, "int_args": ints}


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes):
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


_LAUNCHES = []


def _compile_one(job):
    import triton
    i, cap = job
    name, jitfn, args, kwargs = _LAUNCHES[i]
    rec = dict(_describe(name, args, kwargs), cap=cap)
    t0 = time.time()
    try:
        target, src, options = _aot_parts(jitfn, args, kwargs, cap)
        k = triton.compile(src, target=target, options=options.__dict__)
        rec.update(ok="cubin" in k.asm and len(k.asm["cubin"]) > 0, shared=int(k.metadata.shared),
                   num_warps=int(k.metadata.num_warps),
                   ptx_local=bool(re.search(r"^\s*\.local\b", k.asm.get("ptx", ""), re.M)),
                   usage=_resource_usage(k.asm["cubin"]))
    except Exception as e:  # noqa: BLE001 -- every failure is a result to report
        msg = str(e).strip() or type(e).__name__
        rec.update(ok=False, error=f"{type(e).__name__}: {msg[-2000:]}")
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def config_key(name, args, kwargs):
    """A launch's configuration: kernel, operand dtypes, compile-time constants and num_warps."""
    dtypes = tuple(sorted({str(a.dtype) for a in args if hasattr(a, "dtype")}))
    return (name, dtypes, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def _alignment(args):
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    return sum(a % 16 == 0 for a in ints) - sum(a == 1 for a in ints)


def _volume(kwargs):
    v = 1
    for k, x in kwargs.items():
        if k.startswith("BLOCK") or k == "CHUNK":
            v *= int(x)
    return v


def enumerate_launches():
    """Every launch the launchers make over the shape grid, one per distinct Triton specialisation."""
    import torch
    return _record(torch, [_linear_launches, _conv_launches, _alias_launches])


def select(launches, mode):
    """Which launches to compile.

    all:     one per distinct specialisation (Triton's binder decides; thousands, slow).
    configs: every configuration (config_key), as its most aligned launch (contiguous, 16-divisible
             sizes: the one the software pipeliner stages through shared memory the most).
    cover:   (default, CI) per kernel and dtype: the largest configuration, then each configuration
             that brings a constant value (a tile size, HAS_BIAS, num_warps, ...) not yet covered, then
             the smallest; each as its most aligned launch, plus the least aligned launch of the largest
             configuration (no 16-divisible sizes / unit dims specialised: the other code path).
    """
    if mode == "all":
        seen, out = set(), []
        for launch in launches:
            key = _spec_key(*launch[1:])
            if key not in seen:
                seen.add(key)
                out.append(launch)
        return out
    configs = {}
    for launch in launches:
        configs.setdefault(config_key(launch[0], launch[2], launch[3]), []).append(launch)
    best = {k: max(v, key=lambda L: _alignment(L[2])) for k, v in configs.items()}
    if mode == "configs":
        return list(best.values())
    assert mode == "cover", mode
    families = {}
    for key in configs:
        families.setdefault(key[:2], []).append(key)
    out = []
    for fam, keys in families.items():
        keys.sort(key=lambda k: (-_volume(best[k][3]), k))
        covered, chosen = set(), []
        for k in keys:
            pairs = set(k[2])
            if not pairs <= covered or k is keys[-1]:
                chosen.append(k)
                covered |= pairs
        for k in chosen:
            out.append(best[k])
        worst = min(configs[keys[0]], key=lambda L: _alignment(L[2]))
        if _spec_key(*worst[1:]) != _spec_key(*best[keys[0]][1:]):
            out.append(worst)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default=os.environ.get("ISGD_AOT_ONLY", ""),
                    help="substring of kernel names to keep (default: $ISGD_AOT_ONLY)")
    ap.add_argument("--mode", choices=("cover", "configs", "all"),
                    default=os.environ.get("ISGD_AOT_MODE", "cover"),
                    help="which launches to compile (see select())")
    ns = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET unset: the interpreter's kernels cannot be compiled")
    import triton
    t0 = time.time()
    launches = [launch for launch in enumerate_launches() if ns.only in launch[0]]
    _LAUNCHES[:] = select(launches, ns.mode)
    t_enum = time.time() - t0
    configs = sorted({repr(config_key(n, a, k)) for n, _, a, k in launches})
    jobs = [(i, cap) for i in range(len(_LAUNCHES)) for cap in CAPS]
    # Forked workers inherit the enumerated launches; each compile is independent.
    with multiprocessing.get_context("fork").Pool(max(1, ns.jobs)) as pool:
        results = pool.map(_compile_one, jobs, chunksize=1)
    report = {"triton": triton.__version__, "mode": ns.mode, "only": ns.only, "configs": configs,
              "launches": len(_LAUNCHES),
              "compiles": len(jobs),
              "enumerate_seconds": round(t_enum, 1), "seconds": round(time.time() - t0, 1),
              "shared_limit": SHARED_LIMIT, "resource_tool": _cuobjdump(), "results": results}
    with open(ns.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    bad = [r for r in results if not r.get("ok")]
    print(f"triton {triton.__version__}: {len(configs)} configurations, "
          f"{len(_LAUNCHES)} launches compiled ({ns.mode}), "
          f"{len(jobs)} compiles, {len(bad)} failed, "
          f"{report['seconds']}s")


if __name__ == "__main__":
    main()
