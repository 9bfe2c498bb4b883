#include "adaround/adaround.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cpu_loops.h"
#include "vec_math.h"

// Clones of the float inner loops for AVX-512 / AVX2 / baseline x86-64, picked at load time by the
// dynamic loader (GCC function multi-versioning): one build serves every CPU at its best width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define ZSQ_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ZSQ_CPU_CLONES
#endif

namespace zsq {
namespace {

// ---------------------------------------------------------------- float fast path
// One run of n elements of one channel (scale s, zero point z). Everything the loop calls is
// inline arithmetic (vec_math.h), so GCC vectorizes it; kBeta selects |t|^beta without pow
// for the common beta = 2 (end of the anneal) and 1.
enum class Pow { kOne, kTwo, kAny };

template <Pow kBeta>
ZSQ_VINLINE float pow_mode(float x, float b) {
  if constexpr (kBeta == Pow::kOne) return x;
  else if constexpr (kBeta == Pow::kTwo) return x * x;
  else return vmath::pow_unit(x, b);
}

ZSQ_VINLINE float h_soft(float v) {
  const float sig = 1.0f / (1.0f + vmath::exp(-v));
  return clamp_nan(sig * float(kZeta - kGamma) + float(kGamma), 0.0f, 1.0f);
}

ZSQ_VINLINE float w_hat_of(float w, float h, float s, float z, float lo, float hi) {
  const float q = clamp_nan(floor_exact(w / s) + h + z, lo, hi);
  return (q - z) * s;
}

// Writes w_hat for a run and returns the run's regularizer sum (0 unless kReg).
template <bool kHard, bool kReg, Pow kBeta>
ZSQ_CPU_CLONES double forward_run(const float* __restrict__ w, const float* __restrict__ v, float* __restrict__ out,
                                  int64_t n, float s, float z, float lo, float hi, float beta) {
  constexpr int64_t kTile = 256;
  float term[kTile];
  double total = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t len = n - t0 < kTile ? n - t0 : kTile;
    for (int64_t k = 0; k < len; ++k) {
      const float h = kHard ? float(v[t0 + k] >= 0.0f) : h_soft(v[t0 + k]);
      out[t0 + k] = w_hat_of(w[t0 + k], h, s, z, lo, hi);
      if constexpr (kReg) term[k] = 1.0f - pow_mode<kBeta>(std::fabs(2.0f * h - 1.0f), beta);
    }
    if constexpr (kReg) total += cpu::lane_sum(term, len);
  }
  return total;
}

template <Pow kBetaM1>
ZSQ_CPU_CLONES void backward_run(const float* __restrict__ g, const float* __restrict__ w,
                                 const float* __restrict__ v, float* __restrict__ out, int64_t n, float s, float z,
                                 float lo, float hi, float beta, float g_reg) {
  const float k_zg = float(kZeta - kGamma);
  for (int64_t k = 0; k < n; ++k) {
    const float sig = 1.0f / (1.0f + vmath::exp(-v[k]));
    const float h_lin = sig * k_zg + float(kGamma);
    const float live = float(h_lin > 0.0f) * float(h_lin < 1.0f);
    const float h = clamp_nan(h_lin, 0.0f, 1.0f);
    const float dh = k_zg * sig * (1.0f - sig) * live;
    const float r = floor_exact(w[k] / s) + h + z;
    const float inside = float(r >= lo) * float(r <= hi);
    const float t = 2.0f * h - 1.0f;
    const float sign_t = float(t > 0.0f) - float(t < 0.0f);
    const float d_reg = -2.0f * beta * pow_mode<kBetaM1>(std::fabs(t), beta - 1.0f) * sign_t * dh;
    out[k] = g[k] * s * dh * inside + g_reg * d_reg;
  }
}

Pow pow_of(double b) { return b == 2.0 ? Pow::kTwo : (b == 1.0 ? Pow::kOne : Pow::kAny); }

template <bool kHard, bool kReg>
double forward_run_any(Pow p, const float* w, const float* v, float* out, int64_t n, float s, float z, float lo,
                       float hi, float beta) {
  switch (p) {
    case Pow::kTwo: return forward_run<kHard, kReg, Pow::kTwo>(w, v, out, n, s, z, lo, hi, beta);
    case Pow::kOne: return forward_run<kHard, kReg, Pow::kOne>(w, v, out, n, s, z, lo, hi, beta);
    default: return forward_run<kHard, kReg, Pow::kAny>(w, v, out, n, s, z, lo, hi, beta);
  }
}

double forward_run_dispatch(bool hard, bool reg, Pow p, const float* w, const float* v, float* out, int64_t n,
                            float s, float z, float lo, float hi, float beta) {
  // hard rounding: h is 0 or 1, so every regularizer term 1 - |2h - 1|^beta is exactly 0
  if (hard) return forward_run_any<true, false>(p, w, v, out, n, s, z, lo, hi, beta);
  return reg ? forward_run_any<false, true>(p, w, v, out, n, s, z, lo, hi, beta)
             : forward_run_any<false, false>(p, w, v, out, n, s, z, lo, hi, beta);
}

void backward_run_dispatch(Pow p, const float* g, const float* w, const float* v, float* out, int64_t n, float s,
                           float z, float lo, float hi, float beta, float g_reg) {
  switch (p) {
    case Pow::kTwo: return backward_run<Pow::kTwo>(g, w, v, out, n, s, z, lo, hi, beta, g_reg);
    case Pow::kOne: return backward_run<Pow::kOne>(g, w, v, out, n, s, z, lo, hi, beta, g_reg);
    default: return backward_run<Pow::kAny>(g, w, v, out, n, s, z, lo, hi, beta, g_reg);
  }
}

// Runs of [0, numel) in fixed blocks; returns the sum of the runs' results in block order.
template <typename Run>
double for_each_run(const Layout& L, const Run& run) {
  const int64_t nblocks = (L.numel + cpu::kBlock - 1) / cpu::kBlock;
  std::vector<double> part(nblocks, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double acc = 0;
      cpu::channel_runs(L, b * cpu::kBlock, std::min(L.numel, (b + 1) * cpu::kBlock),
                        [&](int64_t i, int64_t c, int64_t len) { acc += run(i, c, len); });
      part[b] = acc;
    }
  });
  double total = 0;
  for (double p : part) total += p;
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adaround_forward_cpu(const at::Tensor& w_in, const at::Tensor& v_in,
                                                        const at::Tensor& scale, const at::Tensor& zero_point,
                                                        int64_t qmin, int64_t qmax, int64_t axis, bool hard,
                                                        double beta, bool compute_reg) {
  const at::Tensor w = dense(w_in);
  const at::Tensor v = like_layout(v_in, w);
  at::Tensor w_hat = at::empty_like(w);
  const at::ScalarType cd = compute_dtype(w.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(w, axis);
  double reg = 0;
  if (w.scalar_type() == at::kFloat && cpu::has_runs(L)) {
    const float* sp = s.const_data_ptr<float>();
    const float* zp = z.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    const float* vp = v.const_data_ptr<float>();
    float* op = w_hat.mutable_data_ptr<float>();
    const Pow p = pow_of(beta);
    reg = for_each_run(L, [&](int64_t i, int64_t c, int64_t len) {
      return forward_run_dispatch(hard, compute_reg, p, wp + i, vp + i, op + i, len, sp[c], zp[c], float(qmin),
                                  float(qmax), float(beta));
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_forward_cpu", [&] {
      using T = compute_t<scalar_t>;
      const T* sp = s.const_data_ptr<T>();
      const T* zp = z.const_data_ptr<T>();
      const T lo = static_cast<T>(qmin), hi = static_cast<T>(qmax), b = static_cast<T>(beta);
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      scalar_t* op = w_hat.mutable_data_ptr<scalar_t>();
      auto elem = [=](int64_t i, int64_t c) -> T {  // writes w_hat, returns h
        const T h = adaround_h(static_cast<T>(vp[i]), hard);
        op[i] = static_cast<scalar_t>(adaround_w_hat(static_cast<T>(wp[i]), h, sp[c], zp[c], lo, hi));
        return h;
      };
      if (compute_reg) {
        reg = cpu::channel_map_sum(L, [&](int64_t i, int64_t c) { return adaround_reg(elem(i, c), b); });
      } else {
        cpu::channel_map(L, [&](int64_t i, int64_t c) { elem(i, c); });
      }
    });
  }
  // 0-dim in the compute dtype, as the reference
  at::Tensor reg_t = at::full({}, reg, w.options().dtype(at::kDouble)).to(cd);
  return {w_hat, reg_t};
}

at::Tensor adaround_backward_cpu(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w_in,
                                 const at::Tensor& v_in, const at::Tensor& scale, const at::Tensor& zero_point,
                                 int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  const at::Tensor w = dense(w_in);
  const at::Tensor v = like_layout(v_in, w);
  const at::Tensor g = like_layout(grad_w_hat, w);
  at::Tensor grad_v = at::empty_like(w, v.options());
  const at::ScalarType cd = compute_dtype(w.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(w, axis);
  const double g_reg = grad_reg.item<double>();  // 0-dim on the CPU: no device sync
  if (w.scalar_type() == at::kFloat && cpu::has_runs(L)) {
    const float* sp = s.const_data_ptr<float>();
    const float* zp = z.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    const float* vp = v.const_data_ptr<float>();
    const float* gp = g.const_data_ptr<float>();
    float* op = grad_v.mutable_data_ptr<float>();
    const Pow p = pow_of(beta - 1.0);
    for_each_run(L, [&](int64_t i, int64_t c, int64_t len) {
      backward_run_dispatch(p, gp + i, wp + i, vp + i, op + i, len, sp[c], zp[c], float(qmin), float(qmax),
                            float(beta), float(g_reg));
      return 0.0;
    });
    return grad_v;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const T* sp = s.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    const T lo = static_cast<T>(qmin), hi = static_cast<T>(qmax), b = static_cast<T>(beta);
    const T gr = static_cast<T>(g_reg);
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = grad_v.mutable_data_ptr<scalar_t>();
    cpu::channel_map(L, [=](int64_t i, int64_t c) {
      op[i] = static_cast<scalar_t>(adaround_grad_v(static_cast<T>(gp[i]), gr, static_cast<T>(wp[i]),
                                                    static_cast<T>(vp[i]), sp[c], zp[c], lo, hi, b));
    });
  });
  return grad_v;
}

}  // namespace zsq
