// CUDA implementations of the alias-table ops (schemas in schema.cpp, input checks in checks.h). The
// build validates the weights and computes the scaled weights, light/heavy lists and prefix sums with
// ATen (the same formulas as isgd_kernels/reference_sampler.py; the host syncs here are for validation
// errors and list sizes, and only in the build), then calls the torch-free launchers of cuda.cu for the
// PSA split + sweep. The draws are single kernels on the current stream, without host sync.
#ifdef ISGD_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/cuda_binding.h"
#include "checks.h"
#include "cuda_launch.h"

namespace isgd_kernels {
namespace {

using alias_table::kPrescale;
using alias_table::kTinyMax;

void validate(const at::Tensor& w) {
  alias_table::check_weights_meta(w, at::kCUDA);
  const at::Tensor ok = at::logical_and(w.ge(0), w.ne(std::numeric_limits<double>::infinity()));
  if (!ok.all().item<bool>()) {
    const int64_t i = at::logical_not(ok).to(at::kByte).argmax().item<int64_t>();
    alias_table::throw_bad_weight(i, w[i].item<double>());
  }
  alias_table::check_some_positive(w.gt(0).any().item<bool>());
}

at::Tensor alias_build_into_cuda(const at::Tensor& weights, at::Tensor& threshold, at::Tensor& alias) {
  validate(weights);
  alias_table::check_build_buffers(weights, threshold, alias);
  const c10::cuda::CUDAGuard guard(weights.device());
  const int64_t n = weights.numel();

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
  alias_table::check_weights_meta(weights, at::kCUDA);
  const int64_t n = weights.numel();
  auto threshold = at::empty({n}, weights.options().dtype(at::kDouble));
  auto alias = at::empty({n}, weights.options().dtype(alias_table::alias_dtype(n)));
  auto mean = alias_build_into_cuda(weights, threshold, alias);
  return {threshold, alias, mean};
}

at::Tensor alias_sample_cuda(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits) {
  alias_table::check_table(threshold, alias, bits, "_alias_sample", at::kCUDA);
  const c10::cuda::CUDAGuard guard(threshold.device());
  auto out = at::empty({bits.size(0)}, bits.options());
  check_launch(cuda::alias_sample(threshold.const_data_ptr<double>(), alias.const_data_ptr(),
                                  alias.scalar_type() == at::kLong, threshold.numel(), bits.const_data_ptr<int64_t>(),
                                  bits.size(0), out.mutable_data_ptr<int64_t>(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "_alias_sample");
  return out;
}

std::tuple<at::Tensor, at::Tensor> alias_sample_weighted_cuda(const at::Tensor& threshold, const at::Tensor& alias,
                                                              const at::Tensor& weights, const at::Tensor& mean,
                                                              const at::Tensor& bits, at::ScalarType dtype) {
  constexpr const char* op = "_alias_sample_weighted";
  alias_table::check_table(threshold, alias, bits, op, at::kCUDA);
  alias_table::check_weighted_args(threshold, weights, mean, dtype);
  // The kernel reads both in place (the CPU implementation copies them when needed).
  TORCH_CHECK(weights.is_contiguous() && mean.scalar_type() == at::kDouble, op,
              ": on CUDA, weights must be contiguous and mean float64");
  const cuda::DType wtype = launcher_dtype(weights.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(threshold.device());
  const int64_t draws = bits.size(0);
  auto idx = at::empty({draws}, bits.options());
  auto iw = at::empty({draws}, bits.options().dtype(dtype));
  check_launch(cuda::alias_sample_weighted(threshold.const_data_ptr<double>(), alias.const_data_ptr(),
                                           alias.scalar_type() == at::kLong, threshold.numel(),
                                           weights.const_data_ptr(), wtype,
                                           mean.const_data_ptr<double>(), bits.const_data_ptr<int64_t>(), draws,
                                           idx.mutable_data_ptr<int64_t>(), iw.data_ptr(), dtype == at::kDouble,
                                           c10::cuda::getCurrentCUDAStream().stream()),
               op);
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
