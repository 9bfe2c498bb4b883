// CUDA loop skeletons over the (outer, C, inner) memory view of common.h.
//
// Elementwise maps hand their functor *groups* of V contiguous elements: V = 16 bytes of the
// element type when every pointer is 16-byte aligned and a group never straddles two channels
// (one 16-byte load/store per stream per group), else V = 1. Element k of a group at offset i
// lies in channel c0 + k * dc: dc = 0 for channel runs and per-tensor, dc = 1 for channels-last
// rows. Each thread keeps kUnroll groups in flight (read-only loads, so they can be issued
// before the previous group's stores).
//
// Reductions are deterministic: every block writes its partial sums to a buffer, and a finalize
// kernel adds them in a fixed order (no atomics), so results are bit-identical run to run.
// Functors are structs with templated __device__ members (no extended lambdas needed).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace zsq {
namespace cuda {

constexpr int kThreads = 256;        // 1-D blocks
constexpr int kUnroll = 4;           // element groups in flight per thread
constexpr int kRowTile = 32;         // channels per block in the channels-last reduction
constexpr int kRowLanes = 8;         // rows in flight per block there
constexpr int64_t kMinPerThread = 16;  // elements a thread reduces at least (more blocks otherwise)
constexpr int64_t kMaxPerThread = 128; // ... and at most, before another block is added

inline int64_t sm_count() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Blocks for `work` units of kThreads: enough to fill every SM (2048 resident threads each), no more.
inline unsigned grid_for(int64_t work) {
  const int64_t resident = sm_count() * (2048 / kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, resident)));
}

inline bool fits_32bit(const Layout& L) { return L.numel <= std::numeric_limits<int32_t>::max() / 2; }

// ---------------------------------------------------------------- vector loads and stores
template <int Bytes>
struct RawOf;
template <>
struct RawOf<2> { using type = unsigned short; };
template <>
struct RawOf<4> { using type = unsigned int; };
template <>
struct RawOf<8> { using type = unsigned long long; };
template <>
struct RawOf<16> { using type = uint4; };

// V elements at p (aligned to V * sizeof(T)) through the read-only path.
template <int V, typename T>
__device__ __forceinline__ void load_ro(const T* p, T (&out)[V]) {
  using raw_t = typename RawOf<V * sizeof(T)>::type;
  const raw_t r = __ldg(reinterpret_cast<const raw_t*>(p));
  memcpy(out, &r, sizeof(r));
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const T (&in)[V]) {
  using raw_t = typename RawOf<V * sizeof(T)>::type;
  raw_t r;
  memcpy(&r, in, sizeof(r));
  *reinterpret_cast<raw_t*>(p) = r;
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Group width for a layout: vec_width when the pointers are aligned and groups stay in one channel.
template <typename T>
inline int group_width(const Layout& L, bool aligned16) {
  constexpr int V = vec_width<T>();
  if (!aligned16 || L.numel < V) return 1;
  if (L.channels == 1 || L.inner % V == 0 || (L.inner == 1 && L.channels % V == 0)) return V;
  return 1;
}

template <typename index_t>
struct Chan {
  index_t c0, dc;
};

template <int V, typename index_t>
__device__ __forceinline__ Chan<index_t> channel_of(index_t i, index_t C, index_t inner) {
  if (C == 1) return {0, 0};
  if (V > 1 && inner == 1) return {i % C, 1};
  return {(i / inner) % C, 0};
}

// body(g) for g = start, start + stride, ... < count: the grid-stride loop of every kernel here, with
// kUnroll iterations unrolled so each thread has several independent groups in flight.
template <typename index_t, typename Body>
__device__ __forceinline__ void grid_stride(index_t start, index_t stride, index_t count, const Body& body) {
  index_t g = start;
  for (; g + (kUnroll - 1) * stride < count; g += kUnroll * stride) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) body(g + u * stride);
  }
  for (; g < count; g += stride) body(g);
}

// ---------------------------------------------------------------- elementwise: f.template apply<V>(i, c0, dc)
template <int V, typename index_t, typename F>
__global__ void __launch_bounds__(kThreads) channel_map_kernel(index_t numel, index_t C, index_t inner, F f) {
  const index_t groups = numel / V;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  grid_stride(static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x, stride, groups, [&](index_t g) {
    const index_t i = g * V;
    const Chan<index_t> ch = channel_of<V>(i, C, inner);
    f.template apply<V>(i, ch.c0, ch.dc);
  });
  if constexpr (V > 1) {  // tail of a per-tensor map: fewer than V elements
    const index_t i = groups * V + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < numel) f.template apply<1>(i, channel_of<1>(i, C, inner).c0, index_t(0));
  }
}

