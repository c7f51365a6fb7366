// PSA build of the CPU alias table (Hübschle-Schneider & Sanders 2019): the merged light/heavy
// sequence is split into chunks that are swept independently.
//   pass 1  sum / min / max per block of kBlock items (SIMD); only a block whose min, max or sum is
//           suspicious is rescanned, so ValueError still names the first bad index;
//   pass 2  s = N q of every item into the threshold buffer (final for lights), heavy bit mask, and
//           per 64-item word and per block the summed deficit / excess (per block also the counts);
//   sweep   chunks of equal merged length, co-ranked (merge path) from the block and word sums, swept
//           four at a time per thread (independent dependency chains); a step places the run of up
//           to 4 lights below the current heavy's key with two SIMD compares.
// Work is claimed dynamically (blocks in passes 1-2, chunk groups in the sweep), so a thread whose
// core another process is using takes less of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu.h"
#include "cpu_pool.h"
#include "cpu_simd.h"

namespace isgd_kernels {
namespace alias_table {
namespace {

constexpr int64_t kBlock = 1024;               // items per summary block (counts, prefix sums)
constexpr int64_t kClaim = 32;                 // blocks per dynamic claim in passes 1 and 2
constexpr int64_t kMinItemsPerChunk = 1 << 16;  // below this a chunk's start-up costs more than it saves
constexpr int64_t kPrefetchWords = 4;          // how far ahead a stream prefetches s (64-item words)

// Weights -> s = N q (mean 1): s(w) = min((w * pre) * k, cs), pre = 2^600 only when 1/m would
// overflow (m = max weight), k = cs / (m * pre) rounded up until the largest weight gives exactly
// cs >= 1 (so it is heavy, and all-equal weights give identical s: an exactly uniform table).
// Two instructions per item instead of the reference's select on w == m; the tables agree to
// rounding, not bitwise (see reference_sampler.alias_scale).
struct Scale {
  double m, pre, k, cs;
  inline double operator()(double w) const { return min_d((w * pre) * k, cs); }
};

// Threads for a pass over `items` items: at least kMinItemsPerChunk each.
int64_t num_threads_for(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items / kMinItemsPerChunk));
}

inline bool is_bad(double v) { return !(v >= 0.0) || v > std::numeric_limits<double>::max(); }

struct BlockStat {
  double sum, mx;
  int64_t bad;  // first bad index in the block, or -1
};

// NaN shows in the sum, +-inf in the max or min, a negative value in the min (-0.0 passes): only a
// suspicious block is rescanned item by item, which also clears a float64 sum that overflowed.
template <typename T>
BlockStat finish_block(const T* w, int64_t lo, int64_t hi, double s, double m, double mn) {
  BlockStat r{s, m, -1};
  if (!(mn >= 0.0) || !(m <= std::numeric_limits<double>::max()) || std::isnan(s)) {
    for (int64_t k = lo; k < hi; ++k) {
      if (is_bad(static_cast<double>(w[k]))) {
        r.bad = k;
        break;
      }
    }
  }
  return r;
}

#ifdef ISGD_ALIAS_SSE2
template <typename T>
BlockStat block_stat(const T* w, int64_t lo, int64_t hi) {
  const __m128d zero = _mm_setzero_pd();
  __m128d s0 = zero, s1 = zero, m0 = zero, m1 = zero, n0 = zero, n1 = zero;
  int64_t i = lo;
  for (; i + 4 <= hi; i += 4) {
    __m128d a, c;
    load4(w + i, a, c);
    s0 = _mm_add_pd(s0, a);
    s1 = _mm_add_pd(s1, c);
    m0 = _mm_max_pd(m0, a);
    m1 = _mm_max_pd(m1, c);
    n0 = _mm_min_pd(n0, a);
    n1 = _mm_min_pd(n1, c);
  }
  double s = hsum(_mm_add_pd(s0, s1)), m = hmax(_mm_max_pd(m0, m1)), mn = hmin(_mm_min_pd(n0, n1));
  for (; i < hi; ++i) {
    const double v = static_cast<double>(w[i]);
    s += v;
    m = max_d(v, m);
    mn = min_d(v, mn);
  }
  return finish_block(w, lo, hi, s, m, mn);
}

// float32: min / max in float lanes (4 per instruction), the sum in float64 (2.5 instructions per
// item instead of 6 with everything in float64 lanes).
template <>
BlockStat block_stat<float>(const float* w, int64_t lo, int64_t hi) {
  const __m128d zd = _mm_setzero_pd();
  const __m128 zf = _mm_setzero_ps();
  __m128d s0 = zd, s1 = zd, s2 = zd, s3 = zd;
  __m128 m0 = zf, m1 = zf, n0 = zf, n1 = zf;
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m128 x = _mm_loadu_ps(w + i), y = _mm_loadu_ps(w + i + 4);
    m0 = _mm_max_ps(m0, x);
    m1 = _mm_max_ps(m1, y);
    n0 = _mm_min_ps(n0, x);
    n1 = _mm_min_ps(n1, y);
    s0 = _mm_add_pd(s0, _mm_cvtps_pd(x));
    s1 = _mm_add_pd(s1, _mm_cvtps_pd(_mm_movehl_ps(x, x)));
    s2 = _mm_add_pd(s2, _mm_cvtps_pd(y));
    s3 = _mm_add_pd(s3, _mm_cvtps_pd(_mm_movehl_ps(y, y)));
  }
  float mf[4], nf[4];
  _mm_storeu_ps(mf, _mm_max_ps(m0, m1));
  _mm_storeu_ps(nf, _mm_min_ps(n0, n1));
  double s = hsum(_mm_add_pd(_mm_add_pd(s0, s1), _mm_add_pd(s2, s3)));
  double m = std::max(std::max(mf[0], mf[1]), std::max(mf[2], mf[3]));
  double mn = std::min(std::min(nf[0], nf[1]), std::min(nf[2], nf[3]));
  for (; i < hi; ++i) {
    const double v = w[i];
    s += v;
    m = max_d(v, m);
    mn = min_d(v, mn);
  }
  return finish_block(w, lo, hi, s, m, mn);
}
#else
template <typename T>
BlockStat block_stat(const T* w, int64_t lo, int64_t hi) {
  double s[4] = {0, 0, 0, 0}, m = 0, mn = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const double v = static_cast<double>(w[i]);
    s[i & 3] += v;
    m = max_d(v, m);
    mn = min_d(v, mn);
  }
  return finish_block(w, lo, hi, (s[0] + s[1]) + (s[2] + s[3]), m, mn);
}
#endif

