"""Explanation images (PNG, Pillow): heatmap blends and cell-box overlays."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from services.gateway.result import Cell

# One colour per taxonomy code (RBC grey); unknown codes fall back to white.
TYPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "BLA": (230, 25, 75),
    "PMO": (245, 130, 48),
    "MYB": (255, 225, 25),
    "MMZ": (210, 245, 60),
    "NGB": (60, 180, 75),
    "NGS": (0, 128, 128),
    "EOS": (240, 50, 230),
    "BAS": (145, 30, 180),
    "MON": (70, 240, 240),
    "LYT": (0, 130, 200),
    "PLM": (170, 110, 40),
    "EBO": (128, 0, 0),
    "RBC": (160, 160, 160),
}


def _colormap(values: np.ndarray) -> np.ndarray:
    """float[h, w] in [0, 1] -> uint8[h, w, 3], dark blue -> red -> yellow."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 80], [120, 0, 160], [230, 40, 40], [255, 220, 0]], np.float32)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - lo
    out = stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac
    return out.astype(np.uint8)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45) -> bytes:
    """image uint8[H, W, 3]; heatmap float[h, w] (any range, min-max normalised) resized to
    H x W and blended with weight `alpha`."""
    from PIL import Image

    h = np.asarray(heatmap, np.float32)
    span = float(h.max() - h.min()) if h.size else 0.0
    norm = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    colour = Image.fromarray(_colormap(norm)).resize(
        (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
    )
    return _png(Image.blend(Image.fromarray(image), colour, alpha))


def overlay_png(image: np.ndarray, cells: Sequence[Cell]) -> bytes:
    """Boxes coloured by cell type; with importances the line width (1..6 px) and opacity
    grow with the cell's normalised importance. cells: the image's result cells."""
    from PIL import Image, ImageDraw

    base = Image.fromarray(image).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    imps = [c.importance for c in cells if c.importance is not None]
    lo, hi = (min(imps), max(imps)) if imps else (0.0, 0.0)
    for c in cells:
        code = c.cell_type or c.detector_label or ""
        rgb = TYPE_COLOURS.get(code, (255, 255, 255))
        imp = c.importance
        w = (imp - lo) / (hi - lo) if imp is not None and hi > lo else (1.0 if imp else 0.5)
        width = 1 + int(round(5 * w)) if imps else 2
        opacity = int(110 + 145 * w) if imps else 230
        draw.rectangle([float(v) for v in c.box], outline=(*rgb, opacity), width=width)
    return _png(Image.alpha_composite(base, layer).convert("RGB"))


def colour_scale_png(width: int = 256, height: int = 12) -> bytes:
    """The heatmap's colour scale as a horizontal bar, low importance (left) to high."""
    from PIL import Image

    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return _png(Image.fromarray(_colormap(ramp)))
