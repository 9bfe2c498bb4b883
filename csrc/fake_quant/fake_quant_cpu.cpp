#include "fake_quant/fake_quant.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cpu_loops.h"

namespace zsq {

at::Tensor fake_quant_forward_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t qmin, int64_t qmax, int64_t axis) {
  const at::Tensor x = dense(x_in);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(x, axis);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_forward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const T* sp = s.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    const T lo = static_cast<T>(qmin), hi = static_cast<T>(qmax);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    cpu::channel_map(L, [=](int64_t i, int64_t c) {
      const auto e = fake_quant_elem(static_cast<T>(xp[i]), sp[c], zp[c], lo, hi);
      op[i] = static_cast<scalar_t>((e.q - zp[c]) * sp[c]);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fake_quant_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const at::Tensor& scale, const at::Tensor& zero_point,
                                                           int64_t qmin, int64_t qmax, int64_t axis,
                                                           bool need_scale_grad) {
  const at::Tensor x = dense(x_in);
  const at::Tensor grad = like_layout(grad_in, x);
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_x, need_scale_grad ? at::zeros_like(scale) : at::empty({0}, scale.options())};
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(x, axis);
  at::Tensor grad_s;  // in fp64 until cast to the compute dtype, then to scale's dtype (as the reference)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const T* sp = s.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    const T lo = static_cast<T>(qmin), hi = static_cast<T>(qmax);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    // One pass: write the STE gradient of x and return this element's share of dL/ds.
    auto elem = [=](int64_t i, int64_t c) -> T {
      const auto e = fake_quant_elem(static_cast<T>(xp[i]), sp[c], zp[c], lo, hi);
      const T g = static_cast<T>(gp[i]);
      gxp[i] = static_cast<scalar_t>(g * T(e.inside));
      return fake_quant_scale_grad(g, e, zp[c]);
    };
    if (!need_scale_grad) {
      cpu::channel_map(L, [&](int64_t i, int64_t c) { elem(i, c); });
    } else if (axis < 0 || L.channels == 1) {
      grad_s = at::full({}, cpu::channel_map_sum(L, elem), x.options().dtype(at::kDouble));
    } else {
      const std::vector<double> sums =
          cpu::channel_reduce<double>(L, [&](int64_t i, int64_t c) { return static_cast<double>(elem(i, c)); });
      grad_s = at::empty({L.channels}, x.options().dtype(at::kDouble));
      std::copy(sums.begin(), sums.end(), grad_s.mutable_data_ptr<double>());
    }
  });
  if (!need_scale_grad) return {grad_x, at::empty({0}, scale.options())};
  grad_s = grad_s.to(cd).to(scale.scalar_type()).reshape(scale.sizes());
  return {grad_x, grad_s};
}

}  // namespace zsq
