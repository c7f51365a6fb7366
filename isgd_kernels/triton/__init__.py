"""Triton kernels. Importing the kernel modules requires Triton; isgd_kernels imports them lazily.

`supports` is importable without Triton (it answers False then)."""
from __future__ import annotations

# Triton versions whose compile of every launch configuration is checked (tests/test_triton_compile.py,
# scripts/triton_compat.sh): sm_80 and sm_90, fp16/bf16/fp32/fp64. 3.6 is what CUDA builds of
# torch 2.11 ship. Older Triton is not checked: the kernels are not offered there.
MIN_TRITON = (3, 6)

_METHODS = {
    "linear": ("outer", "ghost", "materialize"),
    "conv": ("outer", "ghost", "materialize"),  # conv's T == 1 ("outer") runs the ghost kernel
    "alias": ("build", "sample"),
}


def _installed_triton() -> tuple[int, int] | None:
    try:
        import triton
    except ImportError:
        return None
    parts = triton.__version__.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def supports(kernel_family: str, method: str, dtype) -> bool:
    """Whether the installed Triton compiles the Triton kernel of `kernel_family` ("linear", "conv",
    "alias") and `method` for inputs of `dtype` (a torch dtype; for "alias", the weights' dtype).

    A backend resolver should offer the Triton backend for a problem only when this is True (and a
    CUDA device is present). Since Triton 3.6 every (family, method, dtype) below compiles: fp64 runs
    without tl.dot before Triton 3.9 (see isgd_kernels.triton.linear_norms)."""
    import torch

    if method not in _METHODS.get(kernel_family, ()):
        return False
    version = _installed_triton()
    if version is None or version < MIN_TRITON:
        return False
    return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
