// CUDA kernels for the Linear per-example gradient norms (launchers declared in cuda_launch.h).
// No torch headers here: `nvcc -c` compiles this file on a machine without a CUDA build of torch.
//
// outer (T == 1): ||g_b||^2 = ||a_b||^2 ||delta_b||^2 (+ ||delta_b||^2 for the bias). One read of x and
//   grad_out, bandwidth-bound. Two mappings, picked at launch from the row length:
//   * rows of <= 256 16-byte vectors (fp32 d <= 1024): a group of 4..32 lanes per row, 256 threads
//     = 8..64 rows per block; lanes sized so each owns ~4 vectors (no idle lanes on short rows).
//   * longer rows: a 256-thread block per row; when B is too small to fill the GPU (< 8 blocks per
//     SM), each row is also split over several blocks, which write (||a||^2, ||delta||^2) partials
//     that a second kernel combines in a fixed order (deterministic, no atomics).
//   Unit-stride rows are read with 16-byte loads after peeling the unaligned head; other strides
//   with scalar loads. 4 independent loads per thread per loop step keep 64 bytes in flight.
// ghost (any T): sum_{t,s} (a_t . a_s)(delta_t . delta_s) over the upper triangle of T x T tiles
//   (off-diagonal tiles count twice). One 256-thread block per (example, row tile, column tile >=
//   row tile): B * n(n+1)/2 equal-sized blocks, so no block sweeps a whole row of tiles and small-B
//   / long-T problems still fill the GPU. Each block forms both Gram tiles in registers (FP32/FP64
//   FMA on CUDA cores, k staged through shared memory in chunks), multiplies them elementwise and
//   writes one partial; the T x T matrices never reach global memory.
// Accumulation in float (double for double inputs).
#include "cuda_launch.h"

