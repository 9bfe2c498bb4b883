// Shared argument checks, memory-layout helpers and scalar math for the zsq_fast kernels.
//
// Every per-channel op sees its tensor as (outer, C, inner) in *memory order*: for a dense
// tensor the element at memory offset i sits in channel (i / inner) % C with inner = the
// stride of the channel axis. This covers contiguous and channels_last (there the channel
// axis has stride 1, so inner = 1) without copies; other layouts are made contiguous.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

namespace zsq {

// AdaRound rectified-sigmoid stretch (Nagel et al. 2020), as in zsq_fast/ops/reference.py.
constexpr double kZeta = 1.1;
constexpr double kGamma = -0.1;

// fp32 arithmetic for half/bfloat16/float, fp64 for double (reference.compute_dtype).
template <typename scalar_t>
using compute_t = at::opmath_type<scalar_t>;

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor (float, double, half, bfloat16), got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

// x itself when its memory is dense (contiguous, channels_last, any permutation), else a contiguous copy.
inline at::Tensor dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous();
}

// t with exactly ref's strides (ref dense), copying only when they differ.
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.sizes() == ref.sizes() && t.strides() == ref.strides()) return t;
  at::Tensor out = at::empty_like(ref, t.options());
  out.copy_(t);
  return out;
}

// A per-channel parameter (scale, zero_point, mean, ...) as a flat contiguous vector of dtype t.
inline at::Tensor param(const at::Tensor& p, at::ScalarType t) { return p.reshape(-1).to(t).contiguous(); }

// True when the data of every tensor starts on a `bytes` boundary (vector loads/stores allowed).
inline bool aligned_to(std::initializer_list<const at::Tensor*> ts, int64_t bytes) {
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % bytes != 0) return false;
  return true;
}

struct Layout {
  int64_t numel;
  int64_t channels;  // C: 1 for per-tensor
  int64_t inner;     // memory distance between consecutive channels
};

// axis < 0: per-tensor (a single "channel" spanning everything).
inline Layout channel_layout(const at::Tensor& x, int64_t axis) {
  const int64_t n = x.numel();
  if (axis < 0 || x.size(axis) <= 1 || n == 0) return {n, 1, n > 0 ? n : 1};  // empty: never C = 0
  return {n, x.size(axis), x.stride(axis)};
}

inline void check_axis(const at::Tensor& x, int64_t axis) {
  TORCH_CHECK_VALUE(axis >= -1 && axis < x.dim(), "axis ", axis, " is out of range for a tensor with ",
                    x.dim(), " dims (use -1 for per-tensor)");
}

// scale and zero_point: one element (per-tensor) or x.size(axis) (per-channel).
inline void check_qparams(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t qmin, int64_t qmax, int64_t axis) {
  check_axis(x, axis);
  check_float(scale, "scale");
  check_float(zero_point, "zero_point");
  check_same_device(x, scale, "x", "scale");
  check_same_device(x, zero_point, "x", "zero_point");
  const int64_t expected = axis < 0 ? 1 : x.size(axis);
  TORCH_CHECK_VALUE(scale.numel() == expected, "scale has ", scale.numel(), " elements, expected ", expected);
  TORCH_CHECK_VALUE(zero_point.numel() == expected, "zero_point has ", zero_point.numel(),
                    " elements, expected ", expected);
  TORCH_CHECK_VALUE(qmin < qmax, "need qmin < qmax, got [", qmin, ", ", qmax, "]");
}

// ------------------------------------------------------------------ scalar math (host and device)
C10_HOST_DEVICE inline float zfloor(float x) { return floorf(x); }
C10_HOST_DEVICE inline double zfloor(double x) { return floor(x); }
C10_HOST_DEVICE inline float zexp(float x) { return expf(x); }
C10_HOST_DEVICE inline double zexp(double x) { return exp(x); }
C10_HOST_DEVICE inline float zabs(float x) { return fabsf(x); }
C10_HOST_DEVICE inline double zabs(double x) { return fabs(x); }
C10_HOST_DEVICE inline float zpow(float x, float y) { return powf(x, y); }
C10_HOST_DEVICE inline double zpow(double x, double y) { return pow(x, y); }

// Round half to even (torch.round). On the host the magic-constant form avoids a libm call
// and vectorizes: below 2^23 (2^52) adding and removing the constant rounds to an integer in
// the default round-to-nearest-even mode; larger magnitudes, inf and NaN are returned as is.
C10_HOST_DEVICE inline float round_half_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  constexpr float kBig = 8388608.0f;  // 2^23
  const float b = copysignf(kBig, x);
  const float r = (x + b) - b;  // exact IEEE arithmetic: not folded without -ffast-math
  return fabsf(x) < kBig ? r : x;  // branch-free select keeps the loop vectorizable
#endif
}
C10_HOST_DEVICE inline double round_half_even(double x) {
#ifdef __CUDA_ARCH__
  return rint(x);
#else
  constexpr double kBig = 4503599627370496.0;  // 2^52
  const double b = copysign(kBig, x);
  const double r = (x + b) - b;
  return fabs(x) < kBig ? r : x;
#endif
}

// clamp that lets NaN through (torch.clamp semantics)
template <typename T>
C10_HOST_DEVICE inline T clamp_nan(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T v) {
  return T(1) / (T(1) + zexp(-v));
}

// Chan et al.'s merge of (nb, mean_b, m2_b) into (na, mean, m2), fp64, in the operation order of
// zsq_fast.ops.ChannelStats.merge (so device and host merges agree bit for bit).
C10_HOST_DEVICE inline void chan_merge(double na, double& mean, double& m2, double nb, double mean_b, double m2_b) {
  if (nb == 0) return;
  if (na == 0) {
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const double n = na + nb, delta = mean_b - mean;
  mean = mean + delta * (nb / n);
  m2 = m2 + m2_b + delta * delta * (na * nb / n);
}

// The shift K of a channel's shifted sums: its first element, or 0 when that is not finite
// (an inf shift would turn every difference into inf - inf = NaN).
template <typename T>
C10_HOST_DEVICE inline double stats_shift(T first) {
  const double k = static_cast<double>(first);
  return (k - k == 0.0) ? k : 0.0;  // false for inf and NaN
}

}  // namespace zsq
