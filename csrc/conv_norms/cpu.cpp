// CPU kernel for the per-example gradient norms of a convolution (schema in schema.cpp).
//
// Work item = (example b, group g): the Linear problem U (T, d), G (T, p) of isgd_kernels.conv, with
// d = C_in/groups * prod(k) and p = C_out/groups. Items run in parallel (at::parallel_for), each thread
// with its own buffers, so memory is O(threads * buffers) whatever the batch size, and nothing of
// size B * T * d (the unfolded input) or B * d * p (per-example gradients) is ever allocated:
//
// materialize: ||W||_F^2 with W^T = U^T G (d, p), 2 T d p FLOPs (the dW GEMM of a training step).
//   - fp32 (and fp16/bf16) on AVX-512 CPUs: outer products, vectors along output channels. The item's
//     x is copied into a zero-padded buffer that holds every entry of U^T (row (c, kd, kh, kw) = a
//     pointer, position = an offset: no im2col), G is packed (T, p) by 16 x 16 transposes, and blocks of
//     rows x channels (6 x 64, 14 x 32, 12 x 16) accumulate in registers over all positions, squared at
//     the end.
//   - otherwise: patches are gathered from x by index arithmetic (implicit im2col: rows (c, kd, kh, kw)
//     of U^T, contiguous runs of x rows) for a chunk of output positions at a time into the thread's
//     buffer, and one BLAS GEMM (at::mm) accumulates W^T; ||W||_F^2 at the end.
// ghost: gather the item's whole U^T (d, T) (ghost is picked when T (d + p) < d p, so this is smaller
//   than the item's weight gradient), then row strips of the T x T Gram matrices of U and G by GEMM,
//   upper triangle only, multiplied and reduced strip by strip. 2 T^2 (d + p) FLOPs.
// outer (T == 1): ||u||^2 ||delta||^2.
// Problems too small for a GEMM call to pay off (depthwise: d = prod(k), p = 1) use dot loops.
//
// Accumulation is in float32 (float64 for float64 inputs): half/bf16 values are widened when
// gathered. Per-item results are summed over groups in a fixed order: deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "../common/outer_avx512.h"

