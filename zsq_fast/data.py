"""Image sets for calibration and evaluation: .npz, ImageFolder trees, PNG folders, tensor files.

Everything becomes an `ImageSet`: N images, optional integer labels, and `batches()` that yields
float (B, 3, S, S) tensors already normalized with the model's mean/std. Folders are read lazily,
batch by batch, so an ImageNet-sized folder never sits in memory as floats.

  .npz        `x` uint8 (N, H, W, C) with C in {1, 3} (or (N, H, W) gray), optional `y` int labels
  folder/     with labels.csv: columns `file` and `class_index` (or `label`); files relative to the folder
              or to its images/ sub-folder (the layout of ../shared/data/imagenet_sample)
              class sub-folders of images (torchvision ImageFolder layout; labels = sorted folder index, or
              the folder's line in a classes.txt / wnids.txt beside them, line k = class k: an ImageNet
              subset keeps the standard indices)
              or a flat folder of images (no labels; e.g. PNGs written by `zsq-fast generate`; a
              labels.txt/labels.json beside them, one int per image in sorted-name order, adds labels)
  .pt/.pth    a float tensor (N, 3, H, W) already in normalized input space (zsq_fast.save_images)
  shards/     manifest.json + one .pt file or PNG folder per rank (`zsq-fast generate` under torchrun): one
              set, the shards in global order

Images not already size x size get the standard evaluation geometry: the short side resized to
size / crop_pct (0.875: 256 for 224), antialiased, then a centre crop (crop_mode "squash": both sides to
size / crop_pct). `interpolation` and `crop_pct` are the model's (LoadedModel.preprocessing()).
`classes` keeps the images of some class indices only (see parse_classes), before `limit`.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FileFormatError, InvalidArgumentError, InvalidTypeError, MissingFileError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    n: int
    labels: torch.Tensor | None  # int64 (N,) or None
    source: str
    # (indices) -> float (B, 3, S, S) normalized; indices are a 1-D int64 tensor
    read: Callable[[torch.Tensor], torch.Tensor]

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for start in range(0, self.n, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.n))
            yield self.read(idx), (None if self.labels is None else self.labels[idx])

    def take(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.read(idx), (None if self.labels is None else self.labels[idx])

    # map-style Dataset faces: quantize reads a set too large to hold through them, a batch at a time
    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read(torch.tensor([int(i)]))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return list(self.read(torch.as_tensor(indices, dtype=torch.int64)))

    def subset(self, indices: Sequence[int] | torch.Tensor, source: str | None = None) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageSet(len(idx), None if self.labels is None else self.labels[idx],
                        source or f"{self.source}[{len(idx)} selected]", lambda i: self.read(idx[i]))

    def select_classes(self, classes) -> "ImageSet":
        """The images whose label parse_classes(classes) keeps (a spec string, indices, or a predicate)."""
        keep, text = parse_classes(classes)
        if self.labels is None:
            raise InvalidArgumentError(f"{self.source} has no labels: cannot select classes {text}")
        idx = torch.tensor([i for i, c in enumerate(self.labels.tolist()) if keep(c)], dtype=torch.int64)
        if len(idx) == 0:
            raise InvalidArgumentError(f"no image of {self.source} is in classes {text}")
        return self.subset(idx, f"{self.source}, classes {text} ({len(idx)} images)")

    def settings(self) -> dict:
        return {"source": self.source, "n": self.n, "labels": self.labels is not None}


_CLASS_TERM = re.compile(r"^(?:(\d+)|(\d+)-(\d+)|%(\d+)(!?=)(\d+))$")


def parse_classes(classes) -> tuple[Callable[[int], bool], str]:
    """(predicate on a class index, its description) from a spec string, an iterable of indices, or a
    predicate. A spec is comma-separated terms, a class is kept when any term matches it:
    `7` (index 7), `10-19` (inclusive range), `%4=0` (index divisible by 4), `%4!=0` (the others)."""
    if callable(classes):
        return classes, getattr(classes, "__name__", "predicate")
    if isinstance(classes, str):
        tests = []
        for term in classes.replace(" ", "").split(","):
            m = _CLASS_TERM.match(term)
            if not m or (m.group(4) is not None and int(m.group(4)) == 0):
                raise InvalidArgumentError(f"bad class selection {term!r} in {classes!r}: use indices (7), ranges "
                                           "(10-19) or index modulo (%4=0, %4!=0), comma-separated")
            one, lo, hi, k, op, r = m.groups()
            if one is not None:
                tests.append(lambda c, v=int(one): c == v)
            elif lo is not None:
                tests.append(lambda c, a=int(lo), b=int(hi): a <= c <= b)
            else:
                tests.append(lambda c, k=int(k), r=int(r), eq=op == "=": (c % k == r) == eq)
        return (lambda c: any(t(c) for t in tests)), classes
    try:
        chosen = {int(c) for c in classes}
    except (TypeError, ValueError):
        raise InvalidTypeError(f"classes must be a spec string ('%4=0'), class indices or a predicate, got "
                               f"{type(classes).__name__}") from None
    text = ",".join(str(c) for c in sorted(chosen)[:8]) + (",..." if len(chosen) > 8 else "")
    return chosen.__contains__, text


@dataclass(frozen=True)
class Geometry:
    """How an image of another size becomes size x size (see the module docstring)."""
    size: int
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        if self.size < 1:
            raise InvalidArgumentError(f"input size must be positive, got {self.size}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise InvalidArgumentError(f"interpolation must be bilinear, bicubic or nearest, got "
                                       f"{self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise InvalidArgumentError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in ("center", "squash"):
            raise InvalidArgumentError(f"crop_mode must be center or squash, got {self.crop_mode!r}")


def load_images_for(path: str, mean: Sequence[float], std: Sequence[float], size: int,
                    limit: int | None = None, *, crop_pct: float = 0.875, interpolation: str = "bilinear",
                    crop_mode: str = "center", classes=None) -> ImageSet:
    """Read `path` (see module docstring) for a model with input normalization mean/std and size;
    `load_images_for(path, **loaded_model.preprocessing())` takes all of them from a LoadedModel."""
    geo = Geometry(int(size), float(crop_pct), interpolation, crop_mode)
    if not os.path.exists(path):
        raise MissingFileError(f"data not found: {path}")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        data = _shards(path, mean, std, geo)
    elif os.path.isdir(path):
        data = _folder(path, mean, std, geo)
    elif path.endswith(".npz"):
        data = _npz(path, mean, std, geo)
    elif path.endswith((".pt", ".pth")):
        data = _tensor_file(path, mean, std, geo)
    elif path.lower().endswith(IMAGE_EXTS):
        raise InvalidArgumentError(f"{path} is a single image; pass the folder that holds the images")
    else:
        raise InvalidArgumentError(f"unsupported data file {path}: use .npz (x uint8 NHWC, y), an image folder, "
                                   "or a .pt tensor written by zsq-fast generate")
    if classes is not None:
        data = data.select_classes(classes)
    if limit is not None and limit < data.n:
        data = data.subset(torch.arange(limit), f"{data.source}[:{limit}]")
    return data


def from_uint8(x: np.ndarray | torch.Tensor, y, mean, std, size: int | Geometry, source: str) -> ImageSet:
    """In-memory uint8 images (N, H, W, C) or (N, H, W) -> ImageSet (kept uint8 until a batch is read)."""
    x = torch.as_tensor(np.asarray(x))
    if x.dtype != torch.uint8:
        raise InvalidArgumentError(f"{source}: images must be uint8 in 0..255, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise InvalidArgumentError(f"{source}: images must be (N, H, W, C) with C in (1, 3) (NHWC), got "
                                   f"{tuple(x.shape)}")
    labels = _labels(y, x.shape[0], source)
    x = x.permute(0, 3, 1, 2)  # a view; made contiguous per batch
    m, s = _norm_tensors(mean, std)
    return ImageSet(x.shape[0], labels, source, lambda idx: _normalize(x[idx], m, s, size))


def _npz(path: str, mean, std, size: Geometry) -> ImageSet:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise FileFormatError(f"{path} is a single .npy array, not an .npz archive with x (and y)")
        with z:
            if "x" not in z.files:
                raise FileFormatError(f"{path} has no array 'x' (found: {', '.join(z.files) or 'nothing'}); "
                                      "expected x uint8 (N, H, W, C) and optional y")
            x = z["x"]  # arrays are read (and CRC-checked) here, lazily
            y = z["y"] if "y" in z.files else None
    except FileFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/npy errors of every kind: truncated or corrupted
        raise FileFormatError(f"cannot read {path} as .npz: truncated or corrupted ({type(e).__name__})") from None
    return from_uint8(x, y, mean, std, size, os.path.basename(path))


def _labels(y, n: int, source: str) -> torch.Tensor | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError(f"{source}: labels y must be {n} integers, got {y.dtype} {y.shape}")
    return torch.as_tensor(y.astype(np.int64))


def _norm_tensors(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32).view(1, -1, 1, 1)
    if m.numel() != 3 or s.numel() != 3:
        raise InvalidArgumentError("mean and std need 3 values (RGB)")
    return m, s


def _normalize(x_u8: torch.Tensor, m: torch.Tensor, s: torch.Tensor, size: int | Geometry) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float normalized (B, 3, size, size); gray is replicated to RGB."""
    x = x_u8.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = resize_center(x, size)
    return (x - m) / s


