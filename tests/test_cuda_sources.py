"""Compile every CUDA kernel file with nvcc and check its kernels' resources (no GPU, no CUDA torch).

The .cu files (csrc/<family>/cuda.cu) hold raw-pointer kernels and launchers only (torch bindings live
in csrc/<family>/cuda_binding.cpp), so `nvcc -c` can build them anywhere nvcc exists: the GPU code
paths cannot rot on CPU-only CI. Each file is compiled once, for every SASS target setup.py builds
(ISGD_CUDA_ARCHS, read from setup.cuda_archs), with `-Xptxas -v`; ptxas's per-kernel report must show

  * no local-memory spills (spill stores / loads 0, or at most the allowance of SPILL_ALLOWANCE),
  * at most 255 registers per thread,
  * at most 48 KiB of static shared memory per block (the static limit on every target).

The files compile in parallel (one nvcc per file, started together): the module costs about as long
as the slowest file.
"""
import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*/*.cu"))
NVCC = shutil.which("nvcc") or next((str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"
                                                      / "nvcc",) if p.exists()), None)

MAX_REGISTERS = 255                # per thread, sm_80 and sm_90
MAX_STATIC_SMEM = 48 * 1024        # static __shared__ per block; more needs dynamic shared memory + opt-in

# (family, kernel name) -> (spill store bytes, spill load bytes) tolerated per thread, on every target.
# conv_norms: ghost_kernel and materialize_kernel (implicit im2col, int64 index arithmetic per staged
# element) spill a few words on sm_80 / sm_90 with CUDA 13.0: at most 28 B stored and 48 B loaded per
# thread, through the L1-resident stack, against tiles of up to 16 KiB of shared memory per block.
# They did when this check was added; removing them wants a GPU to confirm it costs no occupancy or
# speed. The ceilings are tight: any growth fails.
SPILL_ALLOWANCE = {
    ("conv_norms", "ghost_kernel"): (32, 48),
    ("conv_norms", "materialize_kernel"): (32, 48),
}


def _setup_cuda_archs():
    """setup.cuda_archs() without running setup.py (which would call setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cuda_archs")
    namespace = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["cuda_archs"]()


ARCHS = _setup_cuda_archs()


def _nvcc_flags():
    """The flags the extension build passes to nvcc for these files (torch's defaults when torch is here)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:  # pragma: no cover - torch is a test dependency
        COMMON_NVCC_FLAGS = []
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return ["-c", "-std=c++17", "-O3", *COMMON_NVCC_FLAGS, *gencode, "-Xptxas", "-v"]


def _family(source):
    return source.parent.name


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Starts one nvcc per .cu file at once; returns {file: (cmd, returncode, stdout + stderr, object)}."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for source in CU_FILES:
        obj = out_dir / f"{_family(source)}.o"
        cmd = [NVCC, *_nvcc_flags(), str(source), "-o", str(obj)]
        procs[source] = (cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for source, (cmd, obj, proc) in procs.items():
        log, _ = proc.communicate()
        results[source] = (" ".join(cmd), proc.returncode, log, obj)
    return results


def _demangle(names):
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if cxxfilt is None or not names:
        return dict(zip(names, names))
    proc = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return dict(zip(names, lines)) if proc.returncode == 0 and len(lines) == len(names) else dict(zip(names, names))


def parse_ptxas_report(log):
    """ptxas -v output -> {(arch, kernel): {"registers", "spill_stores", "spill_loads", "smem"}}.

    The report of one entry function:
      ptxas info : Compiling entry function '_Z...' for 'sm_90'
      ptxas info : Function properties for _Z...
          0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
      ptxas info : Used 64 registers, used 1 barriers, 4416 bytes smem, 440 bytes cmem[0]
    """
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = (m.group(2), m.group(1))
            kernels[current] = {"registers": None, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current]["spill_stores"] = int(m.group(1))
            kernels[current]["spill_loads"] = int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(sm.group(1)) if sm else 0
            current = None
    return kernels


def _spill_allowance(family, mangled):
    """(stores, loads) allowed for a kernel: its name appears in the mangled name as <length><name>."""
    for (fam, kernel), allowed in SPILL_ALLOWANCE.items():
        if fam == family and f"{len(kernel)}{kernel}" in mangled:
            return allowed
    return 0, 0


def resource_violations(family, kernels):
    """Messages for the kernels of one family's report that break the limits above."""
    names = _demangle([name for _, name in kernels])
    problems = []
    for (arch, mangled), r in sorted(kernels.items()):
        name = names[mangled]
        stores_ok, loads_ok = _spill_allowance(family, mangled)
        if r["registers"] is None:
            problems.append(f"{arch} {name}: no register count in the ptxas report")
            continue
        if r["spill_stores"] > stores_ok or r["spill_loads"] > loads_ok:
            problems.append(f"{arch} {name}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                            f"(allowed {stores_ok} / {loads_ok})")
        if r["registers"] > MAX_REGISTERS:
            problems.append(f"{arch} {name}: {r['registers']} registers > {MAX_REGISTERS}")
        if r["smem"] > MAX_STATIC_SMEM:
            problems.append(f"{arch} {name}: {r['smem']} B static shared memory > {MAX_STATIC_SMEM}")
    return problems


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=[_family(p) for p in CU_FILES])
def test_nvcc_compiles(source, compiled):
    cmd, returncode, log, obj = compiled[source]
    assert returncode == 0, f"{cmd}\n{log}"
    assert obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=[_family(p) for p in CU_FILES])
def test_kernel_resources(source, compiled):
    cmd, returncode, log, _ = compiled[source]
    kernels = parse_ptxas_report(log)
    problems = resource_violations(_family(source), kernels)
    if returncode != 0:  # ptxas still reports what it got through (e.g. the kernel with too much smem)
        pytest.fail("\n".join([f"does not compile (see test_nvcc_compiles): {cmd}", *problems]))
    for arch in ARCHS:
        assert any(a == f"sm_{arch}" for a, _ in kernels), f"no ptxas report for sm_{arch}:\n{log[-3000:]}"
    assert not problems, f"{source.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_spill_allowance_names_existing_kernels():
    """An allowance for a kernel that no longer exists (renamed, removed) must go too."""
    for family, kernel in SPILL_ALLOWANCE:
        source = CSRC / family / "cuda.cu"
        assert source.exists() and re.search(rf"\b{kernel}\s*\(", source.read_text()), (family, kernel)


def test_ptxas_report_parser():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    16 bytes stack frame, 12 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 50000 bytes smem, 440 bytes cmem[0]
"""
    kernels = parse_ptxas_report(log)
    assert kernels == {("sm_90", "_Z1kv"): {"registers": 64, "spill_stores": 12, "spill_loads": 24, "smem": 50000}}
    problems = resource_violations("linear_norms", kernels)
    assert len(problems) == 2 and "spills 12 B" in problems[0] and "static shared" in problems[1]


def _included_headers(source, seen):
    for name in re.findall(r'#include\s+"([^"]+)"', source.read_text()):
        header = (source.parent / name).resolve()
        if header not in seen:
            seen.add(header)
            _included_headers(header, seen)
    return seen


def test_cuda_sources_are_torch_free():
    """Keeps the rule that makes the checks above possible: the .cu files and every header they
    include (launcher declarations, shared device helpers) use no torch headers."""
    assert {"linear_norms", "conv_norms", "alias"} <= {_family(p) for p in CU_FILES}
    files = set(CU_FILES)
    for source in CU_FILES:
        files |= _included_headers(source, set())
    files |= set(CSRC.glob("**/*.cuh"))
    for source in sorted(files):
        text = source.read_text()
        for header in ("torch/", "ATen/", "c10/"):
            assert f"#include <{header}" not in text, f"{source.relative_to(ROOT)} includes {header} headers"