struct Pass1 {
  int64_t first_bad = -1, argmax = 0;
  double mx = 0, sum = 0;
};

template <typename T>
Pass1 validate_max_sum(const T* w, int64_t n) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<BlockStat> st(nb);
  for_claimed((nb + kClaim - 1) / kClaim, num_threads_for(n), [&](int64_t c) {
    for (int64_t b = c * kClaim, be = std::min(nb, b + kClaim); b < be; ++b)
      st[b] = block_stat(w, b * kBlock, std::min(n, (b + 1) * kBlock));
  });
  Pass1 r;
  for (int64_t b = 0; b < nb; ++b) {
    if (st[b].bad >= 0) {
      r.first_bad = st[b].bad;
      return r;
    }
    r.sum += st[b].sum;
    r.mx = std::max(r.mx, st[b].mx);
  }
  for (int64_t b = 0; b < nb; ++b) {
    if (st[b].mx == r.mx) {
      for (int64_t k = b * kBlock; k < n; ++k) {
        if (static_cast<double>(w[k]) == r.mx) {
          r.argmax = k;
          break;
        }
      }
      break;
    }
  }
  return r;
}

template <typename T, typename I>
struct Builder {
  const T* w;
  int64_t n, nb, argmax;
  Scale sc;
  double* thr;
  I* alias;
  std::vector<uint64_t> mask_;  // bit i set: item i is heavy (s >= 1); N/8 bytes
  const uint64_t* mask = nullptr;
  std::vector<int64_t> PL, PH;    // lights / heavies in blocks [0, b)
  std::vector<double> PDL, PEH;   // their summed deficit / excess
  std::vector<double> wsum_;      // per mask word: summed deficit of its lights, excess of its heavies

  // s of item i recomputed from the weight (bitwise what pass 2 stored): the chunk starts are found
  // while other chunks already overwrite heavies' entries of the threshold buffer.
  inline double s(int64_t i) const { return sc(static_cast<double>(w[i])); }
  inline bool heavy(int64_t i) const { return (mask[i >> 6] >> (i & 63)) & 1; }
  int64_t A() const { return PL[nb]; }
  int64_t B() const { return PH[nb]; }

