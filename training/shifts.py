"""Controlled photometric and optical shifts of cell images: the generalisation suite's
stand-in for the next scanner, stain batch and focus setting (issue 23 §1).

Every shift is deterministic (no random draw), so a figure "under `stain_blue`" means the
same pixels in every run, on every machine. Magnitudes follow what differs between two
labs' CellaVision-type analysers: background white balance and stain colour of about 10
grey levels per channel, contrast +-20 %, a slightly defocused or blurred optic, strong
JPEG compression, and a pixel size +-15 % off (another objective or camera).

A shift takes and returns an RGB uint8 image `uint8[H, W, 3]` of the same shape: a scale
shift resamples the content about the centre and pads with the image's own border colour,
so a model that resizes whole crops sees the cell grow or shrink, as it would when the
lab's pixel size differs.

`SHIFTS` is the one list the suite, the APL stability figure and the domain check's
calibration iterate over; `apply_shift(image, name)` applies one by name.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Shift:
    name: str
    family: str
    """`none`, `background`, `stain`, `contrast`, `optical`, `compression` or `scale`."""
    description: str
    transform: Transform

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = self.transform(_check(image))
        assert out.shape == image.shape and out.dtype == np.uint8, self.name
        return out


def _check(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a shift takes uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    return image


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _background(offset: tuple[float, float, float]) -> Transform:
    """Add `offset` in proportion to brightness: the white background moves by the full
    offset, dark stained chromatin hardly at all (a white-balance / lamp difference)."""
    delta = np.asarray(offset, dtype=np.float32)

    def apply(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        weight = x.mean(axis=2, keepdims=True) / 255.0
        return _clip(x + weight * delta)

    return apply


def _stain(offset: tuple[float, float, float]) -> Transform:
    """Add `offset` in proportion to stain density: nuclei and cytoplasm move, the white
    background does not (a stain batch or staining time difference)."""
    delta = np.asarray(offset, dtype=np.float32)

    def apply(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        weight = 1.0 - x.mean(axis=2, keepdims=True) / 255.0
        return _clip(x + weight * delta * 2.0)

    return apply


def _contrast(factor: float) -> Transform:
    def apply(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        mean = x.mean(axis=(0, 1), keepdims=True)
        return _clip(mean + (x - mean) * factor)

    return apply


def _pil(op: Callable[[Image.Image], Image.Image]) -> Transform:
    def apply(image: np.ndarray) -> np.ndarray:
        return np.asarray(op(Image.fromarray(image)).convert("RGB"), dtype=np.uint8)

    return apply


def _defocus(radius: int) -> Transform:
    """A disk (pill-box) point-spread function: what an out-of-focus lens does, unlike a
    Gaussian it flattens fine chromatin texture while keeping edges fairly wide."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    kernel /= kernel.sum()

    def apply(image: np.ndarray) -> np.ndarray:
        x = np.pad(image.astype(np.float32), ((radius, radius), (radius, radius), (0, 0)), "edge")
        h, w = image.shape[:2]
        out = np.zeros(image.shape, dtype=np.float32)
        for dy in range(kernel.shape[0]):
            for dx in range(kernel.shape[1]):
                if kernel[dy, dx]:
                    out += kernel[dy, dx] * x[dy : dy + h, dx : dx + w]
        return _clip(out)

    return apply


def _jpeg(quality: int) -> Transform:
    def apply(image: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)

    return apply


def _border_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    return np.median(border, axis=0).astype(np.uint8)


def _scale(factor: float) -> Transform:
    """Resample by `factor` about the centre, same output size: > 1 crops the centre of
    the enlarged image, < 1 pads the shrunk image with the image's border colour."""

    def apply(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        resized = np.asarray(
            Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.uint8
        )
        if factor >= 1.0:
            top, left = (nh - h) // 2, (nw - w) // 2
            return np.ascontiguousarray(resized[top : top + h, left : left + w])
        out = np.empty_like(image)
        out[:] = _border_colour(image)
        top, left = (h - nh) // 2, (w - nw) // 2
        out[top : top + nh, left : left + nw] = resized
        return out

    return apply


SHIFTS: tuple[Shift, ...] = (
    Shift("none", "none", "the image as recorded", lambda image: image.copy()),
    Shift("bg_warm", "background", "background +10 R, -10 B", _background((10, 0, -10))),
    Shift("bg_cool", "background", "background -10 R, +10 B", _background((-10, 0, 10))),
    Shift("bg_dark", "background", "background -10 on every channel", _background((-10, -10, -10))),
    Shift("stain_blue", "stain", "stained areas -10 R, +10 B", _stain((-10, 0, 10))),
    Shift("stain_pink", "stain", "stained areas +10 R, -5 G", _stain((10, -5, 0))),
    Shift("contrast_low", "contrast", "contrast x0.8 about the mean", _contrast(0.8)),
    Shift("contrast_high", "contrast", "contrast x1.2 about the mean", _contrast(1.2)),
    Shift(
        "blur",
        "optical",
        "Gaussian blur, sigma 1.0 px",
        _pil(lambda im: im.filter(ImageFilter.GaussianBlur(1.0))),
    ),
    Shift("defocus", "optical", "disk point-spread function, radius 2 px", _defocus(2)),
    Shift("jpeg", "compression", "JPEG at quality 40", _jpeg(40)),
    Shift("scale_down", "scale", "pixel size +15 % (cells 0.85x as large)", _scale(0.85)),
    Shift("scale_up", "scale", "pixel size -15 % (cells 1.15x as large)", _scale(1.15)),
)

SHIFT_NAMES: tuple[str, ...] = tuple(s.name for s in SHIFTS)

STRONG_SHIFTS: tuple[Shift, ...] = (
    Shift("bg_warm_x4", "background", "background +40 R, -40 B", _background((40, 0, -40))),
    Shift("stain_blue_x4", "stain", "stained areas -40 R, +40 B", _stain((-40, 0, 40))),
    Shift("contrast_x0.5", "contrast", "contrast x0.5 about the mean", _contrast(0.5)),
    Shift("scale_x0.6", "scale", "pixel size +67 % (cells 0.6x as large)", _scale(0.6)),
    Shift("scale_x1.5", "scale", "pixel size -33 % (cells 1.5x as large)", _scale(1.5)),
)
"""Shifts far beyond what separates two labs' analysers (4x the colour offsets, half the
contrast, another objective): what the domain check must call out of domain, where `SHIFTS`
is what the typer is meant to tolerate. Not part of the generalisation suite."""
STRONG_SHIFT_NAMES: tuple[str, ...] = tuple(s.name for s in STRONG_SHIFTS)
_BY_NAME = {s.name: s for s in (*SHIFTS, *STRONG_SHIFTS)}


def get_shift(name: str) -> Shift:
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise KeyError(f"unknown shift {name!r}; known: {known}") from None


def apply_shift(image: np.ndarray, name: str) -> np.ndarray:
    """`image` (RGB uint8[H, W, 3]) under the named shift; same shape and dtype."""
    return get_shift(name)(image)
