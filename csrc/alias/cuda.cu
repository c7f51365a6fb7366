// CUDA kernels of the alias-table sampler (launchers declared in cuda_launch.h; no torch headers).
//
// Build (PSA, Hübschle-Schneider & Sanders 2019; GPU form as Lehmann et al. 2021): the binding
// computes the scaled weights, the light/heavy index lists and their prefix sums with ATen; here
//   alias_split_kernel  co-ranks every kAliasChunk-th position of the merged light/heavy order
//                       ("light a before heavy b iff kl[a] < kh[b]") by binary search (merge path),
//                       one thread per chunk boundary;
//   alias_sweep_kernel  one thread per chunk sweeps its lights and heavies in merged order: a light
//                       takes threshold s and the current heavy as alias; a heavy takes threshold
//                       1 - (kl[a] - kh[b]) and the next heavy as alias. Chunks are independent.
// Thresholds come from prefix sums, not a running residual, so every chunk is exact on its own and
// the table equals the reference's (reference_sampler.py) for the same prefix sums.
//
// Draws: one thread per draw, two 64-bit random words -> (row, coin), one table read (threshold,
// then alias only when the coin rejects). No host synchronisation anywhere.
#include "cuda_launch.h"

#include "../common/cuda/common.cuh"

namespace isgd_kernels {
namespace cuda {
namespace {

__global__ void alias_split_kernel(const double* __restrict__ kl, const double* __restrict__ kh, int64_t n,
                                   int64_t A, int64_t B, int64_t num_bounds, int64_t* __restrict__ arank) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_bounds) return;
  const int64_t k = c * kAliasChunk < n ? c * kAliasChunk : n;
  int64_t lo = k - B > 0 ? k - B : 0;
  int64_t hi = k < A ? k : A;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    // Light `mid` is among the first k merged items iff it precedes heavy k - mid - 1.
    if (kl[mid] < kh[k - mid - 1]) lo = mid + 1; else hi = mid;
  }
  arank[c] = lo;
}

template <typename I>
__global__ void alias_sweep_kernel(const double* __restrict__ s, const int64_t* __restrict__ light,
                                   const int64_t* __restrict__ heavy, const double* __restrict__ kl,
                                   const double* __restrict__ kh, const int64_t* __restrict__ arank, int64_t n,
                                   int64_t B, int64_t num_chunks, int64_t fallback, double* __restrict__ threshold,
                                   I* __restrict__ alias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_chunks) return;
  const int64_t k0 = c * kAliasChunk;
  const int64_t k1 = k0 + kAliasChunk < n ? k0 + kAliasChunk : n;
  int64_t a = arank[c], b = k0 - a;
  const int64_t a_end = arank[c + 1], b_end = k1 - a_end;
  while (a < a_end || b < b_end) {
    const bool is_light = a < a_end && (b >= b_end || kl[a] < kh[b]);
    if (is_light) {
      const int64_t i = light[a];
      threshold[i] = s[i];  // exactly s: a zero weight gets threshold 0
      alias[i] = static_cast<I>(b < B ? heavy[b] : fallback);
      ++a;
    } else {
      const int64_t j = heavy[b];
      double t = 1.0 - (kl[a] - kh[b]);
      t = t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t);
      threshold[j] = t;
      alias[j] = static_cast<I>(heavy[b + 1 < B ? b + 1 : B - 1]);
      ++b;
    }
  }
}

__device__ __forceinline__ double unit_from_bits(int64_t word) {
  // Top 53 bits as a float64 in [0, 1): exact, the same on every backend.
  return __dmul_rn(static_cast<double>(static_cast<unsigned long long>(word) >> 11), 1.1102230246251565e-16);
}

template <typename I>
__device__ __forceinline__ int64_t draw_one(const double* __restrict__ threshold, const I* __restrict__ alias,
                                            int64_t n, const int64_t* __restrict__ bits, int64_t k) {
  const double u0 = unit_from_bits(bits[2 * k]);
  const double u1 = unit_from_bits(bits[2 * k + 1]);
  int64_t row = static_cast<int64_t>(__dmul_rn(u0, static_cast<double>(n)));
  row = row < n - 1 ? row : n - 1;
  return u1 < threshold[row] ? row : static_cast<int64_t>(alias[row]);
}

template <typename I>
__global__ void alias_sample_kernel(const double* __restrict__ threshold, const I* __restrict__ alias, int64_t n,
                                    const int64_t* __restrict__ bits, int64_t draws, int64_t* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= draws) return;
  out[k] = draw_one(threshold, alias, n, bits, k);
}