#include "../common/cuda/common.cuh"
#include "../common/cuda/ghost_pairs.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace isgd_kernels {
namespace cuda {
namespace {

// std::min/max are host-only for nvcc without --expt-relaxed-constexpr.
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------------
// Element conversion and 16-byte vector helpers.

// Low / high 16-bit halves of a 32-bit word, widened to float (exact for both formats).
template <typename T>
struct Halves;
template <>
struct Halves<__half> {
  __device__ static __forceinline__ float lo(unsigned w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ static __forceinline__ float hi(unsigned w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};
template <>
struct Halves<__nv_bfloat16> {
  __device__ static __forceinline__ float lo(unsigned w) { return __uint_as_float(w << 16); }
  __device__ static __forceinline__ float hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
};

// Sum of squares of the elements packed in one 16-byte vector: 8 fp16 / bf16 values here, 4 floats or
// 2 doubles in the specialisations below.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 8;
  __device__ static __forceinline__ float sq(const uint4& r) {
    float s = 0.f;
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = Halves<T>::lo(w[i]), hi = Halves<T>::hi(w[i]);
      s += lo * lo + hi * hi;
    }
    return s;
  }
};
template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ static __forceinline__ float sq(const uint4& r) {
    const float a = __uint_as_float(r.x), b = __uint_as_float(r.y), c = __uint_as_float(r.z), d = __uint_as_float(r.w);
    return a * a + b * b + c * c + d * d;
  }
};
template <>
struct Vec16<double> {
  static constexpr int kElems = 2;
  __device__ static __forceinline__ double sq(const uint4& r) {
    const double a = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    const double b = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
    return a * a + b * b;
  }
};

// ---------------------------------------------------------------------------------------------------
// Reductions (warp_sum, block_sum: common.cuh). All threads of the block must call them.

// Sums (a, b) over the block; the result is valid in thread 0.
template <typename Acc>
__device__ __forceinline__ void block_sum2(Acc& a, Acc& b) {
  __shared__ Acc part_a[kThreads / 32], part_b[kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    part_a[warp] = a;
    part_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? part_a[lane] : Acc(0);
    b = lane < kThreads / 32 ? part_b[lane] : Acc(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// ---------------------------------------------------------------------------------------------------
// outer

// Partial sum of squares of row[0..n) (element j at row[j * stride]) over the elements this thread
// owns: lane, lane + nlanes, ... (in 16-byte vectors when stride == 1).
template <typename T, typename Acc>
__device__ __forceinline__ Acc sq_sum(const T* __restrict__ row, int64_t n, int64_t stride, int lane, int nlanes) {
  Acc s0 = 0, s1 = 0;
  if (n <= 0) return s0;
  if (stride == 1) {
    constexpr int kV = Vec16<T>::kElems;
    // Peel the elements before the first 16-byte boundary (torch only guarantees element alignment).
    const auto addr = reinterpret_cast<uintptr_t>(row);
    const int64_t head = min64(n, static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T)));
    for (int64_t i = lane; i < head; i += nlanes) {
      const Acc v = to_acc(row[i]);
      s0 += v * v;
    }
    const int64_t nvec = (n - head) / kV;
    const uint4* __restrict__ vp = reinterpret_cast<const uint4*>(row + head);
    int64_t i = lane;
    for (; i + 3 * nlanes < nvec; i += 4 * nlanes) {
      // Four independent loads issued before any use: 64 bytes in flight per thread.
      const uint4 r0 = __ldg(vp + i), r1 = __ldg(vp + i + nlanes);
      const uint4 r2 = __ldg(vp + i + 2 * nlanes), r3 = __ldg(vp + i + 3 * nlanes);
      s0 += Vec16<T>::sq(r0) + Vec16<T>::sq(r1);
      s1 += Vec16<T>::sq(r2) + Vec16<T>::sq(r3);
    }
    for (; i < nvec; i += nlanes) s0 += Vec16<T>::sq(__ldg(vp + i));
    for (int64_t j = head + nvec * kV + lane; j < n; j += nlanes) {
      const Acc v = to_acc(row[j]);
      s1 += v * v;
    }
  } else {
    int64_t i = lane;
    for (; i + 3 * nlanes < n; i += 4 * nlanes) {
      const Acc v0 = to_acc(row[i * stride]), v1 = to_acc(row[(i + nlanes) * stride]);
      const Acc v2 = to_acc(row[(i + 2 * nlanes) * stride]), v3 = to_acc(row[(i + 3 * nlanes) * stride]);
      s0 += v0 * v0 + v1 * v1;
      s1 += v2 * v2 + v3 * v3;
    }
    for (; i < n; i += nlanes) {
      const Acc v = to_acc(row[i * stride]);
      s0 += v * v;
    }
  }
  return s0 + s1;
}

// Short rows: LANES consecutive lanes own one example, kThreads / LANES examples per block.
template <typename T, int LANES>
__global__ void __launch_bounds__(kThreads)
outer_rows_kernel(const T* __restrict__ x, const T* __restrict__ g, typename AccOf<T>::type* __restrict__ out,
                  int64_t B, int64_t d, int64_t p, int64_t sxb, int64_t sxd, int64_t sgb, int64_t sgd, bool bias) {
  using Acc = typename AccOf<T>::type;
  static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "LANES: a power of two <= 32");
  constexpr int kRows = kThreads / LANES;
  const int lane = threadIdx.x % LANES;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / LANES;
  Acc sa = 0, sg = 0;
  if (b < B) {
    sa = sq_sum<T, Acc>(x + b * sxb, d, sxd, lane, LANES);
    sg = sq_sum<T, Acc>(g + b * sgb, p, sgd, lane, LANES);
  }
  // Every lane of the warp gets here (groups past B carry zeros), so the full mask is valid; xor
  // offsets < LANES stay inside the aligned group.
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) {
    sa += __shfl_xor_sync(kFullMask, sa, o);
    sg += __shfl_xor_sync(kFullMask, sg, o);
  }
  if (b < B && lane == 0) out[b] = sa * sg + (bias ? sg : Acc(0));
}

