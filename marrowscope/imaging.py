"""Image decoding with safety limits, resizing, cell crops and PNG encoding.

Shared by the model services, the gateway and training, so an image is turned into pixels
the same way everywhere. Every array here is `uint8[H, W, 3]` RGB unless stated.

Decoding rules (`decode_image`):
- formats are detected from the content, never a file name: PNG, JPEG and TIFF only;
- refused with `InvalidInput` before any pixel is decoded: empty or oversized payloads,
  unknown or unsupported formats, headers declaring more than `max_pixels` pixels
  (decompression bombs) or a side below `min_side`; truncated or corrupt data is refused
  when the pixels are decoded;
- no global Pillow state is changed (`Image.MAX_IMAGE_PIXELS`, `LOAD_TRUNCATED_IMAGES`);
- the first frame of a multi-frame file (multi-page TIFF, animated PNG) is used;
- EXIF orientation is applied, as browsers and viewers do;
- colour conversion: 16-bit (and 32-bit integer) grey is scaled linearly
  `round(v * 255 / 65535)` (32-bit values clipped to 0..65535); 8-bit grey, palette, CMYK,
  YCbCr and LAB go through Pillow's `convert("RGB")`; images with alpha (RGBA, LA, PA,
  palette transparency) are composited onto white, the colour of an empty smear
  background; floating-point images are refused (no defined intensity range).
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

from marrowscope.errors import InvalidInput

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF")
# Smear-background grey used where a crop reaches past the image border.
BACKGROUND_RGB: tuple[int, int, int] = (235, 235, 235)
_KNOWN_UNSUPPORTED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP/RIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked before decoding. Defaults fit the paper's 2560x1920 region images
    with room for larger tiles (40 MP)."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 32

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.min_side < 1:
            raise ValueError(f"invalid image limits {self}")


def _sniff_unsupported(data: bytes) -> str | None:
    for magic, name in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            return name
    return None


def _to_rgb(img: Image.Image) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.int64)
        grey = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F" or mode.startswith("F;"):
        raise InvalidInput("floating-point images are not supported; send 8- or 16-bit data")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8).copy()


def decode_image(data: bytes, *, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode PNG/JPEG/TIFF bytes to `uint8[H, W, 3]` RGB; raises `InvalidInput` with a
    clear message for anything else (see the module docstring for the rules)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    limits = limits or ImageLimits()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    unsupported = _sniff_unsupported(data)
    if unsupported:
        raise InvalidInput(
            f"{unsupported} images are not supported; send {', '.join(ACCEPTED_FORMATS)}"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))  # header only
    except UnidentifiedImageError:
        raise InvalidInput(
            f"not a recognised image; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image declares too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise InvalidInput(f"corrupt image header: {exc}") from None
    with img:
        width, height = img.size
        if width * height > limits.max_pixels:
            raise InvalidInput(
                f"image is {width}x{height} = {width * height} pixels; the "
                f"limit is {limits.max_pixels} (refused before decoding)"
            )
        if min(width, height) < limits.min_side:
            raise InvalidInput(
                f"image is {width}x{height}; each side must be at least {limits.min_side} pixels"
            )
        try:
            if getattr(img, "n_frames", 1) > 1:
                log.debug("multi-frame %s image: using the first frame", img.format)
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)  # type: ignore[assignment]  # Image, not ImageFile
            return _to_rgb(img)
        except InvalidInput:
            raise
        except (
            OSError,
            SyntaxError,
            ValueError,
            EOFError,
            struct.error,
            Image.DecompressionBombError,
        ) as exc:
            raise InvalidInput(f"truncated or corrupt {img.format} image: {exc}") from None


def _check_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or image.shape[0] == 0
        or image.shape[1] == 0
    ):
        got = (
            f"{image.dtype}{list(image.shape)}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise InvalidInput(f"{name} must be uint8[H, W, 3] RGB, got {got}")
    return image


def resize_for_model(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize `uint8[H, W, 3]` to `uint8[size[0], size[1], 3]` (H, W) with Pillow's
    antialiased bilinear filter. The aspect ratio is not preserved (the paper's images and
    model inputs share 4:3)."""
    from PIL import Image

    _check_rgb(image)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise InvalidInput(f"target size must be positive, got {size}")
    if image.shape[:2] == (h, w):
        return image.copy()
    out = Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8).copy()


CELL_CROP_PAD_FRACTION = 0.1
"""Context around each box in a cell crop. Training and serving must cut crops alike: the
celltype trainer records this value in the model config and the celltype service refuses a
model that recorded another, because the gateway cuts crops with this constant."""


def crop_cells(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    pad_fraction: float = CELL_CROP_PAD_FRACTION,
    *,
    fill: tuple[int, int, int] = BACKGROUND_RGB,
) -> np.ndarray:
    """Square crops centred on each box, resized to `size` x `size`.

    image: uint8[H, W, 3] RGB. boxes: float[N, 4] x1, y1, x2, y2 pixels (x2 > x1, y2 > y1).
    The square's side is `max(w, h) * (1 + 2 * pad_fraction)` (context of `pad_fraction`
    times the longer side on each side), at least 1 px; parts outside the image are filled
    with `fill`. Returns uint8[N, size, size, 3] (N may be 0).
    """
    from PIL import Image

    _check_rgb(image)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        raise InvalidInput(f"boxes must be finite float[N, 4], got shape {list(boxes.shape)}")
    if size < 1 or pad_fraction < 0:
        raise InvalidInput(f"need size >= 1 and pad_fraction >= 0, got {size}, {pad_fraction}")
    if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise InvalidInput("boxes must have x2 > x1 and y2 > y1")
    height, width = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        side = max(1, int(round(max(x2 - x1, y2 - y1) * (1 + 2 * pad_fraction))))
        left = int(round((x1 + x2) / 2 - side / 2))
        top = int(round((y1 + y2) / 2 - side / 2))
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = fill
        sx0, sy0 = max(left, 0), max(top, 0)
        sx1, sy1 = min(left + side, width), min(top + side, height)
        if sx1 > sx0 and sy1 > sy0:
            canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
        if side != size:
            canvas = np.asarray(
                Image.fromarray(canvas).resize((size, size), Image.Resampling.BILINEAR)
            )
        out[i] = canvas
    return out


def encode_png(image: np.ndarray, *, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes of a `uint8[H, W, 3]` RGB image."""
    from PIL import Image

    _check_rgb(image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
