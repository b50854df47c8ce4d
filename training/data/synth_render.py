"""Render one synthetic smear image with its instance ground truth (in memory).

Layout: red cells first (additive density: stacked red cells look darker), then nucleated
cells in random z-order, each covering what lies below. An owner map records which cell is
on top of every pixel, so annotation masks are the *visible* parts: the cell on top owns
the overlap. Cells whose visible area falls below `config.min_visible` of their full area
(occluded or cut by the border) are not annotated and are counted as dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from marrowscope.taxonomy import COUNTED_CODES

from .synth_cells import BG_COLOUR, MORPH, Sprite, Stain, draw_cell, draw_rbc
from .synth_cohort import DEFAULT_UM_PER_PX, REFERENCE_SIZE, CaseSpec, SynthConfig

# Nucleated cells and red cells per reference field (640x480 at 0.27 um/px), crowding 1.
NUCLEATED_PER_FIELD = 11.0
RBC_PER_FIELD = 32.0


@dataclass
class CellInstance:
    """One annotated cell. `bbox` is [x, y, w, h] float pixels of the visible mask;
    `mask` / `nucleus_mask` are bool[h, w] crops whose top-left pixel is (bbox[0], bbox[1]);
    `nucleus_mask` is None for red cells. `area` = visible pixels, `full_area` = pixels the
    cell would cover unoccluded."""

    code: str
    bbox: tuple[float, float, float, float]
    mask: np.ndarray
    nucleus_mask: np.ndarray | None
    attributes: dict[str, bool]
    area: int
    full_area: int

    def full_mask(self, height: int, width: int, nucleus: bool = False) -> np.ndarray:
        """The crop pasted into a bool[height, width] image."""
        out = np.zeros((height, width), dtype=bool)
        crop = self.nucleus_mask if nucleus else self.mask
        if crop is None:
            return out
        x, y = int(self.bbox[0]), int(self.bbox[1])
        out[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
        return out


def _place(rng, radii, width, height, crowding, existing=None):
    """Centres for cells of the given radii (px): random positions, rejecting ones that
    overlap placed cells by more than a per-cell tolerance (looser with crowding)."""
    placed = list(existing or [])
    out = []
    for r in radii:
        f = np.clip(rng.uniform(0.45, 1.05) / np.sqrt(crowding), 0.3, 1.2)
        for _ in range(20):
            x = rng.uniform(-0.3 * r, width + 0.3 * r)
            y = rng.uniform(-0.3 * r, height + 0.3 * r)
            if not placed:
                break
            p = np.asarray(placed)
            if np.all(np.hypot(p[:, 0] - x, p[:, 1] - y) >= f * (p[:, 2] + r)):
                break
        else:
            out.append(None)
            continue
        placed.append((x, y, r))
        out.append((x, y))
    return out


def _touching(rng, centres, radii, rbc_radius, mean_count):
    """Centres of red cells touching each placed nucleated cell (Poisson(`mean_count`) per
    cell): centre distance 0.6-0.95 of the sum of radii, so each red cell overlaps the
    white cell's rim and the part outside stays visible next to it."""
    out = []
    for centre, r in zip(centres, radii, strict=True):
        if centre is None:
            continue
        for _ in range(rng.poisson(mean_count)):
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.6, 0.95) * (r + rbc_radius)
            out.append((centre[0] + dist * np.cos(angle), centre[1] + dist * np.sin(angle)))
    return out