// Long rows: block (b, split) covers elements [lo, hi) of the concatenation (x row, grad_out row) of
// example b, so splits stay balanced when d_in and d_out differ. With one split the block writes the
// result; otherwise the pair (||a||^2 part, ||delta||^2 part) goes to ws[b][split].
template <typename T>
__global__ void __launch_bounds__(kThreads)
outer_split_kernel(const T* __restrict__ x, const T* __restrict__ g, typename AccOf<T>::type* __restrict__ out,
                   typename AccOf<T>::type* __restrict__ ws, int64_t d, int64_t p, int64_t sxb, int64_t sxd,
                   int64_t sgb, int64_t sgd, int64_t splits, int64_t chunk, bool bias) {
  using Acc = typename AccOf<T>::type;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / splits, split = blk - b * splits;
  const int64_t lo = split * chunk, hi = min64(lo + chunk, d + p);
  Acc sa = 0, sg = 0;
  if (lo < d) sa = sq_sum<T, Acc>(x + b * sxb + lo * sxd, min64(hi, d) - lo, sxd, threadIdx.x, kThreads);
  if (hi > d) {
    const int64_t glo = max64(lo, d) - d;
    sg = sq_sum<T, Acc>(g + b * sgb + glo * sgd, hi - d - glo, sgd, threadIdx.x, kThreads);
  }
  block_sum2(sa, sg);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      out[b] = sa * sg + (bias ? sg : Acc(0));
    } else {
      ws[2 * blk] = sa;
      ws[2 * blk + 1] = sg;
    }
  }
}

// Combines the split partials of each example in split order.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
outer_finalize_kernel(const Acc* __restrict__ ws, Acc* __restrict__ out, int64_t B, int64_t splits, bool bias) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  Acc sa = 0, sg = 0;
  for (int64_t s = 0; s < splits; ++s) {
    sa += ws[2 * (b * splits + s)];
    sg += ws[2 * (b * splits + s) + 1];
  }
  out[b] = sa * sg + (bias ? sg : Acc(0));
}

// ---------------------------------------------------------------------------------------------------
// ghost

// Shared-memory tiles hold accumulators (inputs are widened once, when staged). The compute loop
// reads them as 16-byte vectors: 4 floats or 2 doubles along k.
template <typename Acc>
struct SmemVec;
template <>
struct SmemVec<float> {
  using type = float4;
};
template <>
struct SmemVec<double> {
  using type = double2;
};

__device__ __forceinline__ void fma16(float& acc, const float4& a, const float4& b) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  acc = fmaf(a.w, b.w, acc);
}
__device__ __forceinline__ void fma16(double& acc, const double2& a, const double2& b) {
  acc = fma(a.x, b.x, acc);
  acc = fma(a.y, b.y, acc);
}

// Four consecutive k elements at p (unit stride, aligned to min(16, 4 * sizeof(T)) bytes).
__device__ __forceinline__ void load_quad_vec(const float* p, float (&v)[4]) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load_quad_vec(const double* p, double (&v)[4]) {
  const double2 q0 = __ldg(reinterpret_cast<const double2*>(p));
  const double2 q1 = __ldg(reinterpret_cast<const double2*>(p) + 1);
  v[0] = q0.x; v[1] = q0.y; v[2] = q1.x; v[3] = q1.y;
}
template <typename T>  // __half, __nv_bfloat16
__device__ __forceinline__ void load_quad_vec(const T* p, float (&v)[4]) {
  const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
  v[0] = Halves<T>::lo(q.x); v[1] = Halves<T>::hi(q.x); v[2] = Halves<T>::lo(q.y); v[3] = Halves<T>::hi(q.y);
}

// Elements (t, k..k+3) of one example's (T, K) matrix, zero outside it. `vec`: unit k-stride, K % 4 == 0
// and aligned rows, so a quad is either wholly inside or wholly outside and one vector load reads it.
template <typename T, typename Acc>
__device__ __forceinline__ void load_quad(const T* __restrict__ base, int64_t nt, int64_t nk, int64_t st, int64_t sk,
                                          bool vec, int64_t t, int64_t k, Acc (&v)[4]) {
  v[0] = v[1] = v[2] = v[3] = Acc(0);
  if (t >= nt || k >= nk) return;
  const T* p = base + t * st + k * sk;
  if (vec) {
    load_quad_vec(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k + j < nk) v[j] = to_acc(p[j * sk]);
  }
}