def resize_center(x: torch.Tensor, size: int | Geometry) -> torch.Tensor:
    """Standard evaluation geometry (timm's and torchvision's eval transform): images of the right size
    pass; others get the short side resized to size / crop_pct (antialiased when shrinking) and a centre
    crop, or with crop_mode "squash" both sides resized to size / crop_pct before the crop."""
    geo = size if isinstance(size, Geometry) else Geometry(int(size))
    size = geo.size
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x.contiguous()
    # floor, as timm's transforms_factory and torchvision's 256 for 224
    short = max(size, int(size / geo.crop_pct))
    if geo.crop_mode == "squash":
        nh = nw = short
    else:
        # truncated long side and rounded crop offset, as torchvision's Resize and CenterCrop
        nh, nw = (short, max(short, int(w * short / h))) if h <= w else (max(short, int(h * short / w)), short)
    kw = {} if geo.interpolation == "nearest" else {"align_corners": False, "antialias": nh < h or nw < w}
    x = F.interpolate(x, size=(nh, nw), mode=geo.interpolation, **kw)
    if geo.interpolation == "bicubic":  # its overshoot leaves [0, 1]; PIL's uint8 result is clipped alike
        x = x.clamp_(0.0, 1.0)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return x[..., top:top + size, left:left + size].contiguous()


