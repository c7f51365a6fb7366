// Schema of the convolution per-example gradient-norm kernel. Implementations register per device:
// cpu.cpp (CPU) and cuda_binding.cpp (CUDA), input checks in checks.h.
// Shape contract: x (B, C_in, *S), grad_out (B, C_out, *O) with 1, 2 or 3 spatial dims, any strides,
// same floating dtype; kernel_size, stride, dilation: one value per spatial dim; padding: two per
// spatial dim, per side [lo_0, hi_0, lo_1, hi_1, ...] (zero padding); groups divides C_in and C_out.
// method: "ghost" | "materialize" | "outer" (T == 1), already resolved by isgd_kernels.cost.
// Result (B,) float32 (float64 for float64 inputs): ||dL_i/dW||^2 (+ ||dL_i/db||^2 if bias), the
// weight gradient of a grouped convolution being the sum over its groups' (C_out/groups, d) blocks.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(isgd_kernels, m) {
  m.def(
      "_conv_grad_sq_norms(Tensor x, Tensor grad_out, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool bias, str method) -> Tensor");
}
