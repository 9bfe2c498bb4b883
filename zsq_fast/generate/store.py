"""The image store: all N canvases and their RAdam moments, on the host (pinned) or the device.

Each step streams chunks to the compute device, so device memory depends on the chunk size,
not on N.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageStore:
    x: torch.Tensor           # (N, C, Hc, Wc) float32 canvases in normalized input space
    exp_avg: torch.Tensor     # RAdam first moment, same shape
    exp_avg_sq: torch.Tensor  # RAdam second moment

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def chunks(self, chunk_size: int) -> list[slice]:
        return [slice(i, min(i + chunk_size, self.n)) for i in range(0, self.n, chunk_size)]

    def load(self, sl: slice, device, moments: bool = False):
        """The chunk's images (and moments) on the compute device, as copies."""
        nb = self.x.is_pinned()
        if not moments:
            return self.x[sl].to(device, non_blocking=nb, copy=True)
        return tuple(t[sl].to(device, non_blocking=nb, copy=True) for t in (self.x, self.exp_avg, self.exp_avg_sq))

    def put(self, sl: slice, x, exp_avg=None, exp_avg_sq=None) -> None:
        self.x[sl].copy_(x)
        if exp_avg is not None:
            self.exp_avg[sl].copy_(exp_avg)
            self.exp_avg_sq[sl].copy_(exp_avg_sq)


def make_store(x0: torch.Tensor, location: torch.device) -> ImageStore:
    """Store x0 at `location`; host memory is pinned when a GPU will read it."""
    x = x0.to(location, torch.float32).contiguous()
    if x.device.type == "cpu" and torch.cuda.is_available():
        x = x.pin_memory()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    if x.is_pinned():
        m, v = m.pin_memory(), v.pin_memory()
    return ImageStore(x, m, v)
