// Scalar and SSE2 primitives of the CPU alias-table build (cpu_build.cpp): branch-free min / max,
// horizontal sums, four weights as two pairs of doubles, popcount, the set-bit positions of a byte, and
// the exact two-sum of the compensated prefix sums.
#pragma once

#include <algorithm>
#include <cstdint>

// SSE2 is part of the x86-64 baseline; elsewhere (or with ISGD_ALIAS_PORTABLE defined, to test that
// path on x86) the same build runs as plain scalar code.
#if defined(__SSE2__) && !defined(ISGD_ALIAS_PORTABLE)
#define ISGD_ALIAS_SSE2 1
#include <emmintrin.h>
#endif

namespace isgd_kernels {
namespace alias_table {

// Scalar min / max as one instruction (GCC turned std::max on doubles into compare-and-jump, which
// mispredicts on every other item when light and heavy items interleave).
#ifdef ISGD_ALIAS_SSE2
inline double max_d(double a, double b) { return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(a), _mm_set_sd(b))); }
inline double min_d(double a, double b) { return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(a), _mm_set_sd(b))); }
inline double hsum(__m128d v) { return _mm_cvtsd_f64(v) + _mm_cvtsd_f64(_mm_unpackhi_pd(v, v)); }
inline double hmax(__m128d v) { return std::max(_mm_cvtsd_f64(v), _mm_cvtsd_f64(_mm_unpackhi_pd(v, v))); }
inline double hmin(__m128d v) { return std::min(_mm_cvtsd_f64(v), _mm_cvtsd_f64(_mm_unpackhi_pd(v, v))); }
#else
inline double max_d(double a, double b) { return a > b ? a : b; }
inline double min_d(double a, double b) { return a < b ? a : b; }
#endif

// Without -mpopcnt, __builtin_popcountll is a libgcc call.
inline int64_t popcount64(uint64_t x) {
  x = x - ((x >> 1) & 0x5555555555555555ull);
  x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return static_cast<int64_t>((x * 0x0101010101010101ull) >> 56);
}

// Positions of the set bits of each byte value (padded to 8) and their number: extracting the items
// of one class from a mask word costs ~11 instructions per byte instead of ~7 per item.
struct BytePositions {
  alignas(16) int32_t pos[256][8];
  uint8_t count[256];
  constexpr BytePositions() : pos(), count() {
    for (int b = 0; b < 256; ++b) {
      int c = 0;
      for (int k = 0; k < 8; ++k)
        if (b & (1 << k)) pos[b][c++] = k;
      count[b] = static_cast<uint8_t>(c);
    }
  }
};
inline constexpr BytePositions kBytePos{};

// Two-sum: a + b = s + err exactly.
inline void two_sum(double a, double b, double& s, double& err) {
  s = a + b;
  const double bb = s - a;
  err = (a - (s - bb)) + (b - bb);
}

#ifdef ISGD_ALIAS_SSE2
// Four weights as two pairs of doubles.
template <typename T>
inline void load4(const T* p, __m128d& a, __m128d& b) {
  a = _mm_set_pd(static_cast<double>(p[1]), static_cast<double>(p[0]));
  b = _mm_set_pd(static_cast<double>(p[3]), static_cast<double>(p[2]));
}
template <>
inline void load4<float>(const float* p, __m128d& a, __m128d& b) {
  const __m128 x = _mm_loadu_ps(p);
  a = _mm_cvtps_pd(x);
  b = _mm_cvtps_pd(_mm_movehl_ps(x, x));
}
template <>
inline void load4<double>(const double* p, __m128d& a, __m128d& b) {
  a = _mm_loadu_pd(p);
  b = _mm_loadu_pd(p + 2);
}
#endif

}  // namespace alias_table
}  // namespace isgd_kernels
