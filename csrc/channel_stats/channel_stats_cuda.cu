#include "channel_stats/channel_stats.h"

#include <ATen/Dispatch.h>

#include <type_traits>

#include "common.h"
#include "cuda_loops.cuh"

namespace zsq {
namespace {

// Shifted sums in fp64 (K = the channel's first element in memory, at offset c * inner, so x - K
// is small for a large mean): a[0] += x - K, a[1] += (x - K)^2. fp64 accumulation gives chunk
// merges the accuracy of the CPU kernel; the kernel stays bound by memory bandwidth.
template <typename scalar_t>
struct ShiftedSums {
  const scalar_t* __restrict__ x;
  int64_t shift_stride;  // memory offset between channels' first elements (L.inner)
  template <int V, typename I>
  __device__ __forceinline__ void accumulate(I i, I c, double (&a)[2]) const {
    scalar_t xv[V];
    cuda::load_ro<V>(x + i, xv);
    const double k = stats_shift(x[static_cast<int64_t>(c) * shift_stride]);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      double xd;
      if constexpr (std::is_same_v<scalar_t, double>) {
        xd = xv[u];
      } else {
        xd = static_cast<double>(static_cast<float>(xv[u]));
      }
      const double d = xd - k;
      a[0] += d;
      a[1] += d * d;
    }
  }
};

// Per channel (one block each): the splits' partial sums in a fixed order, then mean and M2, then
// (optionally) the Chan merge into the running statistics, all on the device.
template <typename scalar_t>
__global__ void stats_finalize_kernel(const double* partial, const scalar_t* x, int64_t shift_stride, int64_t splits,
                                      int64_t C, double n, const double* running, double running_count,
                                      double* out) {
  const int64_t c = blockIdx.x;
  double a[2] = {0.0, 0.0};
  for (int64_t k = threadIdx.x; k < splits; k += blockDim.x) {
    a[0] += partial[k * C + c];
    a[1] += partial[(splits + k) * C + c];
  }
  cuda::block_sum(a);
  if (threadIdx.x != 0) return;
  const double shift = stats_shift(x[c * shift_stride]);
  double mean = shift + a[0] / n;
  double m2 = a[1] - a[0] * a[0] / n;
  m2 = m2 < 0 ? 0.0 : m2;  // rounding can leave a tiny negative; NaN passes
  if (running != nullptr) {
    double mu = running[c], q = running[C + c];
    chan_merge(running_count, mu, q, n, mean, m2);
    mean = mu;
    m2 = q;
  }
  out[c] = mean;
  out[C + c] = m2;
}

// dx = (s g_mean)/M + (s g_var) 2/M (x - mean) in the compute dtype T, the reference's order;
// s (an optional device scalar) scales the coefficients before the cast to x's dtype.
template <typename scalar_t, typename T>
struct StatsBackward {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ dx;
  const double *__restrict__ gm, *__restrict__ gv, *__restrict__ mean;
  const double* __restrict__ scale;  // nullptr: 1
  T inv_m, two_inv_m;
  template <int V, typename I>
  __device__ __forceinline__ void apply(I i, I c0, I dc) const {
    scalar_t xv[V], out[V];
    cuda::load_ro<V>(x + i, xv);
    const T s = scale == nullptr ? T(1) : static_cast<T>(*scale);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const I c = c0 + u * dc;
      const T g_m = scale == nullptr ? static_cast<T>(gm[c]) : static_cast<T>(gm[c]) * s;
      const T g_v = scale == nullptr ? static_cast<T>(gv[c]) : static_cast<T>(gv[c]) * s;
      out[u] = static_cast<scalar_t>(g_m * inv_m + g_v * two_inv_m * (static_cast<T>(xv[u]) - static_cast<T>(mean[c])));
    }
    cuda::store<V>(dx + i, out);
  }
};

}  // namespace

at::Tensor channel_stats_forward_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& running,
                                      double running_count) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const int64_t C = x.size(1);
  const bool merge = running.has_value() && running->defined() && running_count > 0;
  if (x.numel() == 0) {
    return merge ? running->to(at::kDouble).contiguous().clone() : at::zeros({2, C}, x.options().dtype(at::kDouble));
  }
  at::Tensor out = at::empty({2, C}, x.options().dtype(at::kDouble));
  const at::Tensor run = merge ? running->to(at::kDouble).contiguous() : at::Tensor();
  const Layout L = channel_layout(x, 1);
  const int64_t splits = cuda::reduce_splits(L);
  at::Tensor partial = at::empty({2, splits, C}, out.options());
  const bool aligned = aligned_to({&x}, 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_forward_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    cuda::channel_reduce<scalar_t, 2, double>(L, aligned, splits, ShiftedSums<scalar_t>{xp, L.inner},
                                              cuda::PartialSink<2, double>{partial.mutable_data_ptr<double>(), splits, C});
    stats_finalize_kernel<scalar_t><<<static_cast<unsigned>(C), 128, 0, at::cuda::getCurrentCUDAStream()>>>(
        partial.const_data_ptr<double>(), xp, L.inner, splits, C, static_cast<double>(x.numel() / C),
        merge ? run.const_data_ptr<double>() : nullptr, running_count, out.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor channel_stats_backward_cuda(const at::Tensor& x_in, const at::Tensor& mean_in,
                                       const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                       double total_count, const std::optional<at::Tensor>& grad_scale) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const at::Tensor mean = param(mean_in, at::kDouble), gm = param(grad_mean_in, at::kDouble),
                   gv = param(grad_var_in, at::kDouble);
  const bool scaled = grad_scale.has_value() && grad_scale->defined();
  const at::Tensor gs = scaled ? grad_scale->reshape({}).to(at::kDouble).contiguous() : at::Tensor();
  const Layout L = channel_layout(x, 1);
  const double inv_m = 1.0 / total_count;
  const bool aligned = aligned_to({&x, &dx}, 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    cuda::channel_map<scalar_t>(
        L, aligned,
        StatsBackward<scalar_t, T>{x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                                   gm.const_data_ptr<double>(), gv.const_data_ptr<double>(),
                                   mean.const_data_ptr<double>(), scaled ? gs.const_data_ptr<double>() : nullptr,
                                   static_cast<T>(inv_m), static_cast<T>(2.0 * inv_m)});
  });
  return dx;
}

}  // namespace zsq
