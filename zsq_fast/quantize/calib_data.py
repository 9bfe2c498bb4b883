"""Calibration images as quantize() reads them: by contiguous batch (observers) or by index (reconstruction).

Sources: a tensor (N, C, H, W) (in memory or memory-mapped, e.g. zsq_fast.load_images of a disk run folder),
a numpy array (np.memmap too), a list of batches, a map-style Dataset whose items are an image or
(image, label, ...), or a DataLoader over such a Dataset (its dataset is read in our own order; its
sampler, batch size and collate_fn are not used, so the result does not depend on them).
A lazy source (Dataset, DataLoader, a file-backed tensor) is never read whole: each request fetches
only the images it names, and its checks (float, finite, one shape) run on what was fetched, naming
the indices. An in-memory tensor or list is checked once, up front, as before.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .. import distributed
from ..errors import InvalidArgumentError, InvalidTypeError, NonFiniteError, ShapeMismatchError
from ..validate import check_finite_images


def _file_backed(t: torch.Tensor) -> bool:
    """True when t's memory is a mapping of a file (torch.from_file, np.memmap): reading it whole would
    page the file in. Linux only (/proc/self/maps); elsewhere False."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    ptr = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= ptr < hi:
                    return len(parts) >= 6 and parts[5].startswith("/") and not parts[5].startswith("/dev/")
    except OSError:
        return False
    return False


def _item_image(item, index: int, name: str) -> torch.Tensor:
    if isinstance(item, (tuple, list)) and item:
        item = item[0]  # (image, label, ...)
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise InvalidTypeError(f"{name}[{index}] must be an image tensor (C, H, W) or (image, label), "
                               f"got {type(item).__name__}")
    return item


