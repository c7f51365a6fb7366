// Schemas of the Linear per-example gradient-norm kernels. Implementations register per device:
// cpu.cpp (CPU) and cuda_binding.cpp (CUDA), input checks in checks.h.
// Shape contract, shared by all three: x (B, T, d_in) and grad_out (B, T, d_out), any strides;
// result (B,) float32 (float64 for float64 inputs): ||dL_i/dW||^2 (+ ||dL_i/db||^2 if bias).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(isgd_kernels, m) {
  // T must be 1: ||a||^2 ||delta||^2 in one fused pass.
  m.def("_linear_sq_norms_outer(Tensor x, Tensor grad_out, bool bias) -> Tensor");
  // sum_{t,s} (a_t . a_s)(delta_t . delta_s) without storing the T x T Gram matrices.
  m.def("_linear_sq_norms_ghost(Tensor x, Tensor grad_out, bool bias) -> Tensor");
  // ||G_i^T A_i||_F^2 without storing the d_out x d_in per-example gradient.
  m.def("_linear_sq_norms_materialize(Tensor x, Tensor grad_out, bool bias) -> Tensor");
}
