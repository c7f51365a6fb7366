// Schema of the LayerNorm / RMSNorm per-example gradient-norm kernel. Implementation: cpu.cpp (CPU); other
// devices take the pure-PyTorch path (isgd_kernels/layer_norm_norms/reference.py).
// Shape contract: x and grad_out (B, R, P), one floating dtype, any strides; P holds the normalized features,
// R the positions that share the affine parameters. Per (example, position), x_hat = (x - mean) * rstd over
// P, rstd = 1 / sqrt(var + eps) (rms: mean 0, var = mean(x^2)). Result (B,) float32 (float64 for float64
// inputs): ||sum_r grad_out * x_hat||^2 if weight, plus ||sum_r grad_out||^2 if bias.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(isgd_kernels, m) {
  m.def("_layer_norm_sq_norms(Tensor x, Tensor grad_out, float eps, bool rms, bool weight, bool bias) -> Tensor");
}
