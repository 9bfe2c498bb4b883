#include "fake_quant/fake_quant.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cuda_loops.cuh"

namespace zsq {
namespace {

template <typename scalar_t, typename T>
struct ForwardElem {
  const scalar_t* x;
  scalar_t* out;
  const T *s, *z;
  T lo, hi;
  template <typename I>
  __device__ void operator()(I i, I c) const {
    const auto e = fake_quant_elem(static_cast<T>(x[i]), s[c], z[c], lo, hi);
    out[i] = static_cast<scalar_t>((e.q - z[c]) * s[c]);
  }
};

// Writes the straight-through grad of x and returns the element's share of dL/ds.
template <typename scalar_t, typename T>
struct BackwardElem {
  const scalar_t *x, *g;
  scalar_t* gx;
  const T *s, *z;
  T lo, hi;
  template <typename I>
  __device__ T operator()(I i, I c) const {
    const auto e = fake_quant_elem(static_cast<T>(x[i]), s[c], z[c], lo, hi);
    const T gi = static_cast<T>(g[i]);
    gx[i] = static_cast<scalar_t>(gi * T(e.inside));
    return fake_quant_scale_grad(gi, e, z[c]);
  }
};

template <typename F, typename T>
struct AccumulateInto {  // adapts f(i, c) -> value to the per-channel reduction's f(i, c, acc)
  F f;
  template <typename I>
  __device__ void operator()(I i, I c, T (&a)[1]) const { a[0] += f(i, c); }
};

}  // namespace

at::Tensor fake_quant_forward_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& zero_point,
                                   int64_t qmin, int64_t qmax, int64_t axis) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(x, axis);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_forward_cuda", [&] {
    using T = compute_t<scalar_t>;
    cuda::channel_map(L, ForwardElem<scalar_t, T>{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                  s.const_data_ptr<T>(), z.const_data_ptr<T>(),
                                                  static_cast<T>(qmin), static_cast<T>(qmax)});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fake_quant_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                            const at::Tensor& scale, const at::Tensor& zero_point,
                                                            int64_t qmin, int64_t qmax, int64_t axis,
                                                            bool need_scale_grad) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad = like_layout(grad_in, x);
  at::Tensor grad_x = at::empty_like(x);
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(x, axis);
  // dL/ds accumulates in the compute dtype (atomicAdd of one value per block), as the reference sums
  at::Tensor acc = need_scale_grad ? at::zeros({axis < 0 ? 1 : L.channels}, x.options().dtype(cd)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const BackwardElem<scalar_t, T> f{x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                      grad_x.mutable_data_ptr<scalar_t>(), s.const_data_ptr<T>(),
                                      z.const_data_ptr<T>(), static_cast<T>(qmin), static_cast<T>(qmax)};
    if (!need_scale_grad) {
      cuda::channel_map(L, f);
    } else if (axis < 0) {
      cuda::channel_map_sum<T>(L, f, acc.mutable_data_ptr<T>());
    } else {
      cuda::channel_reduce<1, T>(L, cuda::reduce_splits(L), AccumulateInto<BackwardElem<scalar_t, T>, T>{f},
                                 cuda::AtomicSink<T>{acc.mutable_data_ptr<T>()});
    }
  });
  if (!need_scale_grad) return {grad_x, at::empty({0}, scale.options())};
  return {grad_x, acc.to(scale.scalar_type()).reshape(scale.sizes())};
}

}  // namespace zsq
