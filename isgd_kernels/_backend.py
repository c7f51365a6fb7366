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
    import triton  # noqa: F401

    TRITON_ERROR: Exception | None = None
except ImportError as exc:
    TRITON_ERROR = exc

BACKENDS = ("triton", "cuda", "cpu", "torch")
_REBUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` from the source tree"


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
