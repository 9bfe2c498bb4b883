#include "channel_stats/channel_stats.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cpu_loops.h"

namespace zsq {
namespace {

// Shifted sums: with K = the channel's first element, S = sum (x - K), Q = sum (x - K)^2 in fp64
// give mean = K + S/n and M2 = Q - S^2/n without the cancellation of raw sums for a large mean.
struct ShiftedSums {
  double s = 0, q = 0;
  ShiftedSums& operator+=(const ShiftedSums& o) {
    s += o.s;
    q += o.q;
    return *this;
  }
};

}  // namespace

at::Tensor channel_stats_forward_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& running,
                                     double running_count) {
  const at::Tensor x = dense(x_in);
  const int64_t C = x.size(1);
  at::Tensor out = at::zeros({2, C}, x.options().dtype(at::kDouble));
  const bool merge = running.has_value() && running->defined() && running_count > 0;
  if (x.numel() == 0) return merge ? running->to(at::kDouble).contiguous().clone() : out;
  const Layout L = channel_layout(x, 1);
  const double n = static_cast<double>(x.numel() / C);
  double* mean = out.data_ptr<double>();
  double* m2 = mean + C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<double> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = stats_shift(xp[c * (L.channels == 1 ? 0 : L.inner)]);
    const double* k = shift.data();
    const auto sums = cpu::channel_reduce<ShiftedSums>(L, [=](int64_t i, int64_t c) {
      const double d = static_cast<double>(xp[i]) - k[c];
      return ShiftedSums{d, d * d};
    });
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = k[c] + sums[c].s / n;
      const double v = sums[c].q - sums[c].s * sums[c].s / n;
      m2[c] = v < 0 ? 0.0 : v;  // rounding can leave a tiny negative; NaN passes
    }
  });
  if (merge) {
    const at::Tensor r = running->to(at::kDouble).contiguous();
    const double* rp = r.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      double mu = rp[c], q = rp[C + c];
      chan_merge(running_count, mu, q, n, mean[c], m2[c]);
      mean[c] = mu;
      m2[c] = q;
    }
  }
  return out;
}

at::Tensor channel_stats_backward_cpu(const at::Tensor& x_in, const at::Tensor& mean_in,
                                      const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                      double total_count, const std::optional<at::Tensor>& grad_scale) {
  const at::Tensor x = dense(x_in);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const at::Tensor mean = param(mean_in, at::kDouble), gm = param(grad_mean_in, at::kDouble),
                   gv = param(grad_var_in, at::kDouble);
  const double gs = grad_scale.has_value() && grad_scale->defined() ? grad_scale->item<double>() : 1.0;
  const bool scaled = grad_scale.has_value() && grad_scale->defined();
  const Layout L = channel_layout(x, 1);
  const double inv_m = 1.0 / total_count;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const int64_t C = L.channels;
    // dx = a[c] + b[c] (x - mean[c]), a = (s g_mean)/M, b = (s g_var) 2/M in the compute dtype (the
    // reference's operation order); the gradient scale s is applied before any cast to x's dtype.
    std::vector<T> a(C), b(C), mu(C);
    const double* gmp = gm.const_data_ptr<double>();
    const double* gvp = gv.const_data_ptr<double>();
    const double* mp = mean.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      const T g_m = scaled ? static_cast<T>(gmp[c]) * static_cast<T>(gs) : static_cast<T>(gmp[c]);
      const T g_v = scaled ? static_cast<T>(gvp[c]) * static_cast<T>(gs) : static_cast<T>(gvp[c]);
      a[c] = g_m * static_cast<T>(inv_m);
      b[c] = g_v * static_cast<T>(2.0 * inv_m);
      mu[c] = static_cast<T>(mp[c]);
    }
    const T* ap = a.data();
    const T* bp = b.data();
    const T* mup = mu.data();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    cpu::channel_map(L, [=](int64_t i, int64_t c) {
      dp[i] = static_cast<scalar_t>(ap[c] + bp[c] * (static_cast<T>(xp[i]) - mup[c]));
    });
  });
  return dx;
}

}  // namespace zsq