__device__ __forceinline__ void store_quad(float* dst, const float (&v)[4]) {
  *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_quad(double* dst, const double (&v)[4]) {
  reinterpret_cast<double2*>(dst)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(dst)[1] = make_double2(v[2], v[3]);
}

// Tile geometry for RM x RM outputs per thread on a 16 x 16 thread grid: BT = 16 * RM rows/columns.
// Thread (ty, tx) owns rows ty + 16 r and columns tx + 16 c (strided, not blocked), so in the compute
// loop a warp reads 2 distinct row vectors (broadcast) and 16 distinct column vectors at a row stride
// of 9 x 16 bytes (odd): 2 wavefronts, conflict-free. Per k-vector a warp then issues RM^2 16-byte
// FMA groups (RM = 4, fp32: 64 FMAs) against 3 RM wavefronts (12): FMA-bound, not shared-memory-bound.
template <typename Acc, int RM>
struct GhostTile {
  static constexpr int kBT = 16 * RM;                         // 16 / 32 / 64 rows of T per tile
  static constexpr int kVK = 16 / static_cast<int>(sizeof(Acc));  // k per 16-byte shared vector
  static constexpr int kBK = 8 * kVK;                         // k per chunk: 32 floats / 16 doubles
  static constexpr int kRowStride = kBK + kVK;                // + 16 bytes of padding: odd vector stride
  static constexpr int kQuadsPerRow = kBK / 4;
  static constexpr int kTileElems = kBT * kRowStride;         // fp32, RM = 4: 64 * 36 * 4 B = 9 KiB
};

// acc[r][c] = sum_k M[t0 + ty + 16 r, k] M[s0 + tx + 16 c, k] for one example's M (nt x nk).
// On the diagonal (t0 == s0) only one tile is staged and read as both operands.
template <typename T, typename Acc, int RM>
__device__ __forceinline__ void gram_tile(const T* __restrict__ base, int64_t nt, int64_t nk, int64_t st, int64_t sk,
                                          bool vec, int64_t t0, int64_t s0, bool diag, Acc* __restrict__ s_row,
                                          Acc* __restrict__ s_col, Acc (&acc)[RM][RM]) {
  using G = GhostTile<Acc, RM>;
  using V = typename SmemVec<Acc>::type;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int c = 0; c < RM; ++c) acc[r][c] = Acc(0);

  for (int64_t k0 = 0; k0 < nk; k0 += G::kBK) {
    // Stage: consecutive threads read consecutive k of one row (coalesced for unit k-stride) and
    // write consecutive 16-byte slots of one shared row (conflict-free).
    for (int q = threadIdx.x; q < G::kBT * G::kQuadsPerRow; q += kThreads) {
      const int row = q / G::kQuadsPerRow, kq = q % G::kQuadsPerRow;
      const int64_t k = k0 + 4 * kq;
      Acc v[4];
      load_quad<T, Acc>(base, nt, nk, st, sk, vec, t0 + row, k, v);
      store_quad(s_row + row * G::kRowStride + 4 * kq, v);
      if (!diag) {
        load_quad<T, Acc>(base, nt, nk, st, sk, vec, s0 + row, k, v);
        store_quad(s_col + row * G::kRowStride + 4 * kq, v);
      }
    }
    __syncthreads();
    const Acc* cols = diag ? s_row : s_col;
#pragma unroll
    for (int kv = 0; kv < G::kBK / G::kVK; ++kv) {
      V a[RM], b[RM];
#pragma unroll
      for (int r = 0; r < RM; ++r) a[r] = reinterpret_cast<const V*>(s_row + (ty + 16 * r) * G::kRowStride)[kv];
#pragma unroll
      for (int c = 0; c < RM; ++c) b[c] = reinterpret_cast<const V*>(cols + (tx + 16 * c) * G::kRowStride)[kv];
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RM; ++c) fma16(acc[r][c], a[r], b[c]);
    }
    __syncthreads();  // the next chunk (or the next gram_tile) overwrites the tiles
  }
}

