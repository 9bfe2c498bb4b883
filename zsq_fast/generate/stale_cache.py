"""Stale aggregation's cache: every chunk's statistics from its last visit, per layer, and their
running whole-set totals, so "all chunks but j" costs one exact un-merge instead of merging the
other K - 1 chunks (O(K) per step instead of O(K^2)).

Un-merge inverts Chan et al.'s pairwise update: with T = A + B (count n, mean mu, M2),
    n_A = n - n_B,  mu_A = mu + (mu - mu_B) n_B / n_A,  M2_A = M2 - M2_B - (mu_B - mu_A)^2 n_A n_B / n.
It is exact in exact arithmetic; in float64 each replace (un-merge + merge) adds rounding of about
1e-16 relative to the totals, and the subtraction loses precision when chunk j dominates the set.
The totals are therefore recomputed from scratch (one vectorized two-pass reduction per layer) at
the start of every step: drift is bounded by one step's K replacements, and a resumed run starts
each step from the same totals as the uninterrupted one.
"""
from __future__ import annotations

import torch

from ..ops import ChannelStats


def unmerge(total: ChannelStats, part: ChannelStats) -> ChannelStats:
    """The statistics of `total` without `part` (part must be a subset of total)."""
    n_rest = total.count - part.count
    if n_rest <= 0:
        return ChannelStats(0.0, data=torch.zeros_like(total.data))
    mean = total.mean + (total.mean - part.mean) * (part.count / n_rest)
    m2 = total.m2 - part.m2 - (part.mean - mean).square() * (n_rest * part.count / total.count)
    return ChannelStats(n_rest, mean, m2.clamp_min(0.0))  # rounding may leave M2 a hair below 0


def sum_stats(counts: torch.Tensor, data: torch.Tensor, n: float | None = None) -> ChannelStats:
    """Exact union of K sets given counts (K,) and stacked (mean, M2) data (K, 2, C), two-pass form.
    n: counts' sum when the caller has it on the host (counts are whole numbers: any summation order)."""
    n = float(counts.sum()) if n is None else n
    if n == 0:
        return ChannelStats(0.0, data=torch.zeros_like(data[0]))
    if data.device.type == "cuda" and counts.device.type == "cpu":  # pageable -> device copies wait
        counts = counts.pin_memory().to(data.device, non_blocking=True)
    w = counts.to(data).view(-1, 1)
    mean = (w * data[:, 0]).sum(0) / n
    m2 = data[:, 1].sum(0) + (w * (data[:, 0] - mean).square()).sum(0)
    return ChannelStats(n, mean, m2)


class StaleCache:
    """counts (K, L) float64 on the host and per layer data (K, 2, C_l) float64 on the device; totals per layer."""

    def __init__(self, counts: torch.Tensor, data: list[torch.Tensor]):
        self.counts = counts.cpu().contiguous()
        # the same memory as numpy: the loop reads a count per chunk and layer, a tensor read each would count
        # as a host read (tests/test_host_syncs.py) and costs a dispatch
        self._host = self.counts.numpy()
        self.data = data
        self.totals = self.resync()

    @classmethod
    def from_chunks(cls, chunks, n_chunks: int | None = None) -> "StaleCache":
        """The cache of `chunks` (an iterable of per-layer ChannelStats lists; n_chunks: its length when it
        is a generator). Each chunk is copied into rows preallocated at the first chunk, as it comes:
        keeping K x L small tensors alive through the setup pass and stacking them at the end fragments
        glibc's heap between the pass's large temporaries (2.8 GB RSS at 10^6 images, RESULTS.md)."""
        if n_chunks is None:
            chunks = list(chunks)
            n_chunks = len(chunks)
        counts, data = None, []
        for j, chunk in enumerate(chunks):
            if counts is None:
                counts = torch.zeros(n_chunks, len(chunk), dtype=torch.float64)
                data = [s.data.new_empty((n_chunks, *s.data.shape)) for s in chunk]
            for layer, s in enumerate(chunk):
                counts[j, layer] = s.count
                data[layer][j].copy_(s.data)
        if counts is None or j != n_chunks - 1:
            raise ValueError(f"StaleCache.from_chunks: expected {n_chunks} chunks, got "
                             f"{0 if counts is None else j + 1}")
        return cls(counts, data)

    def __len__(self) -> int:
        return self.counts.shape[0]

    def entry(self, j: int, layer: int) -> ChannelStats:
        return ChannelStats(float(self._host[j, layer]), data=self.data[layer][j])

    def __getitem__(self, j: int) -> list[ChannelStats]:
        """Chunk j's entries, one per layer (views into the cache)."""
        return [self.entry(j, layer) for layer in range(len(self.data))]

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def resync(self) -> list[ChannelStats]:
        """Recompute the totals from the entries (drops accumulated rounding)."""
        self.totals = [sum_stats(self.counts[:, layer], d, float(self._host[:, layer].sum()))
                       for layer, d in enumerate(self.data)]
        return self.totals

    def others(self, j: int) -> list[ChannelStats]:
        """Per layer: the statistics of every chunk but j."""
        return [unmerge(t, self.entry(j, layer)) for layer, t in enumerate(self.totals)]

    def replace(self, j: int, new: list[ChannelStats], others: list[ChannelStats] | None = None) -> None:
        """Chunk j's entry becomes `new`; the totals follow (others: self.others(j), when at hand)."""
        others = self.others(j) if others is None else others
        for layer, (o, s) in enumerate(zip(others, new)):
            self.totals[layer] = o.merge(s)
            self.counts[j, layer] = s.count
            self.data[layer][j].copy_(s.data)

    def state(self) -> dict:
        return {"counts": self.counts.cpu(), "data": [d.cpu() for d in self.data]}

    @classmethod
    def from_state(cls, saved: dict, device) -> "StaleCache":
        if "data" in saved:
            return cls(saved["counts"].double(), [d.to(device, torch.float64) for d in saved["data"]])
        # checkpoints written before the running totals: nested [chunk][layer] lists
        chunks = [[ChannelStats(c, mu.to(device), m2.to(device)) for c, mu, m2 in zip(cs, ms, m2s)]
                  for cs, ms, m2s in zip(saved["counts"], saved["means"], saved["m2s"])]
        return cls.from_chunks(chunks)
