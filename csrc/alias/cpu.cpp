// CPU implementations of the alias-table ops (schemas in schema.cpp, input checks in checks.h,
// numerical contract in isgd_kernels/reference_sampler.py): argument checks, buffer allocation and
// registration. The kernels: cpu_build.cpp (PSA build), cpu_sample.cpp (draws), on the primitives of
// cpu_simd.h and the work-claiming pool of cpu_pool.h.
//
// Fresh tables are large and first-touch page faults cost about as much as a build, so fresh buffers
// are advised to use transparent huge pages and rebuilds (_alias_build_into) reuse the buffers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "checks.h"
#include "cpu.h"

namespace isgd_kernels {
namespace {

using namespace alias_table;

void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi > lo + kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // best effort
#else
  (void)t;
#endif
}

at::Tensor alias_build_into_cpu(const at::Tensor& weights_in, at::Tensor& threshold, at::Tensor& alias) {
  check_weights_meta(weights_in, at::kCPU);
  check_build_buffers(weights_in, threshold, alias);
  const at::Tensor weights = weights_in.contiguous();
  const double mean = build_table_cpu(weights, threshold, alias);
  return at::scalar_tensor(mean, weights.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> alias_build_cpu(const at::Tensor& weights) {
  check_weights_meta(weights, at::kCPU);
  const int64_t n = weights.numel();
  auto threshold = at::empty({n}, weights.options().dtype(at::kDouble));
  auto alias = at::empty({n}, weights.options().dtype(alias_dtype(n)));
  advise_huge_pages(threshold);
  advise_huge_pages(alias);
  auto mean = alias_build_into_cpu(weights, threshold, alias);
  return {threshold, alias, mean};
}

at::Tensor alias_sample_cpu(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits) {
  check_table(threshold, alias, bits, "_alias_sample", at::kCPU);
  auto out = at::empty({bits.size(0)}, bits.options());
  draw_cpu(threshold, alias, bits, out.mutable_data_ptr<int64_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> alias_sample_weighted_cpu(const at::Tensor& threshold, const at::Tensor& alias,
                                                             const at::Tensor& weights, const at::Tensor& mean,
                                                             const at::Tensor& bits, at::ScalarType dtype) {
  check_table(threshold, alias, bits, "_alias_sample_weighted", at::kCPU);
  check_weighted_args(threshold, weights, mean, dtype);
  const int64_t draws = bits.size(0);
  auto idx = at::empty({draws}, bits.options());
  auto iw = at::empty({draws}, bits.options().dtype(dtype));
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  draw_cpu(threshold, alias, bits, ip);
  importance_weights_cpu(weights, mean.to(at::kDouble).item<double>(), ip, iw);
  return {idx, iw};
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CPU, m) {
  m.impl("_alias_build", &alias_build_cpu);
  m.impl("_alias_build_into", &alias_build_into_cpu);
  m.impl("_alias_sample", &alias_sample_cpu);
  m.impl("_alias_sample_weighted", &alias_sample_weighted_cpu);
}

}  // namespace isgd_kernels
