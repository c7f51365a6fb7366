// CPU kernels of the alias-table sampler (schemas in csrc/alias.cpp, numerical contract in
// isgd_kernels/reference_sampler.py).
//
// Build: parallel sweep (PSA, Hübschle-Schneider & Sanders 2019) without any O(N) temporaries.
//   pass 1  validate + max + sum, per block of kBlock items (ValueError names the first bad index);
//   pass 2  per block: number of light/heavy items and their summed deficit/excess;
//   split   co-rank the merged light/heavy sequence at T equal positions (merge path), using the
//           block prefix sums plus a scan of one block, giving each task its start state;
//   sweep   each task walks its lights and heavies with two pointers over the weights, filling
//           lights from the current heavy (compensated residual) -- the sequential sweep, restarted
//           from exact prefix sums at every task boundary.
// Memory traffic: ~4 reads of the weights + one write of the table (12 bytes/row with int32 alias).
// Fresh tables are large (120 MB at N = 1e7): first-touch page faults cost more than the build
// itself (~35 ms per 80 MB with 4 KiB pages on the reference VM), so fresh buffers are advised to
// use transparent huge pages (~16 ms per 80 MB), and rebuilds go into the existing buffers.
//
// Draws: one pass over the random words; rows of a group are computed and prefetched before the
// coins are resolved, so the random table reads overlap.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace isgd_kernels {
namespace {

constexpr int64_t kBlock = 4096;               // items per summary block (fits L1/L2 for the scans)
constexpr int64_t kMinItemsPerTask = 1 << 17;  // below this the split costs more than it saves
constexpr int64_t kDrawGrain = 1 << 15;        // draws per parallel task
constexpr double kTinyMax = 0x1p-960;          // below: 1/m would overflow, pre-scale by 2^600
constexpr double kPrescale = 0x1p600;
constexpr double kTwoPowM53 = 0x1p-53;

// Branch-free double select / max / min. GCC turns `c ? a : b` and std::max on doubles into
// compare-and-jump, which mispredicts on every other item when light and heavy items interleave
// (pass 2 went from 48 ms to ~10 ms at N = 1e7 with these).
#if defined(__SSE2__)
inline double select_d(bool c, double a, double b) {
  const __m128d m = _mm_castsi128_pd(_mm_set1_epi64x(-static_cast<int64_t>(c)));
  return _mm_cvtsd_f64(_mm_or_pd(_mm_and_pd(m, _mm_set_sd(a)), _mm_andnot_pd(m, _mm_set_sd(b))));
}
inline double max_d(double a, double b) { return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(a), _mm_set_sd(b))); }
inline double min_d(double a, double b) { return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(a), _mm_set_sd(b))); }
#else
inline double select_d(bool c, double a, double b) { return c ? a : b; }
inline double max_d(double a, double b) { return a > b ? a : b; }
inline double min_d(double a, double b) { return a < b ? a : b; }
#endif

// Weights -> s = N q (mean 1): s(w) = cs for the largest weight m (so it is heavy: cs >= 1, and all-
// equal weights give identical s, i.e. an exactly uniform table), else (w * pre) * k with
// k = cs / (m * pre); pre = 2^600 only when 1/m would overflow. (Same idea as
// reference_sampler.alias_scale, one multiply cheaper: the tables agree to rounding, not bitwise.)
struct Scale {
  double m, pre, k, cs;
  inline double operator()(double w) const { return select_d(w == m, cs, (w * pre) * k); }
};

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

at::ScalarType alias_dtype(int64_t n) { return n < (int64_t(1) << 31) ? at::kInt : at::kLong; }

void check_weights_meta(const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 1, "weights must be 1-D, got a tensor of shape ", w.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "weights must have a floating dtype, got ",
                    w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() > 0, "weights is empty: need at least one category");
  TORCH_CHECK(w.device().is_cpu(), "_alias_build (CPU): weights must be a CPU tensor, got ", w.device());
}

// Two-sum: a + b = s + err exactly.
inline void two_sum(double a, double b, double& s, double& err) {
  s = a + b;
  const double bb = s - a;
  err = (a - (s - bb)) + (b - bb);
}

