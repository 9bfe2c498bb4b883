#include "adaround/adaround.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cpu_loops.h"

namespace zsq {

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
      reg = cpu::channel_map_sum(L, [&](int64_t i, int64_t c) {
        return static_cast<double>(adaround_reg(elem(i, c), b));
      });
    } else {
      cpu::channel_map(L, [&](int64_t i, int64_t c) { elem(i, c); });
    }
  });
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
  const double g_reg = grad_reg.item<double>();  // 0-dim on the CPU: no sync to avoid
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
