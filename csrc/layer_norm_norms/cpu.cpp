// CPU kernel for the LayerNorm / RMSNorm per-example gradient norms (schema in schema.cpp).
//
// One pass over x and grad_out, parallel over examples (and over segments of positions when there are fewer
// examples than threads): per position, the row's statistics (its P features are in L1), then
// dw += grad_out * x_hat and db += grad_out. No x_hat or product tensor is written to memory, where the
// PyTorch composition writes two (B, R, P) temporaries and reads them back.
// Accumulation is in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/tensor_checks.h"

namespace isgd_kernels {
namespace {

// sum_j f(row[j]) in independent lanes, folded pairwise: the compiler vectorises it without -ffast-math (a
// single scalar accumulator is a serial dependency chain).
template <typename acc_t, typename F>
inline acc_t lane_sum(const acc_t* __restrict__ row, int64_t n, F f) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += f(row[j + l]);
  acc_t s = 0;
  for (; j < n; ++j) s += f(row[j]);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return s + lanes[0];
}

// Adds rows [r0, r1) of one example to dw (grad_out * x_hat, when non-null) and db (grad_out, when non-null).
template <typename acc_t>
inline void accumulate_rows(const acc_t* x, const acc_t* g, int64_t sxr, int64_t sgr, int64_t r0, int64_t r1,
                            int64_t P, acc_t eps, bool rms, acc_t* __restrict__ dw, acc_t* __restrict__ db) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* __restrict__ xr = x + r * sxr;
    const acc_t* __restrict__ gr = g + r * sgr;
    if (dw != nullptr) {
      acc_t mean = 0, var;
      if (rms) {
        var = lane_sum<acc_t>(xr, P, [](acc_t v) { return v * v; }) / P;
      } else {
        mean = lane_sum<acc_t>(xr, P, [](acc_t v) { return v; }) / P;
        var = lane_sum<acc_t>(xr, P, [mean](acc_t v) { return (v - mean) * (v - mean); }) / P;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(std::max(var, acc_t(0)) + eps);
      for (int64_t p = 0; p < P; ++p) dw[p] += gr[p] * ((xr[p] - mean) * rstd);
    }
    if (db != nullptr)
      for (int64_t p = 0; p < P; ++p) db[p] += gr[p];
  }
}

// The same loops compiled for AVX-512, AVX2 and the x86-64 baseline, picked at load time (the extension is
// built without -march flags, so auto-vectorised code would otherwise be SSE2 only).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ISGD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ISGD_VECTOR_CLONES
#endif

ISGD_VECTOR_CLONES void accumulate(const float* x, const float* g, int64_t sxr, int64_t sgr, int64_t r0, int64_t r1,
                                   int64_t P, float eps, bool rms, float* dw, float* db) {
  accumulate_rows<float>(x, g, sxr, sgr, r0, r1, P, eps, rms, dw, db);
}

ISGD_VECTOR_CLONES void accumulate(const double* x, const double* g, int64_t sxr, int64_t sgr, int64_t r0, int64_t r1,
                                   int64_t P, double eps, bool rms, double* dw, double* db) {
  accumulate_rows<double>(x, g, sxr, sgr, r0, r1, P, eps, rms, dw, db);
}

template <typename acc_t>
acc_t sq_sum(const acc_t* v, int64_t n) {
  return lane_sum<acc_t>(v, n, [](acc_t a) { return a * a; });
}

at::Tensor layer_norm_sq_norms_cpu(const at::Tensor& x_in, const at::Tensor& g_in, double eps, bool rms,
                                   bool weight, bool bias) {
  const char* op = "_layer_norm_sq_norms";
  TORCH_CHECK(x_in.dim() == 3 && x_in.sizes() == g_in.sizes(), op,
              ": expected x and grad_out of one shape (B, R, P), got x ", x_in.sizes(), " and grad_out ",
              g_in.sizes());
  check_same_floating(x_in, g_in, op);
  // The features of a row are read as a contiguous run, in the accumulation dtype: fp16/bf16 are widened by
  // aten first (vectorised; element by element in the loops was 6x slower).
  const auto acc = acc_dtype(x_in);
  const at::Tensor x = x_in.scalar_type() == acc && x_in.stride(2) == 1 ? x_in : x_in.to(acc).contiguous();
  const at::Tensor g = g_in.scalar_type() == acc && g_in.stride(2) == 1 ? g_in : g_in.to(acc).contiguous();
  const int64_t B = x.size(0), R = x.size(1), P = x.size(2);
  auto out = at::zeros({B}, x.options().dtype(acc_dtype(x)));
  if (B == 0 || R == 0 || P == 0 || !(weight || bias)) return out;
  // Segments of positions per example: enough items for every thread when the batch is small.
  const int64_t threads = at::get_num_threads();
  const int64_t S = std::min<int64_t>(R, std::max<int64_t>(1, (2 * threads + B - 1) / B));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_layer_norm_sq_norms_cpu", [&] {
    using acc_t = scalar_t;  // x and g are in the accumulation dtype by now
    const acc_t* xp = x.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    acc_t* op_out = out.mutable_data_ptr<acc_t>();
    const int64_t sxb = x.stride(0), sxr = x.stride(1), sgb = g.stride(0), sgr = g.stride(1);
    // Per item (example b, segment s): its dw and db sums, 2P values. With one segment the item squares them
    // itself; with several, they are summed over segments first.
    std::vector<acc_t> partial(S > 1 ? B * S * 2 * P : 0);
    at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> local(S > 1 ? 0 : 2 * P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / S, s = item % S;
        acc_t* sums = S > 1 ? partial.data() + item * 2 * P : local.data();
        if (S == 1) std::fill(local.begin(), local.end(), acc_t(0));
        accumulate(xp + b * sxb, gp + b * sgb, sxr, sgr, s * R / S, (s + 1) * R / S, P, static_cast<acc_t>(eps),
                   rms, weight ? sums : nullptr, bias ? sums + P : nullptr);
        if (S == 1) op_out[b] = (weight ? sq_sum(sums, P) : acc_t(0)) + (bias ? sq_sum(sums + P, P) : acc_t(0));
      }
    });
    if (S > 1) {
      for (int64_t b = 0; b < B; ++b) {
        acc_t* first = partial.data() + b * S * 2 * P;
        for (int64_t s = 1; s < S; ++s)
          for (int64_t j = 0; j < 2 * P; ++j) first[j] += first[s * 2 * P + j];
        op_out[b] = (weight ? sq_sum(first, P) : acc_t(0)) + (bias ? sq_sum(first + P, P) : acc_t(0));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CPU, m) { m.impl("_layer_norm_sq_norms", &layer_norm_sq_norms_cpu); }

}  // namespace isgd_kernels