// Runs f(0), ..., f(tasks - 1) on the intra-op threads. at::parallel_for is an inline
// `#pragma omp parallel` in the ATen headers, i.e. serial unless this file is compiled with
// -fopenmp; the std::thread fallback keeps the build parallel either way (a thread start costs
// ~30 us, negligible next to a task of >= 2^17 items).
template <typename F>
void run_tasks(int64_t tasks, const F& f) {
#ifdef _OPENMP
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t);
  });
#else
  if (tasks <= 1) {
    if (tasks == 1) f(0);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(tasks - 1);
  for (int64_t t = 1; t < tasks; ++t) threads.emplace_back([&f, t] { f(t); });
  f(0);
  for (auto& th : threads) th.join();
#endif
}

int64_t num_tasks(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items / kMinItemsPerTask));
}

// Splits [0, n) into `tasks` contiguous ranges of whole blocks and runs f(lo_block, hi_block).
template <typename F>
void for_blocks(int64_t nb, int64_t items, const F& f) {
  const int64_t tasks = std::min(num_tasks(items), nb);
  run_tasks(tasks, [&](int64_t t) { f(nb * t / tasks, nb * (t + 1) / tasks); });
}

// The items of one class (light or heavy) in index order, kBuf at a time, found through the heavy
// bit mask written by pass 2 (ctz over 64-item words: each stream touches only its own items) and
// tagged with their merge key: a light's exclusive deficit prefix, a heavy's inclusive excess
// prefix, both continuing from the task's start values and summed with compensation (TwoSum), so
// a key is accurate to ~1 ulp of its magnitude however long the task. After the last entry sit two
// sentinels (index n): a light sentinel carries the exclusive prefix of whatever light comes next
// (what a heavy's threshold needs once the task's lights are done), a heavy one the key +inf.
template <typename T>
struct Stream {
  static constexpr int64_t kBuf = 2048;
  const T* w;
  const uint64_t* heavy_mask;
  int64_t n;
  Scale sc;
  bool light;
  int64_t pos;          // next index to look at
  double acc, comp;     // running prefix (hi + lo)
  int64_t head = 0, cnt = 0;
  std::vector<int64_t> idx;
  std::vector<double> sv, key;

  Stream(const T* w_, const uint64_t* mask_, int64_t n_, const Scale& sc_, bool light_, int64_t start, double base)
      : w(w_), heavy_mask(mask_), n(n_), sc(sc_), light(light_), pos(start), acc(base), comp(0.0),
        idx(kBuf + 66), sv(kBuf + 66), key(kBuf + 66) {
    refill();
  }

  void refill() {
    int64_t k = 0;
    for (int64_t q = head; q < cnt; ++q, ++k) {
      idx[k] = idx[q];
      sv[k] = sv[q];
      key[k] = key[q];
    }
    head = 0;
    const int64_t first_new = k;
    int64_t c = k;
    int64_t* ip = idx.data();
    while (c < kBuf && pos < n) {
      const int64_t wi = pos >> 6;
      uint64_t bits = light ? ~heavy_mask[wi] : heavy_mask[wi];
      bits &= ~uint64_t(0) << (pos & 63);
      const int64_t word_end = (wi + 1) << 6;
      if (word_end > n) bits &= (uint64_t(1) << (n & 63)) - 1;
      while (bits) {
        ip[c++] = (wi << 6) + __builtin_ctzll(bits);
        bits &= bits - 1;
      }
      pos = word_end;
    }
    cnt = c;
    const Scale s = sc;
    double a = acc, e = comp;
    double* vp = sv.data();
    double* kp = key.data();
    for (int64_t q = first_new; q < c; ++q) {
      const double v = s(static_cast<double>(w[ip[q]]));
      vp[q] = v;
      const double x = light ? 1.0 - v : v - 1.0;
      if (light) kp[q] = a + e;  // exclusive
      double t, err;
      two_sum(a, x, t, err);
      a = t;
      e += err;
      if (!light) kp[q] = a + e;  // inclusive
    }
    acc = a;
    comp = e;
    ip[c] = ip[c + 1] = n;
    vp[c] = vp[c + 1] = 0.0;
    kp[c] = kp[c + 1] = light ? a + e : std::numeric_limits<double>::infinity();
  }
};

