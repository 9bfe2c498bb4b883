// Op 2: fake quantization x_hat = s (clamp(round(x/s) + z, qmin, qmax) - z) with the
// straight-through gradient for x and the LSQ gradient for s. axis = -1: per-tensor.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common.h"

namespace zsq {

// Per-element math shared by the CPU and CUDA kernels (T: fp32, or fp64 for double inputs).
template <typename T>
struct FakeQuantElem {
  T q;       // clamp(round(x/s) + z, qmin, qmax)
  T xs;      // x / s
  bool inside;  // round(x/s) + z within [qmin, qmax]
};

template <typename T>
C10_HOST_DEVICE inline FakeQuantElem<T> fake_quant_elem(T x, T s, T z, T qmin, T qmax) {
  const T xs = x / s;  // a true division, as the reference (not x * (1/s))
  const T r = round_half_even(xs) + z;
  return {clamp_nan(r, qmin, qmax), xs, r >= qmin && r <= qmax};
}

// d x_hat / d s (LSQ): (q - z) - [inside] * x/s, times the upstream gradient.
template <typename T>
C10_HOST_DEVICE inline T fake_quant_scale_grad(T g, const FakeQuantElem<T>& e, T z) {
  return g * ((e.q - z) - T(e.inside) * e.xs);
}

at::Tensor fake_quant_forward_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t qmin, int64_t qmax, int64_t axis);
std::tuple<at::Tensor, at::Tensor> fake_quant_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& scale, const at::Tensor& zero_point,
                                                           int64_t qmin, int64_t qmax, int64_t axis,
                                                           bool need_scale_grad);
#ifdef ZSQ_WITH_CUDA
at::Tensor fake_quant_forward_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                   int64_t qmin, int64_t qmax, int64_t axis);
std::tuple<at::Tensor, at::Tensor> fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& scale, const at::Tensor& zero_point,
                                                            int64_t qmin, int64_t qmax, int64_t axis,
                                                            bool need_scale_grad);
#endif

}  // namespace zsq
