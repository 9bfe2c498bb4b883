// Branch-free float exp / log2 / pow for the CPU kernels' inner loops.
//
// libm's expf/powf are opaque calls that stop GCC from vectorizing a loop. These are plain
// arithmetic on floats and int32 bit patterns (range reduction + short polynomials), so a loop
// that uses them vectorizes at whatever width the build targets. Accuracy: a few ulp over the
// ranges AdaRound uses (|x| < 88 for exp, 0 <= x <= 1 for pow), far inside the kernels' tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Forced inline: the callers are vectorized loops (in per-ISA clones), which a call would stop.
#if defined(__GNUC__)
#define ZSQ_VINLINE inline __attribute__((always_inline))
#else
#define ZSQ_VINLINE inline
#endif

namespace zsq {
namespace vmath {

ZSQ_VINLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

ZSQ_VINLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// Nearest integer as a float (|x| < 2^22), round half to even in the default rounding mode.
ZSQ_VINLINE float nearest(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

// 2^n for an integer-valued float n in [-126, 127].
ZSQ_VINLINE float pow2i(float n) { return bits_to_float((static_cast<int32_t>(n) + 127) << 23); }

// e^r for |r| <= ln2/2: Taylor series to degree 7 (truncation error < 1e-8 relative).
ZSQ_VINLINE float exp_reduced(float r) {
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// e^x. Saturates to 0 below -87.3 and to inf above 88.7; NaN propagates.
ZSQ_VINLINE float exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;         // ln 2 split so that n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = nearest(xc * kLog2e);
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  // split 2^n in two factors so that n = 127 or -126 never leaves the normal exponent range
  const float half = nearest(n * 0.5f);
  float y = exp_reduced(r) * pow2i(half) * pow2i(n - half);
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.7f ? INFINITY : y;
  return x != x ? x : y;
}

// log2(x) for finite x > 0 (normal range): x = m 2^e with m in [sqrt(1/2), sqrt(2)), then
// ln m = 2 atanh(s), s = (m - 1)/(m + 1), |s| <= 0.172, series to s^11.
ZSQ_VINLINE float log2(float x) {
  constexpr float kInvLn2 = 1.44269504088896341f;
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e += big ? 1 : 0;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return static_cast<float>(e) + 2.0f * s * p * kInvLn2;
}

// 2^t: t = n + f with n integer and |f| <= 1/2, 2^f = e^(f ln 2). t is clamped to [-149, 128]
// (2^-149 is the smallest subnormal; 2^128 overflows to inf); NaN propagates.
ZSQ_VINLINE float exp2(float t) {
  constexpr float kLn2 = 0.693147180559945309f;
  const float tc = t < -149.0f ? -149.0f : (t > 128.0f ? 128.0f : t);
  const float n = nearest(tc);
  const float half = nearest(n * 0.5f);
  return exp_reduced((tc - n) * kLn2) * pow2i(half) * pow2i(n - half);
}

// x^y for 0 <= x <= 1 and y >= 0, branch-free: x = 0 is taken as FLT_MIN, which gives 2^(-126 y):
// 0 for y >= 1.2, 1 for y = 0, and a nonzero value for 0 < y < 1.2 (AdaRound only takes such powers
// of |2h - 1| where its sign factor is 0 at 0). NaN propagates (the + (x - x) term).
ZSQ_VINLINE float pow_unit(float x, float y) {
  const float xc = x < 1.17549435e-38f ? 1.17549435e-38f : x;
  return exp2(y * log2(xc)) + (x - x);
}

}  // namespace vmath
}  // namespace zsq
