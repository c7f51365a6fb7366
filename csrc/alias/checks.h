// Input checks of the alias-table ops shared by the CPU and CUDA implementations (schemas in
// schema.cpp), and the table conventions both builds follow (numerical contract in
// isgd_kernels/reference_sampler.py). Header-only, like the norm families' checks.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace isgd_kernels {
namespace alias_table {

// Scaling (reference_sampler.alias_scale): a largest weight below kTinyMax would overflow 1/m, so
// the weights are pre-scaled by kPrescale first.
constexpr double kTinyMax = 0x1p-960;
constexpr double kPrescale = 0x1p600;

// dtype of a fresh alias buffer: int32 while it can index the table.
inline at::ScalarType alias_dtype(int64_t n) { return n < (int64_t(1) << 31) ? at::kInt : at::kLong; }

// weights of a build: a non-empty 1-D floating tensor (ValueError otherwise) on `device`.
inline void check_weights_meta(const at::Tensor& w, at::DeviceType device) {
  TORCH_CHECK_VALUE(w.dim() == 1, "weights must be 1-D, got a tensor of shape ", w.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "weights must have a floating dtype, got ",
                    w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() > 0, "weights is empty: need at least one category");
  TORCH_CHECK(w.device().type() == device, "_alias_build (", c10::DeviceTypeName(device), "): weights must be a ",
              c10::DeviceTypeName(device), " tensor, got ", w.device());
}

// The ValueError for weights[i] = v, the first weight that is negative, NaN or infinite.
inline void throw_bad_weight(int64_t i, double v) {
  const char* kind = std::isnan(v) ? "NaN" : (std::isinf(v) ? "infinite" : "negative");
  TORCH_CHECK_VALUE(false, "weights[", i, "] is ", kind, " (", v, "); weights must be finite and non-negative");
}

inline void check_some_positive(bool any_positive) {
  TORCH_CHECK_VALUE(any_positive, "all weights are zero: there is nothing to sample");
}

// Buffers of _alias_build_into for (N,) weights: on the weights' device, threshold (N,) float64, alias
// (N,) int32 (N < 2^31) or int64, both contiguous.
inline void check_build_buffers(const at::Tensor& weights, const at::Tensor& threshold, const at::Tensor& alias) {
  const int64_t n = weights.numel();
  TORCH_CHECK(threshold.device() == weights.device() && alias.device() == weights.device(),
              "_alias_build_into: table buffers must be on the weights' device (", weights.device(), "), got ",
              threshold.device(), " and ", alias.device());
  TORCH_CHECK(threshold.scalar_type() == at::kDouble && threshold.dim() == 1 && threshold.numel() == n &&
                  threshold.is_contiguous(),
              "_alias_build_into: threshold must be a contiguous float64 tensor of shape (", n, ")");
  TORCH_CHECK((alias.scalar_type() == at::kInt || alias.scalar_type() == at::kLong) && alias.dim() == 1 &&
                  alias.numel() == n && alias.is_contiguous(),
              "_alias_build_into: alias must be a contiguous int32/int64 tensor of shape (", n, ")");
  TORCH_CHECK(alias.scalar_type() == at::kLong || n < (int64_t(1) << 31),
              "_alias_build_into: N >= 2^31 needs an int64 alias buffer");
}

// A table (threshold, alias) and the random words of a draw, all on one `device`.
inline void check_table(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits, const char* op,
                        at::DeviceType device) {
  TORCH_CHECK(threshold.device().type() == device && alias.device().type() == device && bits.device().type() == device,
              op, ": expected ", c10::DeviceTypeName(device), " tensors");
  TORCH_CHECK(threshold.device() == alias.device() && threshold.device() == bits.device(), op,
              ": table and bits must be on the same device");
  TORCH_CHECK(threshold.scalar_type() == at::kDouble && threshold.dim() == 1 && threshold.is_contiguous() &&
                  threshold.numel() > 0,
              op, ": threshold must be a non-empty contiguous float64 vector");
  TORCH_CHECK((alias.scalar_type() == at::kInt || alias.scalar_type() == at::kLong) && alias.dim() == 1 &&
                  alias.is_contiguous() && alias.numel() == threshold.numel(),
              op, ": alias must be a contiguous int32/int64 vector as long as threshold");
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.dim() == 2 && bits.size(1) == 2 && bits.is_contiguous(), op,
              ": bits must be a contiguous int64 tensor of shape (n, 2), got ", bits.sizes());
}

// The extra arguments of _alias_sample_weighted (after check_table): the table's (N,) floating weights
// and its 0-d mean on the table's device, and a float32 / float64 result dtype.
inline void check_weighted_args(const at::Tensor& threshold, const at::Tensor& weights, const at::Tensor& mean,
                                at::ScalarType dtype) {
  TORCH_CHECK(weights.device() == threshold.device() && weights.dim() == 1 && weights.numel() == threshold.numel() &&
                  at::isFloatingType(weights.scalar_type()),
              "_alias_sample_weighted: weights must be the table's (N,) floating weights, on its device");
  TORCH_CHECK(mean.numel() == 1 && mean.device() == threshold.device(),
              "_alias_sample_weighted: mean must be a scalar tensor on the table's device");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "_alias_sample_weighted: dtype must be float32 or float64");
}

}  // namespace alias_table
}  // namespace isgd_kernels
