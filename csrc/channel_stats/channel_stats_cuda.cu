#include "channel_stats/channel_stats.h"

#include <ATen/Dispatch.h>

#include "common.h"
#include "cuda_loops.cuh"

namespace zsq {
namespace {

// Shifted sums per thread in the compute dtype (K = the channel's first element, so x - K is
// small for a large mean), block-reduced, written as fp64 partials and combined in fp64.
template <typename scalar_t, typename acc_t>
struct ShiftedSumsElem {
  const scalar_t* x;
  const acc_t* shift;
  template <typename I>
  __device__ void operator()(I i, I c, acc_t (&a)[2]) const {
    const acc_t d = static_cast<acc_t>(x[i]) - shift[c];
    a[0] += d;
    a[1] += d * d;
  }
};

template <typename acc_t>
struct PartialSink {  // partial[k][split][c]
  double* partial;
  int64_t splits, C;
  __device__ void operator()(int64_t c, int64_t split, const acc_t (&a)[2]) const {
    partial[split * C + c] = static_cast<double>(a[0]);
    partial[(splits + split) * C + c] = static_cast<double>(a[1]);
  }
};

template <typename acc_t>
__global__ void stats_finalize_kernel(const double* partial, const acc_t* shift, int64_t splits, int64_t C,
                                      double n, double* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s = 0, q = 0;
  for (int64_t k = 0; k < splits; ++k) {
    s += partial[k * C + c];
    q += partial[(splits + k) * C + c];
  }
  out[c] = static_cast<double>(shift[c]) + s / n;
  const double m2 = q - s * s / n;
  out[C + c] = m2 < 0 ? 0.0 : m2;  // rounding can leave a tiny negative; NaN passes
}

template <typename scalar_t, typename T>
struct StatsBackwardElem {  // dx = g_mean/M + (2 g_var/M) (x - mean), reference order
  const scalar_t* x;
  scalar_t* dx;
  const T *gm, *gv, *mean;
  T inv_m, two_inv_m;
  template <typename I>
  __device__ void operator()(I i, I c) const {
    dx[i] = static_cast<scalar_t>(gm[c] * inv_m + gv[c] * two_inv_m * (static_cast<T>(x[i]) - mean[c]));
  }
};

}  // namespace

at::Tensor channel_stats_forward_cuda(const at::Tensor& x_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const int64_t C = x.size(1);
  at::Tensor out = at::zeros({2, C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return out;
  const Layout L = channel_layout(x, 1);
  const int64_t splits = cuda::reduce_splits(L);
  at::Tensor partial = at::empty({2, splits, C}, out.options());
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  // the first element of each channel in memory (offset c * inner)
  const at::Tensor shift = x.as_strided({C}, {L.inner}).to(cd).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_forward_cuda", [&] {
    using acc_t = compute_t<scalar_t>;
    const acc_t* sp = shift.const_data_ptr<acc_t>();
    cuda::channel_reduce<2, acc_t>(L, splits, ShiftedSumsElem<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), sp},
                                   PartialSink<acc_t>{partial.mutable_data_ptr<double>(), splits, C});
    const int threads = 128;
    stats_finalize_kernel<acc_t><<<static_cast<unsigned>((C + threads - 1) / threads), threads, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(
        partial.const_data_ptr<double>(), sp, splits, C, static_cast<double>(x.numel() / C),
        out.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor channel_stats_backward_cuda(const at::Tensor& x_in, const at::Tensor& mean_in,
                                       const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                       double total_count) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  const at::Tensor mean = param(mean_in, cd), gm = param(grad_mean_in, cd), gv = param(grad_var_in, cd);
  const Layout L = channel_layout(x, 1);
  const double inv_m = 1.0 / total_count;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    cuda::channel_map(L, StatsBackwardElem<scalar_t, T>{x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                                                        gm.const_data_ptr<T>(), gv.const_data_ptr<T>(),
                                                        mean.const_data_ptr<T>(), static_cast<T>(inv_m),
                                                        static_cast<T>(2.0 * inv_m)});
  });
  return dx;
}

}  // namespace zsq