// Block blk = b * num_pairs + pair. Pairs enumerate the tiles (t_tile, s_tile >= t_tile) of the upper
// triangle; partial[blk] = w * sum over the tile of (A A^T)(G G^T) (+ G G^T), w = 2 off the diagonal.
// Rows/columns past T are staged as zeros, so they add nothing (bias term included).
template <typename T, int RM>
__global__ void __launch_bounds__(kThreads, 2)
ghost_kernel(const T* __restrict__ x, const T* __restrict__ g, typename AccOf<T>::type* __restrict__ partial,
             int64_t nt, int64_t d, int64_t p, int64_t sxb, int64_t sxt, int64_t sxd, int64_t sgb, int64_t sgt,
             int64_t sgd, int64_t n_tiles, bool vec_x, bool vec_g, bool bias) {
  using Acc = typename AccOf<T>::type;
  using G = GhostTile<Acc, RM>;
  __shared__ __align__(16) Acc s_row[G::kTileElems];
  __shared__ __align__(16) Acc s_col[G::kTileElems];

  const int64_t num_pairs = num_tile_pairs(n_tiles);
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / num_pairs;
  int64_t t_tile, s_tile;  // s_tile >= t_tile
  tile_pair(n_tiles, blk - b * num_pairs, t_tile, s_tile);
  const bool diag = t_tile == s_tile;
  const int64_t t0 = t_tile * G::kBT, s0 = s_tile * G::kBT;

  Acc ga[RM][RM], gg[RM][RM];
  gram_tile<T, Acc, RM>(x + b * sxb, nt, d, sxt, sxd, vec_x, t0, s0, diag, s_row, s_col, ga);
  gram_tile<T, Acc, RM>(g + b * sgb, nt, p, sgt, sgd, vec_g, t0, s0, diag, s_row, s_col, gg);

  const Acc local = ghost_pair_partial(ga, gg, bias, diag);
  if (threadIdx.x == 0) partial[blk] = local;
}

// ---------------------------------------------------------------------------------------------------
// Host side.

int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      n <= 0)
    n = 132;  // H100 SXM; the error stays recorded and is returned by the launcher
  return n;
}

struct OuterPlan {
  int lanes;       // > 0: outer_rows_kernel<LANES>; 0: outer_split_kernel
  int64_t splits;  // blocks per example (split kernel)
  int64_t chunk;   // elements of (x row, grad_out row) per split
};

OuterPlan plan_outer(int elem_bytes, int64_t B, int64_t d, int64_t p) {
  const int64_t vec = 16 / elem_bytes;  // elements per 16-byte load
  const int64_t nvec = ceil_div(std::max(d, p), vec);
  OuterPlan plan{0, 1, d + p};
  if (nvec <= 8 * 32) {
    // Up to 8 vectors per lane of a full warp (fp32: d <= 1024); smaller groups for shorter rows
    // so that each lane still has ~4 vectors (fp32 d = 64 -> 4 lanes, 64 rows per block).
    int lanes = 4;
    while (lanes < 32 && int64_t(lanes) * 4 < nvec) lanes *= 2;
    plan.lanes = lanes;
    return plan;
  }
  // A block per row. 8 resident 256-thread blocks per SM (2048 threads) fill the GPU; with fewer
  // examples, split rows, but keep >= 4 vectors per thread per split (below that the split costs
  // more than it hides).
  const int64_t target = int64_t(num_sms()) * (2048 / kThreads);
  if (B >= target) return plan;
  const int64_t max_splits = std::max<int64_t>(1, (d + p) / (int64_t(kThreads) * vec * 4));
  const int64_t splits = std::min(ceil_div(target, B), max_splits);
  if (splits <= 1) return plan;
  const int64_t chunk = ceil_div(ceil_div(d + p, splits), int64_t(kThreads) * vec) * (int64_t(kThreads) * vec);
  plan.chunk = chunk;
  plan.splits = ceil_div(d + p, chunk);
  if (plan.splits == 1) plan.chunk = d + p;
  return plan;
}

