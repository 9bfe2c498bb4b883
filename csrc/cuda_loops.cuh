// CUDA loop skeletons over the (outer, C, inner) memory view of common.h: grid-stride
// elementwise maps, block-reduced totals (atomicAdd of one value per block) and per-channel
// reductions whose block results go to a caller-supplied sink (partials or atomics).
// Functors are structs with a templated __device__ operator() (no extended lambdas needed).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.h"

namespace zsq {
namespace cuda {

constexpr int kThreads = 256;       // 1-D blocks
constexpr int kRowTile = 32;        // channels per block in the channel-innermost reduction
constexpr int kRowLanes = 8;        // rows in flight per block there
constexpr int64_t kPerThread = 64;  // elements one thread accumulates before the block reduction

inline unsigned grid_for(int64_t n) {
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                           (2048 / kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, resident)));
}

inline bool fits_32bit(const Layout& L) { return L.numel <= std::numeric_limits<int32_t>::max(); }

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// v[k] summed over a 1-D block (blockDim.x a multiple of 32); the result is valid in thread 0.
template <int N, typename T>
__device__ inline void block_sum(T (&v)[N]) {
  __shared__ T shared[N][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = warp_sum(lane < nwarps ? shared[k][lane] : T(0));
  }
}

// ---------------------------------------------------------------- elementwise: f(i, c)
template <typename index_t, typename F>
__global__ void channel_map_kernel(index_t numel, index_t C, index_t inner, F f) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride)
    f(i, (i / inner) % C);
}

template <typename F>
void channel_map(const Layout& L, const F& f) {
  if (L.numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = grid_for(L.numel);
  if (fits_32bit(L)) {
    channel_map_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<uint32_t>(L.numel), static_cast<uint32_t>(L.channels), static_cast<uint32_t>(L.inner), f);
  } else {
    channel_map_kernel<int64_t><<<grid, kThreads, 0, stream>>>(L.numel, L.channels, L.inner, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- elementwise with a total: *total += sum f(i, c)
template <typename index_t, typename acc_t, typename F>
__global__ void channel_map_sum_kernel(index_t numel, index_t C, index_t inner, F f, acc_t* total) {
  acc_t v[1] = {acc_t(0)};
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride)
    v[0] += f(i, (i / inner) % C);
  block_sum(v);
  if (threadIdx.x == 0) atomicAdd(total, v[0]);
}

// total: a zeroed device scalar of acc_t.
template <typename acc_t, typename F>
void channel_map_sum(const Layout& L, const F& f, acc_t* total) {
  if (L.numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = grid_for(L.numel);
  if (fits_32bit(L)) {
    channel_map_sum_kernel<uint32_t, acc_t><<<grid, kThreads, 0, stream>>>(
        static_cast<uint32_t>(L.numel), static_cast<uint32_t>(L.channels), static_cast<uint32_t>(L.inner), f,
        total);
  } else {
    channel_map_sum_kernel<int64_t, acc_t><<<grid, kThreads, 0, stream>>>(L.numel, L.channels, L.inner, f, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- per-channel reduction
// f(i, c, acc) accumulates element i of channel c into acc[0..N); sink(c, split, acc) takes each
// block's sum. gridDim.y = splits blocks share one channel (or one tile of channels).

// Channel runs of `inner` elements (contiguous layout; per-tensor is C = 1): block (c, split).
template <int N, typename index_t, typename acc_t, typename F, typename Sink>
__global__ void channel_reduce_runs_kernel(index_t count, index_t C, index_t inner, F f, Sink sink) {
  const index_t c = blockIdx.x;
  acc_t a[N];
#pragma unroll
  for (int k = 0; k < N; ++k) a[k] = acc_t(0);
  const index_t stride = static_cast<index_t>(gridDim.y) * blockDim.x;
  for (index_t j = static_cast<index_t>(blockIdx.y) * blockDim.x + threadIdx.x; j < count; j += stride)
    f((j / inner) * C * inner + c * inner + j % inner, c, a);
  block_sum(a);
  if (threadIdx.x == 0) sink(c, static_cast<int64_t>(blockIdx.y), a);
}

// Channel innermost (channels_last): rows of C; threads.x walk channels (coalesced), threads.y rows.
template <int N, typename index_t, typename acc_t, typename F, typename Sink>
__global__ void channel_reduce_rows_kernel(index_t rows, index_t C, F f, Sink sink) {
  __shared__ acc_t shared[N][kRowLanes][kRowTile];
  const index_t c = static_cast<index_t>(blockIdx.x) * kRowTile + threadIdx.x;
  acc_t a[N];
#pragma unroll
  for (int k = 0; k < N; ++k) a[k] = acc_t(0);
  if (c < C) {
    const index_t stride = static_cast<index_t>(gridDim.y) * kRowLanes;
    for (index_t r = static_cast<index_t>(blockIdx.y) * kRowLanes + threadIdx.y; r < rows; r += stride)
      f(r * C + c, c, a);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) shared[k][threadIdx.y][threadIdx.x] = a[k];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      acc_t t = acc_t(0);
      for (int y = 0; y < kRowLanes; ++y) t += shared[k][y][threadIdx.x];
      a[k] = t;
    }
    sink(c, static_cast<int64_t>(blockIdx.y), a);
  }
}

inline bool rows_layout(const Layout& L) { return L.inner == 1 && L.channels > 1; }

// Number of blocks that share a channel, so that each thread accumulates about kPerThread elements.
inline int64_t reduce_splits(const Layout& L) {
  const int64_t count = L.numel / L.channels;
  const int64_t per_block = (rows_layout(L) ? kRowLanes : kThreads) * kPerThread;
  return std::clamp<int64_t>((count + per_block - 1) / per_block, 1, 65535);
}

template <int N, typename acc_t, typename F, typename Sink>
void channel_reduce(const Layout& L, int64_t splits, const F& f, const Sink& sink) {
  if (L.numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = L.numel / L.channels;
  if (rows_layout(L)) {
    const dim3 grid(static_cast<unsigned>((L.channels + kRowTile - 1) / kRowTile), static_cast<unsigned>(splits));
    const dim3 block(kRowTile, kRowLanes);
    if (fits_32bit(L)) {
      channel_reduce_rows_kernel<N, uint32_t, acc_t><<<grid, block, 0, stream>>>(
          static_cast<uint32_t>(count), static_cast<uint32_t>(L.channels), f, sink);
    } else {
      channel_reduce_rows_kernel<N, int64_t, acc_t><<<grid, block, 0, stream>>>(count, L.channels, f, sink);
    }
  } else {
    const dim3 grid(static_cast<unsigned>(L.channels), static_cast<unsigned>(splits));
    if (fits_32bit(L)) {
      channel_reduce_runs_kernel<N, uint32_t, acc_t><<<grid, kThreads, 0, stream>>>(
          static_cast<uint32_t>(count), static_cast<uint32_t>(L.channels), static_cast<uint32_t>(L.inner), f, sink);
    } else {
      channel_reduce_runs_kernel<N, int64_t, acc_t><<<grid, kThreads, 0, stream>>>(count, L.channels, L.inner, f,
                                                                                  sink);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sink: atomicAdd each block's sum into acc[c].
template <typename acc_t>
struct AtomicSink {
  acc_t* acc;
  __device__ void operator()(int64_t c, int64_t /*split*/, const acc_t (&a)[1]) const { atomicAdd(acc + c, a[0]); }
};

}  // namespace cuda
}  // namespace zsq
