"""Augmentation-aware views (DGH fix 2): the model sees images as it saw its training data.

Each step: random horizontal flip (p=0.5) -> 3x3 Gaussian smoothing (sigma 1.25, a natural-image
prior) -> random crop of image_size from a canvas `margin` px larger -> clip to the valid pixel
range. The random parameters are drawn once per step for every image, so both passes of an
exact DGH step see identical views. Final images: smoothing -> center crop -> clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SMOOTH_SIGMA = 1.25


def margin_for(image_size: int) -> int:
    """Canvas margin scaled to the image: +32 px at 224, +4 px at 32 (size // 7)."""
    return image_size // 7


@dataclass
class ViewParams:
    flip: torch.Tensor  # bool (N,)
    top: torch.Tensor   # int64 (N,) crop offsets into the canvas
    left: torch.Tensor

    def __getitem__(self, sl: slice) -> "ViewParams":
        return ViewParams(self.flip[sl], self.top[sl], self.left[sl])


def draw_views(n: int, margin: int, generator: torch.Generator, flip: bool = True) -> ViewParams:
    f = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    top = torch.randint(0, margin + 1, (n,), generator=generator)
    left = torch.randint(0, margin + 1, (n,), generator=generator)
    return ViewParams(f, top, left)


def gaussian_kernel3(channels: int, sigma: float, device, dtype) -> torch.Tensor:
    g = torch.tensor([math.exp(-(d * d) / (2 * sigma * sigma)) for d in (-1, 0, 1)], dtype=torch.float64)
    k2 = torch.outer(g, g)
    k2 = k2 / k2.sum()
    return k2.to(device=device, dtype=dtype).expand(channels, 1, 3, 3).contiguous()


def smooth(x: torch.Tensor, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """Depthwise 3x3 Gaussian blur; reflect padding keeps the size and the pixel range."""
    k = gaussian_kernel3(x.shape[1], sigma, x.device, x.dtype)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-image crop x[i, :, top_i:top_i+h, left_i:left_i+w] as two gathers (differentiable)."""
    n, c, hc, wc = x.shape
    h, w = size
    rows = (top.to(x.device)[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, wc)
    x = x.gather(2, rows)
    cols = (left.to(x.device)[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return x.gather(3, cols)


def clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clip every pixel to the valid range of the normalized input (lo, hi per channel)."""
    return torch.maximum(torch.minimum(x, hi.to(x).view(1, -1, 1, 1)), lo.to(x).view(1, -1, 1, 1))


def apply_view(canvas: torch.Tensor, p: ViewParams, size: tuple[int, int], lo, hi,
               smoothing: bool = True) -> torch.Tensor:
    x = torch.where(p.flip.to(canvas.device).view(-1, 1, 1, 1), canvas.flip(3), canvas)
    if smoothing:
        x = smooth(x)
    if x.shape[-2:] != size:
        x = crop(x, p.top, p.left, size)
    return clip(x, lo, hi)


def final_view(canvas: torch.Tensor, size: tuple[int, int], lo, hi, smoothing: bool = True) -> torch.Tensor:
    x = smooth(canvas) if smoothing else canvas
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    x = x[..., top:top + size[0], left:left + size[1]]
    return clip(x, lo, hi)
