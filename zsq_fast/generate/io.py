"""save_images / load_images: a tensor file (.pt) or a folder of PNGs, both directions.

Images are in the model's normalized input space; PNGs hold the 8-bit pixels
x_png = round(255 * (x * std + mean)), so a PNG round trip is exact up to 1/255 pixel steps.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..models.zoo import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)


def _stats(mean, std, c: int):
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if m.shape[1] != c or s.shape[1] != c:
        raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} entries, images have {c} channels")
    if (s <= 0).any():
        raise ValueError(f"std must be positive, got {std}")
    return m, s


def _is_tensor_file(path: Path) -> bool:
    return path.suffix in (".pt", ".pth")


def save_images(images: torch.Tensor, path: str | os.PathLike, *, labels: torch.Tensor | None = None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """Write images (N, C, H, W, normalized) to `path`: a .pt/.pth file (tensors: images, labels,
    mean, std) or else a folder of 00000.png ... (plus labels.txt when labels are given)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if labels is not None and torch.as_tensor(labels).numel() != images.shape[0]:
        raise ValueError(f"{torch.as_tensor(labels).numel()} labels for {images.shape[0]} images")
    path = Path(path)
    images = images.detach().float().cpu()
    if _is_tensor_file(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"images": images, "mean": torch.tensor(mean), "std": torch.tensor(std)}
        if labels is not None:
            data["labels"] = torch.as_tensor(labels).long().cpu()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
        return path
    from PIL import Image

    if images.shape[1] not in (1, 3):
        raise ValueError(f"PNG folders hold 1- or 3-channel images, got {images.shape[1]} channels")
    m, s = _stats(mean, std, images.shape[1])
    pixels = ((images * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    if path.is_dir() and any(p.suffix.lower() == ".png" for p in path.iterdir()):
        raise ValueError(f"{path} already holds PNG files; save into an empty or new folder")
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(pixels):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path / f"{i:05d}.png")
    if labels is not None:
        (path / "labels.txt").write_text("\n".join(str(int(v)) for v in torch.as_tensor(labels).tolist()) + "\n")
    return path


def load_images(path: str | os.PathLike, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, with_labels: bool = False):
    """Read what save_images wrote: images (N, C, H, W) normalized with mean/std (a .pt file keeps
    its own); with_labels=True returns (images, labels or None). A generate run folder (store="disk")
    gives its output images memory-mapped (read lazily; the run's own normalization)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no images at {path}")
    if path.is_dir() and (path / "run.json").exists():
        from .run_folder import open_output

        images = open_output(path)
        return (images, None) if with_labels else images
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, torch.Tensor):
            data = {"images": data}
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{path} holds no 'images' tensor")
        images, labels = data["images"], data.get("labels")
    else:
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"no .png files in {path}")
        arrays = [np.asarray(Image.open(f)) for f in files]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"PNG images in {path} differ in size: {sorted(shapes)}")
        arr = np.stack(arrays)
        if arr.ndim == 3:
            arr = arr[..., None]
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        m, s = _stats(mean, std, x.shape[1])
        images = (x - m) / s
        lab_file = path / "labels.txt"
        labels = None
        if lab_file.exists():
            labels = torch.tensor([int(t) for t in lab_file.read_text().split()], dtype=torch.long)
    return (images, labels) if with_labels else images
