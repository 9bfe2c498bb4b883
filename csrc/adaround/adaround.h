// Op 3: AdaRound soft quantization w_hat = s (clamp(floor(w/s) + h(V) + z, qmin, qmax) - z) with
// the rounding regularizer sum(1 - |2h(V) - 1|^beta) (0-dim, compute dtype) in the same pass, and the fused dL/dV.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common.h"

namespace zsq {

// floor(x). On the host via round-half-even (a select instead of a libm call, so no branch
// mispredictions in the kernels' loops): r = nearest integer, minus 1 when it lies above x.
template <typename T>
C10_HOST_DEVICE inline T floor_exact(T x) {
#ifdef __CUDA_ARCH__
  return zfloor(x);
#else
  const T r = round_half_even(x);  // x itself for |x| >= 2^23 (2^52), inf and NaN
  return r - T(r > x);  // arithmetic, not a select: scalar loops stay branch-free
#endif
}

// h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), or 1[V >= 0] when hard.
template <typename T>
C10_HOST_DEVICE inline T adaround_h(T v, bool hard) {
  if (hard) return T(v >= T(0));
  return clamp_nan(sigmoid(v) * T(kZeta - kGamma) + T(kGamma), T(0), T(1));
}

template <typename T>
C10_HOST_DEVICE inline T adaround_w_hat(T w, T h, T s, T z, T qmin, T qmax) {
  const T q = clamp_nan(floor_exact(w / s) + h + z, qmin, qmax);
  return (q - z) * s;
}

// x^b for x >= 0 with exact fast paths for the common b = 1 and 2 (as torch.pow special-cases them).
template <typename T>
C10_HOST_DEVICE inline T pow_beta(T x, T b) {
  return b == T(2) ? x * x : (b == T(1) ? x : zpow(x, b));
}

template <typename T>
C10_HOST_DEVICE inline T adaround_reg(T h, T beta) {
  return T(1) - pow_beta(zabs(T(2) * h - T(1)), beta);
}

// dL/dV = g s dh/dV [inside] + g_reg d/dV (1 - |2h-1|^beta); dh/dV = 0 where h is clipped to 0 or 1.
template <typename T>
C10_HOST_DEVICE inline T adaround_grad_v(T g, T g_reg, T w, T v, T s, T z, T qmin, T qmax, T beta) {
  const T sig = sigmoid(v);
  const T h_lin = sig * T(kZeta - kGamma) + T(kGamma);
  const bool live = h_lin > T(0) && h_lin < T(1);
  const T h = clamp_nan(h_lin, T(0), T(1));
  const T dh = T(kZeta - kGamma) * sig * (T(1) - sig) * T(live);
  const T r = floor_exact(w / s) + h + z;
  const bool inside = r >= qmin && r <= qmax;
  const T g_data = g * s * dh * T(inside);
  const T t = T(2) * h - T(1);
  const T sign_t = T(int(t > T(0)) - int(t < T(0)));  // branch-free sign
  const T d_reg = T(-2) * beta * pow_beta(zabs(t), beta - T(1)) * sign_t * dh;
  return g_data + g_reg * d_reg;
}

std::tuple<at::Tensor, at::Tensor> adaround_forward_cpu(const at::Tensor& w, const at::Tensor& v,
                                                        const at::Tensor& scale, const at::Tensor& zero_point,
                                                        int64_t qmin, int64_t qmax, int64_t axis, bool hard,
                                                        double beta, bool compute_reg);
at::Tensor adaround_backward_cpu(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w,
                                 const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                                 int64_t qmin, int64_t qmax, int64_t axis, double beta);
#ifdef ZSQ_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> adaround_forward_cuda(const at::Tensor& w, const at::Tensor& v,
                                                         const at::Tensor& scale, const at::Tensor& zero_point,
                                                         int64_t qmin, int64_t qmax, int64_t axis, bool hard,
                                                         double beta, bool compute_reg);
at::Tensor adaround_backward_cuda(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w,
                                  const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t qmin, int64_t qmax, int64_t axis, double beta);
#endif

}  // namespace zsq
