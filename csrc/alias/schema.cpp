// Schemas of the alias-table sampler. Implementations register per device:
// cpu.cpp (CPU) and cuda_binding.cpp (CUDA), input checks in checks.h; the numerical contract they
// share (scaling, light/heavy merge, how random words become draws) is written down in
// isgd_kernels/reference_sampler.py, whose pure-torch functions are the test oracle.
//
// Shapes: weights (N,) floating, N >= 1; threshold (N,) float64; alias (N,) int32 when N < 2^31,
// else int64; mean 0-d float64 (= sum(w) / N as implied by the table); bits (n, 2) int64 random
// words (row word, coin word) per draw. Draws return int64 indices (n,).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(isgd_kernels, m) {
  // Validates the weights (ValueError naming the first bad index) and builds a fresh table.
  m.def("_alias_build(Tensor weights) -> (Tensor threshold, Tensor alias, Tensor mean)");
  // The same into existing buffers (cheap rebuild when weights are refreshed); returns mean.
  m.def("_alias_build_into(Tensor weights, Tensor(a!) threshold, Tensor(b!) alias) -> Tensor");
  // n draws with replacement: index = row if coin < threshold[row] else alias[row].
  m.def("_alias_sample(Tensor threshold, Tensor alias, Tensor bits) -> Tensor");
  // Draws plus their importance weights 1 / (N q_i) = mean / weights[i], in `dtype`.
  m.def(
      "_alias_sample_weighted(Tensor threshold, Tensor alias, Tensor weights, Tensor mean, Tensor bits, "
      "ScalarType dtype) -> (Tensor, Tensor)");
}
