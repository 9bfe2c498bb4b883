"""A PNG sheet: rows of synthetic images beside rows of real ones, each tile scaled up for viewing."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, cols: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 (rows*(H*scale+pad)+pad, ...) mosaic on a white background."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    th, tw = h * scale, w * scale
    sheet = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = images[i].repeat(scale, 0).repeat(scale, 1)  # nearest-neighbour: keep pixels visible
        sheet[pad + r * (th + pad):pad + r * (th + pad) + th, pad + c * (tw + pad):pad + c * (tw + pad) + tw] = tile
    return sheet


def save_comparison(panels: list[tuple[str, np.ndarray]], path: str, cols: int = 8, scale: int = 4) -> str:
    """Stack labelled grids (title, uint8 NHWC images) vertically and write a PNG."""
    sheets = [(title, image_grid(imgs, cols, scale)) for title, imgs in panels]
    width = max(s.shape[1] for _, s in sheets)
    title_h = 16
    height = sum(s.shape[0] + title_h for _, s in sheets)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, s in sheets:
        draw.text((4, y + 2), title, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(s), (0, y + title_h))
        y += s.shape[0] + title_h
    canvas.save(path)
    return path
