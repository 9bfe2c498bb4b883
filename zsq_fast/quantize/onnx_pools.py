"""Adaptive pools the TorchScript ONNX exporter cannot write, rewritten for the export only.

The exporter writes adaptive_avg/max_pool2d only when the output size divides the input size. Other sizes occur:
a torchvision VGG at 32 px pools a 1x1 map to 7x7, timm's VGG head pools a 3x3 map to 7x7 at 96 px. Bin j of a
dimension of size i pooled to o covers [floor(j i / o), ceil((j + 1) i / o)), so during export:
- a dimension the pool enlarges by a whole factor (o = k i) has one input pixel per bin, floor(j / k): a Gather,
  exact;
- then, when a dimension still does not divide, each output bin is its window reduced (ReduceMean / ReduceMax over
  a Slice) and the bins are concatenated: the same windows and counts as PyTorch's kernel. A max is exact; a mean
  of more than one value may sum in another order in onnxruntime (an ulp before the next quantizer).
The functional ops are patched (nn.AdaptiveAvgPool2d calls them, and so do timm's heads), so module hooks (hw
sites) still apply, and the patch is undone when the export ends.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _sizes(output_size, size: tuple[int, int]) -> tuple[int, int]:
    o = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    return tuple(i if k is None else int(k) for k, i in zip(o, size))


def _bins(i: int, o: int) -> list[tuple[int, int]]:
    return [(j * i // o, -(-(j + 1) * i // o)) for j in range(o)]


def exportable_pool(x: torch.Tensor, output_size, pool, reduce) -> torch.Tensor:
    """pool(x, output_size) computed with ops the exporter writes (module docstring)."""
    size = tuple(int(s) for s in x.shape[-2:])
    out = _sizes(output_size, size)
    if all(i % o == 0 for i, o in zip(size, out)):
        return pool(x, out)
    for dim, (i, o) in zip((-2, -1), zip(size, out)):
        if o != i and o % i == 0:
            x = x.index_select(dim, torch.arange(o, device=x.device) // (o // i))
    size = tuple(int(s) for s in x.shape[-2:])
    if all(i % o == 0 for i, o in zip(size, out)):
        return x if size == out else pool(x, out)
    rows = [torch.cat([reduce(x[..., h0:h1, w0:w1]) for w0, w1 in _bins(size[1], out[1])], -1)
            for h0, h1 in _bins(size[0], out[0])]
    return torch.cat(rows, -2)


def _mean(w: torch.Tensor) -> torch.Tensor:
    return w.mean((-2, -1), keepdim=True)


def _max(w: torch.Tensor) -> torch.Tensor:
    return w.amax((-2, -1), keepdim=True)


@contextmanager
def exportable_adaptive_pools():
    """Within the block, adaptive average / max pools to any size compute the same values with ops the exporter
    writes (module docstring)."""
    avg, mx = F.adaptive_avg_pool2d, F.adaptive_max_pool2d

    def avg_pool(input, output_size):
        return exportable_pool(input, output_size, avg, _mean)

    def max_pool(input, output_size, return_indices=False):
        if return_indices:
            return mx(input, output_size, return_indices=True)
        return exportable_pool(input, output_size, mx, _max)

    F.adaptive_avg_pool2d, F.adaptive_max_pool2d = avg_pool, max_pool
    try:
        yield
    finally:
        F.adaptive_avg_pool2d, F.adaptive_max_pool2d = avg, mx
