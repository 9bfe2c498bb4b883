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

at::Tensor channel_stats_forward_cpu(const at::Tensor& x_in) {
  const at::Tensor x = dense(x_in);
  const int64_t C = x.size(1);
  at::Tensor out = at::zeros({2, C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return out;
  const Layout L = channel_layout(x, 1);
  const double n = static_cast<double>(x.numel() / C);
  double* mean = out.data_ptr<double>();
  double* m2 = mean + C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<double> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(xp[c * (L.channels == 1 ? 0 : L.inner)]);
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
  return out;
}

at::Tensor channel_stats_backward_cpu(const at::Tensor& x_in, const at::Tensor& mean_in,
                                      const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                      double total_count) {
  const at::Tensor x = dense(x_in);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor mean = param(mean_in, cd), gm = param(grad_mean_in, cd), gv = param(grad_var_in, cd);
  const Layout L = channel_layout(x, 1);
  const double inv_m = 1.0 / total_count;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const int64_t C = L.channels;
    // dx = a[c] + b[c] (x - mean[c]), a = g_mean/M, b = 2 g_var/M (the reference's operation order)
    std::vector<T> a(C), b(C);
    const T* gmp = gm.const_data_ptr<T>();
    const T* gvp = gv.const_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      a[c] = gmp[c] * static_cast<T>(inv_m);
      b[c] = gvp[c] * static_cast<T>(2.0 * inv_m);
    }
    const T* ap = a.data();
    const T* bp = b.data();
    const T* mp = mean.const_data_ptr<T>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    cpu::channel_map(L, [=](int64_t i, int64_t c) {
      dp[i] = static_cast<scalar_t>(ap[c] + bp[c] * (static_cast<T>(xp[i]) - mp[c]));
    });
  });
  return dx;
}

}  // namespace zsq