  template <bool kPre>
  void block_summaries(std::vector<int64_t>& nh, std::vector<double>& dl, std::vector<double>& eh) {
    for_claimed((nb + kClaim - 1) / kClaim, num_threads_for(n), [&](int64_t cl) {
      const T* wp = w;
      double* tp = thr;
      uint64_t* mk = mask_.data();
      double* ws = wsum_.data();
      // One word's items [w0, we): s, heavy bits, deficit max(0, 1 - s) and excess max(0, s - 1)
      // sums, branch-free (s = 1 adds 0 to both, whichever class it counts in).
      auto word_scalar = [&](int64_t w0, int64_t we, double& dw, double& ew) {
        uint64_t bits = 0;
        dw = ew = 0;
        for (int64_t i = w0; i < we; ++i) {
          const double v = sc(static_cast<double>(wp[i]));
          tp[i] = v;
          bits |= static_cast<uint64_t>(!(v < 1.0)) << (i - w0);
          dw += max_d(1.0 - v, 0.0);
          ew += max_d(v - 1.0, 0.0);
        }
        return bits;
      };
#ifdef ISGD_ALIAS_SSE2
      const __m128d one = _mm_set1_pd(1.0), zero = _mm_setzero_pd(), vcs = _mm_set1_pd(sc.cs),
                    vpre = _mm_set1_pd(sc.pre), vk = _mm_set1_pd(sc.k);
      auto word_simd = [&](int64_t w0, double& dw, double& ew) {
        uint64_t bits = 0;
        __m128d d0 = zero, d1 = zero, e0 = zero, e1 = zero;
        // Unrolled so that the mask shifts are constants (10.4 -> 8.8 instructions per item).
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          const int64_t i = w0 + 4 * j;
          __m128d a, c;
          load4(wp + i, a, c);
          if (kPre) {
            a = _mm_mul_pd(a, vpre);
            c = _mm_mul_pd(c, vpre);
          }
          a = _mm_min_pd(_mm_mul_pd(a, vk), vcs);
          c = _mm_min_pd(_mm_mul_pd(c, vk), vcs);
          _mm_storeu_pd(tp + i, a);
          _mm_storeu_pd(tp + i + 2, c);
          bits |= static_cast<uint64_t>(_mm_movemask_pd(_mm_cmpge_pd(a, one)) |
                                        (_mm_movemask_pd(_mm_cmpge_pd(c, one)) << 2))
                  << (4 * j);
          const __m128d xa = _mm_sub_pd(a, one), xc = _mm_sub_pd(c, one);
          d0 = _mm_sub_pd(d0, _mm_min_pd(xa, zero));
          d1 = _mm_sub_pd(d1, _mm_min_pd(xc, zero));
          e0 = _mm_add_pd(e0, _mm_max_pd(xa, zero));
          e1 = _mm_add_pd(e1, _mm_max_pd(xc, zero));
        }
        dw = hsum(_mm_add_pd(d0, d1));
        ew = hsum(_mm_add_pd(e0, e1));
        return bits;
      };
#endif
      for (int64_t b = cl * kClaim, be = std::min(nb, b + kClaim); b < be; ++b) {
        const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
        double db = 0, eb = 0;
        int64_t cnt = 0;
        for (int64_t w0 = lo; w0 < hi; w0 += 64) {  // kBlock is a multiple of 64: words stay in-block
          double dw, ew;
#ifdef ISGD_ALIAS_SSE2
          const uint64_t bits = w0 + 64 <= hi ? word_simd(w0, dw, ew) : word_scalar(w0, hi, dw, ew);
#else
          const uint64_t bits = word_scalar(w0, std::min(hi, w0 + 64), dw, ew);
#endif
          mk[w0 >> 6] = bits;
          ws[2 * (w0 >> 6)] = dw;
          ws[2 * (w0 >> 6) + 1] = ew;
          cnt += popcount64(bits);
          db += dw;
          eb += ew;
        }
        nh[b] = cnt;
        dl[b] = db;
        eh[b] = eb;
      }
    });
  }

  void summaries() {
    std::vector<int64_t> nh(nb);
    std::vector<double> dl(nb), eh(nb);
    mask_.resize((n + 63) / 64);
    mask = mask_.data();
    wsum_.resize(2 * mask_.size());
    if (sc.pre != 1.0) {
      block_summaries<true>(nh, dl, eh);
    } else {
      block_summaries<false>(nh, dl, eh);
    }
    PL.assign(nb + 1, 0);
    PH.assign(nb + 1, 0);
    PDL.assign(nb + 1, 0.0);
    PEH.assign(nb + 1, 0.0);
    double sd = 0, cd = 0, se = 0, ce = 0;  // compensated prefix sums (Neumaier)
    for (int64_t b = 0; b < nb; ++b) {
      double t, err;
      two_sum(sd, dl[b], t, err);
      sd = t;
      cd += err;
      two_sum(se, eh[b], t, err);
      se = t;
      ce += err;
      const int64_t len = std::min(n, (b + 1) * kBlock) - b * kBlock;
      PL[b + 1] = PL[b] + (len - nh[b]);
      PH[b + 1] = PH[b] + nh[b];
      PDL[b + 1] = sd + cd;
      PEH[b + 1] = se + ce;
    }
  }

  int64_t word_len(int64_t wi) const { return std::min<int64_t>(64, n - (wi << 6)); }
  int64_t word_heavies(int64_t wi) const { return popcount64(mask[wi]); }

  // Index of light number a and the summed deficit of the lights before it: block prefix, whole
  // words (their counts and sums), then one word item by item.
  std::pair<int64_t, double> light_at(int64_t a) const {
    if (a >= A()) return {n, PDL[nb]};
    const int64_t blk = std::upper_bound(PL.begin(), PL.end(), a) - PL.begin() - 1;
    int64_t cnt = PL[blk];
    double acc = PDL[blk];
    int64_t wi = blk * (kBlock / 64);
    for (int64_t nl; cnt + (nl = word_len(wi) - word_heavies(wi)) <= a; ++wi) {
      cnt += nl;
      acc += wsum_[2 * wi];
    }
    for (int64_t i = wi << 6, hi = i + word_len(wi); i < hi; ++i) {
      if (!heavy(i)) {
        if (cnt == a) return {i, acc};
        acc += 1.0 - s(i);
        ++cnt;
      }
    }
    return {n, PDL[nb]};  // unreachable: the counts come from the same mask
  }

  // Index of heavy number b and the summed excess of the heavies before it.
  std::pair<int64_t, double> heavy_at(int64_t b) const {
    if (b >= B()) return {n, PEH[nb]};
    const int64_t blk = std::upper_bound(PH.begin(), PH.end(), b) - PH.begin() - 1;
    int64_t cnt = PH[blk];
    double acc = PEH[blk];
    int64_t wi = blk * (kBlock / 64);
    for (int64_t nh; cnt + (nh = word_heavies(wi)) <= b; ++wi) {
      cnt += nh;
      acc += wsum_[2 * wi + 1];
    }
    for (int64_t i = wi << 6, hi = i + word_len(wi); i < hi; ++i) {
      if (heavy(i)) {
        if (cnt == b) return {i, acc};
        acc += s(i) - 1.0;
        ++cnt;
      }
    }
    return {n, PEH[nb]};
  }

  // Number of heavies whose inclusive excess prefix is <= x (= heavies merged before a light whose
  // exclusive deficit prefix is x).
  int64_t heavies_before(double x) const {
    const int64_t blk = std::upper_bound(PEH.begin() + 1, PEH.end(), x) - (PEH.begin() + 1);
    if (blk >= nb) return B();
    int64_t cnt = PH[blk];
    double acc = PEH[blk];
    const int64_t wend = std::min((blk + 1) * (kBlock / 64), static_cast<int64_t>(mask_.size()));
    int64_t wi = blk * (kBlock / 64);
    for (; wi < wend && acc + wsum_[2 * wi + 1] <= x; ++wi) {
      cnt += word_heavies(wi);
      acc += wsum_[2 * wi + 1];
    }
    if (wi == wend) return PH[blk + 1];
    for (int64_t i = wi << 6, hi = i + word_len(wi); i < hi; ++i) {
      if (heavy(i)) {
        acc += s(i) - 1.0;
        if (acc > x) return cnt;
        ++cnt;
      }
    }
    return cnt;
  }

  // Number of lights among the first k items of the merged sequence (merge-path co-rank).
  int64_t co_rank(int64_t k) const {
    int64_t lo = std::max<int64_t>(0, k - B()), hi = std::min(k, A());
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int64_t pos = mid + heavies_before(light_at(mid).second);
      if (pos >= k) hi = mid; else lo = mid + 1;
    }
    return lo;
  }

  // The items of one class in index order with their merge keys (light: exclusive deficit prefix,
  // heavy: inclusive excess prefix), up to kCap at a time, found through the heavy bit mask. Key =
  // word base + local: local is a plain running sum within one 64-item word, the base a compensated
  // (hi, lo) sum of the word totals, so keys stay accurate to ~1 ulp of their magnitude however long
  // the chunk. After the last entry sit sentinels: a light's key is the exclusive prefix of whatever
  // light comes next (what a heavy's threshold needs once the chunk's lights are done); a heavy's
  // index repeats the last heavy (the last heavy aliases itself).
  template <int64_t kCap>
  struct Stream {
    I idx[kCap + 72];  // + 64 of overshoot past kCap (one word) and the sentinels
    double key[kCap + 72];
    const Builder* bd;
    bool light;
    int64_t pos, left;  // next index to scan; items still to extract
    double hi, lo;
    int64_t head = 0, cnt = 0;
    bool done = false;

    void init(const Builder* b, bool l, int64_t start, int64_t count, double base) {
      bd = b;
      light = l;
      pos = start;
      left = count;
      hi = base;
      lo = 0.0;
      head = cnt = 0;
      done = false;
      refill();
    }

    int64_t avail() const { return cnt - head; }

    void refill() {
      int64_t c = 0;
      for (int64_t q = head; q < cnt; ++q, ++c) {
        idx[c] = idx[q];
        key[c] = key[q];
      }
      head = 0;
      const int64_t n = bd->n;
      const uint64_t* mk = bd->mask;
      // s from pass 2. Entries read here are not overwritten yet: lights' never are, and a heavy's
      // only once it is placed, after it was extracted (by the thread sweeping its chunk).
      const double* sp = bd->thr;
      I* ip = idx;
      double* kp = key;
      while (c < kCap && left > 0 && pos < n) {
        const int64_t wi = pos >> 6;
        uint64_t bits = light ? ~mk[wi] : mk[wi];
        bits &= ~uint64_t(0) << (pos & 63);
        if (((wi + 1) << 6) > n) bits &= (uint64_t(1) << (n & 63)) - 1;
        const int64_t c0 = c, base = wi << 6;
        // s of the items kPrefetchWords words ahead (8 lines per word): the key loop below waited on
        // these loads (4 words ahead measured best against 2 and 8).
        for (int64_t j = 0; j < 8; ++j) __builtin_prefetch(sp + std::min(base + 64 * kPrefetchWords + 8 * j, n - 1));
#ifdef ISGD_ALIAS_SSE2
        if constexpr (sizeof(I) == 4) {
          // 8 positions per byte of the mask from a table, whatever the number of set bits.
          const __m128i v8 = _mm_set1_epi32(8);
          __m128i vb = _mm_set1_epi32(static_cast<int32_t>(base));
#pragma GCC unroll 8
          for (int by = 0; by < 8; ++by) {
            const uint32_t x = static_cast<uint32_t>(bits >> (8 * by)) & 0xffu;
            const __m128i* tp = reinterpret_cast<const __m128i*>(kBytePos.pos[x]);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(ip + c), _mm_add_epi32(_mm_load_si128(tp), vb));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(ip + c + 4), _mm_add_epi32(_mm_load_si128(tp + 1), vb));
            c += kBytePos.count[x];
            vb = _mm_add_epi32(vb, v8);
          }
        } else
#endif
        {
          while (bits) {
            ip[c++] = static_cast<I>(base + __builtin_ctzll(bits));
            bits &= bits - 1;
          }
        }
        pos = base + 64;
        if (c - c0 > left) {  // past this stream's last item: drop the rest of the word
          c = c0 + left;
          pos = static_cast<int64_t>(idx[c - 1]) + 1;
        }
        left -= c - c0;
        // The heavy stream's last entry is the next chunk's first heavy: only its index is used (the
        // alias of this chunk's last heavy), and its entry may already hold that chunk's threshold.
        const int64_t ck = (!light && left == 0) ? c - 1 : c;
        const double base_key = hi + lo;
        double local = 0.0;
        if (light) {
#pragma GCC unroll 2
          for (int64_t q = c0; q < ck; ++q) {
            kp[q] = base_key + local;
            local += 1.0 - sp[ip[q]];
          }
        } else {
#pragma GCC unroll 2
          for (int64_t q = c0; q < ck; ++q) {
            local += sp[ip[q]] - 1.0;
            kp[q] = base_key + local;
          }
          if (ck < c) kp[ck] = std::numeric_limits<double>::infinity();
        }
        double t, err;
        two_sum(hi, local, t, err);
        hi = t;
        lo += err;
      }
      cnt = c;
      if (left == 0 || pos >= n) {
        done = true;
        for (int64_t q = c; q < c + 8; ++q) {
          key[q] = light ? hi + lo : std::numeric_limits<double>::infinity();
          idx[q] = static_cast<I>(light ? n : (c > 0 ? static_cast<int64_t>(idx[c - 1]) : n));
        }
      }
    }
  };

  // Buffers of 512 lights / 256 heavies: 10 KB per chunk with int32 indices (256 / 128 was no
  // faster).
  static constexpr int64_t kLCap = 512, kHCap = 256;

  struct Sweep {
    Stream<kLCap> L;
    Stream<kHCap> H;
    int64_t a_left, b_left;  // lights / heavies of this chunk still to place
    int64_t b_end;           // merge rank of the first heavy after the chunk
  };

  // Where a chunk starts: merge ranks of its first light and heavy, their indices and key bases.
  struct Start {
    int64_t a, b, li, hj;
    double lbase, hbase;
  };

  Start chunk_start(int64_t c, int64_t chunks) const {
    const int64_t k = n * c / chunks;
    const int64_t a = c == chunks ? A() : co_rank(k);
    const auto li = light_at(a);
    const auto hj = heavy_at(k - a);
    return {a, k - a, li.first, hj.first, li.second, hj.second};
  }

  void start(Sweep& sw, const Start& s0, const Start& s1) const {
    sw.a_left = s1.a - s0.a;
    sw.b_left = s1.b - s0.b;
    sw.b_end = s1.b;
    sw.L.init(this, true, s0.li, s1.a - s0.a, s0.lbase);
    sw.H.init(this, false, s0.hj, s1.b - s0.b + 1, s0.hbase);  // + the next heavy: the last one's alias
  }

  // Refills what runs low and returns how many steps may run without bound checks: a step reads
  // lights [lp, lp + 4] and heavies [hp, hp + 1] and places at most 4 lights and 1 heavy.
  int64_t ready(Sweep& sw) const {
    if (sw.L.avail() < 64 && !sw.L.done) sw.L.refill();
    if (sw.H.avail() < 32 && !sw.H.done) sw.H.refill();
    const int64_t la = std::min(sw.a_left, sw.L.avail());
    const int64_t ha = std::min(sw.b_left, sw.H.done ? sw.H.avail() : sw.H.avail() - 1);
    return std::max<int64_t>(0, std::min(la / 4 - 1, ha));
  }

  // r steps of K chunks, interleaved: each chunk's steps form one dependency chain (key loads,
  // compare, cursor update: ~15 cycles), so several chunks keep the core busy. A step compares the next
  // 4 lights' keys with the current heavy's (light a merges before heavy b iff KL[a] < KH[b]): the
  // leading run below it (0..4 lights) is placed under that heavy, and if the run is shorter than 4
  // the heavy is placed too, its threshold 1 - (what it still owes) taken from the key of the first
  // light left. Stores are unconditional (no branch on the data): a light's alias and a heavy's
  // threshold are rewritten until the item is placed and never touched after; a heavy's alias is
  // always the next heavy. A zero weight is a light with threshold 0 and aliases only point to
  // heavies (s >= 1), so a zero weight is never drawn.
  template <int K>
  void steps(Sweep* sw, int64_t r) const {
    double* __restrict__ tp = thr;
    I* __restrict__ ap = alias;
#ifdef ISGD_ALIAS_SSE2
    const __m128d one = _mm_set_sd(1.0), zero = _mm_setzero_pd();
#endif
    int64_t lp[K], hp[K];
    for (int k = 0; k < K; ++k) {
      lp[k] = sw[k].L.head;
      hp[k] = sw[k].H.head;
    }
    for (int64_t q = 0; q < r; ++q) {
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        Sweep& S = sw[k];
#ifdef ISGD_ALIAS_SSE2
        const __m128d vh = _mm_load1_pd(S.H.key + hp[k]);
        const double* lw = S.L.key + lp[k];
        const __m128 c = _mm_shuffle_ps(_mm_castpd_ps(_mm_cmplt_pd(_mm_loadu_pd(lw), vh)),
                                        _mm_castpd_ps(_mm_cmplt_pd(_mm_loadu_pd(lw + 2), vh)), 0x88);
        const uint64_t below = static_cast<uint64_t>(_mm_movemask_ps(c));
#else
        const double kh = S.H.key[hp[k]];
        const double* lw = S.L.key + lp[k];
        const uint64_t below = static_cast<uint64_t>(lw[0] < kh) | (static_cast<uint64_t>(lw[1] < kh) << 1) |
                               (static_cast<uint64_t>(lw[2] < kh) << 2) | (static_cast<uint64_t>(lw[3] < kh) << 3);
#endif
        // Length of the leading run of set bits (keys are non-decreasing up to rounding at word joins).
        const int64_t cnt = __builtin_ctzll(below + 1);
        const I* lx = S.L.idx + lp[k];
        const I h = S.H.idx[hp[k]];
        ap[lx[0]] = h;
        ap[lx[1]] = h;
        ap[lx[2]] = h;
        ap[lx[3]] = h;
        lp[k] += cnt;
        // 1 + (KH - KL) = 1 - (KL - KH) exactly; <= 1 once the heavy is placed.
#ifdef ISGD_ALIAS_SSE2
        const __m128d t = _mm_add_sd(_mm_sub_sd(vh, _mm_load_sd(S.L.key + lp[k])), one);
        _mm_store_sd(tp + h, _mm_max_sd(t, zero));
#else
        tp[h] = max_d(1.0 + (kh - S.L.key[lp[k]]), 0.0);
#endif
        ap[h] = S.H.idx[hp[k] + 1];
        hp[k] += 1 - (cnt >> 2);
      }
    }
    for (int k = 0; k < K; ++k) {
      sw[k].a_left -= lp[k] - sw[k].L.head;
      sw[k].b_left -= hp[k] - sw[k].H.head;
      sw[k].L.head = lp[k];
      sw[k].H.head = hp[k];
    }
  }

  // The end of a chunk, one item at a time with explicit bounds; once one class is used up, the
  // remaining lights alias the next heavy after the chunk (argmax if none: reachable only through
  // rounding) and the remaining heavies owe against the next light.
  void finish(Sweep& sw) const {
    while (sw.a_left > 0 && sw.b_left > 0) {
      if (sw.L.avail() < 2 && !sw.L.done) sw.L.refill();
      if (sw.H.avail() < 3 && !sw.H.done) sw.H.refill();
      const int64_t lp = sw.L.head, hp = sw.H.head;
      const double kl = sw.L.key[lp], kh = sw.H.key[hp];
      const I h = sw.H.idx[hp];
      if (kl < kh) {
        alias[sw.L.idx[lp]] = h;
        ++sw.L.head;
        --sw.a_left;
      } else {
        thr[h] = min_d(max_d(1.0 - (kl - kh), 0.0), 1.0);
        alias[h] = sw.H.idx[hp + 1];
        ++sw.H.head;
        --sw.b_left;
      }
    }
    if (sw.a_left > 0) {
      if (sw.H.avail() < 1 && !sw.H.done) sw.H.refill();
      const I fb = sw.b_end < B() ? sw.H.idx[sw.H.head] : static_cast<I>(argmax);
      while (sw.a_left > 0) {
        if (sw.L.avail() == 0) sw.L.refill();
        const int64_t m = std::min(sw.a_left, sw.L.avail());
        for (int64_t q = 0; q < m; ++q) alias[sw.L.idx[sw.L.head + q]] = fb;
        sw.L.head += m;
        sw.a_left -= m;
      }
    }
    if (sw.b_left > 0) {
      const double kl = sw.L.key[sw.L.head];
      while (sw.b_left > 0) {
        if (sw.H.avail() < 2 && !sw.H.done) sw.H.refill();
        const int64_t m = std::min(sw.b_left, sw.H.done ? sw.H.avail() : sw.H.avail() - 1);
        for (int64_t q = 0; q < m; ++q) {
          const int64_t p = sw.H.head + q;
          const I h = sw.H.idx[p];
          // Past the last light the excess left can exceed the deficit by rounding: clamp to 1.
          thr[h] = min_d(max_d(1.0 - (kl - sw.H.key[p]), 0.0), 1.0);
          alias[h] = sw.H.idx[p + 1];
        }
        sw.H.head += m;
        sw.b_left -= m;
      }
    }
  }

  // Steps K chunks together until one of them is near its end; that one is finished item by item
  // and swapped behind the others, which go on as K - 1.
  template <int K>
  void run_active(Sweep* sw) const {
    if constexpr (K > 0) {
      for (;;) {
        int64_t r = ready(sw[0]);
        for (int k = 1; k < K; ++k) r = std::min(r, ready(sw[k]));
        if (r == 0) break;
        steps<K>(sw, r);
      }
      for (int k = 0; k < K; ++k) {
        if (ready(sw[k]) == 0) {
          finish(sw[k]);
          if (k != K - 1) std::swap(sw[k], sw[K - 1]);
          run_active<K - 1>(sw);
          return;
        }
      }
    }
  }

  void build() {
    summaries();
    // Chunks are swept kGroup at a time per thread (independent dependency chains: 4 at a time
    // measured best against 1 and 2), 4 groups per thread, claimed dynamically: a thread slowed down by another process leaves groups to the
    // others. A group finds its own chunk starts (a start shared by two groups is computed twice,
    // identically): a co-rank costs ~24 probes of a block search, a few words and one word's items.
    constexpr int64_t kGroup = 4;
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / (4 * kMinItemsPerChunk)));
    const int64_t groups = threads == 1 ? 1 : 4 * threads;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kGroup * groups, n / kMinItemsPerChunk));
    for_claimed((chunks + kGroup - 1) / kGroup, threads, [&](int64_t g) {
      const int64_t c0 = kGroup * g, m = std::min(kGroup, chunks - c0);
      auto sw = std::make_unique<Sweep[]>(kGroup);
      Start s0 = chunk_start(c0, chunks);
      for (int64_t k = 0; k < m; ++k) {
        const Start s1 = chunk_start(c0 + k + 1, chunks);
        start(sw[k], s0, s1);
        s0 = s1;
      }
      if (m == 4) {
        run_active<4>(sw.get());
      } else if (m == 3) {
        run_active<3>(sw.get());
      } else if (m == 2) {
        run_active<2>(sw.get());
      } else {
        run_active<1>(sw.get());
      }
    });
  }
};