def _clip(sprite: Sprite, width: int, height: int):
    h, w = sprite.alpha.shape
    x0, y0 = max(sprite.x0, 0), max(sprite.y0, 0)
    x1, y1 = min(sprite.x0 + w, width), min(sprite.y0 + h, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return (slice(y0, y1), slice(x0, x1)), (
        slice(y0 - sprite.y0, y1 - sprite.y0),
        slice(x0 - sprite.x0, x1 - sprite.x0),
    )


def _low_freq(rng, height, width, cell=48):
    """Smooth noise (float32[height, width], sd ~1) by bilinear upsampling of a coarse grid
    (PIL, single-threaded: BLAS threads thrash on shared cores)."""
    from PIL import Image

    small = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def render_image(
    rng: np.random.Generator,
    case_spec: CaseSpec,
    config: SynthConfig,
    cell_types: Sequence[str] | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, list[CellInstance]]:
    """Render one ROI image of a case.

    Returns (uint8[H, W, 3] RGB before any JPEG encoding, annotated cells). `cell_types`
    forces the nucleated cells to draw (else sampled from `case_spec.type_probs`); `stats`,
    when given, is incremented with `dropped` (annotations under min_visible) and `unplaced`.
    """
    width, height = config.size
    upp = config.um_per_px
    field = width * height * upp**2 / (REFERENCE_SIZE[0] * REFERENCE_SIZE[1] * DEFAULT_UM_PER_PX**2)
    if cell_types is None:
        n = rng.poisson(NUCLEATED_PER_FIELD * config.crowding * field)
        probs = np.array([case_spec.type_probs[c] for c in COUNTED_CODES])
        cell_types = list(rng.choice(COUNTED_CODES, size=n, p=probs / probs.sum()))
    n_rbc = rng.poisson(RBC_PER_FIELD * config.crowding * field)
    stain = Stain(
        config.stain_hue + rng.normal(0, 4.0),
        config.stain_intensity * float(np.exp(rng.normal(0, 0.06))),
    )

    radii = [MORPH[c].diam[0] / 2 / upp for c in cell_types]
    centres = _place(rng, radii, width, height, config.crowding)
    rbc_radius = 7.8 / 2 / upp
    rbc_centres = _place(rng, [rbc_radius] * n_rbc, width, height, config.crowding * 1.5)
    if config.rbc_contact > 0:
        rbc_centres += _touching(rng, centres, radii, rbc_radius, config.rbc_contact)
    sprites: list[Sprite] = [
        draw_rbc(rng, x, y, upp, stain) for x, y in (c for c in rbc_centres if c is not None)
    ]
    n_rbc_drawn = len(sprites)
    order = rng.permutation(len(cell_types))
    for i in order:
        if centres[i] is None:
            continue
        sprites.append(
            draw_cell(
                rng,
                cell_types[i],
                *centres[i],
                upp,
                stain,
                _blast_flags(rng, case_spec) if cell_types[i] == "BLA" else None,
            )
        )

    bg = stain.od(BG_COLOUR) * 0.4
    od = np.empty((height, width, 3), np.float32)
    od[:] = bg
    od *= (1 + 0.25 * _low_freq(rng, height, width))[..., None]
    owner = np.full((height, width), -1, dtype=np.int32)
    clips = []
    for idx, sp in enumerate(sprites):
        cl = _clip(sp, width, height)
        clips.append(cl)
        if cl is None:
            continue
        img_sl, loc = cl
        a = sp.alpha[loc]
        if idx < n_rbc_drawn:
            od[img_sl] += sp.od[loc]
        else:
            od[img_sl] = od[img_sl] * (1 - 0.7 * a)[..., None] + sp.od[loc]
        owner[img_sl][a >= 0.5] = idx

    if config.blur > 0:
        from scipy.ndimage import gaussian_filter

        sigma = config.blur * float(np.exp(rng.normal(0, 0.1)))
        od = gaussian_filter(od, sigma=(sigma, sigma, 0), mode="nearest")
    xx = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    yy = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    t = rng.uniform(0, 2 * np.pi)
    illum = 1.0 - config.illumination * (xx * np.cos(t) + yy * np.sin(t) + 0.5 + xx**2 + yy**2)
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= (255.0 * illum)[..., None]
    od += rng.standard_normal(od.shape, dtype=np.float32) * np.float32(1.2)
    od += np.float32(0.5)
    image = np.clip(od, 0, 255).astype(np.uint8)

    instances = []
    dropped = 0
    for idx, (sp, cl) in enumerate(zip(sprites, clips, strict=True)):
        full = int((sp.alpha >= 0.5).sum())
        if cl is None or full == 0:
            dropped += 1
            continue
        img_sl, loc = cl
        vis = owner[img_sl] == idx
        area = int(vis.sum())
        if area < config.min_visible * full:
            dropped += 1
            continue
        rows, cols = np.flatnonzero(vis.any(1)), np.flatnonzero(vis.any(0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        mask = vis[r0:r1, c0:c1]
        nuc = None if sp.nucleus is None else (sp.nucleus[loc][r0:r1, c0:c1] & mask)
        x, y = img_sl[1].start + c0, img_sl[0].start + r0
        instances.append(
            CellInstance(
                sp.code,
                (float(x), float(y), float(c1 - c0), float(r1 - r0)),
                mask,
                nuc,
                sp.attributes,
                area,
                full,
            )
        )
    if stats is not None:
        stats["dropped"] = stats.get("dropped", 0) + dropped
        stats["unplaced"] = stats.get("unplaced", 0) + sum(c is None for c in centres)
    return image, instances


def _blast_flags(rng, spec: CaseSpec) -> dict[str, bool]:
    return {
        "cup_like_nucleus": bool(rng.random() < spec.p_cup),
        "prominent_nucleoli": bool(rng.random() < spec.p_nucleoli),
        "condensed_chromatin": bool(rng.random() < spec.p_condensed),
        "auer_rod": bool(rng.random() < spec.p_auer),
    }


def rle_from_crop(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """COCO compressed RLE {"size": [h, w], "counts": str} of a bool crop placed at (x0, y0)
    in a height x width image, without materialising the full mask."""
    from pycocotools import mask as mask_utils

    h, w = crop.shape
    strip = np.zeros((height, w), dtype=np.uint8)
    strip[y0 : y0 + h] = crop
    flat = strip.T.ravel()  # column-major, as COCO RLE
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts.insert(0, 0)
    counts[0] += x0 * height
    trailing = (width - x0 - w) * height
    if len(counts) % 2 == 1:  # ends with zeros
        counts[-1] += trailing
    elif trailing:
        counts.append(trailing)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