def _folder(path: str, mean, std, size: Geometry) -> ImageSet:
    entries = sorted(os.listdir(path))
    classes = [d for d in entries if os.path.isdir(os.path.join(path, d))]
    files = [f for f in entries if f.lower().endswith(IMAGE_EXTS)]
    if "labels.csv" in entries:
        items, y = _labels_csv(path)
        source = f"labelled folder {path}"
    elif classes and not files:  # ImageFolder layout
        index = _class_index(path, classes)
        items, labels = [], []
        for d in classes:
            for f in sorted(os.listdir(os.path.join(path, d))):
                if f.lower().endswith(IMAGE_EXTS):
                    items.append(os.path.join(path, d, f))
                    labels.append(index[d])
        y = torch.tensor(labels, dtype=torch.int64)
        source = f"ImageFolder {path} ({len(classes)} classes)"
    else:
        items = [os.path.join(path, f) for f in files]
        y = _sidecar_labels(path, len(items))
        source = f"image folder {path}"
    if not items:
        raise InvalidArgumentError(f"no images ({', '.join(IMAGE_EXTS)}) in {path}")
    m, s = _norm_tensors(mean, std)
    return ImageSet(len(items), y, source, lambda idx: torch.cat([
        _normalize(_read_image(items[i]), m, s, size) for i in idx.tolist()]))


