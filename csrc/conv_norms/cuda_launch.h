// Launchers of the CUDA kernels for the per-example gradient norms of a convolution (kernels in
// cuda.cu, torch binding in cuda_binding.cpp).
//
// Plain C++ on purpose: raw pointers, int64 sizes and strides (in elements), a cudaStream_t. No torch
// headers, so `nvcc -c cuda.cu` works without a CUDA build of torch.
//
// Shape contract (as the op schema in schema.cpp), every rank seen as 3-D: x (B, C_in, D, H, W),
// grad_out (B, C_out, OD, OH, OW), any non-negative strides, both of dtype `dtype`. Results are in the
// accumulation type: double for kDouble inputs, float otherwise.
// The launchers use the current CUDA device (the caller sets it) and return the launch error
// (cudaSuccess when nothing was launched because there was nothing to do).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda/dtype.h"

namespace isgd_kernels {
namespace cuda {

// A convolution of rank 1..3 as 3-D (missing leading dims: size 1, kernel 1, stride 1, padding 0).
struct ConvProblem {
  int64_t B, groups, cg, pg;  // batch, groups, input / output channels per group
  int64_t in[3], out[3];      // spatial sizes (D, H, W) of x and grad_out
  int64_t k[3], stride[3], pad[3], dil[3];  // pad: low side only (the high side shows up in `out`)
  int64_t sx[5], sg[5];       // strides of x and grad_out as (B, C, D, H, W)
  int64_t T, K;               // output positions; patch length cg * k[0] * k[1] * k[2]
};

enum class ConvMethod : int { kGhost = 0, kMaterialize = 1 };

// Partial sums per (example, group): the caller allocates B * groups * this many accumulators.
int64_t conv_sq_norms_num_partials(ConvMethod method, const ConvProblem& problem);

// partial: (B * groups, conv_sq_norms_num_partials(...)) accumulators, row-major; the squared norm of
// example b is the sum of rows b * groups ... b * groups + groups - 1 (the caller reduces them, e.g.
// with a deterministic torch sum). The bias term ||sum_t delta_t||^2 is included when `bias`.
cudaError_t conv_sq_norms_partials(DType dtype, ConvMethod method, const void* x, const void* grad_out,
                                   void* partial, const ConvProblem& problem, bool bias, cudaStream_t stream);

}  // namespace cuda
}  // namespace isgd_kernels
