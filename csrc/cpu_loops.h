// CPU loop skeletons over the (outer, C, inner) memory view of common.h.
//
// f(i, c) is called for the element at memory offset i in channel c. Reductions use fixed
// blocks whose partial results are combined in a fixed order, so results do not depend on
// the number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace zsq {
namespace cpu {

constexpr int64_t kBlock = 32768;  // elements per parallel work item

// f(i, c) over [begin, end): runs of one channel when inner > 1, rows of C channels when inner == 1.
template <typename F>
inline void channel_range(const Layout& L, int64_t begin, int64_t end, const F& f) {
  const int64_t C = L.channels, inner = L.inner;
  int64_t i = begin;
  if (inner == 1) {
    int64_t c = begin % C;
    while (i < end) {
      const int64_t len = std::min(C - c, end - i);
      for (int64_t k = 0; k < len; ++k) f(i + k, c + k);
      i += len;
      c = 0;
    }
  } else {
    while (i < end) {
      const int64_t c = (i / inner) % C;
      const int64_t len = std::min(inner - i % inner, end - i);
      for (int64_t k = 0; k < len; ++k) f(i + k, c);
      i += len;
    }
  }
}

// Elementwise: f(i, c) for every element.
template <typename F>
inline void channel_map(const Layout& L, const F& f) {
  at::parallel_for(0, L.numel, kBlock, [&](int64_t begin, int64_t end) { channel_range(L, begin, end, f); });
}

// Sum of n floats: 16 independent lanes (a plain vector add, so it vectorizes without
// reassociation flags), then the lanes in double. Fixed order: deterministic.
template <typename T>
inline double lane_sum(const T* t, int64_t n) {
  constexpr int kLanes = 16;
  T lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += t[k + l];
  for (int l = 0; k < n; ++k, ++l) lanes[l] += t[k];
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Runs of one channel: run(i, c, len) over [begin, end) when every element of the run shares
// channel c (inner > 1, or per-tensor). Callers check has_runs(L) first.
inline bool has_runs(const Layout& L) { return L.channels == 1 || L.inner > 1; }

template <typename F>
inline void channel_runs(const Layout& L, int64_t begin, int64_t end, const F& run) {
  int64_t i = begin;
  while (i < end) {
    const int64_t c = L.channels == 1 ? 0 : (i / L.inner) % L.channels;
    const int64_t len = std::min(L.inner - i % L.inner, end - i);
    run(i, c, len);
    i += len;
  }
}

// Elementwise with a total: returns the sum over every element of f(i, c) (float or double), in fixed
// blocks combined in a fixed order, so the result does not depend on the number of threads.
// The per-element values go through a small tile so the elementwise loop stays vectorizable.
template <typename F>
inline double channel_map_sum(const Layout& L, const F& f) {
  using T = decltype(f(int64_t{0}, int64_t{0}));
  constexpr int64_t kTile = 256;
  const int64_t nblocks = (L.numel + kBlock - 1) / kBlock;
  std::vector<double> part(nblocks, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    T tile[kTile];
    for (int64_t b = b0; b < b1; ++b) {
      double acc = 0;
      const int64_t end = std::min(L.numel, (b + 1) * kBlock);
      for (int64_t t0 = b * kBlock; t0 < end; t0 += kTile) {
        const int64_t t1 = std::min(end, t0 + kTile);
        channel_range(L, t0, t1, [&](int64_t i, int64_t c) { tile[i - t0] = f(i, c); });
        acc += lane_sum(tile, t1 - t0);
      }
      part[b] = acc;
    }
  });
  double total = 0;
  for (double p : part) total += p;
  return total;
}

// Per-channel reduction: out[c] = sum over channel c of f(i, c) (Acc: a value with += and Acc{} = 0).
template <typename Acc, typename F>
inline std::vector<Acc> channel_reduce(const Layout& L, const F& f) {
  const int64_t C = L.channels, inner = L.inner;
  std::vector<Acc> out(C, Acc{});
  if (L.numel == 0) return out;
  if (inner == 1) {  // rows of C: fixed row blocks with one partial per channel each
    const int64_t rows = L.numel / C;
    const int64_t rpb = std::max<int64_t>(1, kBlock / C);
    const int64_t nblocks = (rows + rpb - 1) / rpb;
    std::vector<Acc> part(nblocks * C, Acc{});
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        Acc* p = part.data() + b * C;
        for (int64_t r = b * rpb; r < std::min(rows, (b + 1) * rpb); ++r)
          for (int64_t j = 0; j < C; ++j) p[j] += f(r * C + j, j);
      }
    });
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t j = 0; j < C; ++j) out[j] += part[b * C + j];
  } else {  // runs of `inner` elements of one channel: one task per channel, kBlock elements at least
    const int64_t outer = L.numel / (C * inner);
    const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, outer * inner));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Acc acc[4] = {Acc{}, Acc{}, Acc{}, Acc{}};
        for (int64_t o = 0; o < outer; ++o) {
          const int64_t base = (o * C + c) * inner;
          for (int64_t k = 0; k < inner; ++k) acc[k & 3] += f(base + k, c);
        }
        acc[0] += acc[1];
        acc[2] += acc[3];
        acc[0] += acc[2];
        out[c] = acc[0];
      }
    });
  }
  return out;
}

}  // namespace cpu
}  // namespace zsq
