// CUDA implementations of the alias-table ops (schemas in csrc/alias.cpp). The build validates the
// weights and computes the scaled weights, light/heavy lists and prefix sums with ATen (the same
// formulas as isgd_kernels/reference_sampler.py; the host syncs here are for validation errors and
// list sizes, and only in the build), then calls the torch-free launchers of alias_cuda.cu for the
// PSA split + sweep. The draws are single kernels on the current stream, without host sync.
#ifdef ISGD_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cuda_launch.h"

namespace isgd_kernels {
namespace {

constexpr double kTinyMax = 0x1p-960;
constexpr double kPrescale = 0x1p600;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::ScalarType alias_dtype(int64_t n) { return n < (int64_t(1) << 31) ? at::kInt : at::kLong; }

void validate(const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 1, "weights must be 1-D, got a tensor of shape ", w.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "weights must have a floating dtype, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() > 0, "weights is empty: need at least one category");
  TORCH_CHECK(w.is_cuda(), "_alias_build (CUDA): weights must be a CUDA tensor, got ", w.device());
  const at::Tensor ok = at::logical_and(w.ge(0), w.ne(std::numeric_limits<double>::infinity()));
  if (!ok.all().item<bool>()) {
    const int64_t i = at::logical_not(ok).to(at::kByte).argmax().item<int64_t>();
    const double v = w[i].item<double>();
    const char* kind = std::isnan(v) ? "NaN" : (std::isinf(v) ? "infinite" : "negative");
    TORCH_CHECK_VALUE(false, "weights[", i, "] is ", kind, " (", v, "); weights must be finite and non-negative");
  }
  TORCH_CHECK_VALUE(w.gt(0).any().item<bool>(), "all weights are zero: there is nothing to sample");
}

at::Tensor alias_build_into_cuda(const at::Tensor& weights, at::Tensor& threshold, at::Tensor& alias) {
  validate(weights);
  const c10::cuda::CUDAGuard guard(weights.device());
  const int64_t n = weights.numel();
  TORCH_CHECK(threshold.is_cuda() && threshold.scalar_type() == at::kDouble && threshold.dim() == 1 &&
                  threshold.numel() == n && threshold.is_contiguous(),
              "_alias_build_into: threshold must be a contiguous float64 CUDA tensor of shape (", n, ")");
  TORCH_CHECK(alias.is_cuda() && (alias.scalar_type() == at::kInt || alias.scalar_type() == at::kLong) &&
                  alias.dim() == 1 && alias.numel() == n && alias.is_contiguous(),
              "_alias_build_into: alias must be a contiguous int32/int64 CUDA tensor of shape (", n, ")");
  TORCH_CHECK(alias.scalar_type() == at::kLong || n < (int64_t(1) << 31),
              "_alias_build_into: N >= 2^31 needs an int64 alias buffer");

  // Scaling: exactly reference_sampler.alias_scale.
  const at::Tensor w64 = weights.to(at::kDouble).contiguous();
  const double m = w64.max().item<double>();
  const double pre = m < kTinyMax ? kPrescale : 1.0;
  const double rinv = 1.0 / (m * pre);
  const at::Tensor is_max = w64.eq(m);
  const at::Tensor ws = at::where(is_max, at::ones_like(w64), w64.mul(pre).mul(rinv));
  const double cs = std::max(1.0, static_cast<double>(n) / ws.sum().item<double>());
  const at::Tensor s = ws.mul(cs);
  const int64_t argmax = is_max.to(at::kByte).argmax().item<int64_t>();

  const at::Tensor is_light = s.lt(1.0);
  const at::Tensor L = at::nonzero(is_light).view({-1});
  const at::Tensor H = at::nonzero(at::logical_not(is_light)).view({-1});
  const int64_t A = L.numel(), B = H.numel();
  TORCH_INTERNAL_ASSERT(B >= 1, "_alias_build: the largest weight must be heavy");
  at::Tensor kl = at::zeros({A + 1}, w64.options());
  if (A > 0) kl.narrow(0, 1, A).copy_(at::cumsum(at::rsub(s.index_select(0, L), 1.0), 0));
  at::Tensor kh = at::cumsum(s.index_select(0, H).sub(1.0), 0);
  // A parallel scan can be off by an ulp at block joins; the merge needs monotone prefixes.
  kl = std::get<0>(at::cummax(kl, 0)).contiguous();
  kh = std::get<0>(at::cummax(kh, 0)).contiguous();
  const at::Tensor L_ = A > 0 ? L : at::zeros({1}, L.options());
  at::Tensor ws_ranks = at::empty({cuda::alias_sweep_workspace_elems(n)}, L.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cuda::alias_sweep(s.const_data_ptr<double>(), L_.const_data_ptr<int64_t>(),
                                 H.const_data_ptr<int64_t>(), kl.const_data_ptr<double>(),
                                 kh.const_data_ptr<double>(), n, A, B, argmax, ws_ranks.mutable_data_ptr<int64_t>(),
                                 threshold.mutable_data_ptr<double>(), alias.data_ptr(),
                                 alias.scalar_type() == at::kLong, stream),
               "_alias_build");
  return at::scalar_tensor(m / cs, w64.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> alias_build_cuda(const at::Tensor& weights) {
  TORCH_CHECK_VALUE(weights.dim() == 1, "weights must be 1-D, got a tensor of shape ", weights.sizes());
  const int64_t n = weights.numel();
  auto threshold = at::empty({n}, weights.options().dtype(at::kDouble));
  auto alias = at::empty({n}, weights.options().dtype(alias_dtype(n)));
  auto mean = alias_build_into_cuda(weights, threshold, alias);
  return {threshold, alias, mean};
}

void check_table(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits, const char* op) {
  TORCH_CHECK(threshold.is_cuda() && alias.is_cuda() && bits.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(threshold.get_device() == alias.get_device() && threshold.get_device() == bits.get_device(), op,
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

at::Tensor alias_sample_cuda(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits) {
  check_table(threshold, alias, bits, "_alias_sample");
  const c10::cuda::CUDAGuard guard(threshold.device());
  auto out = at::empty({bits.size(0)}, bits.options());
  check_launch(cuda::alias_sample(threshold.const_data_ptr<double>(), alias.const_data_ptr(),
                                  alias.scalar_type() == at::kLong, threshold.numel(), bits.const_data_ptr<int64_t>(),
                                  bits.size(0), out.mutable_data_ptr<int64_t>(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "_alias_sample");
  return out;
}

cuda::AliasWeightType weight_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::AliasWeightType::kHalf;
    case at::kBFloat16: return cuda::AliasWeightType::kBFloat16;
    case at::kFloat: return cuda::AliasWeightType::kFloat;
    case at::kDouble: return cuda::AliasWeightType::kDouble;
    default: TORCH_CHECK(false, "_alias_sample_weighted: unsupported weights dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> alias_sample_weighted_cuda(const at::Tensor& threshold, const at::Tensor& alias,
                                                              const at::Tensor& weights, const at::Tensor& mean,
                                                              const at::Tensor& bits, at::ScalarType dtype) {
  check_table(threshold, alias, bits, "_alias_sample_weighted");
  TORCH_CHECK(weights.is_cuda() && weights.dim() == 1 && weights.numel() == threshold.numel() &&
                  weights.is_contiguous(),
              "_alias_sample_weighted: weights must be the table's contiguous (N,) CUDA weights");
  TORCH_CHECK(mean.is_cuda() && mean.numel() == 1 && mean.scalar_type() == at::kDouble,
              "_alias_sample_weighted: mean must be a float64 CUDA scalar tensor");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "_alias_sample_weighted: dtype must be float32 or float64");
  const c10::cuda::CUDAGuard guard(threshold.device());
  const int64_t draws = bits.size(0);
  auto idx = at::empty({draws}, bits.options());
  auto iw = at::empty({draws}, bits.options().dtype(dtype));
  check_launch(cuda::alias_sample_weighted(threshold.const_data_ptr<double>(), alias.const_data_ptr(),
                                           alias.scalar_type() == at::kLong, threshold.numel(),
                                           weights.const_data_ptr(), weight_type(weights.scalar_type()),
                                           mean.const_data_ptr<double>(), bits.const_data_ptr<int64_t>(), draws,
                                           idx.mutable_data_ptr<int64_t>(), iw.data_ptr(), dtype == at::kDouble,
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "_alias_sample_weighted");
  return {idx, iw};
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CUDA, m) {
  m.impl("_alias_build", &alias_build_cuda);
  m.impl("_alias_build_into", &alias_build_into_cuda);
  m.impl("_alias_sample", &alias_sample_cuda);
  m.impl("_alias_sample_weighted", &alias_sample_weighted_cuda);
}

}  // namespace isgd_kernels

#endif  // ISGD_WITH_CUDA
