// The CPU alias-table kernels behind the ops of cpu.cpp: the PSA build (cpu_build.cpp) and the draws
// (cpu_sample.cpp). Inputs are checked by the callers (checks.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace isgd_kernels {
namespace alias_table {

// Validates the (N,) contiguous weights (ValueError naming the first bad index) and writes the table
// into threshold (N,) float64 and alias (N,) int32 / int64; returns the mean (= sum(w) / N as implied
// by the table).
double build_table_cpu(const at::Tensor& weights, at::Tensor& threshold, at::Tensor& alias);

// out[k] = index drawn with the random words bits[k] (one int64 per row of bits).
void draw_cpu(const at::Tensor& threshold, const at::Tensor& alias, const at::Tensor& bits, int64_t* out);

// iw[k] = mean / weights[idx[k]] for the draws of idx (iw: float32 or float64, as long as idx).
void importance_weights_cpu(const at::Tensor& weights, double mean, const int64_t* idx, at::Tensor& iw);

}  // namespace alias_table
}  // namespace isgd_kernels
