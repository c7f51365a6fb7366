"""The compiled extension, the availability of each backend, and dispatch ("auto" resolution).

Importing isgd_kernels never fails because a backend is missing; asking for a missing backend
raises an error that says how to get it. Every op family resolves its backend here and registers
the fake (meta) kernels of its compiled ops through `register_extension_fake`.
"""
from __future__ import annotations

import importlib
import os

import torch

try:
    # Loading the extension registers its C++/CUDA ops with the dispatcher. By name: it is a compiled
    # module, not part of the Python import graph (which the import contracts check).
    _C = importlib.import_module("isgd_kernels._C")

    EXTENSION_ERROR: Exception | None = None
except ImportError as exc:  # built without the extension, or a torch ABI mismatch
    _C = None
    EXTENSION_ERROR = exc

try:
    import triton

    TRITON_ERROR: Exception | None = None
except ImportError as exc:
    TRITON_ERROR = exc

BACKENDS = ("triton", "cuda", "cpu", "torch")
# The oldest Triton whose every kernel configuration is compile-checked (tests/test_triton_compile.py,
# scripts/triton_compat.sh: sm_80 and sm_90, fp16/bf16/fp32/fp64). 3.6 is what CUDA builds of torch 2.11
# ship. "auto" never picks the Triton backend below it.
MIN_TRITON = (3, 6)
_TRITON_METHODS = {
    "linear": ("outer", "ghost", "materialize"),
    "conv": ("outer", "ghost", "materialize"),  # conv's T == 1 ("outer") runs the ghost kernel
    "alias": ("build", "sample"),
}
_REBUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` from the source tree"


def installed_triton() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, None without one."""
    if TRITON_ERROR is not None:
        return None
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def triton_supports(kernel_family: str, method: str, dtype: torch.dtype) -> bool:
    """Whether the installed Triton compiles the Triton kernel of `kernel_family` ("linear", "conv", "alias")
    and `method` for inputs of `dtype`: every floating dtype from MIN_TRITON on (fp64 without tl.dot before
    Triton 3.9, see _triton_common.fp64_dot_supported)."""
    if method not in _TRITON_METHODS.get(kernel_family, ()):
        return False
    version = installed_triton()
    return version is not None and version >= MIN_TRITON and dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled extension registered `isgd_kernels::<op>` for `dispatch_key`."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"isgd_kernels::{op}", dispatch_key)
    except RuntimeError:  # the op has no schema at all: a stale build that predates it
        return False


def backend_available(backend: str, device: torch.device, op: str) -> bool:
    return backend_unavailable_reason(backend, device, op) is None


def backend_unavailable_reason(backend: str, device: torch.device, op: str) -> str | None:
    """None if `backend` can run `op` on `device`, else a message that says how to get it."""
    if backend == "torch":
        return None
    if backend == "triton":
        if TRITON_ERROR is not None:
            return f"Triton is not installed ({TRITON_ERROR}); `pip install triton` (it ships with CUDA builds of torch)"
        version = installed_triton()
        if version is None or version < MIN_TRITON:
            return (f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest version "
                    "whose kernels are compile-checked here; upgrade triton, or use backend='cuda' or 'torch'")
        if device.type != "cuda" and not triton_interpreted():
            return (f"Triton kernels need a CUDA tensor, got one on {device}; use backend='cpu' or 'torch', "
                    "or set TRITON_INTERPRET=1 before importing isgd_kernels to run them in the (slow) interpreter")
        return None
    if backend in ("cpu", "cuda"):
        if _C is None:
            return f"the compiled extension isgd_kernels._C failed to load ({EXTENSION_ERROR}); {_REBUILD_HINT}"
        if device.type != backend:
            return f"backend='{backend}' needs {backend.upper()} tensors, got tensors on {device}"
        key = "CPU" if backend == "cpu" else "CUDA"
        if not has_kernel(op, key):
            if backend == "cuda":
                return (f"isgd_kernels._C was built without a CUDA kernel for {op}; build it where torch has CUDA "
                        f"and nvcc is on PATH (or CUDA_HOME is set): {_REBUILD_HINT}")
            return f"isgd_kernels._C has no CPU kernel for {op}; {_REBUILD_HINT}"
        return None
    return f"unknown backend '{backend}'; choose one of {('auto',) + BACKENDS}"


# Preference order of "auto" per device type (first available wins). On CPU the C++ kernels beat
# the reference: one fused pass for T = 1, chunked batched GEMMs (bounded memory) for T > 1.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


_RESOLVED: dict[tuple, str] = {}


def resolve_backend(backend: str, device: torch.device, ops: tuple[str, ...],
                    order: dict[str, tuple[str, ...]] = AUTO_ORDER) -> str:
    """Turn "auto" into the first backend of `order[device.type]` that can run every op in `ops`;
    check that an explicit backend can, raising an error that says how to get it otherwise.
    Memoized: availability does not change within a process, and the scorer asks once per layer."""
    candidates = order.get(device.type, ("torch",))
    key = (backend, device.type, ops, candidates, triton_interpreted())
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve_backend(backend, device, ops, candidates)
    return resolved


def _resolve_backend(backend: str, device: torch.device, ops: tuple[str, ...], candidates: tuple[str, ...]) -> str:
    if backend == "auto":
        for candidate in candidates:
            if all(backend_available(candidate, device, op) for op in ops):
                return candidate
        return "torch"
    for op in ops:
        reason = backend_unavailable_reason(backend, device, op)
        if reason is not None:
            raise RuntimeError(f"isgd_kernels: backend '{backend}' is unavailable: {reason}")
    return backend


def register_extension_fake(op: str):
    """Decorator: make `fake` the fake (meta) kernel of the compiled op ``isgd_kernels::<op>``, so the op
    traces under torch.compile / FakeTensorMode. A build without the op (no extension, or a stale one
    that predates it) registers nothing. Fakes check what shapes can be checked with ``torch._check``,
    so a traced graph fails at the call that is wrong, not inside a kernel."""
    def decorate(fake):
        if _C is not None and hasattr(torch.ops.isgd_kernels, op):
            torch.library.register_fake(f"isgd_kernels::{op}")(fake)
        return fake

    return decorate