template <typename T, typename I>
struct Builder {
  const T* w;
  int64_t n;
  Scale sc;
  int64_t nb;
  int64_t argmax;
  std::vector<int64_t> PL, PH;    // lights / heavies in blocks [0, b)
  std::vector<double> PDL, PEH;   // their summed deficit / excess
  std::vector<uint64_t> mask_;    // bit i set: item i is heavy (s >= 1); N/8 bytes
  const uint64_t* mask = nullptr;
  double* thr;
  I* alias;

  inline double s(int64_t i) const { return sc(static_cast<double>(w[i])); }
  int64_t A() const { return PL[nb]; }
  int64_t B() const { return PH[nb]; }

  void block_summaries() {
    std::vector<int64_t> nl(nb), nh(nb);
    std::vector<double> dl(nb), eh(nb);
    mask_.assign((n + 63) / 64, 0);
    mask = mask_.data();
    uint64_t* mk = mask_.data();
    for_blocks(nb, n, [&](int64_t b0, int64_t b1) {
      const Scale sc_ = sc;
      const T* wp = w;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
        // Branch-free, four lanes: max(0, 1 - s) is the deficit of a light, max(0, s - 1) the
        // excess of a heavy (s = 1 contributes 0 to both, whichever class it counts in).
        int64_t cnt[4] = {0, 0, 0, 0};
        double d[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0};
        for (int64_t w0 = lo; w0 < hi; w0 += 64) {  // kBlock is a multiple of 64: words stay in-block
          const int64_t we = std::min(hi, w0 + 64);
          uint64_t bits = 0;
          int64_t i = w0;
          // Unrolled by hand: lane arrays indexed by a runtime lane number went through the stack.
          for (; i + 4 <= we; i += 4) {
            const double v0 = sc_(static_cast<double>(wp[i])), v1 = sc_(static_cast<double>(wp[i + 1]));
            const double v2 = sc_(static_cast<double>(wp[i + 2])), v3 = sc_(static_cast<double>(wp[i + 3]));
            const uint64_t h0 = !(v0 < 1.0), h1 = !(v1 < 1.0), h2 = !(v2 < 1.0), h3 = !(v3 < 1.0);
            bits |= (h0 | (h1 << 1) | (h2 << 2) | (h3 << 3)) << (i - w0);
            cnt[0] += (h0 + h1) + (h2 + h3);
            d[0] += max_d(1.0 - v0, 0.0);
            d[1] += max_d(1.0 - v1, 0.0);
            d[2] += max_d(1.0 - v2, 0.0);
            d[3] += max_d(1.0 - v3, 0.0);
            e[0] += max_d(v0 - 1.0, 0.0);
            e[1] += max_d(v1 - 1.0, 0.0);
            e[2] += max_d(v2 - 1.0, 0.0);
            e[3] += max_d(v3 - 1.0, 0.0);
          }
          for (; i < we; ++i) {
            const double v = sc_(static_cast<double>(wp[i]));
            const uint64_t h = !(v < 1.0);
            bits |= h << (i - w0);
            cnt[0] += h;
            d[0] += max_d(1.0 - v, 0.0);
            e[0] += max_d(v - 1.0, 0.0);
          }
          mk[w0 >> 6] = bits;
        }
        nh[b] = cnt[0];  // cnt[0] counts heavies here
        nl[b] = (hi - lo) - nh[b];
        dl[b] = (d[0] + d[1]) + (d[2] + d[3]);
        eh[b] = (e[0] + e[1]) + (e[2] + e[3]);
      }
    });
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
      PL[b + 1] = PL[b] + nl[b];
      PH[b + 1] = PH[b] + nh[b];
      PDL[b + 1] = sd + cd;
      PEH[b + 1] = se + ce;
    }
  }

  // Index of light number a and the summed deficit of the lights before it.
  std::pair<int64_t, double> light_at(int64_t a) const {
    if (a >= A()) return {n, PDL[nb]};
    const int64_t blk = std::upper_bound(PL.begin(), PL.end(), a) - PL.begin() - 1;
    int64_t cnt = PL[blk];
    double acc = PDL[blk];
    for (int64_t i = blk * kBlock, hi = std::min(n, i + kBlock); i < hi; ++i) {
      const double v = s(i);
      if (v < 1.0) {
        if (cnt == a) return {i, acc};
        acc += 1.0 - v;
        ++cnt;
      }
    }
    return {n, PDL[nb]};  // unreachable: the counts come from the same classification
  }

  // Index of heavy number b and the summed excess of the heavies before it.
  std::pair<int64_t, double> heavy_at(int64_t b) const {
    if (b >= B()) return {n, PEH[nb]};
    const int64_t blk = std::upper_bound(PH.begin(), PH.end(), b) - PH.begin() - 1;
    int64_t cnt = PH[blk];
    double acc = PEH[blk];
    for (int64_t i = blk * kBlock, hi = std::min(n, i + kBlock); i < hi; ++i) {
      const double v = s(i);
      if (!(v < 1.0)) {
        if (cnt == b) return {i, acc};
        acc += v - 1.0;
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
    for (int64_t i = blk * kBlock, hi = std::min(n, i + kBlock); i < hi; ++i) {
      const double v = s(i);
      if (!(v < 1.0)) {
        acc += v - 1.0;
        if (acc > x) return cnt;
        ++cnt;
      }
    }
    return PH[blk + 1];
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

  // Sweep lights [a, a_end) and heavies [b, b_end) in merged order: light a before heavy b iff
  // key(a) < key(b). Each step is branch-free (both outcomes computed, one selected; a branch on the
  // data-dependent light/heavy sequence mispredicted about every other item), and its dependency
  // chain is two L1 loads and a compare -- no running residual.
  void sweep(int64_t a, int64_t a_end, int64_t b, int64_t b_end) {
    if (a >= a_end && b >= b_end) return;
    const auto li = light_at(a);
    const auto hj = heavy_at(b);
    Stream<T> L(w, mask, n, sc, true, li.first, li.second), H(w, mask, n, sc, false, hj.first, hj.second);
    const int64_t nn = n, am = argmax;
    // Locals and restrict pointers: the table stores cannot alias the stream buffers, so cursors and
    // buffer pointers stay in registers (otherwise they were reloaded from the stack every step).
    double* __restrict__ tp = thr;
    I* __restrict__ ap = alias;
    const int64_t* __restrict__ li_ = L.idx.data();
    const double* __restrict__ lk = L.key.data();
    const double* __restrict__ ls = L.sv.data();
    const int64_t* __restrict__ hi_ = H.idx.data();
    const double* __restrict__ hk = H.key.data();
    int64_t lh = L.head, lc = L.cnt, hh = H.head, hc = H.cnt;
    while (a < a_end || b < b_end) {
      // Refills are rare (once per kBuf items); a stream is not refilled past what the task needs.
      if (lh == lc && a < a_end) {
        L.head = lh;
        L.refill();
        lh = L.head;
        lc = L.cnt;
      }
      if (hc - hh < 2 && H.pos < nn && b <= b_end) {
        H.head = hh;
        H.refill();
        hh = H.head;
        hc = H.cnt;
      }
      const double kl = lk[lh], kh = hk[hh];
      const bool light = (a < a_end) & ((b >= b_end) | (kl < kh));
      const int64_t i = li_[lh], j = hi_[hh], jn = hi_[hh + 1];
      const int64_t tgt = light ? i : j;
      // A light keeps exactly s (a zero weight: threshold 0); a heavy keeps 1 - (what it still owes).
      tp[tgt] = select_d(light, ls[lh], min_d(max_d(1.0 - (kl - kh), 0.0), 1.0));
      ap[tgt] = static_cast<I>(light ? (j < nn ? j : am) : (jn < nn ? jn : j));
      lh += light;
      hh += !light;
      a += light;
      b += !light;
    }
  }

  void build() {
    block_summaries();
    const int64_t tasks = num_tasks(n);
    std::vector<int64_t> ra(tasks + 1), rb(tasks + 1);
    ra[0] = 0;
    rb[0] = 0;
    ra[tasks] = A();
    rb[tasks] = B();
    for (int64_t t = 1; t < tasks; ++t) {
      const int64_t k = n * t / tasks;
      ra[t] = co_rank(k);
      rb[t] = k - ra[t];
    }
    run_tasks(tasks, [&](int64_t t) { sweep(ra[t], ra[t + 1], rb[t], rb[t + 1]); });
  }
};

struct Pass1 {
  int64_t first_bad = -1;
  double mx = 0, sum = 0;
};

template <typename T>
Pass1 validate_max_sum(const T* w, int64_t n, int64_t& argmax) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> bad(nb, -1);
  std::vector<double> bmax(nb), bsum(nb);
  for_blocks(nb, n, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      // Four independent lanes: the sum and max chains do not serialise on FP latency.
      double s[4] = {0, 0, 0, 0}, m[4] = {0, 0, 0, 0};
      bool ok = true;
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4) {
        for (int k = 0; k < 4; ++k) {
          const double v = static_cast<double>(w[i + k]);
          ok &= (v >= 0.0) & (v <= std::numeric_limits<double>::max());
          s[k] += v;
          m[k] = max_d(v, m[k]);
        }
      }
      for (; i < hi; ++i) {
        const double v = static_cast<double>(w[i]);
        ok &= (v >= 0.0) & (v <= std::numeric_limits<double>::max());
        s[0] += v;
        m[0] = max_d(v, m[0]);
      }
      if (!ok) {
        for (int64_t k = lo; k < hi; ++k) {
          const double v = static_cast<double>(w[k]);
          if (!((v >= 0.0) & (v <= std::numeric_limits<double>::max()))) {
            bad[b] = k;
            break;
          }
        }
      }
      bsum[b] = (s[0] + s[1]) + (s[2] + s[3]);
      bmax[b] = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
    }
  });
  Pass1 r;
  for (int64_t b = 0; b < nb; ++b) {
    if (bad[b] >= 0) {
      r.first_bad = bad[b];
      return r;
    }
    r.sum += bsum[b];
    r.mx = std::max(r.mx, bmax[b]);
  }
  argmax = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (bmax[b] == r.mx) {
      for (int64_t k = b * kBlock; k < n; ++k) {
        if (static_cast<double>(w[k]) == r.mx) {
          argmax = k;
          break;
        }
      }
      break;
    }
  }
  return r;
}

