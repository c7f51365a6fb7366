"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90 (no GPU needed).

The compiling runs in a subprocess (tests/triton_aot.py) with TRITON_INTERPRET unset: conftest.py sets
the interpreter for the whole session, and interpreted kernels cannot be compiled. Runs against the
installed Triton; scripts/triton_compat.sh runs this file under Triton 3.6 as well. ISGD_AOT_MODE
(cover | configs | all) and ISGD_AOT_ONLY (kernel-name substring) widen or narrow the run (see
tests/triton_aot.py).
"""
import ast
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import triton_aot  # noqa: E402

# Bytes of stack frame per thread tolerated below the register ceiling (see test_no_register_spills).
MAX_STACK = 32


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout.strip())
    with open(out) as f:
        return json.load(f)


def test_report_is_for_the_installed_triton(report):
    import triton
    assert report["triton"] == triton.__version__
    assert report["results"], "nothing was compiled"


def _what(r):
    return f"{r['kernel']} {r['dtypes']} {r['constexprs']} ints={r['int_args']} sm_{r['cap']}"


def test_every_configuration_compiles(report):
    bad = [f"{_what(r)}: {r.get('error', 'no cubin')[-600:]}" for r in report["results"] if not r["ok"]]
    head = f"triton {report['triton']}: {len(bad)} of {len(report['results'])} failed:\n"
    assert not bad, head + "\n".join(bad[:20])


def test_shared_memory_within_the_target_limit(report):
    limit = {int(k): v for k, v in report["shared_limit"].items()}
    bad = [f"{_what(r)}: {r['shared']} B > {limit[r['cap']]} B" for r in report["results"]
           if r["ok"] and r["shared"] > limit[r["cap"]]]
    assert not bad, "\n".join(bad)


def test_no_register_spills(report):
    ok = [r for r in report["results"] if r["ok"]]
    assert ok
    if report["resource_tool"] is None:
        pytest.skip("no cuobjdump (Triton ships one in triton/backends/nvidia/bin)")
    # cuobjdump reads the cubin's own resource attributes. Triton kernels make no calls and declare no
    # local arrays (LOCAL:0, no `.local` in the PTX), so a stack frame holds spilled registers only
    # (checked against `ptxas -v`: STACK:16 <-> "12 bytes spill stores", and STL/LDL in the SASS).
    # ptxas sometimes parks a few words on the stack below the register ceiling (8-24 bytes at 32-128
    # registers, a choice it makes for occupancy); that is tolerated. At the ceiling (255 registers)
    # the allocator ran out: any stack there is a pressure spill, and so is anything over MAX_STACK.
    def spills(u):
        stack = u.get("STACK", 1 << 30)
        return u.get("LOCAL", 1) > 0 or stack > MAX_STACK or (stack > 0 and u.get("REG", 255) >= 255)

    bad = [f"{_what(r)}: {r['usage']}" for r in ok if not r["usage"] or spills(r["usage"]) or r["ptx_local"]]
    assert not bad, "local memory / stack (spills):\n" + "\n".join(bad)


def test_compiled_set_covers_every_configuration_of_the_rules(report):
    """The launches come from the launchers; check they reach every configuration the tile rules can
    return over the shape grid (so the grid crosses every clamp), and that each compiled one is
    among them."""
    from isgd_kernels.conv_norms import triton as C
    from isgd_kernels.linear_norms import triton as L

    rule_keys = lambda k: k.startswith("BLOCK") or k in ("num_warps", "USE_DOT")  # noqa: E731
    reached = {}
    for cfg in report["configs"]:
        name, _, items = ast.literal_eval(cfg)
        reached.setdefault(name, set()).add(tuple((k, v) for k, v in items if rule_keys(k)))
    expected = {}
    S = triton_aot.SIZES
    for dt in triton_aot.DTYPES:
        dtype = getattr(torch, dt)
        for D, P in itertools.product(S, S):
            rules = [("_linear_sq_norms_outer_kernel", L.outer_config(D, P, dtype))]
            for T in S:
                rules += [("_linear_sq_norms_ghost_kernel", L.ghost_config(T, D, P, dtype)),
                          ("_linear_sq_norms_materialize_kernel", L.materialize_config(T, D, P, dtype)),
                          ("_conv_sq_norms_ghost_kernel", C.conv_ghost_config(T, D, P, dtype)),
                          ("_conv_sq_norms_materialize_kernel", C.conv_materialize_config(T, D, P, dtype))]
            for name, cfg in rules:
                expected.setdefault(name, set()).add(tuple(sorted((k, repr(v)) for k, v in cfg.items())))
    for name, cfgs in expected.items():
        if report["only"] not in name:  # ISGD_AOT_ONLY narrowed the run
            continue
        assert cfgs == reached.get(name), f"{name}: rule-only {cfgs - reached.get(name, set())}, " \
                                          f"launch-only {reached.get(name, set()) - cfgs}"
    # The grid runs from below every lower clamp (16, or 1 for BLOCK_B) to past every upper one (1024).
    assert min(S) == 1 and max(S) > 1024
    compiled = {}
    for r in report["results"]:
        compiled.setdefault(r["kernel"], set()).add(tuple(sorted(r["constexprs"].items())))
    for name in expected:
        assert name in compiled or report["only"] not in name, f"{name} never compiled"
