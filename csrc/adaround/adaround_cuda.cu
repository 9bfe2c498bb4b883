#include "adaround/adaround.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cuda_loops.cuh"

namespace zsq {
namespace {

// Writes w_hat and returns the group's regularizer sum (0 when !reg).
template <typename scalar_t, typename T>
struct Forward {
  const scalar_t *__restrict__ w, *__restrict__ v;
  scalar_t* __restrict__ w_hat;
  const T *__restrict__ s, *__restrict__ z;
  T lo, hi, beta;
  bool hard, reg;
  template <int V, typename I>
  __device__ __forceinline__ T apply(I i, I c0, I dc) const {
    scalar_t wv[V], vv[V], ov[V];
    cuda::load_ro<V>(w + i, wv);
    cuda::load_ro<V>(v + i, vv);
    T total = T(0);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const I c = c0 + u * dc;
      const T h = adaround_h(static_cast<T>(vv[u]), hard);
      ov[u] = static_cast<scalar_t>(adaround_w_hat(static_cast<T>(wv[u]), h, s[c], z[c], lo, hi));
      if (reg) total += adaround_reg(h, beta);
    }
    cuda::store<V>(w_hat + i, ov);
    return total;
  }
};


template <typename scalar_t, typename T>
struct Backward {
  const scalar_t *__restrict__ g, *__restrict__ w, *__restrict__ v;
  scalar_t* __restrict__ grad_v;
  const T* __restrict__ g_reg;  // 0-dim on the device: read here, no host sync
  const T *__restrict__ s, *__restrict__ z;
  T lo, hi, beta;
  template <int V, typename I>
  __device__ __forceinline__ void apply(I i, I c0, I dc) const {
    scalar_t gv[V], wv[V], vv[V], ov[V];
    cuda::load_ro<V>(g + i, gv);
    cuda::load_ro<V>(w + i, wv);
    cuda::load_ro<V>(v + i, vv);
    const T gr = *g_reg;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const I c = c0 + u * dc;
      ov[u] = static_cast<scalar_t>(adaround_grad_v(static_cast<T>(gv[u]), gr, static_cast<T>(wv[u]),
                                                    static_cast<T>(vv[u]), s[c], z[c], lo, hi, beta));
    }
    cuda::store<V>(grad_v + i, ov);
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
  // summed in the compute dtype, as the reference: block partials, then a fixed-order sum
  at::Tensor reg = compute_reg ? at::empty({}, w.options().dtype(cd)) : at::zeros({}, w.options().dtype(cd));
  const bool aligned = aligned_to({&w, &v, &w_hat}, 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_forward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const Forward<scalar_t, T> f{w.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 w_hat.mutable_data_ptr<scalar_t>(), s.const_data_ptr<T>(), z.const_data_ptr<T>(),
                                 static_cast<T>(qmin), static_cast<T>(qmax), static_cast<T>(beta), hard, compute_reg};
    if (compute_reg) {
      cuda::channel_map_sum<scalar_t, T, T>(L, aligned, f, w, reg.mutable_data_ptr<T>());
    } else {
      cuda::channel_map<scalar_t>(L, aligned, cuda::DropTotal<Forward<scalar_t, T>>{f});
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
  if (w.numel() == 0) return grad_v;
  const at::ScalarType cd = compute_dtype(w.scalar_type());
  const at::Tensor s = param(scale, cd), z = param(zero_point, cd);
  const Layout L = channel_layout(w, axis);
  const at::Tensor g_reg = grad_reg.reshape({}).to(cd).contiguous();
  const bool aligned = aligned_to({&g, &w, &v, &grad_v}, 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    cuda::channel_map<scalar_t>(L, aligned,
                                Backward<scalar_t, T>{g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                                      v.const_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
                                                      g_reg.const_data_ptr<T>(), s.const_data_ptr<T>(),
                                                      z.const_data_ptr<T>(), static_cast<T>(qmin),
                                                      static_cast<T>(qmax), static_cast<T>(beta)});
  });
  return grad_v;
}

}  // namespace zsq
