"""Generation across the ranks of a torch.distributed group: who owns which images, the seeding that
makes an image independent of the world size, and the few reductions a step needs.

Ownership: the global set is cut into units (dgh/bns: chunks of chunk_size images at multiples of
chunk_size; fdda: its single-class batches) and each rank owns a contiguous run of whole units. A
unit is what the single-process loop treats as one batch (per-batch bns statistics, stale cache
entries, fdda class batches), so world 2 computes what world 1 does.

Whole-set statistics of exact dgh: merged along a tree over the global image indices
(fixed_order.py: the same bits for any split); global_stats (two float64 all-reduces) serves the
stale cache.
Random draws that are not per-image (views, fdda's distorted centers) come from one generator seeded
alike on every rank and drawn for all N images, each rank taking its slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as zd
from ..errors import InvalidArgumentError
from ..ops import ChannelStats

# initial noise is drawn per block of this many images, each block from its own seed (canvas_block)
CANVAS_BLOCK = 64


@dataclass(frozen=True)
class Shard:
    """This rank's images [start, stop) of n_total, and the units (global slices) it owns."""
    rank: int
    world: int
    start: int
    stop: int
    n_total: int
    units: tuple

    @property
    def n(self) -> int:
        return self.stop - self.start

    def local(self, sl: slice) -> slice:
        """A global slice inside the shard as a slice of the rank's store."""
        return slice(sl.start - self.start, sl.stop - self.start)

    def note(self) -> dict:
        return {"rank": self.rank, "world_size": self.world, "start": self.start, "stop": self.stop,
                "n_images": self.n_total}


def chunk_units(n: int, chunk_size: int) -> list[slice]:
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def plan(units: list[slice], n_total: int, rank: int | None = None, world: int | None = None,
         what: str = "chunks") -> Shard:
    """The shard of `rank` when `units` (contiguous, covering [0, n_total)) are split over `world`."""
    rank = zd.rank() if rank is None else rank
    world = zd.world_size() if world is None else world
    if world > len(units):
        raise InvalidArgumentError(f"{world} ranks need at least {world} {what}, the set has {len(units)} "
                                   f"(n_images={n_total}); lower chunk_size or run on fewer ranks")
    mine = units[zd.shard(len(units), rank, world)]
    return Shard(rank, world, mine[0].start, mine[-1].stop, n_total, tuple(mine))


def _block_seed(seed: int, block: int) -> int:
    """A 64-bit seed for block `block` of run `seed` (numpy's SeedSequence: independent streams)."""
    words = np.random.SeedSequence(seed, spawn_key=(block,)).generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def initial_canvases(seed: int, shape, lo: torch.Tensor, hi: torch.Tensor, start: int = 0, stop: int | None = None):
    """(slice into [start, stop), canvases) blocks of N(0, 1) noise clipped to the pixel range, for
    the global images [start, stop) of a set of shape[0]. Image i is row i % CANVAS_BLOCK of the
    block drawn from _block_seed(seed, i // CANVAS_BLOCK): it depends on the seed and i only, not on
    N, the shard or the world size."""
    stop = shape[0] if stop is None else stop
    lo, hi = lo.cpu().view(1, -1, 1, 1), hi.cpu().view(1, -1, 1, 1)
    for b in range(start // CANVAS_BLOCK, math.ceil(stop / CANVAS_BLOCK)):
        first = b * CANVAS_BLOCK
        g = torch.Generator().manual_seed(_block_seed(seed, b))
        x = torch.randn(CANVAS_BLOCK, *shape[1:], generator=g)
        a, z = max(start, first), min(stop, first + CANVAS_BLOCK)
        x = x[a - first:z - first]
        yield slice(a - start, z - start), torch.maximum(torch.minimum(x, hi), lo)


def global_stats(totals: list[ChannelStats]) -> list[ChannelStats]:
    """Per-layer statistics over every rank's images from each rank's own (count, mean, M2).

    Not sum / sum of squares: var = E[x^2] - mean^2 cancels catastrophically when |mean| >> std
    (deep BN inputs: float64 keeps ~16 digits, mean^2/var of 1e8 leaves 8). Instead two reductions
    of non-cancelling terms, Chan et al.'s parallel formula:
        round 1: sum_r n_r and sum_r n_r mean_r            -> n, mean
        round 2: sum_r [M2_r + n_r (mean_r - mean)^2]      -> M2 (every term >= 0)
    Each round is one float64 all-reduce of all layers at once ((1 + C_l) and C_l numbers per layer).
    The all-reduced result is the same on every rank, so the loss gradient w.r.t. the global mean and
    variance is too. Identity in a single process."""
    if not zd.active():
        return totals
    sizes = [t.data.shape[1] for t in totals]
    first = torch.cat([torch.cat([t.data.new_tensor([t.count]), t.count * t.mean]) for t in totals])
    zd.all_reduce_sum_(first, "the whole-set statistics (count, sum)")
    counts, means, pos = [], [], 0
    for c in sizes:
        n = float(first[pos])
        counts.append(n)
        means.append(first[pos + 1:pos + 1 + c] / n if n > 0 else first[pos + 1:pos + 1 + c] * 0)
        pos += 1 + c
    second = torch.cat([t.m2 + t.count * (t.mean - mu).square() for t, mu in zip(totals, means)])
    zd.all_reduce_sum_(second, "the whole-set statistics (M2)")
    out, pos = [], 0
    for n, mu, c in zip(counts, means, sizes):
        out.append(ChannelStats(n, mu, second[pos:pos + c]))
        pos += c
    return out


def reduce_sums(values: dict, what: str = "the step's losses") -> dict:
    """{key: sum over ranks} of per-rank float sums (one float64 all-reduce; keys alike on every rank)."""
    if not zd.active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=zd.collective_device())
    zd.all_reduce_sum_(t, what)
    return dict(zip(keys, t.tolist()))
