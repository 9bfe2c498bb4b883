// Op 1: per-channel (mean, M2) of a chunk (N, C, *spatial), optionally merged into running
// statistics, and the fused backward of a loss on whole-set statistics:
// dL/dx = s g_mean/M + s g_var * 2 (x - mean)/M (s: an optional 0-dim gradient scale).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace zsq {

// (2, C) float64: row 0 mean, row 1 M2 = sum (x - mean)^2 over every dim but 1; with `running`
// ((2, C) float64 over running_count elements per channel) the Chan merge of both.
at::Tensor channel_stats_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& running,
                                     double running_count);
// mean, grad_mean, grad_var: (C,) float64; grad_scale: 0-dim float64 or undefined.
at::Tensor channel_stats_backward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                      const at::Tensor& grad_var, double total_count,
                                      const std::optional<at::Tensor>& grad_scale);
#ifdef ZSQ_WITH_CUDA
at::Tensor channel_stats_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& running,
                                      double running_count);
at::Tensor channel_stats_backward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                       const at::Tensor& grad_var, double total_count,
                                       const std::optional<at::Tensor>& grad_scale);
#endif

}  // namespace zsq
