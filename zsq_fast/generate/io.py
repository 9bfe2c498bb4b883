"""save_images / load_images: a tensor file (.pt) or a folder of PNGs, both directions.

Images are in the model's normalized input space; PNGs hold the 8-bit pixels
x_png = round(255 * (x * std + mean)), so a PNG round trip is exact up to 1/255 pixel steps.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import FileFormatError, InvalidArgumentError, InvalidTypeError
from ..fileio import as_path, load_torch_file, write_atomic, write_folder_atomic
from ..models.zoo import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)
from ..validate import check_finite_images


def _stats(mean, std, c: int | None):
    try:
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidTypeError(f"mean and std must be sequences of numbers, got {mean!r:.80}, {std!r:.80}") from None
    if c is not None and (m.shape[1] != c or s.shape[1] != c):
        raise InvalidArgumentError(f"mean/std have {m.shape[1]}/{s.shape[1]} entries, images have {c} channels")
    if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(s).all()) and bool((s > 0).all())):
        raise InvalidArgumentError(f"mean must be finite and std positive, got {mean!r:.80}, {std!r:.80}")
    return m, s


def _is_tensor_file(path: Path) -> bool:
    return path.suffix in (".pt", ".pth")


def _check_images(images, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a (N, C, H, W) float tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0 or images.numel() == 0:
        raise InvalidArgumentError(f"{name} must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InvalidTypeError(f"{name} must be float (normalized input space), got dtype {images.dtype}")
    check_finite_images(images, name)


def _check_labels(labels, n: int, source: str) -> torch.Tensor | None:
    if labels is None:
        return None
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidTypeError(f"{source}: labels must be {n} integers, got {type(labels).__name__}") from None
    if y.dim() != 1 or y.numel() != n or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InvalidArgumentError(f"{source}: labels must be {n} integers (one per image), got {y.dtype} "
                                   f"{tuple(y.shape)}")
    return y.long().cpu()


def save_images(images: torch.Tensor, path: str | os.PathLike, *, labels: torch.Tensor | None = None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """Write images (N, C, H, W, normalized) to `path`: a .pt/.pth file (tensors: images, labels,
    mean, std) or else a folder of 00000.png ... (plus labels.txt when labels are given). Written
    atomically: on any failure nothing is left at `path`."""
    _check_images(images)
    labels = _check_labels(labels, images.shape[0], "save_images")
    path = as_path(path, "save_images path")
    images = images.detach().float().cpu()
    if _is_tensor_file(path):
        m, s = _stats(mean, std, None)
        data = {"images": images, "mean": m.flatten(), "std": s.flatten()}
        if labels is not None:
            data["labels"] = labels
        return write_atomic(path, lambda tmp: torch.save(data, tmp), "images file")
    from PIL import Image

    if images.shape[1] not in (1, 3):
        raise InvalidArgumentError(f"PNG folders hold 1- or 3-channel images, got {images.shape[1]} channels")
    m, s = _stats(mean, std, images.shape[1])
    pixels = ((images * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    if path.is_dir() and any(p.suffix.lower() == ".png" for p in path.iterdir()):
        raise InvalidArgumentError(f"{path} already holds PNG files; save into an empty or new folder")

    def write(folder: Path) -> None:
        for i, img in enumerate(pixels):
            arr = img.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:05d}.png")
        if labels is not None:
            (folder / "labels.txt").write_text("\n".join(str(int(v)) for v in labels.tolist()) + "\n")

    return write_folder_atomic(path, write, "PNG folder")


def _read_png(f: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(f) as im:
            if im.mode not in ("L", "RGB"):
                raise FileFormatError(f"{str(f)!r} is a {im.mode} image; save_images writes 8-bit gray or RGB PNGs")
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data
        if isinstance(e, FileFormatError):
            raise
        raise FileFormatError(f"{str(f)!r} is not a readable PNG (truncated or corrupted: "
                              f"{' '.join(str(e).split())[:120]})") from None


def load_images(path: str | os.PathLike, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, with_labels: bool = False):
    """Read what save_images wrote: images (N, C, H, W) normalized with mean/std (a .pt file keeps
    its own); with_labels=True returns (images, labels or None). A generate run folder (store="disk")
    gives its output images memory-mapped (read lazily; the run's own normalization). A folder written
    by several ranks (manifest.json: the CLI's output, or a sharded checkpoint folder of store="disk")
    gives the whole set, its shards concatenated in global order."""
    path = as_path(path, "load_images path")
    if not path.exists():
        raise InvalidArgumentError(f"no images at {path}")
    from .sharded_run import is_sharded, load_sharded

    if is_sharded(path):  # written by several ranks: every shard, in global order
        images, labels = load_sharded(path, lambda p: load_images(p, mean=mean, std=std, with_labels=True))
        return (images, labels) if with_labels else images
    if path.is_dir() and (path / "run.json").exists():
        from .run_folder import open_output

        images = open_output(path)
        return (images, None) if with_labels else images
    if path.is_file():
        data = load_torch_file(path, "zsq_fast images file (written by save_images)")
        if isinstance(data, torch.Tensor):
            data = {"images": data}
        if not isinstance(data, dict) or "images" not in data:
            raise FileFormatError(f"{path} holds no 'images' tensor")
        images = data["images"]
        try:
            _check_images(images, f"the images in {path}")
        except (InvalidTypeError, InvalidArgumentError) as e:
            raise FileFormatError(str(e)) from None
        labels = _check_labels(data.get("labels"), images.shape[0], str(path))
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise InvalidArgumentError(f"no .png files in {path}")
        arrays = [_read_png(f) for f in files]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise FileFormatError(f"PNG images in {path} differ in size: {sorted(shapes)}")
        arr = np.stack(arrays)
        if arr.ndim == 3:
            arr = arr[..., None]
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        m, s = _stats(mean, std, x.shape[1])
        images = (x - m) / s
        lab_file = path / "labels.txt"
        labels = None
        if lab_file.exists():
            try:
                labels = torch.tensor([int(t) for t in lab_file.read_text().split()], dtype=torch.long)
            except (ValueError, UnicodeDecodeError):
                raise FileFormatError(f"{lab_file} must hold one integer label per image") from None
            if labels.numel() != images.shape[0]:
                raise FileFormatError(f"{lab_file} has {labels.numel()} labels for {images.shape[0]} images")
    return (images, labels) if with_labels else images