namespace isgd_kernels {
namespace {

constexpr const char* kOp = "_conv_grad_sq_norms";

// Elements of one gathered (d, chunk) buffer: 2^20 (4 MiB fp32) per thread. Larger GEMMs beat keeping
// the chunk in L2 here (benchmark CNN, MKL sgemm: 2^20 against 2^16 and 2^18).
constexpr int64_t kChunkElements = int64_t(1) << 20;
// Shortest chunk for a GEMM call when d is very large (the k dimension of the GEMM).
constexpr int64_t kMinChunk = 64;
// Elements of one Gram strip (rows x T) in the ghost path, and its most rows: strips below the diagonal
// are skipped, so short strips do about T^2 / 2 of the T^2 work (32 rows measured best against 8, 16
// and 64).
constexpr int64_t kStripElements = int64_t(1) << 16;
constexpr int64_t kStripRows = 32;
// T * (d + bias) * p up to which dot loops beat a GEMM call per item (e.g. depthwise 3x3 convs).
constexpr int64_t kDirectWork = int64_t(1) << 15;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Independent lanes so the compiler vectorises without -ffast-math (see linear_norms/cpu.cpp).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  acc_t s = 0;
  for (; j < n; ++j) s += a[j] * b[j];
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

using outer::OuterSeg;

#ifdef ISGD_OUTER_AVX512
using outer::kOuterChunkElements;
using outer::kOuterMaxRows;
using outer::outer_kernel;
using outer::cpu_has_avx512;
// materialize blocks (outer_avx512.h): U^T[r, t] is read straight from a zero-padded copy of the item's x
// (no im2col): row r = (c, kd, kh, kw) is a pointer into it, position t = (od, oh, ow) an offset shared by
// every row, so the positions of one output row form a segment of offsets x, x + sw, x + 2 sw, ...
// Short problems run as fast as long ones (the dot blocks along positions that this replaced lost to
// at::mm below T = 64).

// GCC 12's AVX-512 headers start unmasked shuffles from _mm512_undefined_ps(), which -Wall reports as
// "used uninitialized" once inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// dst[i * ldd + j] = src[j * lds + i] for i < ni <= 16, j < 16, with rows j >= nj of src read as zeros:
// a 16 x 16 transpose in registers (the scalar loop it replaces cost half as much as the FMAs of a 3 -> 32
// channel conv).
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t lds, int64_t nj, int64_t ni,
                                                     float* dst, int64_t ldd) {
  const __mmask16 m = static_cast<__mmask16>(ni >= 16 ? 0xFFFF : (1u << ni) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) r[j] = j < nj ? _mm512_maskz_loadu_ps(m, src + j * lds) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: (r0[0], r1[0], r0[1], r1[1]), (r0[2], r1[2], r0[3], r1[3])
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {  // r[4q + e], lane L: element 4L + e of rows 4q .. 4q + 3
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
    r[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {
    // Lanes (0, 2) and (1, 3) of row groups (0, 1) and (2, 3), then one lane of each group per output row.
    const __m512 lo0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88), hi0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
    const __m512 lo1 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
    const __m512 hi1 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
    const __m512 out[4] = {_mm512_shuffle_f32x4(lo0, lo1, 0x88), _mm512_shuffle_f32x4(hi0, hi1, 0x88),
                           _mm512_shuffle_f32x4(lo0, lo1, 0xDD), _mm512_shuffle_f32x4(hi0, hi1, 0xDD)};
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l)
      if (4 * l + e < ni) _mm512_storeu_ps(dst + (4 * l + e) * ldd, out[l]);
  }
}

#pragma GCC diagnostic pop

#endif

// Patch element k = (c, kd, kh, kw) of the (C_in/groups, *k) weight layout: where it sits relative to
// the window corner, and which output rows / columns see it inside x rather than in the padding.
// Computed once per thread, not per item and chunk: redone per item, the divisions cost more than the
// copies.
struct Tap {
  int64_t x_off;               // c * stride_c
  int64_t off_d, off_h, off_w;  // dilated kernel offset minus the low padding
  int64_t h_lo, h_hi;          // output rows oh with oh * sh + off_h in [0, H)
  int64_t w_lo, w_hi;          // output columns likewise
};

std::vector<Tap> make_taps(const ConvGeometry& geo) {
  const int64_t KH = geo.k[1], KW = geo.k[2], kvol = geo.k[0] * KH * KW;
  // First output index o >= 0 with o * s + off >= 0, and one past the last with o * s + off < n.
  auto lo = [](int64_t off, int64_t s, int64_t out) { return std::min(out, off >= 0 ? 0 : ceil_div(-off, s)); };
  auto hi = [](int64_t off, int64_t s, int64_t n, int64_t out, int64_t l) {
    return std::max(l, n - 1 - off < 0 ? 0 : std::min(out, (n - 1 - off) / s + 1));
  };
  std::vector<Tap> taps(geo.K);
  for (int64_t kk = 0; kk < geo.K; ++kk) {
    const int64_t c = kk / kvol, r = kk % kvol;
    const int64_t kd = r / (KH * KW), kh = (r / KW) % KH, kw = r % KW;
    Tap& tap = taps[kk];
    tap.x_off = c * geo.sx[1];
    tap.off_d = kd * geo.dil[0] - geo.pad[0];
    tap.off_h = kh * geo.dil[1] - geo.pad[1];
    tap.off_w = kw * geo.dil[2] - geo.pad[2];
    tap.h_lo = lo(tap.off_h, geo.stride[1], geo.out[1]);
    tap.h_hi = hi(tap.off_h, geo.stride[1], geo.in[1], geo.out[1], tap.h_lo);
    tap.w_lo = lo(tap.off_w, geo.stride[2], geo.out[2]);
    tap.w_hi = hi(tap.off_w, geo.stride[2], geo.in[2], geo.out[2], tap.w_lo);
  }
  return taps;
}

// Rows [k0, k1) of U^T for output positions [t0, t0 + n): dst[(k - k0) * ld + j] = patch element k of
// position t0 + j, zero where the window reaches into the padding.
//
// Per row k only runs are copied and zeroed. When x rows are packed and the convolution keeps the
// width (stride 1 in H and W, W == OW: 'same'-style convs), a whole plane of row k is one contiguous
// run of x shifted by off_h * W + off_w, and only the padded columns of each row are zeroed afterwards.
template <typename scalar_t, typename acc_t>
void gather_patches(const ConvGeometry& geo, const Tap* taps, const scalar_t* __restrict__ x, int64_t t0,
                    int64_t n, int64_t k0, int64_t k1, acc_t* __restrict__ dst, int64_t ld) {
  const int64_t OH = geo.out[1], OW = geo.out[2], plane = OH * OW;
  const int64_t D = geo.in[0], W = geo.in[2];
  const int64_t sh = geo.stride[1], sw = geo.stride[2], sxh = geo.sx[3], sxw = geo.sx[4];
  const bool unit_w = sw == 1 && sxw == 1;
  const bool packed = unit_w && sh == 1 && W == OW && sxh == W;
  // The chunk's pieces of output planes (3-D: one per od; else one), shared by every row k.
  constexpr int kMaxPieces = 8;
  int64_t piece_od[kMaxPieces], piece_p0[kMaxPieces], piece_p1[kMaxPieces];
  for (int64_t t = t0; t < t0 + n;) {
    int np = 0;
    for (; t < t0 + n && np < kMaxPieces; ++np) {
      const int64_t od = t / plane, p0 = t - od * plane, p1 = std::min(plane, p0 + (t0 + n - t));
      piece_od[np] = od;
      piece_p0[np] = p0;
      piece_p1[np] = p1;
      t += p1 - p0;
    }
    const int64_t base = (piece_od[0] * plane + piece_p0[0]) - t0;  // dst column of the first piece
    for (int64_t kk = k0; kk < k1; ++kk) {
      const Tap& tap = taps[kk];
      const scalar_t* xc = x + tap.x_off;
      acc_t* col = dst + (kk - k0) * ld + base;
      for (int q = 0; q < np; ++q) {
        const int64_t p0 = piece_p0[q], p1 = piece_p1[q];
        acc_t* o = col - p0;  // o[p] is plane position p of this row
        col += p1 - p0;
        const int64_t id = piece_od[q] * geo.stride[0] + tap.off_d;
        if (id < 0 || id >= D || tap.w_lo == tap.w_hi || tap.h_lo == tap.h_hi) {
          std::fill(o + p0, o + p1, acc_t(0));
          continue;
        }
        const scalar_t* xp = xc + id * geo.sx[2];
        const int64_t w_lo = tap.w_lo, w_hi = tap.w_hi, off_w = tap.off_w;
        if (packed) {
          const int64_t a = std::max(p0, tap.h_lo * OW + w_lo);
          const int64_t e = std::max(a, std::min(p1, (tap.h_hi - 1) * OW + w_hi));
          std::fill(o + p0, o + a, acc_t(0));
          const scalar_t* src = xp + tap.off_h * W + off_w;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            std::memcpy(o + a, src + a, (e - a) * sizeof(acc_t));
          } else {
            for (int64_t p = a; p < e; ++p) o[p] = static_cast<acc_t>(src[p]);
          }
          std::fill(o + e, o + p1, acc_t(0));
          if (w_lo > 0 || w_hi < OW) {  // columns of the copied rows that fell into the padding
            for (int64_t rs = a - a % OW; rs < e; rs += OW) {
              for (int64_t p = std::max(a, rs); p < std::min(e, rs + w_lo); ++p) o[p] = acc_t(0);
              for (int64_t p = std::max(a, rs + w_hi); p < std::min(e, rs + OW); ++p) o[p] = acc_t(0);
            }
          }
          continue;
        }
        for (int64_t p = p0; p < p1;) {
          const int64_t oh = p / OW, ow = p - oh * OW, len = std::min(OW - ow, p1 - p);
          acc_t* orow = o + oh * OW;  // orow[w] is column w of output row oh
          p += len;
          if (oh < tap.h_lo || oh >= tap.h_hi) {
            std::fill(orow + ow, orow + ow + len, acc_t(0));
            continue;
          }
          const scalar_t* xr = xp + (oh * sh + tap.off_h) * sxh;
          const int64_t a = std::clamp(w_lo, ow, ow + len), e = std::clamp(w_hi, a, ow + len);
          for (int64_t w = ow; w < a; ++w) orow[w] = acc_t(0);
          if (unit_w) {
            for (int64_t w = a; w < e; ++w) orow[w] = static_cast<acc_t>(xr[w + off_w]);
          } else {
            for (int64_t w = a; w < e; ++w) orow[w] = static_cast<acc_t>(xr[(w * sw + off_w) * sxw]);
          }
          for (int64_t w = e; w < ow + len; ++w) orow[w] = acc_t(0);
        }
      }
    }
  }
}

