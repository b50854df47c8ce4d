"""Hostile and tiny slide files for the slide-bomb and upload tests, written in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

UM_PER_PX = 0.5
_RES = (1e4 / UM_PER_PX, 1e4 / UM_PER_PX)  # pixels per centimetre


def write_bomb(path: Path, side: int = 20_000, *, tile: int = 256, overview: bool = True) -> Path:
    """A tiled TIFF declaring side x side px at 0.5 um/px whose TileOffsets all point at one
    stored tile of noise (the probe's 442 KB / 60,000 px file, smaller), with a real
    downsample-64 overview level when `overview`. A few hundred KB at 20,000 px."""
    import tifffile

    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            rng.integers(100, 200, (tile, tile, 3), dtype=np.uint8),
            tile=(tile, tile),
            photometric="rgb",
            compression="deflate",
            resolution=_RES,
            resolutionunit="CENTIMETER",
        )
        if overview:
            small = max(16, side // 64)
            tw.write(
                np.full((small, small, 3), 230, np.uint8),
                tile=(tile, tile),
                subfiletype=1,
                photometric="rgb",
                compression="deflate",
                resolution=(_RES[0] / 64, _RES[1] / 64),
                resolutionunit="CENTIMETER",
            )
    # grow the first level to `side` in place: every tile is the one tile written above
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
        n = (-(-side // tile)) ** 2
        page.tags["ImageWidth"].overwrite(side)
        page.tags["ImageLength"].overwrite(side)
        page.tags["TileOffsets"].overwrite([offset] * n)
        page.tags["TileByteCounts"].overwrite([count] * n)
    return path


def write_tiny_slide(path: Path, side: int = 512, *, seed: int = 0) -> Path:
    """A real one-level tiled TIFF of noise at 0.5 um/px (incompressible: ~3 bytes per px),
    the smallest file every submission check accepts."""
    import tifffile

    rng = np.random.default_rng(seed)
    tifffile.imwrite(
        path,
        rng.integers(0, 255, (side, side, 3), dtype=np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=_RES,
        resolutionunit="CENTIMETER",
    )
    return path
