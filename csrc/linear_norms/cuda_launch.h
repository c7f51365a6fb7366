// Launchers of the CUDA kernels for the Linear per-example gradient norms (kernels in cuda.cu, torch
// binding in cuda_binding.cpp).
//
// Plain C++ on purpose: raw pointers, int64 sizes and strides (in elements), a cudaStream_t.
// No torch headers, so `nvcc -c cuda.cu` works without a CUDA build of torch.
//
// Shape contract (as the op schemas in schema.cpp): x (B, T, d_in), grad_out (B, T, d_out),
// any non-negative strides, both of dtype `dtype`. Results and scratch are in the accumulation
// type: double for kDouble inputs, float otherwise.
// The launchers use the current CUDA device (the caller sets it) and return the launch error
// (cudaSuccess when nothing was launched because there was nothing to do).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda/dtype.h"

namespace isgd_kernels {
namespace cuda {

// ---- outer (T == 1): out[b] = ||x[b]||^2 ||g[b]||^2 (+ ||g[b]||^2 if bias) ------------------------

// Bytes of scratch linear_sq_norms_outer needs for these sizes on the current device (0 when the
// rows are spread over enough blocks already; otherwise small: B x splits x 2 accumulators).
int64_t linear_sq_norms_outer_workspace_bytes(DType dtype, int64_t B, int64_t d_in, int64_t d_out);

// x row b starts at x + b*stride_xb, element j at + j*stride_xd (same for grad_out).
// out: B accumulators. workspace: linear_sq_norms_outer_workspace_bytes(...) bytes, 16-byte aligned
// (may be null when that is 0).
cudaError_t linear_sq_norms_outer(DType dtype, const void* x, const void* grad_out, void* out, void* workspace,
                                  int64_t B, int64_t d_in, int64_t d_out, int64_t stride_xb, int64_t stride_xd,
                                  int64_t stride_gb, int64_t stride_gd, bool bias, cudaStream_t stream);

// ---- ghost (any T): sum_{t,s} (a_t . a_s)(delta_t . delta_s) (+ sum_{t,s} delta_t . delta_s) -------

// Partial sums per example: one per (row tile, column tile >= row tile) of the T x T Gram matrices.
int64_t linear_sq_norms_ghost_num_partials(int64_t T);

// partial: B x linear_sq_norms_ghost_num_partials(T) accumulators, row-major; out[b] is the sum of
// row b (the caller reduces it, e.g. with a deterministic torch sum).
cudaError_t linear_sq_norms_ghost_partials(DType dtype, const void* x, const void* grad_out, void* partial,
                                           int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                           int64_t stride_xb, int64_t stride_xt, int64_t stride_xd,
                                           int64_t stride_gb, int64_t stride_gt, int64_t stride_gd, bool bias,
                                           cudaStream_t stream);

}  // namespace cuda
}  // namespace isgd_kernels
