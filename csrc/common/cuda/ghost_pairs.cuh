// What the ghost kernels (linear_norms/cuda.cu, conv_norms/cuda.cu) share: one block per tile pair
// (row tile, column tile >= row tile) of the upper triangle of the T x T Gram matrices, and the
// partial sum each block writes. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace isgd_kernels {
namespace cuda {

// Tile pairs (t, s >= t) of an n x n grid: n (n + 1) / 2.
__host__ __device__ constexpr int64_t num_tile_pairs(int64_t n) { return n * (n + 1) / 2; }

// Pair index (0 <= pair < num_tile_pairs(n)) -> (t_tile, s_tile), s_tile >= t_tile. The index counts
// the lower triangle (i, j <= i) from the end, then mirrors it; sqrt in double is exact enough for
// pair < 2^31 and the two loops fix any rounding.
__device__ __forceinline__ void tile_pair(int64_t n, int64_t pair, int64_t& t_tile, int64_t& s_tile) {
  const int64_t r = num_tile_pairs(n) - 1 - pair;
  int64_t i = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(r) + 1.0) - 1.0) * 0.5);
  while (i > 0 && i * (i + 1) / 2 > r) --i;
  while ((i + 1) * (i + 2) / 2 <= r) ++i;
  const int64_t j = r - i * (i + 1) / 2;
  t_tile = n - 1 - i;
  s_tile = n - 1 - j;
}

// The partial of one tile pair, from each thread's RM x RM entries of the two Gram tiles (ga: of the
// inputs, gg: of the output gradients): sum of ga .* gg (+ gg with a bias) over the block, doubled off
// the diagonal (the mirrored tile). Valid in thread 0; every thread of the block must call it.
template <typename Acc, int RM>
__device__ __forceinline__ Acc ghost_pair_partial(const Acc (&ga)[RM][RM], const Acc (&gg)[RM][RM], bool bias,
                                                  bool diag) {
  Acc local = 0;
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int c = 0; c < RM; ++c) local += ga[r][c] * gg[r][c] + (bias ? gg[r][c] : Acc(0));
  local = block_sum(local);
  return diag ? local : Acc(2) * local;
}

}  // namespace cuda
}  // namespace isgd_kernels
