// Input checks shared by the CPU and CUDA implementations of the Linear norm ops (schemas and shape
// contract in schema.cpp). Header-only so the CUDA binding can use it without linking order.
#pragma once

#include <ATen/ATen.h>

#include "../common/tensor_checks.h"

namespace isgd_kernels {

inline void check_linear_norm_inputs(const at::Tensor& x, const at::Tensor& g, const char* op) {
  TORCH_CHECK(x.dim() == 3 && g.dim() == 3, op, ": expected x (B, T, d_in) and grad_out (B, T, d_out), got x ",
              x.sizes(), " and grad_out ", g.sizes());
  TORCH_CHECK(x.size(0) == g.size(0) && x.size(1) == g.size(1), op,
              ": x and grad_out must agree on (B, T), got x ", x.sizes(), " and grad_out ", g.sizes());
  check_same_floating(x, g, op);
}

}  // namespace isgd_kernels
