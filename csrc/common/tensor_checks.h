// Torch helpers shared by the CPU and CUDA implementations of every op family.
#pragma once

#include <ATen/ATen.h>

namespace isgd_kernels {

// dtype of results and accumulators: float64 for float64 inputs, float32 otherwise (the same rule as
// isgd_kernels.reference.accumulation_dtype on the Python side).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_dtype(const at::Tensor& x) { return acc_dtype(x.scalar_type()); }

// x and grad_out of a norm op: one floating dtype, one device.
inline void check_same_floating(const at::Tensor& x, const at::Tensor& g, const char* op) {
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), op, ": x and grad_out must have the same dtype, got ",
              x.scalar_type(), " and ", g.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected a floating dtype, got ", x.scalar_type());
  TORCH_CHECK(x.device() == g.device(), op, ": x and grad_out must be on the same device, got x on ", x.device(),
              " and grad_out on ", g.device());
}

}  // namespace isgd_kernels
