// The AVX-512 outer-product microkernel shared by the CPU conv and Linear norm kernels
// (conv_norms/cpu.cpp, linear_norms/cpu.cpp): ||U^T G||_F^2 for U^T (d, T) and G (T, p) without writing
// U^T G to memory when it fits in registers block by block.
//
// Compiled for AVX-512 whatever the build flags (the build does not pass -mavx512f); callers check
// cpu_has_avx512() at run time and keep a portable path for other CPUs. ISGD_OUTER_AVX512 is defined
// where this code exists (GCC/Clang on x86-64).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ISGD_OUTER_AVX512 1
#endif

namespace isgd_kernels {
namespace outer {

// Positions t, t + 1, ... t + n - 1 of one run: offsets x, x + sw, ... x + (n - 1) sw into every row of
// U^T (conv: one output row; Linear: all positions, sw = x's stride along T).
struct OuterSeg {
  int64_t x, n;
};

#ifdef ISGD_OUTER_AVX512
// W^T (d, p) = U^T G as a sum of outer products, vectors along output channels: a block of R rows of U^T
// and NV * 16 columns of G keeps R x NV zmm accumulators over all positions of a chunk; per position
// NV loads of the G row, R broadcasts of U^T[r, t] and R * NV FMAs. The block's sums are squared into 16
// lanes (or added to W in memory when the positions come in several chunks): no horizontal reduction per
// block, so short problems run as fast as long ones (the dot blocks along positions that this replaced
// in the conv kernel spent as much on reductions as on FMAs at T = 64).
// Row r of U^T is a pointer rows[r]; position t of segment s is the offset seg[s].x + j * sw, shared by
// every row. G row t is at g + t * ldg and must hold NV * 16 readable floats (callers pad the tail).
// Most rows per block for NV = 1 .. 4 vectors of G: 24 accumulators at most, 32 zmm registers.
constexpr int kOuterMaxRows[4] = {12, 14, 8, 6};
// Positions per chunk: a column block's G rows (chunk x at most 64 floats, 2^16 floats = 256 KiB) stay in
// L2 while every row block of U^T streams over them; longer T runs in chunks with W in memory.
constexpr int64_t kOuterChunkElements = int64_t(1) << 16;

template <int R, int NV>
__attribute__((target("avx512f,fma"))) void outer_block(const float* const* rows, const OuterSeg* seg,
                                                         int64_t nseg, int64_t sw, const float* g, int64_t ldg,
                                                         float* w, int64_t ldw, float* sq16) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* x[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) x[r] = rows[r];
  for (int64_t s = 0; s < nseg; ++s) {
    int64_t i = seg[s].x;
    for (int64_t j = 0; j < seg[s].n; ++j, i += sw, g += ldg) {
      __m512 gv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) gv[v] = _mm512_loadu_ps(g + 16 * v);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 u = _mm512_set1_ps(x[r][i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(u, gv[v], acc[r][v]);
      }
    }
  }
  if (w != nullptr) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        float* o = w + r * ldw + 16 * v;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][v]));
      }
    return;
  }
  __m512 sq[NV];  // NV independent chains
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) sq[v] = _mm512_mul_ps(acc[0][v], acc[0][v]);
#pragma GCC unroll 16
  for (int r = 1; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) sq[v] = _mm512_fmadd_ps(acc[r][v], acc[r][v], sq[v]);
  __m512 s = _mm512_loadu_ps(sq16);
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) s = _mm512_add_ps(s, sq[v]);
  _mm512_storeu_ps(sq16, s);
}

using OuterKernel = void (*)(const float* const*, const OuterSeg*, int64_t, int64_t, const float*, int64_t, float*,
                             int64_t, float*);

constexpr int kOuterRowsMax = *std::max_element(kOuterMaxRows, kOuterMaxRows + 4);

template <int NV, int... Rm1>
constexpr std::array<OuterKernel, kOuterRowsMax> outer_kernels(std::integer_sequence<int, Rm1...>) {
  return {{&outer_block<Rm1 + 1, NV>...}};
}

// outer_kernel(r, nv): the block of r rows and nv vectors, r <= kOuterMaxRows[nv - 1].
inline OuterKernel outer_kernel(int r, int nv) {
  static constexpr std::array<std::array<OuterKernel, kOuterRowsMax>, 4> table = {
      outer_kernels<1>(std::make_integer_sequence<int, kOuterMaxRows[0]>()),
      outer_kernels<2>(std::make_integer_sequence<int, kOuterMaxRows[1]>()),
      outer_kernels<3>(std::make_integer_sequence<int, kOuterMaxRows[2]>()),
      outer_kernels<4>(std::make_integer_sequence<int, kOuterMaxRows[3]>())};
  return table[nv - 1][r - 1];
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

}  // namespace outer
}  // namespace isgd_kernels
