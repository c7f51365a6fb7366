// Input checks and geometry shared by the CPU and CUDA implementations of _conv_grad_sq_norms
// (schema and shape contract in schema.cpp). Header-only, like linear_norms/checks.h.
#pragma once

#include <ATen/ATen.h>

#include "../common/tensor_checks.h"

namespace isgd_kernels {

// A convolution of rank 1, 2 or 3 seen as 3-D: missing leading spatial dims have size 1, kernel 1,
// stride 1, dilation 1 and padding 0. Arrays are indexed (D, H, W); strides are in elements.
struct ConvGeometry {
  int64_t B = 0, C_in = 0, C_out = 0, groups = 1;
  int64_t cg = 0, pg = 0;         // input / output channels per group
  int64_t in[3] = {1, 1, 1};      // input spatial size
  int64_t out[3] = {1, 1, 1};     // output spatial size
  int64_t k[3] = {1, 1, 1};       // kernel size
  int64_t stride[3] = {1, 1, 1};
  int64_t pad[3] = {0, 0, 0};     // low-side padding (the high side only shows up in `out`)
  int64_t dil[3] = {1, 1, 1};
  int64_t sx[5] = {0, 0, 0, 0, 0};  // x strides (B, C, D, H, W)
  int64_t sg[5] = {0, 0, 0, 0, 0};  // grad_out strides (B, C, D, H, W)
  int64_t T = 1;                  // output positions per example
  int64_t K = 0;                  // patch length per group: cg * kd * kh * kw
};

enum class ConvMethod { kOuter, kGhost, kMaterialize };

inline ConvMethod parse_conv_method(c10::string_view method, int64_t T, const char* op) {
  if (method == "ghost") return ConvMethod::kGhost;
  if (method == "materialize") return ConvMethod::kMaterialize;
  if (method == "outer") {
    TORCH_CHECK(T == 1, op, ": method 'outer' needs one output position per example, got T = ", T);
    return ConvMethod::kOuter;
  }
  TORCH_CHECK(false, op, ": method must be 'ghost', 'materialize' or 'outer' (resolve 'auto' with "
              "isgd_kernels.cost.choose_method), got '", method, "'");
}

// x (B, C_in, *S), grad_out (B, C_out, *O) with n = len(S) in {1, 2, 3}; kernel_size, stride,
// dilation: n ints; padding: 2n ints, per side [lo_0, hi_0, lo_1, hi_1, ...].
inline ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op, ": x must be (B, C_in, *spatial) with 1, 2 or 3 spatial dims, got ",
              x.sizes());
  TORCH_CHECK(g.dim() == x.dim(), op, ": grad_out must have the rank of x, got x ", x.sizes(), " and grad_out ",
              g.sizes());
  check_same_floating(x, g, op);
  const int64_t n = x.dim() - 2;
  TORCH_CHECK(static_cast<int64_t>(kernel_size.size()) == n && static_cast<int64_t>(stride.size()) == n &&
                  static_cast<int64_t>(dilation.size()) == n && static_cast<int64_t>(padding.size()) == 2 * n,
              op, ": a ", n, "-D convolution needs ", n, " kernel_size/stride/dilation values and ", 2 * n,
              " padding values (per side), got kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding,
              ", dilation ", dilation);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(x.size(0) == g.size(0), op, ": x ", x.sizes(), " and grad_out ", g.sizes(), " differ in batch size");
  ConvGeometry geo;
  geo.B = x.size(0);
  geo.C_in = x.size(1);
  geo.C_out = g.size(1);
  geo.groups = groups;
  TORCH_CHECK(geo.C_in % groups == 0 && geo.C_out % groups == 0, op, ": C_in = ", geo.C_in, " and C_out = ",
              geo.C_out, " must be divisible by groups = ", groups);
  geo.cg = geo.C_in / groups;
  geo.pg = geo.C_out / groups;
  geo.sx[0] = x.stride(0);
  geo.sx[1] = x.stride(1);
  geo.sg[0] = g.stride(0);
  geo.sg[1] = g.stride(1);
  const int64_t lead = 3 - n;  // leading size-1 spatial dims
  for (int64_t j = 0; j < n; ++j) {
    const int64_t a = lead + j;
    geo.in[a] = x.size(2 + j);
    geo.out[a] = g.size(2 + j);
    geo.k[a] = kernel_size[j];
    geo.stride[a] = stride[j];
    geo.dil[a] = dilation[j];
    geo.pad[a] = padding[2 * j];
    geo.sx[2 + a] = x.stride(2 + j);
    geo.sg[2 + a] = g.stride(2 + j);
    TORCH_CHECK(geo.k[a] >= 1 && geo.stride[a] >= 1 && geo.dil[a] >= 1 && padding[2 * j] >= 0 &&
                    padding[2 * j + 1] >= 0,
                op, ": kernel_size, stride and dilation must be >= 1 and padding >= 0, got kernel_size ", kernel_size,
                ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
    const int64_t expected =
        (geo.in[a] + padding[2 * j] + padding[2 * j + 1] - geo.dil[a] * (geo.k[a] - 1) - 1) / geo.stride[a] + 1;
    TORCH_CHECK(expected >= 1 && geo.out[a] == expected, op, ": grad_out ", g.sizes(),
                " does not have the output size of a convolution of x ", x.sizes(), " with kernel_size ", kernel_size,
                ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  }
  geo.T = geo.out[0] * geo.out[1] * geo.out[2];
  geo.K = geo.cg * geo.k[0] * geo.k[1] * geo.k[2];
  return geo;
}

}  // namespace isgd_kernels