template <typename T, typename I>
double build_typed(const at::Tensor& weights, at::Tensor& threshold, at::Tensor& alias) {
  const T* w = weights.const_data_ptr<T>();
  const int64_t n = weights.numel();
  int64_t argmax = 0;
  const Pass1 p1 = validate_max_sum(w, n, argmax);
  if (p1.first_bad >= 0) {
    const double v = static_cast<double>(w[p1.first_bad]);
    const char* kind = std::isnan(v) ? "NaN" : (std::isinf(v) ? "infinite" : "negative");
    TORCH_CHECK_VALUE(false, "weights[", p1.first_bad, "] is ", kind, " (", v,
                      "); weights must be finite and non-negative");
  }
  TORCH_CHECK_VALUE(p1.mx > 0.0, "all weights are zero: there is nothing to sample");

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

  Builder<T, I> bld;
  bld.w = w;
  bld.n = n;
  bld.sc = sc;
  bld.nb = (n + kBlock - 1) / kBlock;
  bld.argmax = argmax;
  bld.thr = threshold.mutable_data_ptr<double>();
  bld.alias = alias.mutable_data_ptr<I>();
  bld.build();
  return sc.m / sc.cs;  // mean: importance weight of i is mean / w_i
}

at::Tensor alias_build_into_cpu(const at::Tensor& weights_in, at::Tensor& threshold, at::Tensor& alias) {
  check_weights_meta(weights_in);
  const int64_t n = weights_in.numel();
  TORCH_CHECK(threshold.device().is_cpu() && alias.device().is_cpu(), "_alias_build_into: table buffers must be on CPU");
  TORCH_CHECK(threshold.scalar_type() == at::kDouble && threshold.dim() == 1 && threshold.numel() == n &&
                  threshold.is_contiguous(),
              "_alias_build_into: threshold must be a contiguous float64 tensor of shape (", n, ")");
  TORCH_CHECK((alias.scalar_type() == at::kInt || alias.scalar_type() == at::kLong) && alias.dim() == 1 &&
                  alias.numel() == n && alias.is_contiguous(),
              "_alias_build_into: alias must be a contiguous int32/int64 tensor of shape (", n, ")");
  TORCH_CHECK(alias.scalar_type() == at::kLong || n < (int64_t(1) << 31),
              "_alias_build_into: N >= 2^31 needs an int64 alias buffer");
  const at::Tensor weights = weights_in.contiguous();
  double mean = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "_alias_build_cpu", [&] {
    if (alias.scalar_type() == at::kInt) {
      mean = build_typed<scalar_t, int32_t>(weights, threshold, alias);
    } else {
      mean = build_typed<scalar_t, int64_t>(weights, threshold, alias);
    }
  });
  return at::scalar_tensor(mean, weights.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> alias_build_cpu(const at::Tensor& weights) {
  check_weights_meta(weights);
  const int64_t n = weights.numel();
  auto threshold = at::empty({n}, weights.options().dtype(at::kDouble));
  auto alias = at::empty({n}, weights.options().dtype(alias_dtype(n)));
  advise_huge_pages(threshold);
  advise_huge_pages(alias);
  auto mean = alias_build_into_cpu(weights, threshold, alias);
  return {threshold, alias, mean};
}

void check_table(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits, const char* op) {
  TORCH_CHECK(threshold.device().is_cpu() && alias.device().is_cpu() && bits.device().is_cpu(), op,
              ": expected CPU tensors");
  TORCH_CHECK(threshold.scalar_type() == at::kDouble && threshold.dim() == 1 && threshold.is_contiguous() &&
                  threshold.numel() > 0,
              op, ": threshold must be a non-empty contiguous float64 vector");
  TORCH_CHECK((alias.scalar_type() == at::kInt || alias.scalar_type() == at::kLong) && alias.dim() == 1 &&
                  alias.is_contiguous() && alias.numel() == threshold.numel(),
              op, ": alias must be a contiguous int32/int64 vector as long as threshold");
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.dim() == 2 && bits.size(1) == 2 && bits.is_contiguous(), op,
              ": bits must be a contiguous int64 tensor of shape (n, 2), got ", bits.sizes());
}

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

