"""PNG pictures of a run, drawn with Pillow only (a dependency already), so a person can judge at a
glance whether it converged: generation loss curves with a grid of sample images, and the
reconstruction loss of every quantization unit."""
from __future__ import annotations

import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (20, 20, 20), (120, 120, 120), (228, 228, 228)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL = (420, 260)
MARGIN = (64, 34, 14, 40)  # left, top, right, bottom inside a panel


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def line_panel(series: dict[str, tuple[list, list]], title: str, *, log_y: bool = False,
               x_label: str = "step", note: str | None = None, legend: bool = True) -> Image.Image:
    """One chart: every series (xs, ys) as a line, y in log scale when asked (non-positive values are
    left out there), y range and x range written on the axes, a legend in the corner."""
    img = Image.new("RGB", PANEL, WHITE)
    d = ImageDraw.Draw(img)
    d.rectangle((1, 1, PANEL[0] - 2, PANEL[1] - 2), outline=LIGHT)  # keeps neighbouring panels apart
    font, small = _font(14), _font(11)
    d.text((MARGIN[0], 8), title, fill=BLACK, font=font)
    x0, y0, x1, y1 = MARGIN[0], MARGIN[1], PANEL[0] - MARGIN[2], PANEL[1] - MARGIN[3]
    d.rectangle((x0, y0, x1, y1), outline=GREY)
    pts = {k: [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))
               and (not log_y or float(y) > 0)] for k, (xs, ys) in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        d.text((x0 + 10, (y0 + y1) // 2), note or "nothing to plot", fill=GREY, font=font)
        return img
    xs = [p[0] for v in pts.values() for p in v]
    ys = [p[1] for v in pts.values() for p in v]
    tf = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    lo, hi = tf(min(ys)), tf(max(ys))
    if hi - lo < 1e-12:
        lo, hi = lo - (0.5 if log_y else max(abs(lo), 1.0) * 0.05), hi + (0.5 if log_y else max(abs(hi), 1.0) * 0.05)
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def to_px(x, y):
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (tf(y) - lo) / (hi - lo) * (y1 - y0))

    for frac in (0.25, 0.5, 0.75):  # light grid with its value
        yy = y1 - frac * (y1 - y0)
        d.line((x0, yy, x1, yy), fill=LIGHT)
        val = lo + frac * (hi - lo)
        d.text((4, yy - 6), _fmt(10 ** val if log_y else val), fill=GREY, font=small)
    d.text((4, y0 - 6), _fmt(10 ** hi if log_y else hi), fill=BLACK, font=small)
    d.text((4, y1 - 6), _fmt(10 ** lo if log_y else lo), fill=BLACK, font=small)
    d.text((x0, y1 + 4), _fmt(xlo), fill=BLACK, font=small)
    right = _fmt(xhi)
    d.text((x1 - d.textlength(right, font=small), y1 + 4), right, fill=BLACK, font=small)
    label = x_label + (" (log y)" if log_y else "")
    d.text(((x0 + x1) / 2 - d.textlength(label, font=small) / 2, y1 + 20), label, fill=GREY, font=small)
    for i, (name, p) in enumerate(pts.items()):
        px = [to_px(x, y) for x, y in p]
        color = COLORS[i % len(COLORS)]
        if len(px) == 1:
            d.ellipse((px[0][0] - 2, px[0][1] - 2, px[0][0] + 2, px[0][1] + 2), fill=color)
        else:
            d.line(px, fill=color, width=2)
    shown = list(pts)[:12]
    if legend and (len(shown) > 1 or note is None):  # legend on a white box, top right
        d.rectangle((x1 - 124, y0 + 2, x1 - 2, y0 + 6 + 14 * len(shown)), fill=WHITE, outline=LIGHT)
        for i, name in enumerate(shown):
            color = COLORS[i % len(COLORS)]
            ly = y0 + 4 + 14 * i
            d.line((x1 - 120, ly + 6, x1 - 104, ly + 6), fill=color, width=3)
            d.text((x1 - 100, ly), name[:16], fill=color, font=small)
    return img


def image_grid(images: torch.Tensor, mean, std, *, max_images: int = 64, cell: int = 64,
               labels: list | None = None) -> Image.Image:
    """Up to max_images images (N, C, H, W, normalized) in pixel space, upscaled to `cell` px, in rows of 8."""
    x = images[:max_images].detach().float().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    cols = min(8, pixels.shape[0])
    rows = math.ceil(pixels.shape[0] / cols)
    grid = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + 4) + 4), WHITE)
    d = ImageDraw.Draw(grid)
    small = _font(11)
    for i, p in enumerate(pixels):
        arr = p.permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
        tile = tile.resize((cell, cell), Image.NEAREST)
        pos = (4 + (i % cols) * (cell + 4), 4 + (i // cols) * (cell + 4))
        grid.paste(tile, pos)
        if labels is not None:
            text = str(labels[i])
            d.rectangle((pos[0], pos[1], pos[0] + 4 + d.textlength(text, font=small), pos[1] + 13), fill=BLACK)
            d.text((pos[0] + 2, pos[1] + 1), text, fill=(255, 255, 0), font=small)
    return grid


def _stack(rows: list[list[Image.Image]], title: str) -> Image.Image:
    widths = [sum(im.width for im in r) for r in rows]
    heights = [max(im.height for im in r) for r in rows]
    out = Image.new("RGB", (max(widths), sum(heights) + 28), WHITE)
    ImageDraw.Draw(out).text((8, 6), title, fill=BLACK, font=_font(15))
    y = 28
    for r, h in zip(rows, heights):
        x = 0
        for im in r:
            out.paste(im, (x, y))
            x += im.width
        y += h
    return out


def _series(history: list[dict], keys) -> dict[str, tuple[list, list]]:
    steps = [h["step"] for h in history]
    return {k: (steps, [h.get(k) for h in history]) for k in keys if any(k in h for h in history)}


def generation_figure(record: dict, images: torch.Tensor, mean, std, *, max_images: int = 64) -> Image.Image:
    """Loss curves of a generate run (L_BN per layer group, ODSL or the FDDA terms, lr) over a grid of
    sample images. record: GenerationRecord.to_dict()."""
    history = record.get("losses") or []
    s = record.get("settings", {})
    bn_keys = ["bn"] + sorted({k for h in history for k in h if k.startswith("bn_")},
                              key=["bn_input", "bn_early", "bn_mid", "bn_late"].index)
    method = s.get("method", "?")
    if method == "fdda":
        other = line_panel(_series(history, ["ce", "center", "distort"]), "FDDA terms (CE, L_C, L_D)", log_y=True)
    else:
        odsl = _series(history, ["odsl"])
        other = line_panel(odsl, "ODSL per image (lower = wider outputs)", note="ODSL off (odsl_weight 0)")
    charts = [line_panel(_series(history, bn_keys), "BN loss per layer group", log_y=True), other,
              line_panel(_series(history, ["lr"]), "learning rate", log_y=True)]
    labels = record.get("labels")
    grid = image_grid(images, mean, std, max_images=max_images,
                      labels=None if labels is None else list(labels)[:max_images])
    title = (f"generate {method}{' ' + s['aggregation'] if method == 'dgh' else ''}: {s.get('n_images')} images, "
             f"{record.get('steps_done')} steps; whole-set BN loss {_fmt(record.get('initial_bn_loss', float('nan')))}"
             f" -> {_fmt(record.get('final_bn_loss', float('nan')))}; first {min(max_images, images.shape[0])} images")
    return _stack([charts, [grid]], title)


def reconstruction_figure(units: list[dict], curves: dict[str, tuple[list, list]] | None = None,
                          title: str = "reconstruction") -> Image.Image:
    """Final reconstruction loss of every unit (in order) and, when given, each unit's loss curve over
    its iterations. units: quant_config['units'] ({name, kind, loss})."""
    order = [u["name"] for u in units]
    final = line_panel({"final loss": (list(range(len(units))), [u.get("loss") for u in units])},
                       "final reconstruction loss per unit", log_y=True, x_label="unit index (data-flow order)",
                       note="no reconstruction (method nearest)")
    charts = [final]
    if curves:
        named = {n: curves[n] for n in order if n in curves} or curves
        charts.append(line_panel(named, "loss during reconstruction (colours: key)", log_y=True,
                                 x_label="iteration", legend=False))
    # the key: unit index, name, kind and final loss, in the colour of its curve (two columns)
    per_col = 17
    key = Image.new("RGB", (PANEL[0] * (1 + (len(units) > per_col)), PANEL[1]), WHITE)
    d = ImageDraw.Draw(key)
    small = _font(11)
    for i, u in enumerate(units[:2 * per_col]):
        x, y = 10 + PANEL[0] * (i // per_col), 8 + 14 * (i % per_col)
        d.text((x, y), f"{i}: {u['name'][:30]} ({u.get('kind', '')}) {_fmt(u.get('loss') or 0)}",
               fill=COLORS[i % len(COLORS)], font=small)
    if len(units) > 2 * per_col:
        d.text((10, 8 + 14 * per_col), f"... {len(units) - 2 * per_col} more units", fill=GREY, font=small)
    return _stack([charts + [key]], title)


def save_png(image: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    image.save(path, format="PNG")
    return path


class UnitCurves:
    """A quantize progress callback that keeps each unit's (iteration, loss) points."""

    def __init__(self):
        self.curves: dict[str, tuple[list, list]] = {}
        self._start: dict[str, int] = {}

    def __call__(self, step: int, total: int, info=None) -> None:
        if not isinstance(info, dict) or "unit" not in info or "loss" not in info:
            return
        name = info["unit"]
        start = self._start.setdefault(name, step)
        xs, ys = self.curves.setdefault(name, ([], []))
        xs.append(step - start + 1)
        ys.append(float(info["loss"]))