template <typename T, int LANES>
void launch_outer_rows(const T* x, const T* g, typename AccOf<T>::type* out, int64_t B, int64_t d, int64_t p,
                       int64_t sxb, int64_t sxd, int64_t sgb, int64_t sgd, bool bias, cudaStream_t stream) {
  constexpr int64_t kRows = kThreads / LANES;
  const int64_t per_launch = kMaxGridX * kRows;
  for (int64_t b0 = 0; b0 < B; b0 += per_launch) {
    const int64_t n = std::min(per_launch, B - b0);
    outer_rows_kernel<T, LANES><<<static_cast<unsigned>(ceil_div(n, kRows)), kThreads, 0, stream>>>(
        x + b0 * sxb, g + b0 * sgb, out + b0, n, d, p, sxb, sxd, sgb, sgd, bias);
  }
}

template <typename T>
cudaError_t launch_outer(const T* x, const T* g, typename AccOf<T>::type* out, void* workspace, int64_t B, int64_t d,
                         int64_t p, int64_t sxb, int64_t sxd, int64_t sgb, int64_t sgd, bool bias, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const OuterPlan plan = plan_outer(sizeof(T), B, d, p);
  switch (plan.lanes) {
    case 4: launch_outer_rows<T, 4>(x, g, out, B, d, p, sxb, sxd, sgb, sgd, bias, stream); break;
    case 8: launch_outer_rows<T, 8>(x, g, out, B, d, p, sxb, sxd, sgb, sgd, bias, stream); break;
    case 16: launch_outer_rows<T, 16>(x, g, out, B, d, p, sxb, sxd, sgb, sgd, bias, stream); break;
    case 32: launch_outer_rows<T, 32>(x, g, out, B, d, p, sxb, sxd, sgb, sgd, bias, stream); break;
    default:
      if (plan.splits == 1) {
        for (int64_t b0 = 0; b0 < B; b0 += kMaxGridX) {
          const int64_t n = std::min(kMaxGridX, B - b0);
          outer_split_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
              x + b0 * sxb, g + b0 * sgb, out + b0, nullptr, d, p, sxb, sxd, sgb, sgd, 1, d + p, bias);
        }
      } else {
        // Only when B < 8 * #SMs, so B * splits < 16 * #SMs fits one launch.
        if (workspace == nullptr) return cudaErrorInvalidValue;
        Acc* ws = static_cast<Acc*>(workspace);
        outer_split_kernel<T><<<static_cast<unsigned>(B * plan.splits), kThreads, 0, stream>>>(
            x, g, out, ws, d, p, sxb, sxd, sgb, sgd, plan.splits, plan.chunk, bias);
        outer_finalize_kernel<Acc><<<static_cast<unsigned>(ceil_div(B, kThreads)), kThreads, 0, stream>>>(
            ws, out, B, plan.splits, bias);
      }
  }
  return cudaGetLastError();
}

// RM (outputs per thread per side) from T: tiles of 16 / 32 / 64 rows, so short sequences do not pay
// for a 64 x 64 tile of zeros (the Triton kernel's clamp(next_pow2(T), 16, 64)).
int ghost_rm(int64_t T) { return T <= 16 ? 1 : (T <= 32 ? 2 : 4); }

// Can quads of 4 consecutive k be read with one aligned vector load? (see load_quad)
bool quad_vectorisable(const void* ptr, int elem_bytes, int64_t B, int64_t T, int64_t K, int64_t sb, int64_t st,
                       int64_t sk) {
  const uintptr_t align = static_cast<uintptr_t>(std::min(16, 4 * elem_bytes));
  return sk == 1 && K % 4 == 0 && (T <= 1 || st % 4 == 0) && (B <= 1 || sb % 4 == 0) &&
         reinterpret_cast<uintptr_t>(ptr) % align == 0;
}

