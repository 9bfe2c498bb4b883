"""Whole-set per-channel statistics in an order fixed by the image indices alone, so exact dgh gives
the same bits for any chunk size and any number of ranks.

Merging chunk statistics as they stream (Chan's update, float64) rounds differently when the chunks
or the ranks' shares change. Here every image is a leaf (its own count, mean, M2 per channel) and
leaves are merged along one binary tree over the global image indices 0..N-1: the node (level k,
index j) covers images [j 2^k, (j+1) 2^k). A stream of images in index order keeps a stack of the
largest complete nodes so far (O(log N) per layer); a rank ends with the dyadic decomposition of its
range. All pieces (every rank's, gathered exactly) are pushed in index order through the same stack
rule, and what is left is folded left to right: the same merges in the same order whatever the
split. Each merge is elementwise (ops.reference.chan_merge), so threading cannot reorder it.

The leaves come from one statistics kernel call per layer and chunk on the chunk reshaped to
(1, n*C, ...) (channels_last: one call per image): each image-channel plane is reduced on its own, so
a leaf does not depend on which chunk the image was in.
"""
from __future__ import annotations

import torch

from .. import distributed as zd
from ..ops import ChannelStats, channel_stats
from ..ops.reference import chan_merge

Node = tuple  # (level, index, count, data (2, C) float64)


def _merge(a: Node, b: Node) -> Node:
    """a then b (a covers the images before b's)."""
    la, ia, na, da = a
    lb, ib, nb, db = b
    mean, m2 = chan_merge(na, da[0], da[1], nb, db[0], db[1])
    return la + 1, ia // 2, na + nb, torch.stack([mean, m2])


def _push(stack: list[Node], node: Node) -> None:
    """Append a node; merge it with its left sibling while that is on top (a binary counter)."""
    while stack and node[1] % 2 == 1 and stack[-1][0] == node[0] and stack[-1][1] == node[1] - 1:
        node = _merge(stack.pop(), node)
    stack.append(node)


class FixedOrderStats:
    """One layer's statistics over images fed in increasing global index order (chunk by chunk)."""

    def __init__(self):
        self.stack: list[Node] = []
        self.next: int | None = None

    @torch.no_grad()
    def add_chunk(self, start: int, a: torch.Tensor) -> None:
        """a: (n, C, *spatial) activations of the images start..start+n-1 (global indices)."""
        if self.next is not None and start != self.next:
            raise ValueError(f"images must come in index order: expected {self.next}, got {start}")
        n, c = a.shape[0], a.shape[1]
        a = a.detach()
        per_image = float(a[:1].numel() // max(1, c))
        if a.is_contiguous():  # one kernel call: each (image, channel) plane is a channel of (1, n*C, ...)
            leaves = channel_stats(a.reshape(1, n * c, *a.shape[2:])).data.view(2, n, c)
            rows = [leaves[:, i] for i in range(n)]
        else:  # channels_last: a call per image (as fast as one per chunk; a contiguous copy would cost 3x)
            rows = [channel_stats(a[i:i + 1]).data for i in range(n)]
        for i, row in enumerate(rows):
            _push(self.stack, (0, start + i, per_image, row))
        self.next = start + n


def _fold(pieces: list[Node]) -> ChannelStats:
    stack: list[Node] = []
    for p in sorted(pieces, key=lambda p: p[1] << p[0]):  # by first image
        _push(stack, p)
    acc = stack[0]
    for p in stack[1:]:
        _, _, n, data = acc
        _, _, m, other = p
        mean, m2 = chan_merge(n, data[0], data[1], m, other[0], other[1])
        acc = (0, 0, n + m, torch.stack([mean, m2]))
    return ChannelStats(acc[2], data=acc[3].clone())


def finish(layers: list[FixedOrderStats]) -> list[ChannelStats]:
    """Per layer, the statistics of every rank's images (the same bits on every rank and for any split).
    A rank with no images contributes nothing."""
    if not zd.active():
        return [_fold(t.stack) for t in layers]
    device = layers[0].stack[0][3].device if layers and layers[0].stack else None
    mine = [[(lv, j, n, d.cpu()) for lv, j, n, d in t.stack] for t in layers]
    every = zd.all_gather_object(mine, "the whole-set statistics (fixed-order pieces)")
    out = []
    for k in range(len(layers)):
        pieces = [(lv, j, n, d.to(device) if device is not None else d) for rank in every for lv, j, n, d in rank[k]]
        out.append(_fold(pieces))
    return out
