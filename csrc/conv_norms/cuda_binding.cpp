// CUDA implementation of _conv_grad_sq_norms (schema in schema.cpp): checks the inputs, allocates the
// partial sums on the current stream and calls the torch-free launcher of cuda.cu. Strides go to the
// kernels as they are: no .contiguous() copies.
#ifdef ISGD_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "../common/cuda_binding.h"
#include "checks.h"
#include "cuda_launch.h"

namespace isgd_kernels {
namespace {

constexpr const char* kOp = "_conv_grad_sq_norms";

cuda::ConvProblem problem_of(const ConvGeometry& geo) {
  cuda::ConvProblem p{};
  p.B = geo.B;
  p.groups = geo.groups;
  p.cg = geo.cg;
  p.pg = geo.pg;
  for (int a = 0; a < 3; ++a) {
    p.in[a] = geo.in[a];
    p.out[a] = geo.out[a];
    p.k[a] = geo.k[a];
    p.stride[a] = geo.stride[a];
    p.pad[a] = geo.pad[a];
    p.dil[a] = geo.dil[a];
  }
  for (int a = 0; a < 5; ++a) {
    p.sx[a] = geo.sx[a];
    p.sg[a] = geo.sg[a];
  }
  p.T = geo.T;
  p.K = geo.K;
  return p;
}

at::Tensor conv_grad_sq_norms_cuda(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, bool bias, c10::string_view method) {
  const ConvGeometry geo = conv_geometry(x, grad_out, kernel_size, stride, padding, dilation, groups, kOp);
  TORCH_CHECK(x.is_cuda(), kOp, ": expected CUDA tensors, got x on ", x.device());
  const ConvMethod how = parse_conv_method(method, geo.T, kOp);
  // T == 1: one 16 x 16 Gram tile per item is the outer product ||u||^2 ||delta||^2 in O(d + p).
  const cuda::ConvMethod launch_method = (how == ConvMethod::kMaterialize && geo.T > 1)
                                             ? cuda::ConvMethod::kMaterialize
                                             : cuda::ConvMethod::kGhost;
  const cuda::DType dtype = launcher_dtype(x.scalar_type(), kOp);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  if (geo.B == 0) return at::empty({0}, opts);
  const cuda::ConvProblem problem = problem_of(geo);
  const int64_t n_partials = cuda::conv_sq_norms_num_partials(launch_method, problem);
  auto partial = at::empty({geo.B, geo.groups * n_partials}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::conv_sq_norms_partials(dtype, launch_method, x.const_data_ptr(), grad_out.const_data_ptr(),
                                            partial.mutable_data_ptr(), problem, bias, stream),
               kOp);
  return partial.sum(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(isgd_kernels, CUDA, m) { m.impl("_conv_grad_sq_norms", &conv_grad_sq_norms_cuda); }

}  // namespace isgd_kernels

#endif  // ISGD_WITH_CUDA