template <typename T, int RM>
cudaError_t launch_ghost_rm(const T* x, const T* g, typename AccOf<T>::type* partial, int64_t B, int64_t nt, int64_t d,
                            int64_t p, int64_t sxb, int64_t sxt, int64_t sxd, int64_t sgb, int64_t sgt, int64_t sgd,
                            bool bias, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(nt, 16 * RM);
  const int64_t num_pairs = num_tile_pairs(n_tiles);
  if (num_pairs > kMaxGridX) return cudaErrorInvalidConfiguration;  // T > ~4M: not a Linear layer
  const bool vec_x = quad_vectorisable(x, sizeof(T), B, nt, d, sxb, sxt, sxd);
  const bool vec_g = quad_vectorisable(g, sizeof(T), B, nt, p, sgb, sgt, sgd);
  const int64_t per_launch = kMaxGridX / num_pairs;
  for (int64_t b0 = 0; b0 < B; b0 += per_launch) {
    const int64_t n = std::min(per_launch, B - b0);
    ghost_kernel<T, RM><<<static_cast<unsigned>(n * num_pairs), kThreads, 0, stream>>>(
        x + b0 * sxb, g + b0 * sgb, partial + b0 * num_pairs, nt, d, p, sxb, sxt, sxd, sgb, sgt, sgd, n_tiles, vec_x,
        vec_g, bias);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ghost(const T* x, const T* g, typename AccOf<T>::type* partial, int64_t B, int64_t nt, int64_t d,
                         int64_t p, int64_t sxb, int64_t sxt, int64_t sxd, int64_t sgb, int64_t sgt, int64_t sgd,
                         bool bias, cudaStream_t stream) {
  switch (ghost_rm(nt)) {
    case 1: return launch_ghost_rm<T, 1>(x, g, partial, B, nt, d, p, sxb, sxt, sxd, sgb, sgt, sgd, bias, stream);
    case 2: return launch_ghost_rm<T, 2>(x, g, partial, B, nt, d, p, sxb, sxt, sxd, sgb, sgt, sgd, bias, stream);
    default: return launch_ghost_rm<T, 4>(x, g, partial, B, nt, d, p, sxb, sxt, sxd, sgb, sgt, sgd, bias, stream);
  }
}

int elem_bytes(DType dtype) {
  switch (dtype) {
    case DType::kHalf:
    case DType::kBFloat16: return 2;
    case DType::kFloat: return 4;
    default: return 8;
  }
}

}  // namespace

int64_t linear_sq_norms_outer_workspace_bytes(DType dtype, int64_t B, int64_t d_in, int64_t d_out) {
  if (B <= 0) return 0;
  const OuterPlan plan = plan_outer(elem_bytes(dtype), B, d_in, d_out);
  if (plan.lanes > 0 || plan.splits <= 1) return 0;
  const int64_t acc_bytes = dtype == DType::kDouble ? 8 : 4;
  return B * plan.splits * 2 * acc_bytes;
}

cudaError_t linear_sq_norms_outer(DType dtype, const void* x, const void* grad_out, void* out, void* workspace,
                                  int64_t B, int64_t d_in, int64_t d_out, int64_t stride_xb, int64_t stride_xd,
                                  int64_t stride_gb, int64_t stride_gd, bool bias, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (d_in < 0 || d_out < 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto elem) {
    using T = typename decltype(elem)::type;
    return launch_outer(static_cast<const T*>(x), static_cast<const T*>(grad_out),
                        static_cast<typename AccOf<T>::type*>(out), workspace, B, d_in, d_out, stride_xb, stride_xd,
                        stride_gb, stride_gd, bias, stream);
  });
}

int64_t linear_sq_norms_ghost_num_partials(int64_t T) {
  if (T <= 0) return 0;
  return num_tile_pairs(ceil_div(T, 16 * ghost_rm(T)));
}

cudaError_t linear_sq_norms_ghost_partials(DType dtype, const void* x, const void* grad_out, void* partial,
                                           int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                           int64_t stride_xb, int64_t stride_xt, int64_t stride_xd,
                                           int64_t stride_gb, int64_t stride_gt, int64_t stride_gd, bool bias,
                                           cudaStream_t stream) {
  if (B <= 0 || T <= 0) return cudaSuccess;  // nothing to write: B x 0 partials
  if (d_in < 0 || d_out < 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto elem) {
    using E = typename decltype(elem)::type;  // (T is the sequence length here)
    return launch_ghost(static_cast<const E*>(x), static_cast<const E*>(grad_out),
                        static_cast<typename AccOf<E>::type*>(partial), B, T, d_in, d_out, stride_xb, stride_xt,
                        stride_xd, stride_gb, stride_gt, stride_gd, bias, stream);
  });
}

}  // namespace cuda
}  // namespace isgd_kernels
