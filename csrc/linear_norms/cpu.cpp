// CPU kernels for the Linear per-example gradient norms (schemas in schema.cpp).
//
// outer:       one fused, vectorisable pass over x and grad_out, parallel over examples.
// ghost:       per chunk of examples, Gram matrices by batched GEMM; chunks keep the T x T
//              temporaries under kChunkElements so memory stays bounded for any B.
// materialize: on AVX-512 CPUs (fp32, fp16/bf16 widened by chunks), the outer-product blocks of
//              outer_avx512.h (shared with the conv kernel), one example per item, in parallel: no
//              per-example gradient is written to memory (faster than the bmm path below, and than
//              the dW GEMM of a training step, on the shapes benchmarked). Elsewhere (float64, fewer examples than threads, g features strided, no AVX-512): per
//              chunk, the per-example gradients G_i^T A_i by batched GEMM, squared and summed.
// Accumulation is in float32 (float64 for float64 inputs); half/bf16 chunks are upcast before GEMM.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "../common/outer_avx512.h"

namespace isgd_kernels {
namespace {

// Temporaries per chunk (elements of the Gram / per-example-gradient batch): 16M fp32 = 64 MiB.
constexpr int64_t kChunkElements = int64_t(1) << 24;

template <typename scalar_t, typename acc_t>
inline acc_t row_sq_sum(const scalar_t* row, int64_t n, int64_t stride) {
  if (stride != 1) {
    acc_t s = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = static_cast<acc_t>(row[j * stride]);
      s += v * v;
    }
    return s;
  }
  // Independent lanes let the compiler vectorise the reduction without -ffast-math (a single
  // scalar accumulator is a serial dependency chain; g++ -O3, x86-64 baseline SSE2).
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(row[j + l]);
      lanes[l] += v * v;
    }
  }
  acc_t s = 0;
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    s += v * v;
  }
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

at::Tensor linear_sq_norms_outer_cpu(const at::Tensor& x, const at::Tensor& g, bool bias) {
  check_linear_norm_inputs(x, g, "_linear_sq_norms_outer");
  TORCH_CHECK(x.size(1) == 1, "_linear_sq_norms_outer: needs T == 1, got x ", x.sizes());
  const int64_t B = x.size(0), d = x.size(2), p = g.size(2);
  auto out = at::empty({B}, x.options().dtype(acc_dtype(x)));
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "_linear_sq_norms_outer_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const int64_t sxb = x.stride(0), sxd = x.stride(2), sgb = g.stride(0), sgp = g.stride(2);
    // ~d+p elements per example: a grain of 32K elements amortises the thread hand-off.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d + p));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t sa = row_sq_sum<scalar_t, acc_t>(xp + b * sxb, d, sxd);
        const acc_t sg = row_sq_sum<scalar_t, acc_t>(gp + b * sgb, p, sgp);
        op[b] = sa * sg + (bias ? sg : acc_t(0));
      }
    });
  });
  return out;
}

at::Tensor linear_sq_norms_ghost_cpu(const at::Tensor& x, const at::Tensor& g, bool bias) {
  check_linear_norm_inputs(x, g, "_linear_sq_norms_ghost");
  const int64_t B = x.size(0), T = x.size(1);
  auto out = at::empty({B}, x.options().dtype(acc_dtype(x)));
  if (B == 0) return out;
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, T * T));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    auto a = x.narrow(0, b0, n).to(acc_dtype(x));
    auto d = g.narrow(0, b0, n).to(acc_dtype(x));
    auto gram_a = at::bmm(a, a.transpose(1, 2));  // (n, T, T)
    auto gram_g = at::bmm(d, d.transpose(1, 2));
    auto sq = (gram_a * gram_g).sum({1, 2});
    if (bias) sq += gram_g.sum({1, 2});  // ||sum_t delta_t||^2 = sum_{t,s} delta_t . delta_s
    out.narrow(0, b0, n).copy_(sq);
  }
  return out;
}

#ifdef ISGD_OUTER_AVX512
// Most floats in a thread's W block (d x 64 with T in chunks); larger d uses the bmm path.
constexpr int64_t kOuterMaxBuffer = int64_t(1) << 22;

