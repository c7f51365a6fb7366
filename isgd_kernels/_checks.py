"""Argument checks and dtype rules shared by the public ops (one place for each message)."""
from __future__ import annotations

import torch

from isgd_kernels._backend import BACKENDS
from isgd_kernels.cost import METHODS


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, float32 for everything else (fp16/bf16/fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_pair(x, grad_out, name_x: str, name_g: str, op: str) -> None:
    """Both floating-point tensors on one device (dtypes may differ: see promote_pair)."""
    for name, t in ((name_x, x), (name_g, grad_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                             f"got {t.dtype}")
    if x.device != grad_out.device:
        raise ValueError(f"{op}: {name_x} is on {x.device} but {name_g} is on {grad_out.device}; "
                         "move both to the same device")


def check_backend_and_method(backend: str, method: str, op: str) -> None:
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")


def promote_pair(x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed input dtypes are promoted to the wider one, as torch's binary ops do."""
    if x.dtype == grad_out.dtype:
        return x, grad_out
    common = torch.promote_types(x.dtype, grad_out.dtype)
    return x.to(common), grad_out.to(common)
