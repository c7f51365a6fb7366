// CUDA kernels for the per-example gradient norms of a convolution (launchers in cuda_launch.h).
// No torch headers here: `nvcc -c` compiles this file on a machine without a CUDA build of torch.
//
// Work item = (example b, group g), the Linear problem U (T, d), G (T, p) of isgd_kernels.conv, with
// d = C_in/groups * prod(k), p = C_out/groups. U is never stored: implicit im2col, every element of a
// staged tile is gathered from x by index arithmetic (zero where the window reaches into the padding).
//
// materialize: one 256-thread block per (item, p tile, d tile). It sweeps all T positions in steps of
//   16, staging a (16, p tile) slice of G and a (16, d tile) slice of U in shared memory, and keeps its
//   tile of G^T U in registers (RP x RD per thread on a 16 x 16 thread grid); the epilogue squares and
//   sums the tile. Blocks of the first d tile also sum G over T for the bias term. 2 T d p FLOPs.
// ghost: one 256-thread block per (item, row tile, column tile >= row tile) of the T x T Gram matrices,
//   as the Linear ghost kernel: both Gram tiles in registers (U U^T over d in steps of 16, then G G^T
//   over p), multiplied elementwise and reduced; off-diagonal tiles count twice. 2 T^2 (d + p) FLOPs.
// Staging maps consecutive threads to consecutive output positions, which are consecutive addresses
// of grad_out and (stride 1) of x in NC(D)HW layouts: coalesced loads. Shared rows are padded by one
// element so the transposed stores do not conflict.
// Each block writes one partial sum; the binding sums them in a fixed order (deterministic, no atomics).
// Accumulation in float (double for double inputs); FMA on CUDA cores, no tensor cores.
#include "cuda_launch.h"

#include "../common/cuda/common.cuh"
#include "../common/cuda/ghost_pairs.cuh"

#include <algorithm>
#include <cstdint>