void draw_all(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits, int64_t* out) {
  const int64_t draws = bits.size(0), n = threshold.numel();
  const double* thr = threshold.const_data_ptr<double>();
  const uint64_t* b = reinterpret_cast<const uint64_t*>(bits.const_data_ptr<int64_t>());
  auto run = [&](auto* al) {
    if (draws < 2 * kDrawGrain) {
      draw_range(thr, al, b, out, 0, draws, n);  // the common training-batch case: no thread hand-off
    } else {
      const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), draws / kDrawGrain));
      run_tasks(tasks, [&](int64_t t) { draw_range(thr, al, b, out, draws * t / tasks, draws * (t + 1) / tasks, n); });
    }
  };
  if (alias.scalar_type() == at::kInt) {
    run(alias.const_data_ptr<int32_t>());
  } else {
    run(alias.const_data_ptr<int64_t>());
  }
}

at::Tensor alias_sample_cpu(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits) {
  check_table(threshold, alias, bits, "_alias_sample");
  auto out = at::empty({bits.size(0)}, bits.options());
  draw_all(threshold, alias, bits, out.mutable_data_ptr<int64_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> alias_sample_weighted_cpu(const at::Tensor& threshold, const at::Tensor& alias,
                                                             const at::Tensor& weights, const at::Tensor& mean,
                                                             const at::Tensor& bits, at::ScalarType dtype) {
  check_table(threshold, alias, bits, "_alias_sample_weighted");
  TORCH_CHECK(weights.device().is_cpu() && weights.dim() == 1 && weights.numel() == threshold.numel() &&
                  at::isFloatingType(weights.scalar_type()),
              "_alias_sample_weighted: weights must be the table's (N,) floating CPU weights");
  TORCH_CHECK(mean.numel() == 1 && mean.device().is_cpu(), "_alias_sample_weighted: mean must be a CPU scalar tensor");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "_alias_sample_weighted: dtype must be float32 or float64");
  const int64_t draws = bits.size(0);
  auto idx = at::empty({draws}, bits.options());
  auto iw = at::empty({draws}, bits.options().dtype(dtype));
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  draw_all(threshold, alias, bits, ip);
  const double mu = mean.to(at::kDouble).item<double>();
  const at::Tensor w = weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "_alias_sample_weighted_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    if (dtype == at::kFloat) {
      float* o = iw.mutable_data_ptr<float>();
      for (int64_t k = 0; k < draws; ++k) o[k] = static_cast<float>(mu / static_cast<double>(wp[ip[k]]));
    } else {
      double* o = iw.mutable_data_ptr<double>();
      for (int64_t k = 0; k < draws; ++k) o[k] = mu / static_cast<double>(wp[ip[k]]);
    }
  });
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