// Output positions flatten to one stride in grad_out (contiguous NC*, or any layout whose spatial dims
// are packed): then a group's G^T (p, T) is a strided view and needs no copy.
bool flat_positions(const ConvGeometry& geo, int64_t* t_stride) {
  // The stride of position t = (od, oh, ow): walk the dims from W up, skipping size-1 dims.
  int64_t expect = -1, span = 1;
  for (int a = 2; a >= 0; --a) {
    if (geo.out[a] == 1) continue;
    const int64_t s = geo.sg[2 + a];
    if (expect < 0) {
      expect = s;
      span = s * geo.out[a];
    } else if (s != span) {
      return false;
    } else {
      span *= geo.out[a];
    }
  }
  *t_stride = expect < 0 ? 1 : expect;
  return true;
}

// Rows of G^T (p, n) for positions [t0, t0 + n) into dst (ld = n), widened to acc_t.
template <typename scalar_t, typename acc_t>
void gather_grad(const ConvGeometry& geo, const scalar_t* g, int64_t t0, int64_t n, acc_t* dst) {
  const int64_t OH = geo.out[1], OW = geo.out[2];
  for (int64_t j = 0; j < geo.pg; ++j) {
    const scalar_t* gc = g + j * geo.sg[1];
    acc_t* row = dst + j * n;
    int64_t t = t0, ow = t0 % OW, oh = (t0 / OW) % OH, od = t0 / (OW * OH);
    while (t < t0 + n) {
      const int64_t len = std::min(OW - ow, t0 + n - t);
      const scalar_t* src = gc + od * geo.sg[2] + oh * geo.sg[3] + ow * geo.sg[4];
      acc_t* o = row + (t - t0);
      for (int64_t i = 0; i < len; ++i) o[i] = static_cast<acc_t>(src[i * geo.sg[4]]);
      t += len;
      ow = 0;
      if (++oh == OH) {
        oh = 0;
        ++od;
      }
    }
  }
}