// ||sum_t g_t||^2 over columns [0, 16 nv) of G (T rows, stride ldg; columns past p read as zeros).
__attribute__((target("avx512f"))) float col_sum_sq(const float* g, int64_t T, int64_t ldg, int64_t nv) {
  __m512 sq = _mm512_setzero_ps();
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    const int64_t n = std::min<int64_t>(4, nv - v0);
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const float* row = g + 16 * v0;
    for (int64_t t = 0; t < T; ++t, row += ldg)
      for (int64_t v = 0; v < n; ++v) s[v] = _mm512_add_ps(s[v], _mm512_loadu_ps(row + 16 * v));
    for (int64_t v = 0; v < n; ++v) sq = _mm512_fmadd_ps(s[v], s[v], sq);
  }
  float lanes[16];  // not _mm512_reduce_add_ps: GCC 12 warns on its _mm512_undefined_ps() under -Wall
  _mm512_storeu_ps(lanes, sq);
  float total = 0;
  for (float v : lanes) total += v;
  return total;
}

// Per-thread state of the outer-product path (outer_avx512.h) for one shape, on float32 data: item = one
// example, U^T[r, t] = x[i, t, r] (row r = a pointer into x, position t = offset t * stride(1), any strides)
// and G = g[i] (T, p) with contiguous rows, read in place when p is a multiple of 16, else copied into the
// thread's buffer with rows zero-padded to 16 nv floats. The bias term is ||sum_t g_t||^2.
class OuterLinear {
 public:
  OuterLinear(const at::Tensor& x, const at::Tensor& g, bool bias)
      : T_(x.size(1)), d_(x.size(2)), p_(g.size(2)), nv_((g.size(2) + 15) / 16), bias_(bias),
        sxt_(x.stride(1)), sxd_(x.stride(2)), sgt_(g.stride(1)), ldg_(p_ % 16 ? 16 * nv_ : sgt_) {
    if (p_ % 16) gbuf_.assign(T_ * ldg_, 0.f);  // columns past p stay zero
    nb_ = (nv_ + 3) / 4;
    ldw_ = 16 * ((nv_ + nb_ - 1) / nb_);  // the widest column block
    const int64_t per_chunk = std::max<int64_t>(1, outer::kOuterChunkElements / ldw_);
    const int64_t chunks = (T_ + per_chunk - 1) / per_chunk;
    chunk_ = (T_ + chunks - 1) / chunks;
    if (chunks > 1) w_.resize(d_ * ldw_);
    rows_.resize(d_);
  }

  float run(const float* x, const float* g) {
    for (int64_t r = 0; r < d_; ++r) rows_[r] = x + r * sxd_;
    if (!gbuf_.empty()) {
      for (int64_t t = 0; t < T_; ++t) std::memcpy(gbuf_.data() + t * ldg_, g + t * sgt_, p_ * sizeof(float));
      g = gbuf_.data();
    }
    // Column blocks of at most 4 vectors and row blocks, both split evenly (every block keeps enough
    // independent accumulators); positions innermost so each block's sums stay in registers.
    float sq16[16] = {};
    float total = 0;
    const bool chunked = !w_.empty();
    for (int64_t b = 0; b < nb_; ++b) {
      const int64_t v0 = b * nv_ / nb_, nv = (b + 1) * nv_ / nb_ - v0;
      const int64_t nrb = (d_ + outer::kOuterMaxRows[nv - 1] - 1) / outer::kOuterMaxRows[nv - 1];
      if (chunked) std::fill(w_.begin(), w_.end(), 0.f);
      for (int64_t t0 = 0; t0 < T_; t0 += chunk_) {
        const outer::OuterSeg seg{t0 * sxt_, std::min(chunk_, T_ - t0)};
        for (int64_t rb = 0; rb < nrb; ++rb) {
          const int64_t r0 = rb * d_ / nrb, nr = (rb + 1) * d_ / nrb - r0;
          outer::outer_kernel(static_cast<int>(nr), static_cast<int>(nv))(
              rows_.data() + r0, &seg, 1, sxt_, g + t0 * ldg_ + 16 * v0, ldg_,
              chunked ? w_.data() + r0 * ldw_ : nullptr, ldw_, sq16);
        }
      }
      if (chunked)
        for (float v : w_) total += v * v;
    }
    for (float v : sq16) total += v;
    if (bias_) total += col_sum_sq(g, T_, ldg_, nv_);
    return total;
  }

 private:
  const int64_t T_, d_, p_, nv_;
  const bool bias_;
  const int64_t sxt_, sxd_, sgt_, ldg_;
  int64_t nb_ = 0, ldw_ = 0, chunk_ = 0;
  std::vector<float> w_, gbuf_;
  std::vector<const float*> rows_;
};