class CalibData:
    """N calibration images of one shape, read per batch; see the module docstring."""

    def __init__(self, source, name: str = "calib_images", allow_empty: bool = False):
        self.name = name
        self.dataset = None
        self.tensor: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None  # cast per batch (the model's dtype), set by the caller
        if isinstance(source, DataLoader):
            source = source.dataset
            if isinstance(source, IterableDataset):
                raise InvalidTypeError(f"{name}: a DataLoader over an IterableDataset has no random access; "
                                       "reconstruction samples images by index: pass a map-style Dataset")
        if isinstance(source, IterableDataset):
            raise InvalidTypeError(f"{name}: an IterableDataset has no random access; reconstruction samples "
                                   "images by index: pass a map-style Dataset (with __len__ and __getitem__)")
        if isinstance(source, np.ndarray):
            with warnings.catch_warnings():  # a read-only memmap: we never write to it
                warnings.simplefilter("ignore", UserWarning)
                source = torch.from_numpy(source)  # shares memory: an np.memmap stays lazy
        if isinstance(source, (list, tuple)):
            source = self._concat(source, allow_empty)
        if isinstance(source, torch.Tensor):
            self._init_tensor(source, allow_empty)
        elif isinstance(source, Dataset) or (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            self._init_dataset(source, allow_empty)
        else:
            raise InvalidTypeError(f"{name} must be a tensor (N, C, H, W), a list of such batches, a numpy array, "
                                   f"a map-style Dataset or a DataLoader, got {type(source).__name__}")

    # ------------------------------------------------------------ construction
    def _concat(self, batches, allow_empty: bool) -> torch.Tensor:
        if len(batches) == 0:
            if allow_empty:
                return torch.empty(0, 0)
            raise InvalidArgumentError(f"{self.name} is empty: quantize needs at least one calibration image")
        try:
            return torch.cat([torch.as_tensor(t) for t in batches])
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidTypeError(f"{self.name} as a list must hold (B, C, H, W) tensors of one shape "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

    def _init_tensor(self, t: torch.Tensor, allow_empty: bool) -> None:
        self.lazy = _file_backed(t)
        if t.dim() < 2 or (t.shape[0] == 0 and not allow_empty):
            raise InvalidArgumentError(f"{self.name} is empty (shape {tuple(t.shape)}): "
                                       "quantize needs at least one calibration image")
        if not t.is_floating_point():
            raise InvalidTypeError(f"{self.name} must be float, already preprocessed as the model expects "
                                   f"(got dtype {t.dtype})")
        if not self.lazy:
            check_finite_images(t, self.name)
        self.tensor, self.n, self.image_shape = t, t.shape[0], tuple(t.shape[1:])

    def _init_dataset(self, ds, allow_empty: bool) -> None:
        self.lazy = True
        try:
            self.n = len(ds)
        except TypeError:
            raise InvalidTypeError(f"{self.name}: the dataset has no length; pass a map-style Dataset") from None
        if self.n == 0 and not allow_empty:
            raise InvalidArgumentError(f"{self.name} is empty (a dataset of length 0): quantize needs at least one "
                                       "calibration image")
        self.dataset = ds
        self.image_shape = tuple(self._item(0).shape) if self.n else ()

    # ------------------------------------------------------------ reading
    def _item(self, i: int) -> torch.Tensor:
        x = _item_image(self.dataset[i], i, self.name)
        if not x.is_floating_point():
            raise InvalidTypeError(f"{self.name}[{i}] must be float, already preprocessed as the model expects "
                                   f"(got dtype {x.dtype})")
        return x

    def _checked(self, x: torch.Tensor, indices: list[int] | range) -> torch.Tensor:
        """A fetched lazy batch, checked: float, the set's image shape, finite (errors name the indices)."""
        if not isinstance(indices, range):
            indices = [int(i) for i in indices]
        where = (f"{self.name}[{indices.start}:{indices.stop}]" if isinstance(indices, range)
                 else f"{self.name} (images {indices[:4]}{'...' if len(indices) > 4 else ''})")
        if not x.is_floating_point():
            raise InvalidTypeError(f"{where} must be float, already preprocessed as the model expects "
                                   f"(got dtype {x.dtype})")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ShapeMismatchError(f"{where}: images of shape {tuple(x.shape[1:])}, but the set's first image "
                                     f"has {self.image_shape}")
        if isinstance(indices, range):
            check_finite_images(x, where, first_index=indices.start)
        elif x.numel() and not bool(torch.isfinite(x).all()):
            bad = torch.nonzero(~torch.isfinite(x).reshape(x.shape[0], -1).all(1)).flatten().tolist()
            raise NonFiniteError(f"{self.name} holds non-finite values (NaN/inf) in images (indices "
                                 f"{sorted({indices[i] for i in bad})[:8]}); pass finite, preprocessed images")
        return x if self.dtype is None else x.to(self.dtype)

    def _fetch(self, indices) -> torch.Tensor:
        if self.tensor is not None:
            t = self.tensor
            x = t[indices.start:indices.stop] if isinstance(indices, range) else t[torch.as_tensor(indices)]
            if not self.lazy:
                return x if self.dtype is None else x.to(self.dtype)
            return self._checked(x, indices)
        many = getattr(self.dataset, "__getitems__", None)  # PyTorch's batched-fetch protocol, when offered
        if many is not None and len(indices) > 1:
            items = [_item_image(it, i, self.name) for it, i in zip(many(list(indices)), indices)]
        else:
            items = [self._item(i) for i in indices]
        try:
            x = torch.stack(items)
        except RuntimeError:
            shapes = sorted({tuple(i.shape) for i in items})
            raise ShapeMismatchError(f"{self.name}: images of different shapes {shapes[:3]} among items "
                                     f"{list(indices)[:8]}; every calibration image must have one shape") from None
        return self._checked(x, indices)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Images start..stop-1 (a view of an in-memory tensor; fetched from a lazy source)."""
        return self._fetch(range(start, min(stop, self.n)))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Images at the positions idx (a CPU LongTensor), in that order."""
        return self._fetch(idx.tolist() if self.tensor is None else idx)

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first index, images) over the whole set in order, batch_size at a time."""
        for i in range(0, self.n, batch_size):
            yield i, self.rows(i, i + batch_size)

    def describe(self) -> str:
        kind = "dataset" if self.dataset is not None else ("memory-mapped tensor" if self.lazy else "tensor")
        return f"{kind} of {self.n} images {self.image_shape}"


@dataclass(frozen=True)
class Layout:
    """Where this rank's images sit in the whole calibration set: ranks hold contiguous shards in rank
    order, so global index = start + local index (a single process: start 0, total n)."""
    total: int
    start: int
    counts: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + self.counts[distributed.rank()]

    def local(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in idx, local indices) of the global indices idx that this rank holds."""
        pos = torch.nonzero((idx >= self.start) & (idx < self.stop)).flatten()
        return pos, idx[pos] - self.start


def layout_of(n_local: int) -> Layout:
    """Every rank's count (one all-reduce) -> the global layout; InvalidArgumentError on every rank if one
    holds no image (each rank must run the model for the collectives to line up)."""
    counts = torch.zeros(distributed.world_size(), dtype=torch.int64, device=distributed.collective_device())
    counts[distributed.rank()] = n_local
    distributed.all_reduce_sum_(counts, "the calibration shards' sizes")
    counts_t = tuple(int(c) for c in counts)
    empty = [r for r, c in enumerate(counts_t) if c == 0]
    if empty:
        raise InvalidArgumentError(f"calib_images: rank(s) {empty} of {len(counts_t)} hold no calibration image "
                                   f"(shard sizes {list(counts_t)}); give every rank at least one")
    r = distributed.rank()
    return Layout(sum(counts_t), sum(counts_t[:r]), counts_t)
