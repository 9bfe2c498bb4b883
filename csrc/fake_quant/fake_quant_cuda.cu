#include "fake_quant/fake_quant.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cuda_loops.cuh"

namespace zsq {
namespace {

template <typename scalar_t, typename T>
struct Forward {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ out;
  const T *__restrict__ s, *__restrict__ z;
  T lo, hi;
  template <int V, typename I>
  __device__ __forceinline__ void apply(I i, I c0, I dc) const {
    scalar_t xv[V], ov[V];
    cuda::load_ro<V>(x + i, xv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const I c = c0 + u * dc;
      const auto e = fake_quant_elem(static_cast<T>(xv[u]), s[c], z[c], lo, hi);
      ov[u] = static_cast<scalar_t>((e.q - z[c]) * s[c]);
    }
    cuda::store<V>(out + i, ov);
  }
};

// Writes the straight-through grad of x and returns (apply) or accumulates (accumulate) the
// elements' share of dL/ds.
template <typename scalar_t, typename T>
struct Backward {
  const scalar_t *__restrict__ x, *__restrict__ g;
  scalar_t* __restrict__ gx;
  const T *__restrict__ s, *__restrict__ z;
  T lo, hi;
  template <int V, typename I>
  __device__ __forceinline__ T apply(I i, I c0, I dc) const {
    scalar_t xv[V], gv[V], ov[V];
    cuda::load_ro<V>(x + i, xv);
    cuda::load_ro<V>(g + i, gv);
    T total = T(0);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const I c = c0 + u * dc;
      const auto e = fake_quant_elem(static_cast<T>(xv[u]), s[c], z[c], lo, hi);
      const T gi = static_cast<T>(gv[u]);
      ov[u] = static_cast<scalar_t>(gi * T(e.inside));
      total += fake_quant_scale_grad(gi, e, z[c]);
    }
    cuda::store<V>(gx + i, ov);
    return total;
  }
  template <int V, typename I>
  __device__ __forceinline__ void accumulate(I i, I c, T (&a)[1]) const {
    a[0] += apply<V>(i, c, I(0));
  }
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
  const bool aligned = aligned_to({&x, &out}, 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_forward_cuda", [&] {
    using T = compute_t<scalar_t>;
    cuda::channel_map<scalar_t>(L, aligned,
                                Forward<scalar_t, T>{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
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
  if (x.numel() == 0) return {grad_x, need_scale_grad ? at::zeros_like(scale) : at::empty({0}, scale.options())};
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(x, axis);
  const bool aligned = aligned_to({&x, &grad, &grad_x}, 16);
  // dL/ds in the compute dtype: block partials, then a fixed-order sum (deterministic, no atomics)
  at::Tensor acc = need_scale_grad ? at::empty({axis < 0 ? 1 : L.channels}, x.options().dtype(cd)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Backward<scalar_t, T> f{x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                  grad_x.mutable_data_ptr<scalar_t>(), s.const_data_ptr<T>(),
                                  z.const_data_ptr<T>(), static_cast<T>(qmin), static_cast<T>(qmax)};
    if (!need_scale_grad) {
      cuda::channel_map<scalar_t>(L, aligned, cuda::DropTotal<Backward<scalar_t, T>>{f});
    } else if (axis < 0 || L.channels == 1) {
      cuda::channel_map_sum<scalar_t, T, T>(L, aligned, f, x, acc.mutable_data_ptr<T>());
    } else {
      const int64_t splits = cuda::reduce_splits(L);
      at::Tensor partial = at::empty({splits, L.channels}, acc.options());
      cuda::channel_reduce<scalar_t, 1, T>(L, aligned, splits, f,
                                           cuda::PartialSink<1, T>{partial.mutable_data_ptr<T>(), splits, L.channels});
      cuda::sum_partials<T, T>(partial.const_data_ptr<T>(), splits, L.channels, acc.mutable_data_ptr<T>());
    }
  });
  if (!need_scale_grad) return {grad_x, at::empty({0}, scale.options())};
  return {grad_x, acc.to(scale.scalar_type()).reshape(scale.sizes())};
}

}  // namespace zsq