// The outer-product path over all examples. fp32 x is read in place whatever its strides, and fp32 g when
// its rows are contiguous (a copy per example pads them, cheaper than aten ops at tiny sizes); otherwise
// chunks of examples are first copied by aten (vectorised, threaded) into float32, g into rows padded
// with zeros to a multiple of 16; temporaries stay under ~kChunkElements floats. (Widening element by
// element per example in the worker made fp16 slower than the bmm path.)
void linear_sq_norms_outer_blocks(const at::Tensor& x, const at::Tensor& g, bool bias, float* out) {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), p = g.size(2), ldp = (p + 15) / 16 * 16;
  const bool x_direct = x.scalar_type() == at::kFloat;
  const bool g_direct = g.scalar_type() == at::kFloat;  // the caller checked g.stride(2) == 1
  const int64_t per_example = (x_direct ? 0 : T * d) + (g_direct ? 0 : T * ldp);
  const int64_t chunk = per_example == 0
                            ? B
                            : std::max<int64_t>(at::get_num_threads(), kChunkElements / per_example);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    at::Tensor xs = x.narrow(0, b0, n), gs = g.narrow(0, b0, n);
    if (!x_direct) xs = xs.to(at::kFloat, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
    if (!g_direct) {
      at::Tensor padded = at::empty({n, T, ldp}, g.options().dtype(at::kFloat));
      if (ldp > p) padded.narrow(2, p, ldp - p).zero_();
      padded.narrow(2, 0, p).copy_(gs);
      gs = padded;
    }
    const float* xp = xs.const_data_ptr<float>();
    const float* gp = gs.const_data_ptr<float>();
    const int64_t sxb = xs.stride(0), sgb = gs.stride(0);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      OuterLinear worker(xs, gs, bias);
      for (int64_t b = begin; b < end; ++b) out[b0 + b] = worker.run(xp + b * sxb, gp + b * sgb);
    });
  }
}
#endif

// materialize: ||G_i^T [A_i, 1]||_F^2 per example.
at::Tensor linear_sq_norms_materialize_cpu(const at::Tensor& x, const at::Tensor& g, bool bias) {
  check_linear_norm_inputs(x, g, "_linear_sq_norms_materialize");
  const int64_t B = x.size(0), d = x.size(2), p = g.size(2);
  auto out = at::empty({B}, x.options().dtype(acc_dtype(x)));
  if (B == 0) return out;
#ifdef ISGD_OUTER_AVX512
  // Outer-product blocks, one example per item, when there are items for every thread (fewer: the bmm
  // below lets one GEMM use all threads), no float64 (its accumulation stays in float64), g's features
  // contiguous (a transposed g is an operand bmm takes as is; copying it measured no faster) and the W
  // block of a thread (d x 64 floats, with T in chunks) small.
  if (x.scalar_type() != at::kDouble && B >= at::get_num_threads() && d > 0 && p > 0 && outer::cpu_has_avx512()) {
    // ||G^T A||_F = ||A^T G||_F: the blocks vectorise over the second operand's features, which runs faster
    // as the wider one (d_in 768 -> d_out 192 at T = 197: 1.46 vs 1.72 ms), so the operands swap when x is
    // wider; the bias term then comes from g apart.
    if (d > p && x.stride(2) == 1 && p * 64 <= kOuterMaxBuffer) {
      linear_sq_norms_outer_blocks(g, x, /*bias=*/false, out.mutable_data_ptr<float>());
      if (bias) out += g.sum(1, /*keepdim=*/false, at::kFloat).square().sum(1);
      return out;
    }
    if (g.stride(2) == 1 && d * 64 <= kOuterMaxBuffer) {
      linear_sq_norms_outer_blocks(x, g, bias, out.mutable_data_ptr<float>());
      return out;
    }
  }
#endif
  // Elsewhere: per chunk, the per-example gradients G_i^T A_i by batched GEMM, squared and summed.
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, d * p));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    auto a = x.narrow(0, b0, n).to(acc_dtype(x));
    auto dl = g.narrow(0, b0, n).to(acc_dtype(x));
    auto per_example_grad = at::bmm(dl.transpose(1, 2), a);  // (n, d_out, d_in), chunk-local
    auto sq = per_example_grad.square().sum({1, 2});
    if (bias) sq += dl.sum(1).square().sum(1);
    out.narrow(0, b0, n).copy_(sq);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CPU, m) {
  m.impl("_linear_sq_norms_outer", &linear_sq_norms_outer_cpu);
  m.impl("_linear_sq_norms_ghost", &linear_sq_norms_ghost_cpu);
  m.impl("_linear_sq_norms_materialize", &linear_sq_norms_materialize_cpu);
}

}  // namespace isgd_kernels
