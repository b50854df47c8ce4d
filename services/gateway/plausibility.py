"""Whether a case's images and detections can be real marrow cells at the stated pixel size.

A probe scored P(AML) 1.0 from a 32x32 image (11 "cells" in 8.6 um) and from cells whose
detections were hundreds of um wide: the models answer whatever they are fed. These checks
withhold P(AML) (and the NPM1-by-morphology call from the same features) with a reason, as
the unit rules of `services.gateway.units` do; counts and images are still reported.

Thresholds come from real cell diameters in smears (Wintrobe's Clinical Hematology): nucleated
marrow cells range from ~7 um (small lymphocytes, orthochromatic erythroblasts) to ~25 um
(promyelocytes, myelocytes); megakaryocytes are larger but rare, so they never carry the
median. Detection boxes are loose or tight by a few um, hence the margins below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CELL_DIAMETER_UM = (4.0, 50.0)
"""Accepted median detection size (sqrt of box area, um) of a case's nucleated cells."""
MIN_IMAGE_SIDE_UM = 20.0
"""An image whose shorter side is below this cannot hold one whole myeloid cell (12-20 um):
what it shows are fragments, and counting them as cells is meaningless."""
ASSUMED_UM_PER_PX = 0.5
"""Pixel size assumed for the image-size check when none is known: the coarse end of smear
scans (20x), which makes an image the largest it can be in um, so only images that are
surely too small are refused (a 32x32 image is 16 um at 0.5 um/px)."""


def image_too_small(images: Sequence[dict]) -> dict | None:
    """`{"reason": "image_too_small", "detail"}` when an image's shorter side is below
    `MIN_IMAGE_SIDE_UM` (result entries: width, height, um_per_px, index), else None."""
    small = []
    for im in images:
        um = im.get("um_per_px") or ASSUMED_UM_PER_PX
        side_um = min(im["width"], im["height"]) * um
        if side_um < MIN_IMAGE_SIDE_UM:
            small.append(
                f"image {im['index']} ({im['width']}x{im['height']} px = {side_um:.3g} um)"
            )
    if not small:
        return None
    return {
        "reason": "image_too_small",
        "detail": f"{'; '.join(small)}: an image must be at least {MIN_IMAGE_SIDE_UM:g} um on "
        "its shorter side to hold whole cells (pixel size as given, else "
        f"{ASSUMED_UM_PER_PX:g} um/px assumed); send larger fields of view",
    }


def implausible_cell_size(images: Sequence[dict]) -> dict | None:
    """`{"reason": "implausible_cell_size", "detail"}` when the median size of the classified
    (nucleated) detections, in um at each image's pixel size, is outside
    `CELL_DIAMETER_UM`; images without a pixel size are not checked (px say nothing)."""
    sizes = [
        float(np.sqrt(max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0))) * im["um_per_px"]
        for im in images
        if im.get("um_per_px")
        for b, cell in ((c["box"], c) for c in im["cells"])
        if cell["cell_type"] is not None
    ]
    if not sizes:
        return None
    median = float(np.median(sizes))
    lo, hi = CELL_DIAMETER_UM
    if lo <= median <= hi:
        return None
    return {
        "reason": "implausible_cell_size",
        "detail": f"detected cells measure {median:.3g} um across (median of {len(sizes)}) at "
        f"the given pixel size; nucleated marrow cells measure {lo:g}-{hi:g} um: the pixel "
        "size (options.um_per_px) is probably wrong, or the images are not marrow smears",
    }