template <int V, typename F>
void launch_map(const Layout& L, const F& f) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = grid_for((L.numel / V + kUnroll - 1) / kUnroll);
  if (fits_32bit(L)) {
    channel_map_kernel<V, uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<uint32_t>(L.numel), static_cast<uint32_t>(L.channels), static_cast<uint32_t>(L.inner), f);
  } else {
    channel_map_kernel<V, int64_t><<<grid, kThreads, 0, stream>>>(L.numel, L.channels, L.inner, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f.template apply<V>(i, c0, dc) over every element; T: the element type (sets the vector width).
template <typename T, typename F>
void channel_map(const Layout& L, bool aligned16, const F& f) {
  if (L.numel == 0) return;
  if (group_width<T>(L, aligned16) > 1) {
    launch_map<vec_width<T>()>(L, f);
  } else {
    launch_map<1>(L, f);
  }
}

// A map over a functor whose apply also returns a total (used by channel_map_sum), dropping the total.
template <typename F>
struct DropTotal {
  F f;
  template <int V, typename I>
  __device__ __forceinline__ void apply(I i, I c0, I dc) const {
    f.template apply<V>(i, c0, dc);
  }
};

// ---------------------------------------------------------------- block sums
template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// v[k] summed over a 1-D block (blockDim.x a multiple of 32, <= 1024); valid in thread 0.
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

// ---------------------------------------------------------------- elementwise with a total
// f.template apply<V>(i, c0, dc) returns the group's share (acc_t); each block writes
// partial[blockIdx.x]; sum_partials adds them in block order.
template <int V, typename index_t, typename acc_t, typename F>
__global__ void __launch_bounds__(kThreads) channel_map_sum_kernel(index_t numel, index_t C, index_t inner, F f,
                                                                    acc_t* partial) {
  acc_t a[1] = {acc_t(0)};
  const index_t groups = numel / V;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  grid_stride(static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x, stride, groups, [&](index_t g) {
    const index_t i = g * V;
    const Chan<index_t> ch = channel_of<V>(i, C, inner);
    a[0] += f.template apply<V>(i, ch.c0, ch.dc);
  });
  if constexpr (V > 1) {
    const index_t i = groups * V + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < numel) a[0] += f.template apply<1>(i, channel_of<1>(i, C, inner).c0, index_t(0));
  }
  block_sum(a);
  if (threadIdx.x == 0) partial[blockIdx.x] = a[0];
}

// out[c] = sum over k < splits of partial[k * C + c], in k order; one block per channel.
template <typename acc_t, typename out_t>
__global__ void sum_partials_kernel(const acc_t* partial, int64_t splits, int64_t C, out_t* out) {
  const int64_t c = blockIdx.x;
  acc_t a[1] = {acc_t(0)};
  for (int64_t k = threadIdx.x; k < splits; k += blockDim.x) a[0] += partial[k * C + c];
  block_sum(a);
  if (threadIdx.x == 0) out[c] = static_cast<out_t>(a[0]);
}

template <typename acc_t, typename out_t>
void sum_partials(const acc_t* partial, int64_t splits, int64_t C, out_t* out) {
  sum_partials_kernel<acc_t, out_t><<<static_cast<unsigned>(C), 128, 0, at::cuda::getCurrentCUDAStream()>>>(
      partial, splits, C, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// *total = the sum over every element (out: a device scalar of out_t). Uses a temporary buffer.
template <typename T, typename acc_t, typename out_t, typename F>
void channel_map_sum(const Layout& L, bool aligned16, const F& f, const at::Tensor& like, out_t* total) {
  const int V = L.numel == 0 ? 1 : group_width<T>(L, aligned16);
  const unsigned grid = grid_for((std::max<int64_t>(L.numel, 1) / V + kUnroll - 1) / kUnroll);
  const auto opts = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor partial = L.numel > 0 ? at::empty({static_cast<int64_t>(grid)}, opts) : at::zeros({1}, opts);
  acc_t* pp = partial.mutable_data_ptr<acc_t>();
  if (L.numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    auto launch = [&](auto v_tag) {
      constexpr int Vc = decltype(v_tag)::value;
      if (fits_32bit(L)) {
        channel_map_sum_kernel<Vc, uint32_t, acc_t><<<grid, kThreads, 0, stream>>>(
            static_cast<uint32_t>(L.numel), static_cast<uint32_t>(L.channels), static_cast<uint32_t>(L.inner), f,
            pp);
      } else {
        channel_map_sum_kernel<Vc, int64_t, acc_t><<<grid, kThreads, 0, stream>>>(L.numel, L.channels, L.inner, f,
                                                                                   pp);
      }
    };
    if (V > 1) {
      launch(std::integral_constant<int, vec_width<T>()>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sum_partials<acc_t, out_t>(pp, static_cast<int64_t>(grid), 1, total);
}

// ---------------------------------------------------------------- per-channel reduction
// f.template accumulate<V>(i, c, a) adds the V elements at i (all in channel c) into a[0..N);
// block (channel or channel tile, split) sums go to sink(c, split, a).

// Channel runs of `inner` elements (contiguous layout): block (c, split). With V > 1, inner % V == 0.
template <int V, int N, typename index_t, typename acc_t, typename F, typename Sink>
__global__ void __launch_bounds__(kThreads) channel_reduce_runs_kernel(index_t count, index_t C, index_t inner, F f,
                                                                        Sink sink) {
  const index_t c = blockIdx.x;
  acc_t a[N];
#pragma unroll
  for (int k = 0; k < N; ++k) a[k] = acc_t(0);
  const index_t stride = static_cast<index_t>(gridDim.y) * blockDim.x;
  grid_stride(static_cast<index_t>(blockIdx.y) * blockDim.x + threadIdx.x, stride, count / V, [&](index_t g) {
    const index_t j = g * V;
    f.template accumulate<V>((j / inner) * C * inner + c * inner + j % inner, c, a);
  });
  block_sum(a);
  if (threadIdx.x == 0) sink(static_cast<int64_t>(c), static_cast<int64_t>(blockIdx.y), a);
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
    grid_stride(static_cast<index_t>(blockIdx.y) * kRowLanes + threadIdx.y, stride, rows,
                [&](index_t r) { f.template accumulate<1>(r * C + c, c, a); });
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
    sink(static_cast<int64_t>(c), static_cast<int64_t>(blockIdx.y), a);
  }
}

inline bool rows_layout(const Layout& L) { return L.inner == 1 && L.channels > 1; }

// Blocks that share one channel (or channel tile): each thread reduces kMinPerThread..kMaxPerThread
// elements, and there are enough blocks to give every SM several (small CIFAR layers included).
inline int64_t reduce_splits(const Layout& L) {
  if (L.numel == 0 || L.channels <= 0) return 1;
  const int64_t count = L.numel / L.channels;
  const int64_t per_block = rows_layout(L) ? kRowLanes : kThreads;
  const int64_t tiles = rows_layout(L) ? (L.channels + kRowTile - 1) / kRowTile : L.channels;
  const int64_t most = std::max<int64_t>(1, count / (per_block * kMinPerThread));
  const int64_t least = (count + per_block * kMaxPerThread - 1) / (per_block * kMaxPerThread);
  const int64_t fill = (4 * sm_count() + tiles - 1) / tiles;
  return std::clamp<int64_t>(std::max(least, std::min(fill, most)), 1, 65535);
}

// T: the element type (vector width of the runs kernel).
template <typename T, int N, typename acc_t, typename F, typename Sink>
void channel_reduce(const Layout& L, bool aligned16, int64_t splits, const F& f, const Sink& sink) {
  if (L.numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = L.numel / L.channels;
  const bool small = fits_32bit(L);
  if (rows_layout(L)) {
    const dim3 grid(static_cast<unsigned>((L.channels + kRowTile - 1) / kRowTile), static_cast<unsigned>(splits));
    const dim3 block(kRowTile, kRowLanes);
    if (small) {
      channel_reduce_rows_kernel<N, uint32_t, acc_t><<<grid, block, 0, stream>>>(
          static_cast<uint32_t>(count), static_cast<uint32_t>(L.channels), f, sink);
    } else {
      channel_reduce_rows_kernel<N, int64_t, acc_t><<<grid, block, 0, stream>>>(count, L.channels, f, sink);
    }
  } else {
    const dim3 grid(static_cast<unsigned>(L.channels), static_cast<unsigned>(splits));
    constexpr int V = vec_width<T>();
    const bool vec = aligned16 && L.inner % V == 0;
    auto launch = [&](auto v_tag) {
      constexpr int Vc = decltype(v_tag)::value;
      if (small) {
        channel_reduce_runs_kernel<Vc, N, uint32_t, acc_t><<<grid, kThreads, 0, stream>>>(
            static_cast<uint32_t>(count), static_cast<uint32_t>(L.channels), static_cast<uint32_t>(L.inner), f, sink);
      } else {
        channel_reduce_runs_kernel<Vc, N, int64_t, acc_t><<<grid, kThreads, 0, stream>>>(count, L.channels, L.inner,
                                                                                         f, sink);
      }
    };
    if (vec) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sink: each block's N sums into partial[k][split][c] (k < N), for a fixed-order finalize.
template <int N, typename acc_t>
struct PartialSink {
  acc_t* partial;
  int64_t splits, C;
  __device__ void operator()(int64_t c, int64_t split, const acc_t (&a)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[(k * splits + split) * C + c] = a[k];
  }
};

}  // namespace cuda
}  // namespace zsq
