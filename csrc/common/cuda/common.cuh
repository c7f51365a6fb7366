// Device helpers shared by the CUDA kernels (csrc/<family>/cuda.cu): block size, accumulation type,
// conversions, warp / block sums. Torch-free like the .cu files that include it, so `nvcc -c` checks
// them anywhere.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace isgd_kernels {
namespace cuda {

constexpr int kThreads = 256;              // every kernel uses 256-thread blocks
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit; larger problems launch in pieces
constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: float for fp16 / bf16 / fp32 inputs, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Host side: f(ElementOf<T>{}) with T the element type of dtype (__half, __nv_bfloat16, float,
// double); what f returns, or cudaErrorInvalidValue for an unknown dtype.
template <typename T>
struct ElementOf {
  using type = T;
};
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf: return f(ElementOf<__half>{});
    case DType::kBFloat16: return f(ElementOf<__nv_bfloat16>{});
    case DType::kFloat: return f(ElementOf<float>{});
    case DType::kDouble: return f(ElementOf<double>{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Reductions. All threads of the warp (block) must call them: no early returns before.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over a kThreads block; the result is valid in thread 0.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc part[kThreads / 32];
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < kThreads / 32 ? part[lane] : Acc(0));
  return v;
}

}  // namespace cuda
}  // namespace isgd_kernels
