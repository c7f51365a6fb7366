// Helpers of the torch bindings of the CUDA kernels (csrc/<family>/cuda_binding.cpp): torch dtypes to
// the launchers' element types, and launch errors to exceptions. Compiled only with ISGD_WITH_CUDA.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "cuda/dtype.h"
#include "tensor_checks.h"

namespace isgd_kernels {

inline cuda::DType launcher_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float16, bfloat16, float32 or float64)");
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace isgd_kernels