def _labels_csv(path: str) -> tuple[list[str], torch.Tensor]:
    """Files and labels from path/labels.csv (header `file` and `class_index` or `label`)."""
    csv_path = os.path.join(path, "labels.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        label_col = next((c for c in ("class_index", "label") if c in cols), None)
        if "file" not in cols or label_col is None:
            raise FileFormatError(f"{csv_path} needs a header with columns file and class_index (or label); "
                                  f"found: {', '.join(cols) or 'nothing'}")
        rows = list(reader)
    if not rows:
        raise FileFormatError(f"{csv_path} lists no images")
    files, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            labels.append(int(row[label_col]))
        except (TypeError, ValueError):
            raise FileFormatError(f"{csv_path} line {line}: {label_col} must be an integer, got "
                                  f"{row[label_col]!r}") from None
        if labels[-1] < 0:
            raise FileFormatError(f"{csv_path} line {line}: {label_col} must be >= 0, got {labels[-1]}")
        files.append(row["file"] or "")
    # names relative to the folder, or to its images/ sub-folder (the shared ImageNet sample's layout)
    base = next((b for b in (path, os.path.join(path, "images")) if os.path.isfile(os.path.join(b, files[0]))), path)
    items = [os.path.join(base, f) for f in files]
    missing = [f for f, p in zip(files, items) if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f"{len(missing)} of the {len(files)} images {csv_path} lists are not in {base} "
                               f"(first: {missing[0]!r})")
    return items, torch.tensor(labels, dtype=torch.int64)


def _class_index(path: str, classes: list[str]) -> dict[str, int]:
    """ImageFolder labels: a class list beside the folders (line k = class k) fixes the indices, so a
    folder of some ImageNet classes keeps their standard indices; without one, sorted folder order."""
    for name in ("classes.txt", "wnids.txt"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                order = {c: k for k, c in enumerate(line.strip() for line in f) if c}
            unknown = [c for c in classes if c not in order]
            if unknown:
                raise FileFormatError(f"{len(unknown)} class folders of {path} are not in {name} "
                                      f"(first: {unknown[0]!r})")
            return order
    return {c: k for k, c in enumerate(classes)}


def _sidecar_labels(path: str, n: int) -> torch.Tensor | None:
    for name in ("labels.json", "labels.txt"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            with open(p) as f:
                y = json.load(f) if name.endswith(".json") else [int(t) for t in f.read().split()]
            if isinstance(y, dict):
                y = y.get("labels")
            return _labels(y, n, p)
    return None


def _read_image(path: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise FileFormatError(f"cannot read image {path} ({type(e).__name__})") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).unsqueeze(0)


def _tensor_file(path: str, mean, std, size: Geometry) -> ImageSet:
    size = size.size  # already model input: only checked, never resized
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FileFormatError(f"cannot read {path} as a tensor file ({type(e).__name__})") from None
    labels = None
    if isinstance(obj, dict):  # {"images": T, "labels": T} style
        x = obj.get("images", obj.get("x"))
        labels = obj.get("labels", obj.get("y"))
    else:
        x = obj
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise InvalidArgumentError(f"{path}: expected a float tensor (N, 3, H, W) in normalized input space")
    if x.shape[-1] != size or x.shape[-2] != size:
        raise InvalidArgumentError(f"{path}: images are {x.shape[-2]}x{x.shape[-1]}, the model takes {size}x{size}")
    x = x.float()
    saved = (obj.get("mean"), obj.get("std")) if isinstance(obj, dict) else (None, None)
    if saved[0] is not None and saved[1] is not None:  # saved under another normalization: re-normalize
        m0, s0 = _norm_tensors(torch.as_tensor(saved[0]).tolist(), torch.as_tensor(saved[1]).tolist())
        m, s = _norm_tensors(mean, std)
        if not (torch.allclose(m0, m) and torch.allclose(s0, s)):
            x = (x * s0 + m0 - m) / s
    y = None if labels is None else _labels(labels.numpy() if isinstance(labels, torch.Tensor) else labels,
                                            x.shape[0], path)
    return ImageSet(x.shape[0], y, f"tensor file {path}", lambda idx: x[idx])


def to_uint8_hwc(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized float (N, 3, H, W) -> uint8 (N, H, W, 3) for viewing (inverse of the normalization)."""
    m, s = _norm_tensors(mean, std)
    p = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return (p * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def one_per_class(labels: torch.Tensor, k: int = 1, seed: int = 0) -> torch.Tensor:
    """Indices of k seeded-random examples of every class present (e.g. FDDA's class centers)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out)


def random_subset(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    if n > n_total:
        raise InvalidArgumentError(f"asked for {n} images but the data has {n_total}")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _shards(path: str, mean, std, size: Geometry) -> ImageSet:
    """The shards a multi-rank `generate` wrote (manifest.json) as one lazily read set, in global order."""
    from .generate.sharded_run import load_shards

    rows, parts = load_shards(path, lambda p: load_images_for(str(p), mean, std, size.size, crop_pct=size.crop_pct,
                                                              interpolation=size.interpolation,
                                                              crop_mode=size.crop_mode), lambda part: part.n)
    starts = torch.tensor([r["start"] for r in rows])
    labels = [p.labels for p in parts]

    def read(idx: torch.Tensor) -> torch.Tensor:
        which = torch.searchsorted(starts, idx, right=True) - 1
        pieces = [(which == k, parts[k].read(idx[which == k] - starts[k])) for k in which.unique().tolist()]
        out = pieces[0][1].new_empty(len(idx), *pieces[0][1].shape[1:])
        for mask, x in pieces:
            out[mask] = x
        return out

    return ImageSet(rows[-1]["stop"], torch.cat(labels) if all(y is not None for y in labels) else None,
                    f"{len(rows)} shards in {path}", read)
