#include "adaround/adaround.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cuda_loops.cuh"

namespace zsq {
namespace {

// Writes w_hat and returns the element's regularizer term.
template <typename scalar_t, typename T>
struct ForwardElem {
  const scalar_t *w, *v;
  scalar_t* w_hat;
  const T *s, *z;
  T lo, hi, beta;
  bool hard;
  template <typename I>
  __device__ T operator()(I i, I c) const {
    const T h = adaround_h(static_cast<T>(v[i]), hard);
    w_hat[i] = static_cast<scalar_t>(adaround_w_hat(static_cast<T>(w[i]), h, s[c], z[c], lo, hi));
    return adaround_reg(h, beta);
  }
};

template <typename scalar_t, typename T>
struct BackwardElem {
  const scalar_t *g, *w, *v;
  scalar_t* grad_v;
  const T* g_reg;  // 0-dim on the device: read here, no host sync
  const T *s, *z;
  T lo, hi, beta;
  template <typename I>
  __device__ void operator()(I i, I c) const {
    grad_v[i] = static_cast<scalar_t>(adaround_grad_v(static_cast<T>(g[i]), *g_reg,
                                                      static_cast<T>(w[i]), static_cast<T>(v[i]), s[c], z[c], lo,
                                                      hi, beta));
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> adaround_forward_cuda(const at::Tensor& w_in, const at::Tensor& v_in,
                                                         const at::Tensor& scale, const at::Tensor& zero_point,
                                                         int64_t qmin, int64_t qmax, int64_t axis, bool hard,
                                                         double beta, bool compute_reg) {
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = dense(w_in);
  const at::Tensor v = like_layout(v_in, w);
  at::Tensor w_hat = at::empty_like(w);
  const at::ScalarType cd = compute_dtype(w.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(w, axis);
  at::Tensor reg = at::zeros({}, w.options().dtype(cd));  // summed in the compute dtype, as the reference
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_forward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const ForwardElem<scalar_t, T> f{w.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                     w_hat.mutable_data_ptr<scalar_t>(), s.const_data_ptr<T>(),
                                     z.const_data_ptr<T>(), static_cast<T>(qmin), static_cast<T>(qmax),
                                     static_cast<T>(beta), hard};
    if (compute_reg) {
      cuda::channel_map_sum<T>(L, f, reg.mutable_data_ptr<T>());
    } else {
      cuda::channel_map(L, f);
    }
  });
  return {w_hat, reg};
}

at::Tensor adaround_backward_cuda(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w_in,
                                  const at::Tensor& v_in, const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = dense(w_in);
  const at::Tensor v = like_layout(v_in, w);
  const at::Tensor g = like_layout(grad_w_hat, w);
  at::Tensor grad_v = at::empty_like(w, v.options());
  const at::ScalarType cd = compute_dtype(w.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(w, axis);
  const at::Tensor g_reg = grad_reg.reshape({}).to(cd).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    cuda::channel_map(L, BackwardElem<scalar_t, T>{g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                                   v.const_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
                                                   g_reg.const_data_ptr<T>(), s.const_data_ptr<T>(),
                                                   z.const_data_ptr<T>(), static_cast<T>(qmin),
                                                   static_cast<T>(qmax), static_cast<T>(beta)});
  });
  return grad_v;
}

}  // namespace zsq
