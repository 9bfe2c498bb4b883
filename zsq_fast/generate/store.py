"""The image store: all N canvases and their RAdam moments, on the host (pinned) or the device
(run_folder.DiskStore keeps them in files); choose_store picks one for store="auto".

Each step streams chunks to the compute device, so device memory depends on the chunk size,
not on N.
"""
from __future__ import annotations

import math
import os
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

    def flush(self) -> None:
        """Nothing to make durable in memory (the disk store's counterpart syncs its files)."""


def make_store(x0: torch.Tensor, location: torch.device) -> ImageStore:
    """Store x0 at `location`; host memory is pinned when a GPU will read it."""
    return fill_store(tuple(x0.shape), [(slice(0, x0.shape[0]), x0)], location)


def fill_store(shape: tuple, blocks, location: torch.device) -> ImageStore:
    """A store of `shape` at `location` filled from blocks ((slice, canvases) pairs covering it) one at a
    time: no whole-set temporary beside the store (at 10^6 images that copy is gigabytes). Host memory is
    pinned when a GPU will read it."""
    pin = location.type == "cpu" and torch.cuda.is_available()
    x, m, v = (torch.zeros(shape, dtype=torch.float32, device=location, pin_memory=pin) for _ in range(3))
    filled = 0
    for sl, block in blocks:
        x[sl].copy_(block)
        filled += sl.stop - sl.start
    if filled != shape[0]:
        raise ValueError(f"fill_store: blocks cover {filled} of {shape[0]} images")
    return ImageStore(x, m, v)


# "auto" keeps the set (images + 2 moments) where it takes at most this share of the free memory
AUTO_SHARE = 0.5


def free_host_bytes() -> float:
    """MemAvailable (Linux), else the free physical pages, else inf where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such sysconf name (macOS)
        return math.inf


def choose_store(nbytes: int, device: torch.device, free_device: int | None = None,
                 free_host: int | None = None) -> tuple[str, str]:
    """(store, reason) for store="auto": the device when the set fits in AUTO_SHARE of its free memory
    (CUDA), else the host when it fits there, else disk. nbytes: images + both moments."""
    gib = 2.0 ** 30
    if device.type == "cuda":
        free_device = torch.cuda.mem_get_info(device)[0] if free_device is None else free_device
        if nbytes <= AUTO_SHARE * free_device:
            return "device", (f"images + moments {nbytes / gib:.2f} GiB <= {AUTO_SHARE:g} x "
                              f"{free_device / gib:.2f} GiB free on {device}")
    free_host = free_host_bytes() if free_host is None else free_host
    if nbytes <= AUTO_SHARE * free_host:
        where = "" if device.type == "cuda" else " (the compute device)"
        return "host", (f"images + moments {nbytes / gib:.2f} GiB <= {AUTO_SHARE:g} x {free_host / gib:.2f} GiB "
                        f"free host memory{where}")
    return "disk", (f"images + moments {nbytes / gib:.2f} GiB > {AUTO_SHARE:g} x {free_host / gib:.2f} GiB free "
                    "host memory")
