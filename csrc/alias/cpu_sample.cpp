// Draws from the CPU alias table: one pass over the random words; rows of a group are computed and
// prefetched before the coins are resolved, so the random table reads overlap.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu.h"
#include "cpu_pool.h"

namespace isgd_kernels {
namespace alias_table {
namespace {

constexpr int64_t kDrawGrain = 1 << 15;        // draws per parallel task
constexpr double kTwoPowM53 = 0x1p-53;

// Draws [k0, k1): rows of a group of kGroup draws first (and their table entries prefetched), then
// the coins, so up to kGroup random reads are in flight instead of one.
template <typename I>
inline void draw_range(const double* thr, const I* al, const uint64_t* bits, int64_t* out, int64_t k0, int64_t k1,
                       int64_t n) {
  constexpr int64_t kGroup = 16;
  const double nd = static_cast<double>(n);
  int64_t rows[kGroup];
  for (int64_t g = k0; g < k1; g += kGroup) {
    const int64_t m = std::min(kGroup, k1 - g);
    for (int64_t q = 0; q < m; ++q) {
      const double u0 = static_cast<double>(bits[2 * (g + q)] >> 11) * kTwoPowM53;
      const int64_t row = std::min(static_cast<int64_t>(u0 * nd), n - 1);
      rows[q] = row;
      __builtin_prefetch(thr + row);
      __builtin_prefetch(al + row);
    }
    for (int64_t q = 0; q < m; ++q) {
      const double u1 = static_cast<double>(bits[2 * (g + q) + 1] >> 11) * kTwoPowM53;
      const int64_t row = rows[q];
      out[g + q] = u1 < thr[row] ? row : static_cast<int64_t>(al[row]);
    }
  }
}

}  // namespace

void draw_cpu(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits, int64_t* out) {
  const int64_t draws = bits.size(0), n = threshold.numel();
  const double* thr = threshold.const_data_ptr<double>();
  const uint64_t* b = reinterpret_cast<const uint64_t*>(bits.const_data_ptr<int64_t>());
  auto run = [&](auto* al) {
    if (draws < 2 * kDrawGrain) {
      draw_range(thr, al, b, out, 0, draws, n);  // the common training-batch case: no thread hand-off
    } else {
      const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), draws / kDrawGrain));
      for_claimed(tasks, tasks, [&](int64_t t) { draw_range(thr, al, b, out, draws * t / tasks, draws * (t + 1) / tasks, n); });
    }
  };
  if (alias.scalar_type() == at::kInt) {
    run(alias.const_data_ptr<int32_t>());
  } else {
    run(alias.const_data_ptr<int64_t>());
  }
}


void importance_weights_cpu(const at::Tensor& weights, double mean, const int64_t* idx, at::Tensor& iw) {
  const int64_t draws = iw.numel();
  const at::Tensor w = weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "_alias_sample_weighted_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    if (iw.scalar_type() == at::kFloat) {
      float* o = iw.mutable_data_ptr<float>();
      for (int64_t k = 0; k < draws; ++k) o[k] = static_cast<float>(mean / static_cast<double>(wp[idx[k]]));
    } else {
      double* o = iw.mutable_data_ptr<double>();
      for (int64_t k = 0; k < draws; ++k) o[k] = mean / static_cast<double>(wp[idx[k]]);
    }
  });
}

}  // namespace alias_table
}  // namespace isgd_kernels