template <typename acc_t>
at::Tensor matrix(acc_t* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride = 1) {
  return at::from_blob(data, {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Per-thread state: buffers sized once for the geometry, reused by every item of the thread.
//
// With a bias, U^T gets one more row of ones: G^T [U, 1] = [dW, db], so the GEMM (or the Gram matrix
// U U^T + 1 1^T) yields the bias term too, and grad_out is read by the GEMM only, never by a separate
// pass (that pass cost ~7% of the op on the benchmark CNN).
template <typename scalar_t, typename acc_t>
class Worker {
 public:
  // threaded_gemm: items run one by one and each at::mm uses every thread (the outer-product blocks would not).
  Worker(const ConvGeometry& geo, ConvMethod method, bool bias, bool threaded_gemm)
      : geo_(geo),
        method_(method),
        threaded_gemm_(threaded_gemm),
        T_(geo.T),
        K_(geo.K),
        Kx_(geo.K + (bias ? 1 : 0)),
        P_(geo.pg),
        taps_(make_taps(geo)) {
    int64_t t_stride = 0;
    g_view_ = std::is_same_v<scalar_t, acc_t> && flat_positions(geo, &t_stride) && t_stride == 1;
    direct_ = T_ * Kx_ * P_ <= kDirectWork;
    if (method_ == ConvMethod::kOuter) {
      chunk_ = 1;
    } else if (method_ == ConvMethod::kGhost) {
      chunk_ = T_;
      strip_ = std::clamp<int64_t>(std::min(kStripElements / T_, kStripRows), 1, T_);
      gram_.resize(2 * strip_ * T_);
    } else if (use_blocks()) {
      blocks_ = true;
      setup_blocks();
    } else {
      // Equal chunks of at most ~kChunkElements / d positions, a multiple of 16 (64-byte rows).
      const int64_t target = std::clamp<int64_t>(kChunkElements / Kx_, std::min(kMinChunk, T_), T_);
      chunk_ = std::min(T_, ceil_div(ceil_div(T_, ceil_div(T_, target)), 16) * 16);
      w_.resize(Kx_ * P_);
    }
    if (!blocks_) {
      u_.resize(Kx_ * chunk_);
      if (Kx_ > K_) std::fill(u_.begin() + K_ * chunk_, u_.end(), acc_t(1));  // the ones row
    }
    if (!g_view_) g_.resize(P_ * chunk_);
  }

  acc_t run(const scalar_t* x, const scalar_t* g) {
    if (method_ == ConvMethod::kOuter) return outer(x, g);
    if (method_ == ConvMethod::kGhost) return ghost(x, g);
#ifdef ISGD_OUTER_AVX512
    if constexpr (std::is_same_v<acc_t, float>) {
      if (blocks_) return materialize_blocks(x, g);
    }
#endif
    return materialize(x, g);
  }

 private:
  bool use_blocks() const {
#ifdef ISGD_OUTER_AVX512
    return std::is_same_v<acc_t, float> && !direct_ && !threaded_gemm_ &&
           cpu_has_avx512();
#else
    return false;
#endif
  }

#ifdef ISGD_OUTER_AVX512
  // Padded x (extents: every position of every tap), one row pointer per row of U^T (the ones row points
  // to a padded plane of ones), the positions' segments chunk by chunk, the packed G.
  void setup_blocks() {
    const ConvGeometry& geo = geo_;
    int64_t ext[3];
    for (int a = 0; a < 3; ++a) ext[a] = (geo.out[a] - 1) * geo.stride[a] + (geo.k[a] - 1) * geo.dil[a] + 1;
    xp_w_ = ext[2];
    xp_hw_ = ext[1] * ext[2];
    xp_plane_ = ext[0] * xp_hw_;
    xp_d_ = ext[0];
    xp_h_ = ext[1];
    xpad_.assign(geo.cg * xp_plane_, 0.f);  // only the interior is ever written: the border stays zero
    if (Kx_ > K_) ones_.assign(xp_plane_, 1.f);
    const int64_t KH = geo.k[1], KW = geo.k[2], kvol = geo.k[0] * KH * KW;
    row_ptr_.resize(Kx_);
    for (int64_t kk = 0; kk < K_; ++kk) {
      const int64_t c = kk / kvol, r = kk % kvol, kd = r / (KH * KW), kh = (r / KW) % KH, kw = r % KW;
      row_ptr_[kk] = xpad_.data() + c * xp_plane_ + kd * geo.dil[0] * xp_hw_ + kh * geo.dil[1] * xp_w_ +
                     kw * geo.dil[2];
    }
    if (Kx_ > K_) row_ptr_[K_] = ones_.data();
    nv_ = ceil_div(P_, 16);
    ldg_ = nv_ * 16;
    const int64_t chunks = ceil_div(T_, std::max<int64_t>(1, kOuterChunkElements / ldg_));
    chunk_ = ceil_div(T_, chunks);
    gp_.assign(chunk_ * ldg_, 0.f);  // columns past p stay zero
    if (chunks > 1) w_.resize(Kx_ * ldg_);
    chunk_seg_.push_back(0);
    int64_t t = 0;
    for (int64_t od = 0; od < geo.out[0]; ++od) {
      for (int64_t oh = 0; oh < geo.out[1]; ++oh) {
        const int64_t base = od * geo.stride[0] * xp_hw_ + oh * geo.stride[1] * xp_w_;
        for (int64_t ow = 0; ow < geo.out[2];) {
          const int64_t len = std::min(geo.out[2] - ow, (t / chunk_ + 1) * chunk_ - t);
          segs_.push_back({base + ow * geo.stride[2], len});
          t += len;
          ow += len;
          if (t % chunk_ == 0 || t == T_) chunk_seg_.push_back(static_cast<int64_t>(segs_.size()));
        }
      }
    }
  }

  // The item's x into the interior of xpad_ (widened to float).
  void pad_x(const scalar_t* x) {
    const ConvGeometry& geo = geo_;
    const int64_t n = std::min(geo.in[2], xp_w_ - geo.pad[2]);
    if (n <= 0) return;
    for (int64_t c = 0; c < geo.cg; ++c) {
      for (int64_t id = 0; id < geo.in[0] && id + geo.pad[0] < xp_d_; ++id) {
        for (int64_t ih = 0; ih < geo.in[1] && ih + geo.pad[1] < xp_h_; ++ih) {
          const scalar_t* src = x + c * geo.sx[1] + id * geo.sx[2] + ih * geo.sx[3];
          float* dst = xpad_.data() + c * xp_plane_ + (id + geo.pad[0]) * xp_hw_ + (ih + geo.pad[1]) * xp_w_ + geo.pad[2];
          if (std::is_same_v<scalar_t, float> && geo.sx[4] == 1) {
            std::memcpy(dst, src, n * sizeof(float));
          } else {
            for (int64_t iw = 0; iw < n; ++iw) dst[iw] = static_cast<float>(src[iw * geo.sx[4]]);
          }
        }
      }
    }
  }

  // G (n, p) of positions [t0, t0 + n) into gp_, p contiguous (row stride ldg_).
  void pack_grad(const scalar_t* g, int64_t t0, int64_t n) {
    int64_t ld;
    const float* rows = reinterpret_cast<const float*>(grad_rows(g, t0, n, &ld));
    for (int64_t j = 0; j < P_; j += 16)
      for (int64_t t = 0; t < n; t += 16)
        transpose16(rows + j * ld + t, ld, std::min<int64_t>(16, P_ - j), std::min<int64_t>(16, n - t),
                    gp_.data() + t * ldg_ + j, ldg_);
  }

  // ||G^T [U, 1]||_F^2 by outer_block: blocks of rows of U^T x blocks of at most 4 vectors of columns of G,
  // both split evenly (every block keeps enough independent accumulators).
  float materialize_blocks(const scalar_t* x, const scalar_t* g) {
    pad_x(x);
    float sq16[16] = {};
    const bool chunked = !w_.empty();
    if (chunked) std::fill(w_.begin(), w_.end(), 0.f);
    const int64_t nb = ceil_div(nv_, 4);
    for (size_t c = 0; c + 1 < chunk_seg_.size(); ++c) {
      const int64_t t0 = static_cast<int64_t>(c) * chunk_;
      pack_grad(g, t0, std::min(chunk_, T_ - t0));
      const OuterSeg* seg = segs_.data() + chunk_seg_[c];
      const int64_t nseg = chunk_seg_[c + 1] - chunk_seg_[c];
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t v0 = b * nv_ / nb, nv = (b + 1) * nv_ / nb - v0;
        const int64_t nrb = ceil_div(Kx_, kOuterMaxRows[nv - 1]);
        for (int64_t rb = 0; rb < nrb; ++rb) {
          const int64_t r0 = rb * Kx_ / nrb, nr = (rb + 1) * Kx_ / nrb - r0;
          outer_kernel(static_cast<int>(nr), static_cast<int>(nv))(
              row_ptr_.data() + r0, seg, nseg, geo_.stride[2], gp_.data() + 16 * v0, ldg_,
              chunked ? w_.data() + r0 * ldg_ + 16 * v0 : nullptr, ldg_, sq16);
        }
      }
    }
    if (chunked) return dot(w_.data(), w_.data(), Kx_ * ldg_);
    float sq = 0;
    for (float v : sq16) sq += v;
    return sq;
  }
#endif

  // G^T rows (p, n) for positions [t0, t0 + n): a view of grad_out when possible, else widened into g_.
  const acc_t* grad_rows(const scalar_t* g, int64_t t0, int64_t n, int64_t* ld) {
    if (g_view_) {
      *ld = geo_.sg[1];
      return reinterpret_cast<const acc_t*>(g) + t0;
    }
    gather_grad<scalar_t, acc_t>(geo_, g, t0, n, g_.data());
    *ld = n;
    return g_.data();
  }

  // T == 1: ||g u^T||^2 = ||u||^2 ||g||^2 (+ ||g||^2 for the bias).
  acc_t outer(const scalar_t* x, const scalar_t* g) {
    gather_patches<scalar_t, acc_t>(geo_, taps_.data(), x, 0, 1, 0, K_, u_.data(), 1);
    int64_t ld;
    const acc_t* rows = grad_rows(g, 0, 1, &ld);
    acc_t sg = 0;
    for (int64_t j = 0; j < P_; ++j) sg += rows[j * ld] * rows[j * ld];
    return dot(u_.data(), u_.data(), Kx_) * sg;
  }

  // ||G^T [U, 1]||_F^2, accumulated over chunks of positions.
  acc_t materialize(const scalar_t* x, const scalar_t* g) {
    acc_t* w = w_.data();
    if (direct_) std::fill(w_.begin(), w_.end(), acc_t(0));
    for (int64_t t0 = 0; t0 < T_; t0 += chunk_) {
      const int64_t n = std::min(chunk_, T_ - t0);
      // Rows have stride n; a shorter last chunk needs its own ones row (gathers never write past row K).
      gather_patches<scalar_t, acc_t>(geo_, taps_.data(), x, t0, n, 0, K_, u_.data(), n);
      if (Kx_ > K_ && n != chunk_) std::fill(u_.data() + K_ * n, u_.data() + Kx_ * n, acc_t(1));
      int64_t ld;
      const acc_t* rows = grad_rows(g, t0, n, &ld);
      if (direct_) {
        for (int64_t k = 0; k < Kx_; ++k)
          for (int64_t j = 0; j < P_; ++j) w[k * P_ + j] += dot(u_.data() + k * n, rows + j * ld, n);
        continue;
      }
      // W^T (d, p) += U^T (d, n) . G (n, p): this orientation measured faster than G^T U (MKL sgemm).
      at::Tensor wt = matrix(w, Kx_, P_, P_);
      const at::Tensor ut = matrix(u_.data(), Kx_, n, n);
      const at::Tensor gt = matrix(const_cast<acc_t*>(rows), n, P_, 1, ld);
      if (t0 == 0) {
        at::mm_out(wt, ut, gt);
      } else {
        wt.addmm_(ut, gt);
      }
    }
    return dot(w, w, Kx_ * P_);
  }

  // sum_{t,s} (u_t . u_s + 1)(delta_t . delta_s) by strips of the Gram matrices.
  acc_t ghost(const scalar_t* x, const scalar_t* g) {
    gather_patches<scalar_t, acc_t>(geo_, taps_.data(), x, 0, T_, 0, K_, u_.data(), T_);
    int64_t ld;
    acc_t* rows = const_cast<acc_t*>(grad_rows(g, 0, T_, &ld));
    acc_t* ga = gram_.data();
    acc_t* gg = gram_.data() + strip_ * T_;
    acc_t total = 0;
    // Strip [t0, t0 + m) x [t0, T): its leading m x m block is a whole diagonal block (counted once);
    // the rest is the upper triangle, which stands for itself and its mirror image (counted twice).
    for (int64_t t0 = 0; t0 < T_; t0 += strip_) {
      const int64_t m = std::min(strip_, T_ - t0), nc = T_ - t0;
      at::Tensor a = matrix(ga, m, nc, nc), b = matrix(gg, m, nc, nc);
      at::mm_out(a, matrix(u_.data() + t0, m, Kx_, 1, T_), matrix(u_.data() + t0, Kx_, nc, T_));
      at::mm_out(b, matrix(rows + t0, m, P_, 1, ld), matrix(rows + t0, P_, nc, ld));
      for (int64_t i = 0; i < m; ++i) {
        total += dot(ga + i * nc, gg + i * nc, m);
        total += acc_t(2) * dot(ga + i * nc + m, gg + i * nc + m, nc - m);
      }
    }
    return total;
  }

  const ConvGeometry& geo_;
  const ConvMethod method_;
  const bool threaded_gemm_;
  const int64_t T_, K_, Kx_, P_;  // Kx_: rows of U^T, K_ plus the ones row with a bias
  const std::vector<Tap> taps_;
  bool g_view_ = false, direct_ = false, blocks_ = false;
  int64_t chunk_ = 1, strip_ = 1;
  std::vector<acc_t> u_, g_, w_, gram_;
  // Outer-product blocks: padded x and its extents, row pointers, segments, packed G.
  int64_t xp_w_ = 0, xp_hw_ = 0, xp_plane_ = 0, xp_d_ = 0, xp_h_ = 0, nv_ = 0, ldg_ = 0;
  std::vector<float> xpad_, ones_, gp_;
  std::vector<const float*> row_ptr_;
  std::vector<OuterSeg> segs_;
  std::vector<int64_t> chunk_seg_;  // segs_ of chunk c: [chunk_seg_[c], chunk_seg_[c + 1])
};

at::Tensor conv_grad_sq_norms_cpu(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, bool bias, c10::string_view method) {
  const ConvGeometry geo = conv_geometry(x, grad_out, kernel_size, stride, padding, dilation, groups, kOp);
  TORCH_CHECK(x.device().is_cpu(), kOp, ": expected CPU tensors, got x on ", x.device());
  ConvMethod how = parse_conv_method(method, geo.T, kOp);
  if (geo.T == 1) how = ConvMethod::kOuter;  // ghost and materialize both reduce to it
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t items = geo.B * geo.groups;
  auto partial = at::empty({geo.B, geo.groups}, x.options().dtype(acc));
  if (items == 0) return partial.sum(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "_conv_grad_sq_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    acc_t* out = partial.mutable_data_ptr<acc_t>();
    // Fewer items than threads (a single large example): run them one by one so that each GEMM can
    // use every thread itself.
    const bool serial = items < at::get_num_threads();
    auto body = [&](int64_t begin, int64_t end) {
      Worker<scalar_t, acc_t> worker(geo, how, bias, serial);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / geo.groups, grp = i % geo.groups;
        out[i] = worker.run(xp + b * geo.sx[0] + grp * geo.cg * geo.sx[1],
                            gp + b * geo.sg[0] + grp * geo.pg * geo.sg[1]);
      }
    };
    if (serial) {
      body(0, items);
    } else {
      at::parallel_for(0, items, 1, body);
    }
  });
  return partial.sum(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CPU, m) { m.impl("_conv_grad_sq_norms", &conv_grad_sq_norms_cpu); }

}  // namespace isgd_kernels
