// Launchers of the CUDA kernels of the alias-table sampler (kernels in cuda.cu, torch binding in
// cuda_binding.cpp, numerical contract in isgd_kernels/reference_sampler.py).
//
// Plain C++ on purpose: raw pointers, int64 sizes, a cudaStream_t. No torch headers, so
// `nvcc -c cuda.cu` works without a CUDA build of torch. The launchers use the current CUDA
// device (the caller sets it) and return the launch error (cudaSuccess when there was nothing to do).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda/dtype.h"

namespace isgd_kernels {
namespace cuda {

// Items of the merged light/heavy sequence swept by one thread of alias_sweep.
constexpr int64_t kAliasChunk = 32;

// int64 elements of scratch alias_sweep needs (the co-ranks of the chunk boundaries).
int64_t alias_sweep_workspace_elems(int64_t n);

// PSA split + sweep. Inputs (device): s (n,) scaled weights (mean 1); light (A,) and heavy (B,)
// int64 item indices in increasing order, A + B = n, B >= 1; kl (A + 1,) exclusive prefix sums of
// the lights' deficits 1 - s (kl[A] = total), kh (B,) inclusive prefix sums of the heavies'
// excesses s - 1, both non-decreasing. fallback: an index with positive weight (alias of a light
// left without a heavy by rounding). Outputs: threshold (n,) float64, alias (n,) int32 (alias64 =
// false) or int64. workspace: alias_sweep_workspace_elems(n) int64.
cudaError_t alias_sweep(const double* s, const int64_t* light, const int64_t* heavy, const double* kl,
                        const double* kh, int64_t n, int64_t A, int64_t B, int64_t fallback, int64_t* workspace,
                        double* threshold, void* alias, bool alias64, cudaStream_t stream);

// Draws: bits (draws, 2) int64 random words (row word, coin word) -> out (draws,) int64 indices.
cudaError_t alias_sample(const double* threshold, const void* alias, bool alias64, int64_t n, const int64_t* bits,
                         int64_t draws, int64_t* out, cudaStream_t stream);

// Draws plus importance weights iw[k] = mean[0] / weights[out[k]] (float32, or float64 if iw64);
// wtype: the dtype of weights.
cudaError_t alias_sample_weighted(const double* threshold, const void* alias, bool alias64, int64_t n,
                                  const void* weights, DType wtype, const double* mean,
                                  const int64_t* bits, int64_t draws, int64_t* out, void* iw, bool iw64,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace isgd_kernels
