// Element types of the torch-free CUDA launchers (csrc/<family>/cuda_launch.h): the launchers take
// raw pointers plus one of these, and the bindings map torch dtypes onto them
// (csrc/common/cuda_binding.h). Plain C++, no CUDA or torch headers.
#pragma once

namespace isgd_kernels {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

}  // namespace cuda
}  // namespace isgd_kernels
