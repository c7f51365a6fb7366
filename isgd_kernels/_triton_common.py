"""What every Triton launcher of the package shares: dtype-derived constants, tile sizes, the tile product.

Imported by the kernel modules only (it imports Triton); the backend resolver's Triton version gate is
in isgd_kernels._backend, which must work without Triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from isgd_kernels._backend import installed_triton
from isgd_kernels._checks import accumulation_dtype


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_operands_to_fp32(dtype: torch.dtype) -> bool:
    # The interpreter has no bfloat16 arithmetic (numpy): tl.dot on bf16 tiles returns garbage there.
    # Upcasting the tiles is exact, so interpreter runs still test the kernel's indexing and masking.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp64_dot_supported() -> bool:
    """Whether the kernels use tl.dot on float64 tiles (sm_80+): from Triton 3.9, whose every fp64
    configuration the AOT test compiles without spills. 3.6 rejects fp64 tl.dot; 3.8 accepts it but
    its fp64 dot configurations were not checked, so it keeps the broadcast path (also checked)."""
    return installed_triton() >= (3, 9)


def use_dot(dtype: torch.dtype) -> bool:
    return dtype != torch.float64 or fp64_dot_supported()


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 Gram entries feed a sum of products that can cancel; plain tf32 (~1e-3 relative error)
    # is too coarse for DP-style clipping, three-pass tf32 is near-fp32 accurate on tensor cores.
    # (Ignored for fp16/bf16/fp64 operands and by the interpreter.)
    return "tf32x3" if dtype == torch.float32 else "ieee"


@triton.jit
def mm(a, b, acc, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b. Without tl.dot (fp64 before Triton 3.9): a broadcast multiply-sum over the middle
    axis of an (M, K, N) tile -- not the innermost axis, so no thread-locality rewrite applies."""
    if USE_DOT:
        out = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
    else:
        out = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


def tile(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def dtype_constants(dtype: torch.dtype) -> dict:
    """The dtype-derived compile-time constants every norm kernel takes besides HAS_BIAS and the tiles."""
    return dict(ACC_DTYPE=tl_acc_dtype(dtype), DOT_PRECISION=dot_precision(dtype),
                DOT_FP32=dot_operands_to_fp32(dtype))


def partial_sums(kernel, x: torch.Tensor, grad_out: torch.Tensor, middle: tuple, rows: int, num_tiles: int,
                 **constexprs) -> torch.Tensor:
    """Runs ``kernel(x, grad_out, partial, *middle, num_tiles, **constexprs)`` on a (rows, num_tiles) grid,
    each program writing one partial sum, and returns their sum per row: (rows,) in the accumulation
    dtype. Reduced by torch, so deterministic, unlike atomics."""
    partial = torch.empty(rows, num_tiles, device=x.device, dtype=accumulation_dtype(x.dtype))
    kernel[(rows, num_tiles)](x, grad_out, partial, *middle, num_tiles, **constexprs)
    return partial.sum(1)