template <typename I, typename W, typename O>
__global__ void alias_sample_weighted_kernel(const double* __restrict__ threshold, const I* __restrict__ alias,
                                             int64_t n, const W* __restrict__ weights,
                                             const double* __restrict__ mean, const int64_t* __restrict__ bits,
                                             int64_t draws, int64_t* __restrict__ out, O* __restrict__ iw) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= draws) return;
  const int64_t i = draw_one(threshold, alias, n, bits, k);
  out[k] = i;
  iw[k] = static_cast<O>(__ddiv_rn(mean[0], static_cast<double>(to_acc(weights[i]))));
}

template <typename I, typename W>
cudaError_t launch_weighted(const double* threshold, const void* alias, int64_t n, const void* weights,
                            const double* mean, const int64_t* bits, int64_t draws, int64_t* out, void* iw,
                            bool iw64, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(draws, kThreads)));
  const I* al = static_cast<const I*>(alias);
  const W* w = static_cast<const W*>(weights);
  if (iw64) {
    alias_sample_weighted_kernel<I, W, double><<<grid, kThreads, 0, stream>>>(threshold, al, n, w, mean, bits, draws,
                                                                              out, static_cast<double*>(iw));
  } else {
    alias_sample_weighted_kernel<I, W, float><<<grid, kThreads, 0, stream>>>(threshold, al, n, w, mean, bits, draws,
                                                                             out, static_cast<float*>(iw));
  }
  return cudaGetLastError();
}

template <typename I>
cudaError_t launch_weighted_w(const double* threshold, const void* alias, int64_t n, const void* weights,
                              DType wtype, const double* mean, const int64_t* bits, int64_t draws,
                              int64_t* out, void* iw, bool iw64, cudaStream_t stream) {
  return dispatch_dtype(wtype, [&](auto elem) {
    using W = typename decltype(elem)::type;
    return launch_weighted<I, W>(threshold, alias, n, weights, mean, bits, draws, out, iw, iw64, stream);
  });
}

}  // namespace

int64_t alias_sweep_workspace_elems(int64_t n) { return ceil_div(n, kAliasChunk) + 1; }

cudaError_t alias_sweep(const double* s, const int64_t* light, const int64_t* heavy, const double* kl,
                        const double* kh, int64_t n, int64_t A, int64_t B, int64_t fallback, int64_t* workspace,
                        double* threshold, void* alias, bool alias64, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t num_chunks = ceil_div(n, kAliasChunk);
  const int64_t num_bounds = num_chunks + 1;
  alias_split_kernel<<<static_cast<unsigned>(ceil_div(num_bounds, kThreads)), kThreads, 0, stream>>>(
      kl, kh, n, A, B, num_bounds, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(num_chunks, kThreads)));
  if (alias64) {
    alias_sweep_kernel<int64_t><<<grid, kThreads, 0, stream>>>(s, light, heavy, kl, kh, workspace, n, B, num_chunks,
                                                               fallback, threshold, static_cast<int64_t*>(alias));
  } else {
    alias_sweep_kernel<int32_t><<<grid, kThreads, 0, stream>>>(s, light, heavy, kl, kh, workspace, n, B, num_chunks,
                                                               fallback, threshold, static_cast<int32_t*>(alias));
  }
  return cudaGetLastError();
}

cudaError_t alias_sample(const double* threshold, const void* alias, bool alias64, int64_t n, const int64_t* bits,
                         int64_t draws, int64_t* out, cudaStream_t stream) {
  if (draws <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(draws, kThreads)));
  if (alias64) {
    alias_sample_kernel<int64_t><<<grid, kThreads, 0, stream>>>(threshold, static_cast<const int64_t*>(alias), n,
                                                                bits, draws, out);
  } else {
    alias_sample_kernel<int32_t><<<grid, kThreads, 0, stream>>>(threshold, static_cast<const int32_t*>(alias), n,
                                                                bits, draws, out);
  }
  return cudaGetLastError();
}

cudaError_t alias_sample_weighted(const double* threshold, const void* alias, bool alias64, int64_t n,
                                  const void* weights, DType wtype, const double* mean,
                                  const int64_t* bits, int64_t draws, int64_t* out, void* iw, bool iw64,
                                  cudaStream_t stream) {
  if (draws <= 0) return cudaSuccess;
  if (alias64) {
    return launch_weighted_w<int64_t>(threshold, alias, n, weights, wtype, mean, bits, draws, out, iw, iw64, stream);
  }
  return launch_weighted_w<int32_t>(threshold, alias, n, weights, wtype, mean, bits, draws, out, iw, iw64, stream);
}

}  // namespace cuda
}  // namespace isgd_kernels
