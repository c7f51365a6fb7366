"""Build isgd_kernels (+ the `issgd` trainer package under python/).

One extension, ``isgd_kernels._C``, from csrc/ (one folder per op family, plus common/):
  * the module init and every family's schema and CPU kernels (csrc/*.cpp, csrc/<family>/*.cpp but
    the CUDA bindings) are always built;
  * CUDA kernels (csrc/<family>/*.cu + their torch bindings csrc/<family>/*cuda_binding.cpp) are
    built when the installed torch has CUDA and nvcc is found. Set ISGD_FORCE_CPU=1 to skip them.

Target architectures come from ISGD_CUDA_ARCHS (default "80;90", i.e. A100 and H100/H200),
e.g. ISGD_CUDA_ARCHS="80;86;90" or "90a". Torch is needed at build time: install it first and
build with ``pip install --no-build-isolation``.
"""
import fnmatch
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "isgd_kernels needs PyTorch at build time. Install torch first (e.g. `pip install torch`), "
        "then build with `pip install --no-build-isolation .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch.library.custom_op and register_fake, which every op here uses, arrived in torch 2.4.
MIN_TORCH = (2, 4)
if torch.__version__ < MIN_TORCH:  # a TorchVersion: compares with tuples
    raise SystemExit(f"isgd_kernels needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}: "
                     "upgrade torch first, then build with `pip install --no-build-isolation .`")


def _sources(*patterns, exclude=None):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern)))
    return [f for f in found if not (exclude and fnmatch.fnmatch(os.path.basename(f), exclude))]


def cuda_archs():
    """The SASS targets of the build, e.g. ["80", "90"]: ISGD_CUDA_ARCHS split on ';' or ','.

    tests/test_cuda_sources.py reads this function out of this file (without running setup()) to
    check the kernels' resource usage for the same targets: keep it free of torch and setuptools.
    """
    archs = os.environ.get("ISGD_CUDA_ARCHS", "80;90")
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def _gencode_flags():
    archs = cuda_archs()
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX for the newest listed arch so later GPUs can JIT it.
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _extension():
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("ISGD_FORCE_CPU", "0") != "1"
    )
    cxx_flags = ["-O3"]  # the C++ standard is torch's choice (BuildExtension sets the one its headers need)
    link_flags = []
    # at::parallel_for is inlined into our kernels: without -fopenmp its OpenMP pragma is ignored and
    # every "parallel" CPU loop runs on one thread (the pytorch_scatter recipe).
    if "backend: OpenMP" in torch.__config__.parallel_info() and sys.platform != "darwin":
        cxx_flags += ["-fopenmp", "-DAT_PARALLEL_OPENMP"]
        link_flags += ["-fopenmp"]
    sources = _sources("*.cpp", "*/*.cpp", exclude="*cuda_binding.cpp")
    if not with_cuda:
        return CppExtension("isgd_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_flags)
    sources += _sources("*/*cuda_binding.cpp", "*/*.cu")
    nvcc_flags = ["-O3", "-lineinfo"] + _gencode_flags()
    return CUDAExtension(
        "isgd_kernels._C",
        sources,
        define_macros=[("ISGD_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    name="isgd_kernels",
    version="0.1.0",
    description="Per-example gradient norms, alias-table sampling and importance-sampled SGD for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["isgd_kernels", "isgd_kernels.*"]) + ["issgd"],
    package_dir={"issgd": "python/issgd"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # torch is deliberately not listed: pip would replace the user's (CUDA or CPU) build.
    install_requires=["numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "scikit-learn", "expecttest"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "pandas"],
        "demo": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["issgd=issgd.cli:main"]},
)