template <typename T, typename I>
double build_typed(const at::Tensor& weights, at::Tensor& threshold, at::Tensor& alias) {
  const T* w = weights.const_data_ptr<T>();
  const int64_t n = weights.numel();
  const Pass1 p1 = validate_max_sum(w, n);
  if (p1.first_bad >= 0) throw_bad_weight(p1.first_bad, static_cast<double>(w[p1.first_bad]));
  check_some_positive(p1.mx > 0.0);

  Scale sc;
  sc.m = p1.mx;
  sc.pre = p1.mx < kTinyMax ? kPrescale : 1.0;
  const double rinv = 1.0 / (p1.mx * sc.pre);
  double sum_ws;  // sum of w / m
  if (std::isfinite(p1.sum)) {
    sum_ws = (p1.sum * sc.pre) * rinv;
  } else {  // sum of float64 weights near DBL_MAX overflowed: sum the scaled weights instead
    sum_ws = 0;
    for (int64_t i = 0; i < n; ++i) sum_ws += (static_cast<double>(w[i]) * sc.pre) * rinv;
  }
  sc.cs = std::max(1.0, static_cast<double>(n) / sum_ws);
  sc.k = rinv * sc.cs;
  while ((sc.m * sc.pre) * sc.k < sc.cs) sc.k = std::nextafter(sc.k, std::numeric_limits<double>::infinity());

  Builder<T, I> bld;
  bld.w = w;
  bld.n = n;
  bld.sc = sc;
  bld.nb = (n + kBlock - 1) / kBlock;
  bld.argmax = p1.argmax;
  bld.thr = threshold.mutable_data_ptr<double>();
  bld.alias = alias.mutable_data_ptr<I>();
  bld.build();
  return sc.m / sc.cs;  // mean: importance weight of i is mean / w_i
}

}  // namespace

double build_table_cpu(const at::Tensor& weights, at::Tensor& threshold, at::Tensor& alias) {
  double mean = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "_alias_build_cpu", [&] {
    if (alias.scalar_type() == at::kInt) {
      mean = build_typed<scalar_t, int32_t>(weights, threshold, alias);
    } else {
      mean = build_typed<scalar_t, int64_t>(weights, threshold, alias);
    }
  });
  return mean;
}

}  // namespace alias_table
}  // namespace isgd_kernels
