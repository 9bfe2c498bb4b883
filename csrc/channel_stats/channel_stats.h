// Op 1: per-channel (mean, M2) of a chunk (N, C, *spatial) and the fused backward of a loss on
// whole-set statistics: dL/dx = g_mean/M + g_var * 2 (x - mean)/M.
#pragma once

#include <ATen/ATen.h>

namespace zsq {

// (2, C) float64: row 0 mean, row 1 M2 = sum (x - mean)^2, over every dim but 1. Zeros for an empty chunk.
at::Tensor channel_stats_forward_cpu(const at::Tensor& x);
at::Tensor channel_stats_backward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                      const at::Tensor& grad_var, double total_count);
#ifdef ZSQ_WITH_CUDA
at::Tensor channel_stats_forward_cuda(const at::Tensor& x);
at::Tensor channel_stats_backward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                       const at::Tensor& grad_var, double total_count);
#endif

}  // namespace zsq
