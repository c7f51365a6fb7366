"""Compile-check every CUDA kernel file with nvcc (no GPU and no CUDA build of torch needed).

The .cu files hold raw-pointer kernels and launchers only (torch bindings live in .cpp files), so
`nvcc -c` can check them anywhere nvcc exists: the GPU code paths cannot rot on CPU-only CI.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# Headers the .cu files include (launcher declarations, shared device helpers): torch-free too.
CUDA_HEADERS = sorted((ROOT / "csrc" / "cuda").glob("*.h")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
NVCC = shutil.which("nvcc") or next((str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"
                                                      / "nvcc",) if p.exists()), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(source, tmp_path):
    archs = os.environ.get("ISGD_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *gencode, str(source), "-o", str(tmp_path / "kernel.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_cuda_sources_are_torch_free():
    """Keeps the rule that makes the check above possible."""
    assert {"linear_norms_cuda.cu", "conv_norms_cuda.cu"} <= {p.name for p in CU_FILES}
    for source in CU_FILES + CUDA_HEADERS:
        text = source.read_text()
        for header in ("torch/", "ATen/", "c10/"):
            assert f"#include <{header}" not in text, f"{source.name} includes {header} headers"
