// CUDA implementations of the Linear per-example gradient-norm ops (schemas in schema.cpp).
// Checks the inputs, allocates outputs and scratch on the current stream, and calls the torch-free
// launchers of cuda.cu. Strides go to the kernels as they are: no .contiguous() copies.
// (_linear_sq_norms_materialize has no CUDA kernel yet: it is not registered for CUDA here.)
#ifdef ISGD_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "../common/cuda_binding.h"
#include "checks.h"
#include "cuda_launch.h"

namespace isgd_kernels {
namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& g, const char* op) {
  check_linear_norm_inputs(x, g, op);
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got x on ", x.device());
}

at::Tensor linear_sq_norms_outer_cuda(const at::Tensor& x, const at::Tensor& g, bool bias) {
  constexpr const char* op = "_linear_sq_norms_outer";
  check_inputs(x, g, op);
  TORCH_CHECK(x.size(1) == 1, op, ": needs T == 1, got x ", x.sizes());
  const cuda::DType dtype = launcher_dtype(x.scalar_type(), op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t B = x.size(0), d = x.size(2), p = g.size(2);
  auto out = at::empty({B}, x.options().dtype(acc_dtype(x)));
  if (B == 0) return out;
  const int64_t ws_bytes = cuda::linear_sq_norms_outer_workspace_bytes(dtype, B, d, p);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::linear_sq_norms_outer(dtype, x.const_data_ptr(), g.const_data_ptr(), out.mutable_data_ptr(),
                                           ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, B, d, p,
                                           x.stride(0), x.stride(2), g.stride(0), g.stride(2), bias, stream),
               op);
  return out;
}

at::Tensor linear_sq_norms_ghost_cuda(const at::Tensor& x, const at::Tensor& g, bool bias) {
  constexpr const char* op = "_linear_sq_norms_ghost";
  check_inputs(x, g, op);
  const cuda::DType dtype = launcher_dtype(x.scalar_type(), op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), p = g.size(2);
  const auto opts = x.options().dtype(acc_dtype(x));
  if (B == 0) return at::empty({0}, opts);
  if (T == 0) return at::zeros({B}, opts);
  // One partial per (example, upper-triangle tile pair): B * n(n+1)/2 with n = ceil(T / 64) for T > 32
  // (B * T^2 / 8192 accumulators), summed below in a fixed order: deterministic, no atomics.
  const int64_t n_partials = cuda::linear_sq_norms_ghost_num_partials(T);
  auto partial = at::empty({B, n_partials}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::linear_sq_norms_ghost_partials(dtype, x.const_data_ptr(), g.const_data_ptr(),
                                                    partial.mutable_data_ptr(), B, T, d, p, x.stride(0), x.stride(1),
                                                    x.stride(2), g.stride(0), g.stride(1), g.stride(2), bias, stream),
               op);
  return partial.sum(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CUDA, m) {
  m.impl("_linear_sq_norms_outer", &linear_sq_norms_outer_cuda);
  m.impl("_linear_sq_norms_ghost", &linear_sq_norms_ghost_cuda);
}

}  // namespace isgd_kernels

#endif  // ISGD_WITH_CUDA