namespace isgd_kernels {
namespace cuda {
namespace {

constexpr int kStep = 16;                  // positions (materialize) or k / p values (ghost) per stage
static_assert(kThreads == kStep * kStep, "the tiles map kThreads onto a 16 x 16 thread grid");

// Output position t -> window corner in x (low padding subtracted) and the offset of t in grad_out.
struct Position {
  int64_t d, h, w;  // corner; an input coordinate is corner + dilated kernel offset
  int64_t g_off;
  bool valid;
};

__device__ __forceinline__ Position position(const ConvProblem& P, int64_t t) {
  Position pos;
  pos.valid = t < P.T;
  if (!pos.valid) t = 0;
  const int64_t ow = t % P.out[2], oh = (t / P.out[2]) % P.out[1], od = t / (P.out[2] * P.out[1]);
  pos.d = od * P.stride[0] - P.pad[0];
  pos.h = oh * P.stride[1] - P.pad[1];
  pos.w = ow * P.stride[2] - P.pad[2];
  pos.g_off = od * P.sg[2] + oh * P.sg[3] + ow * P.sg[4];
  return pos;
}

// U[t, k] of the item whose x slice starts at xg (x[b, g * cg]).
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type patch(const T* __restrict__ xg, const ConvProblem& P,
                                                        const Position& pos, int64_t k) {
  using Acc = typename AccOf<T>::type;
  if (!pos.valid || k >= P.K) return Acc(0);
  const int64_t kvol = P.k[0] * P.k[1] * P.k[2];
  const int64_t c = k / kvol, r = k - c * kvol;
  const int64_t kd = r / (P.k[1] * P.k[2]), kh = (r / P.k[2]) % P.k[1], kw = r % P.k[2];
  const int64_t id = pos.d + kd * P.dil[0], ih = pos.h + kh * P.dil[1], iw = pos.w + kw * P.dil[2];
  if (id < 0 || id >= P.in[0] || ih < 0 || ih >= P.in[1] || iw < 0 || iw >= P.in[2]) return Acc(0);
  return to_acc(xg[c * P.sx[1] + id * P.sx[2] + ih * P.sx[3] + iw * P.sx[4]]);
}

// G[t, j] of the item whose grad_out slice starts at gg (grad_out[b, g * pg]).
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type grad(const T* __restrict__ gg, const ConvProblem& P,
                                                       const Position& pos, int64_t j) {
  using Acc = typename AccOf<T>::type;
  if (!pos.valid || j >= P.pg) return Acc(0);
  return to_acc(gg[j * P.sg[1] + pos.g_off]);
}

// ---------------------------------------------------------------------------------------------------
// materialize: tile (16 RP) x (16 RD) of the item's G^T U.

template <typename T, int RP, int RD>
__global__ void __launch_bounds__(kThreads)
materialize_kernel(const T* __restrict__ x, const T* __restrict__ g, typename AccOf<T>::type* __restrict__ partial,
                   const ConvProblem P, int64_t p_tiles, int64_t d_tiles, int64_t first_block, bool bias) {
  using Acc = typename AccOf<T>::type;
  constexpr int BP = 16 * RP, BD = 16 * RD;
  __shared__ Acc s_g[kStep][BP + 1];
  __shared__ Acc s_u[kStep][BD + 1];

  const int64_t blk = first_block + blockIdx.x;
  const int64_t tiles = p_tiles * d_tiles;
  const int64_t item = blk / tiles, rem = blk - item * tiles;
  const int64_t p0 = (rem / d_tiles) * BP, d0 = (rem % d_tiles) * BD;
  const bool bias_block = bias && rem % d_tiles == 0;
  const int64_t b = item / P.groups, grp = item - b * P.groups;
  const T* xg = x + b * P.sx[0] + grp * P.cg * P.sx[1];
  const T* gg = g + b * P.sg[0] + grp * P.pg * P.sg[1];

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  // Staging: thread tid always loads position tt = tid % kStep of the stage (kThreads % kStep == 0),
  // columns tid / kStep + j * (kThreads / kStep).
  const int tt = tid % kStep, col0 = tid / kStep;
  constexpr int kColStep = kThreads / kStep;

  Acc acc[RP][RD];
#pragma unroll
  for (int r = 0; r < RP; ++r)
#pragma unroll
    for (int c = 0; c < RD; ++c) acc[r][c] = Acc(0);
  Acc bias_sum = Acc(0);  // thread tid < BP: sum over T of G[t, p0 + tid]

  for (int64_t t0 = 0; t0 < P.T; t0 += kStep) {
    const Position pos = position(P, t0 + tt);
    for (int c = col0; c < BP; c += kColStep) s_g[tt][c] = grad(gg, P, pos, p0 + c);
    for (int c = col0; c < BD; c += kColStep) s_u[tt][c] = patch(xg, P, pos, d0 + c);
    __syncthreads();
    if (bias_block && tid < BP) {
#pragma unroll
      for (int s = 0; s < kStep; ++s) bias_sum += s_g[s][tid];
    }
#pragma unroll
    for (int s = 0; s < kStep; ++s) {
      Acc a[RP], u[RD];
#pragma unroll
      for (int r = 0; r < RP; ++r) a[r] = s_g[s][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < RD; ++c) u[c] = s_u[s][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < RP; ++r)
#pragma unroll
        for (int c = 0; c < RD; ++c) acc[r][c] = fma(a[r], u[c], acc[r][c]);
    }
    __syncthreads();  // the next stage overwrites the tiles
  }

  // Rows / columns past p and d were staged as zeros: they add nothing.
  Acc local = bias_sum * bias_sum;
#pragma unroll
  for (int r = 0; r < RP; ++r)
#pragma unroll
    for (int c = 0; c < RD; ++c) local = fma(acc[r][c], acc[r][c], local);
  local = block_sum(local);
  if (tid == 0) partial[blk] = local;
}

// ---------------------------------------------------------------------------------------------------
// ghost: tile (16 RM) x (16 RM) of the T x T Gram matrices.

// acc[r][c] = sum over columns of rows t0 + ty + 16 r and s0 + tx + 16 c of the item's U (kPatch) or G.
enum class Source { kPatch, kGrad };

template <typename T, int RM, Source S>
__device__ __forceinline__ void gram_tile(const T* __restrict__ base, const ConvProblem& P, int64_t ncols,
                                          int64_t t0, int64_t s0, bool diag,
                                          typename AccOf<T>::type (*s_row)[16 * RM + 1],
                                          typename AccOf<T>::type (*s_col)[16 * RM + 1],
                                          typename AccOf<T>::type (&acc)[RM][RM]) {
  using Acc = typename AccOf<T>::type;
  constexpr int BT = 16 * RM;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int c = 0; c < RM; ++c) acc[r][c] = Acc(0);
  // Staging: consecutive threads take consecutive positions (coalesced along W); each thread keeps its
  // positions (row q = tid % BT + i * kThreads for BT > kThreads is not needed: BT <= 64 < 256).
  const int q = tid % BT, k_first = tid / BT;
  constexpr int kKStep = kThreads / BT;
  const Position pr = position(P, t0 + q), pc = position(P, s0 + q);
  for (int64_t k0 = 0; k0 < ncols; k0 += kStep) {
    for (int kk = k_first; kk < kStep; kk += kKStep) {
      if (S == Source::kPatch) {
        s_row[kk][q] = patch(base, P, pr, k0 + kk);
        if (!diag) s_col[kk][q] = patch(base, P, pc, k0 + kk);
      } else {
        s_row[kk][q] = grad(base, P, pr, k0 + kk);
        if (!diag) s_col[kk][q] = grad(base, P, pc, k0 + kk);
      }
    }
    __syncthreads();
    auto cols = diag ? s_row : s_col;
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      Acc a[RM], bcol[RM];
#pragma unroll
      for (int r = 0; r < RM; ++r) a[r] = s_row[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < RM; ++c) bcol[c] = cols[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RM; ++c) acc[r][c] = fma(a[r], bcol[c], acc[r][c]);
    }
    __syncthreads();
  }
}

template <typename T, int RM>
__global__ void __launch_bounds__(kThreads)
ghost_kernel(const T* __restrict__ x, const T* __restrict__ g, typename AccOf<T>::type* __restrict__ partial,
             const ConvProblem P, int64_t n_tiles, int64_t first_block, bool bias) {
  using Acc = typename AccOf<T>::type;
  constexpr int BT = 16 * RM;
  __shared__ Acc s_row[kStep][BT + 1];
  __shared__ Acc s_col[kStep][BT + 1];

  const int64_t num_pairs = num_tile_pairs(n_tiles);
  const int64_t blk = first_block + blockIdx.x;
  const int64_t item = blk / num_pairs;
  int64_t t_tile, s_tile;  // s_tile >= t_tile
  tile_pair(n_tiles, blk - item * num_pairs, t_tile, s_tile);
  const bool diag = t_tile == s_tile;
  const int64_t t0 = t_tile * BT, s0 = s_tile * BT;

  const int64_t b = item / P.groups, grp = item - b * P.groups;
  const T* xg = x + b * P.sx[0] + grp * P.cg * P.sx[1];
  const T* gg = g + b * P.sg[0] + grp * P.pg * P.sg[1];

  Acc ga[RM][RM], gd[RM][RM];
  gram_tile<T, RM, Source::kPatch>(xg, P, P.K, t0, s0, diag, s_row, s_col, ga);
  gram_tile<T, RM, Source::kGrad>(gg, P, P.pg, t0, s0, diag, s_row, s_col, gd);

  // Positions past T were staged as zeros, so their Gram entries (bias term included) are zero.
  const Acc local = ghost_pair_partial(ga, gd, bias, diag);
  if (threadIdx.x == 0) partial[blk] = local;
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Tile widths from the problem: 16, 32 or 64 rows, so small p (depthwise: p = 1), small d or short T do
// not pay for a 64-wide tile of zeros.
int tile_mult(int64_t n) { return n <= 16 ? 1 : (n <= 32 ? 2 : 4); }

int64_t tiles(int64_t n, int mult) { return ceil_div(n, 16 * mult); }

template <typename T, int RP, int RD>
cudaError_t launch_materialize_rp_rd(const T* x, const T* g, typename AccOf<T>::type* partial, const ConvProblem& P,
                                     bool bias, cudaStream_t stream) {
  const int64_t p_tiles = tiles(P.pg, RP), d_tiles = tiles(P.K, RD);
  const int64_t blocks = P.B * P.groups * p_tiles * d_tiles;
  for (int64_t first = 0; first < blocks; first += kMaxGridX) {
    const int64_t n = std::min(kMaxGridX, blocks - first);
    materialize_kernel<T, RP, RD><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(x, g, partial, P, p_tiles,
                                                                                      d_tiles, first, bias);
  }
  return cudaGetLastError();
}

template <typename T, int RP>
cudaError_t launch_materialize_rp(const T* x, const T* g, typename AccOf<T>::type* partial, const ConvProblem& P,
                                  bool bias, cudaStream_t stream) {
  switch (tile_mult(P.K)) {
    case 1: return launch_materialize_rp_rd<T, RP, 1>(x, g, partial, P, bias, stream);
    case 2: return launch_materialize_rp_rd<T, RP, 2>(x, g, partial, P, bias, stream);
    default: return launch_materialize_rp_rd<T, RP, 4>(x, g, partial, P, bias, stream);
  }
}

template <typename T, int RM>
cudaError_t launch_ghost_rm(const T* x, const T* g, typename AccOf<T>::type* partial, const ConvProblem& P, bool bias,
                            cudaStream_t stream) {
  const int64_t n_tiles = tiles(P.T, RM);
  const int64_t blocks = P.B * P.groups * num_tile_pairs(n_tiles);
  for (int64_t first = 0; first < blocks; first += kMaxGridX) {
    const int64_t n = std::min(kMaxGridX, blocks - first);
    ghost_kernel<T, RM><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(x, g, partial, P, n_tiles, first, bias);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(ConvMethod method, const T* x, const T* g, typename AccOf<T>::type* partial, const ConvProblem& P,
                   bool bias, cudaStream_t stream) {
  if (method == ConvMethod::kGhost) {
    switch (tile_mult(P.T)) {
      case 1: return launch_ghost_rm<T, 1>(x, g, partial, P, bias, stream);
      case 2: return launch_ghost_rm<T, 2>(x, g, partial, P, bias, stream);
      default: return launch_ghost_rm<T, 4>(x, g, partial, P, bias, stream);
    }
  }
  switch (tile_mult(P.pg)) {
    case 1: return launch_materialize_rp<T, 1>(x, g, partial, P, bias, stream);
    case 2: return launch_materialize_rp<T, 2>(x, g, partial, P, bias, stream);
    default: return launch_materialize_rp<T, 4>(x, g, partial, P, bias, stream);
  }
}

}  // namespace

int64_t conv_sq_norms_num_partials(ConvMethod method, const ConvProblem& P) {
  if (P.T <= 0) return 0;
  if (method == ConvMethod::kGhost) {
    return num_tile_pairs(tiles(P.T, tile_mult(P.T)));
  }
  return tiles(P.pg, tile_mult(P.pg)) * tiles(P.K, tile_mult(P.K));
}

cudaError_t conv_sq_norms_partials(DType dtype, ConvMethod method, const void* x, const void* grad_out,
                                   void* partial, const ConvProblem& P, bool bias, cudaStream_t stream) {
  if (P.B <= 0 || P.groups <= 0 || P.T <= 0) return cudaSuccess;  // nothing to write
  if (P.cg <= 0 || P.pg <= 0 || P.K <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto elem) {
    using T = typename decltype(elem)::type;
    return launch(method, static_cast<const T*>(x), static_cast<const T*>(grad_out),
                  static_cast<typename AccOf<T>::type*>(partial), P, bias, stream);
  });
}

}  // namespace cuda
}  // namespace isgd_kernels
