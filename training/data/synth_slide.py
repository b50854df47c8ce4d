"""Synthetic whole slides with known zones: the ground truth that ROI selection is measured on.

A slide is a smear drawn left to right over glass: thick area, monolayer, feathered edge, with
out-of-focus patches and debris patches dropped into the monolayer. Every zone is known per
block of `block` x `block` level-0 pixels (the zone map), so the fraction of selected regions
in the monolayer and the ROI-quality AUROC can be measured exactly.

Why procedural: cells are placed on hashed jittered grids, a pure function of (x, y, seed),
so any tile of any pyramid level renders on its own, at its own scale. The writer streams
tiles into a pyramidal tiled TIFF (tifffile), so a 20k x 16k slide is written without ever
holding a level in memory, and the generator never needs to read back what it wrote.

Rendering is in optical density (OD, Beer-Lambert) as in `synth_render`: overlapping cells add
OD and look darker, which is what makes the thick area thick.

    python -m training.data.synth_slide --out DIR --count 4 --seed 0   # DIR/slide_000.tiff ...

DICOM: none of the readers compared in docs/SLIDES.md writes DICOM WSI from pixels without a
further converter stack (wsidicomizer/highdicom + codecs); slides are written as TIFF only.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ZONES: tuple[str, ...] = ("glass", "thick", "monolayer", "feathered", "out_of_focus", "debris")
"""Zone codes are the indices in this tuple (the zone map's values)."""
ZONE = {name: i for i, name in enumerate(ZONES)}

# Optical density per RGB channel (MGG-like): red cells pink, nuclei purple, cytoplasm pale
# blue, debris (stain precipitate) blue-black.
OD_RBC = np.array([0.10, 0.55, 0.42], np.float32)
OD_NUCLEUS = np.array([0.75, 1.05, 0.45], np.float32)
OD_CYTO = np.array([0.22, 0.24, 0.10], np.float32)
OD_DEBRIS = np.array([1.6, 1.5, 1.1], np.float32)
GLASS_RGB = np.array([238.0, 236.0, 240.0], np.float32)

# Per zone: red-cell grid spacing (um) and layers, nucleated-cell presence probability,
# cell elongation, defocus sigma (um).
_RBC_SPACING_UM = {"thick": 6.0, "monolayer": 9.0, "feathered": 16.0}
_RBC_LAYERS = {"thick": 3, "monolayer": 1, "feathered": 1}
_NUC_P = {"thick": 0.7, "monolayer": 0.3, "feathered": 0.08}
_NUC_SPACING_UM = 28.0
RBC_RADIUS_UM = 3.8
NUC_RADIUS_UM = 4.5
CYTO_RADIUS_UM = 7.0
DEFOCUS_SIGMA_UM = 2.5


@dataclass(frozen=True)
class SlideSpec:
    """Size, scale and layout of one synthetic slide.

    width, height: level-0 pixels; block: zone-map block side (level-0 px); tile: TIFF tile
    side; levels: pyramid downsamples (powers of 2); mpp: um per level-0 pixel.
    """

    width: int = 8192
    height: int = 6144
    block: int = 512
    tile: int = 256
    levels: tuple[int, ...] = (1, 2, 4, 8, 16)
    mpp: float = 0.5
    seed: int = 0
    oof_fraction: float = 0.12
    debris_fraction: float = 0.10
    cells: str = "discs"
    """How the monolayer's cells look at fine scales: "discs" (anti-aliased discs, what the
    ROI studies were measured on) or "fields" (the field generator's cell and red-cell
    sprites, `synth_cells.draw_cell` / `draw_rbc`, red cells as sparse as in a field, so that
    a detector trained on synthetic fields finds cells in the slide's regions, as the demo
    needs)."""

    def __post_init__(self) -> None:
        if self.cells not in ("discs", "fields"):
            raise ValueError(f"cells must be 'discs' or 'fields', got {self.cells!r}")
        if self.width % self.block or self.height % self.block:
            raise ValueError("width and height must be multiples of block")
        if self.levels[0] != 1 or any(b % a for a, b in pairwise(self.levels)):
            raise ValueError(f"levels must start at 1 and divide each other: {self.levels}")

    @property
    def grid(self) -> tuple[int, int]:
        """Zone map shape (rows, cols)."""
        return self.height // self.block, self.width // self.block


def zone_map(spec: SlideSpec) -> np.ndarray:
    """uint8[rows, cols] zone codes: a smear band over glass, thick -> monolayer -> feathered
    from left to right with a ragged boundary, then out-of-focus and debris patches inside the
    monolayer."""
    rng = np.random.default_rng([spec.seed, 1])
    rows, cols = spec.grid
    zmap = np.full((rows, cols), ZONE["glass"], np.uint8)
    top, bottom = max(1, round(rows * 0.1)), rows - max(1, round(rows * 0.1))
    left, right = max(1, round(cols * 0.06)), cols - max(1, round(cols * 0.06))
    span = right - left
    for r in range(top, bottom):
        thick_end = left + round(span * rng.uniform(0.2, 0.3))
        feather_start = left + round(span * rng.uniform(0.72, 0.82))
        end = right - int(rng.integers(0, 2))
        zmap[r, left:thick_end] = ZONE["thick"]
        zmap[r, thick_end:feather_start] = ZONE["monolayer"]
        zmap[r, feather_start:end] = ZONE["feathered"]
    mono = np.argwhere(zmap == ZONE["monolayer"])
    for zone, fraction in (("out_of_focus", spec.oof_fraction), ("debris", spec.debris_fraction)):
        n_patches = max(1, round(len(mono) * fraction / 4))
        for _ in range(n_patches):
            r, c = mono[rng.integers(len(mono))]
            patch = zmap[r : r + 2, c : c + 2]
            patch[patch == ZONE["monolayer"]] = ZONE[zone]
    return zmap


# -- procedural cells --------------------------------------------------------------------------
def _hash01(i: np.ndarray, j: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per integer grid cell (a 32-bit integer mix)."""
    h = (i.astype(np.uint64) * np.uint64(73856093)) ^ (j.astype(np.uint64) * np.uint64(19349663))
    h ^= np.uint64((seed * 83492791 + salt * 2654435761) & 0xFFFFFFFF)
    h = (h ^ (h >> np.uint64(16))) * np.uint64(0x45D9F3B) & np.uint64(0xFFFFFFFF)
    h = (h ^ (h >> np.uint64(16))) * np.uint64(0x45D9F3B) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    return (h & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(1 << 24)


def _centres(
    x0: float, y0: float, x1: float, y1: float, spacing: float, seed: int, salt: int, jitter: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Jittered-grid centres (um) of the cells whose centre may fall in [x0, x1) x [y0, y1):
    (cx, cy, i, j). The same (i, j) gives the same centre in every tile and level."""
    gi, gj = np.meshgrid(
        np.arange(math.floor(x0 / spacing) - 1, math.ceil(x1 / spacing) + 1),
        np.arange(math.floor(y0 / spacing) - 1, math.ceil(y1 / spacing) + 1),
    )
    i, j = gi.ravel(), gj.ravel()
    cx = (i + 0.5 + jitter * (_hash01(i, j, seed, salt) - 0.5)) * spacing
    cy = (j + 0.5 + jitter * (_hash01(i, j, seed, salt + 1) - 0.5)) * spacing
    return cx, cy, i, j


def _stamp(
    h: int,
    w: int,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: float,
    edge: float,
    stretch: float = 1.0,
    pallor: bool = False,
) -> np.ndarray:
    """float32[h, w]: summed coverage of anti-aliased discs at pixel centres (cx, cy) (px),
    all at once (one bincount), so thousands of cells cost a few array operations."""
    if len(cx) == 0:
        return np.zeros((h, w), np.float32)
    reach = int(math.ceil(radius / stretch + edge))
    oy, ox = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    px = np.floor(cx).astype(np.int64)[:, None] + ox.ravel()[None]
    py = np.floor(cy).astype(np.int64)[:, None] + oy.ravel()[None]
    dx, dy = px + 0.5 - cx[:, None], py + 0.5 - cy[:, None]
    d = np.hypot(dx * stretch, dy)
    cover = np.clip((radius - d) / edge + 0.5, 0.0, 1.0)
    if pallor:
        cover *= 1.0 - 0.45 * np.clip((radius * 0.45 - d) / (2 * edge) + 0.5, 0.0, 1.0)
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < h) & (cover > 0)
    acc = np.bincount((py * w + px)[ok], weights=cover[ok], minlength=h * w)
    return acc.reshape(h, w).astype(np.float32)


def _zone_at(spec: SlideSpec, zmap: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    bum = spec.block * spec.mpp
    r = np.clip((cy // bum).astype(np.int64), 0, zmap.shape[0] - 1)
    c = np.clip((cx // bum).astype(np.int64), 0, zmap.shape[1] - 1)
    inside = (cx >= 0) & (cy >= 0) & (cx < zmap.shape[1] * bum) & (cy < zmap.shape[0] * bum)
    return np.where(inside, zmap[r, c], ZONE["glass"])


def _base(zone: np.ndarray) -> np.ndarray:
    """Out-of-focus and debris patches are monolayer underneath."""
    return np.where(np.isin(zone, (ZONE["out_of_focus"], ZONE["debris"])), ZONE["monolayer"], zone)


def render_region(
    spec: SlideSpec, zmap: np.ndarray, x0: int, y0: int, w: int, h: int, ds: int
) -> np.ndarray:
    """uint8[h, w, 3] of the slide at downsample `ds`, top-left (x0, y0) in level-0 px."""
    um = spec.mpp * ds  # um per output pixel
    pad = int(math.ceil(3 * DEFOCUS_SIGMA_UM / um)) + 2
    hh, ww = h + 2 * pad, w + 2 * pad
    ox, oy = x0 * spec.mpp - pad * um, y0 * spec.mpp - pad * um  # um of the padded origin
    ex, ey = ox + ww * um, oy + hh * um
    edge = 0.7
    od = np.zeros((hh, ww, 3), np.float32)

    def px(cx: np.ndarray, cy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (cx - ox) / um, (cy - oy) / um

    sprites = spec.cells == "fields" and um <= FIELD_CELLS_MAX_UM
    rbc: list[tuple[np.ndarray, np.ndarray, int]] = []
    m = 20.0 if sprites else CYTO_RADIUS_UM * 2  # the largest field cell reaches ~16 um
    for name in ("thick", "monolayer", "feathered"):
        s = _RBC_SPACING_UM[name]
        for layer in range(_RBC_LAYERS[name]):
            off = layer * s / 3.1
            cx, cy, ri, rj = _centres(
                ox - m, oy - m, ex + m, ey + m, s, spec.seed, 10 + 2 * layer, 0.35
            )
            cx, cy = cx + off, cy + off * 0.7
            keep = _base(_zone_at(spec, zmap, cx, cy)) == ZONE[name]
            if sprites and name == "monolayer":
                # drawn below as the fields' red cells, as sparse as in a field
                keep &= _hash01(ri, rj, spec.seed, 50 + layer) < FIELD_RBC_SHARE
                rbc.append((cx[keep], cy[keep], layer))
                continue
            stretch = 0.55 if name == "feathered" else 1.0
            cover = _stamp(
                hh,
                ww,
                *px(cx[keep], cy[keep]),
                RBC_RADIUS_UM / um,
                edge,
                stretch,
                pallor=name != "feathered",
            )
            od += cover[..., None] * OD_RBC
    cx, cy, i, j = _centres(ox - m, oy - m, ex + m, ey + m, _NUC_SPACING_UM, spec.seed, 40, 0.4)
    base = _base(_zone_at(spec, zmap, cx, cy))
    p = np.zeros(len(cx), np.float32)
    for name, prob in _NUC_P.items():
        p[base == ZONE[name]] = prob
    present = _hash01(i, j, spec.seed, 42) < p
    fielded = present & (base == ZONE["monolayer"]) if sprites else np.zeros_like(present)
    present &= ~fielded
    feathered = base == ZONE["feathered"]
    cyto = np.minimum(_stamp(hh, ww, *px(cx[present], cy[present]), CYTO_RADIUS_UM / um, edge), 1)
    od = od * (1 - cyto[..., None]) + cyto[..., None] * OD_CYTO
    for sel, strength in ((present & ~feathered, 1.0), (present & feathered, 0.45)):
        nuc = _stamp(hh, ww, *px(cx[sel], cy[sel]), NUC_RADIUS_UM / um, edge, 1.1)
        od += (strength * np.minimum(nuc, 1))[..., None] * OD_NUCLEUS
    if sprites:
        nucleated = (cx[fielded], cy[fielded], i[fielded], j[fielded])
        _draw_sprites(od, spec, um, px, nucleated, rbc)
    zone_px = _zone_at(
        spec,
        zmap,
        ox + (np.arange(ww) + 0.5)[None, :] * um + np.zeros((hh, 1)),
        oy + (np.arange(hh) + 0.5)[:, None] * um + np.zeros((1, ww)),
    )
    oof = zone_px == ZONE["out_of_focus"]
    if oof.any():
        from scipy.ndimage import gaussian_filter

        sigma = DEFOCUS_SIGMA_UM / um
        blurred = np.stack([gaussian_filter(od[..., c], sigma) for c in range(3)], axis=-1)
        od = np.where(oof[..., None], blurred, od)
    if (zone_px == ZONE["debris"]).any():
        # Stain precipitate: dense small granules and a few larger dark clumps.
        for spacing, radius, prob, salt in ((5.0, 1.2, 0.5, 60), (40.0, 6.0, 0.7, 70)):
            cx, cy, i, j = _centres(ox - 8, oy - 8, ex + 8, ey + 8, spacing, spec.seed, salt, 0.8)
            sel = (_zone_at(spec, zmap, cx, cy) == ZONE["debris"]) & (
                _hash01(i, j, spec.seed, salt + 2) < prob
            )
            g = np.minimum(_stamp(hh, ww, *px(cx[sel], cy[sel]), radius / um, edge), 1)
            od += g[..., None] * OD_DEBRIS
    rng = np.random.default_rng([spec.seed, ds, x0, y0])
    rgb = GLASS_RGB * np.exp(-od[pad : pad + h, pad : pad + w])
    rgb += rng.normal(0, 1.5, (h, w, 1)).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


FIELD_RBC_SHARE = 0.12
"""With `cells == "fields"`: the share of the monolayer's red-cell grid drawn, so the
monolayer is as sparse as the generator's fields (about 20 red cells in 640x480 px at 0.27
um/px); the packed monolayer of the ROI studies left the demo detector finding nothing."""

FIELD_CELLS_MAX_UM = 1.0
"""Coarsest output scale (um per pixel) at which `SlideSpec.cells == "fields"` draws sprites;
coarser pyramid levels keep the discs (no detector reads them)."""


@functools.cache
def _field_types() -> tuple[tuple[str, ...], np.ndarray]:
    """The field generator's control differential as (codes, cumulative shares): a cell's
    type is a hash of its grid position, so every tile and level agrees on it."""
    from training.data.synth_cohort import CONTROL_DIFFERENTIAL

    types = tuple(CONTROL_DIFFERENTIAL)
    shares = np.array([CONTROL_DIFFERENTIAL[c] for c in types], np.float64)
    return types, np.cumsum(shares / shares.sum())


def _draw_sprites(
    od: np.ndarray,
    spec: SlideSpec,
    um: float,
    px,
    nucleated: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rbc: list[tuple[np.ndarray, np.ndarray, int]] = (),  # type: ignore[assignment]
) -> None:
    """Composite field-generator cell sprites into `od` (in place), covering what lies below
    as `synth_render.render_image` does. Each cell draws from its own generator seeded by
    (slide seed, grid i, j), so a cell that straddles two tiles is drawn the same in both.
    Red cells (`rbc`, already thinned to `FIELD_RBC_SHARE`) add their OD as in a field,
    seeded by their slide position."""
    from training.data.synth_cells import Stain, draw_cell, draw_rbc

    stain = Stain(0.0, 1.0)
    hh, ww = od.shape[:2]

    def paste(sprite, cover: bool) -> None:
        h, w = sprite.alpha.shape
        y0, x0 = sprite.y0, sprite.x0
        ys, xs = slice(max(0, y0), min(hh, y0 + h)), slice(max(0, x0), min(ww, x0 + w))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return
        loc = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        if cover:
            a = sprite.alpha[loc]
            od[ys, xs] = od[ys, xs] * (1 - 0.7 * a)[..., None] + sprite.od[loc]
        else:
            od[ys, xs] += sprite.od[loc]

    for cx, cy, layer in rbc:
        for gx, gy, x, y in zip(cx, cy, *px(cx, cy), strict=True):
            # seeded by the red cell's slide position (0.1 um), the same in every tile
            key = [spec.seed, 90 + layer, int(round(gx * 10)) + 10**7, int(round(gy * 10)) + 10**7]
            paste(draw_rbc(np.random.default_rng(key), float(x), float(y), um, stain), False)
    types, cum = _field_types()
    cx, cy, i, j = nucleated
    pick = np.searchsorted(cum, _hash01(i, j, spec.seed, 43), side="right")
    for x, y, gi, gj, t in zip(*px(cx, cy), i, j, pick, strict=True):
        rng = np.random.default_rng([spec.seed, 95, int(gi) & 0xFFFFFFFF, int(gj) & 0xFFFFFFFF])
        sprite = draw_cell(rng, types[min(int(t), len(types) - 1)], float(x), float(y), um, stain)
        paste(sprite, True)


def nucleated_counts(spec: SlideSpec, zmap: np.ndarray) -> np.ndarray:
    """int32[rows, cols]: nucleated cells whose centre lies in each block (ground truth)."""
    rows, cols = zmap.shape
    bum = spec.block * spec.mpp
    ni = math.ceil(cols * bum / _NUC_SPACING_UM) + 1
    nj = math.ceil(rows * bum / _NUC_SPACING_UM) + 1
    i, j = np.meshgrid(np.arange(ni), np.arange(nj))
    cx = (i + 0.5 + 0.4 * (_hash01(i, j, spec.seed, 40) - 0.5)) * _NUC_SPACING_UM
    cy = (j + 0.5 + 0.4 * (_hash01(i, j, spec.seed, 41) - 0.5)) * _NUC_SPACING_UM
    r = np.clip((cy // bum).astype(np.int64), 0, rows - 1)
    c = np.clip((cx // bum).astype(np.int64), 0, cols - 1)
    inside = (cx < cols * bum) & (cy < rows * bum)
    zone = zmap[r, c]
    base = np.where(np.isin(zone, (ZONE["out_of_focus"], ZONE["debris"])), ZONE["monolayer"], zone)
    p = np.zeros(base.shape, np.float32)
    for name, prob in _NUC_P.items():
        p[base == ZONE[name]] = prob
    present = inside & (_hash01(i, j, spec.seed, 42) < p)
    counts = np.zeros((rows, cols), np.int32)
    np.add.at(counts, (r[present], c[present]), 1)
    return counts


# -- writer ------------------------------------------------------------------------------------
def _tiles(spec: SlideSpec, zmap: np.ndarray, ds: int) -> Iterator[np.ndarray]:
    w, h = math.ceil(spec.width / ds), math.ceil(spec.height / ds)
    t = spec.tile
    for ty in range(0, h, t):
        for tx in range(0, w, t):
            yield render_region(spec, zmap, tx * ds, ty * ds, t, t, ds)


def write_slide(path: Path, spec: SlideSpec) -> dict:
    """Write a pyramidal tiled TIFF (deflate, one page per level, pixel size recorded) and a
    JSON sidecar `<stem>.json` with the spec, zone names, zone map and nucleated-cell counts.
    Memory: one tile rendered at a time. Returns the sidecar dict."""
    import tifffile

    zmap = zone_map(spec)
    counts = nucleated_counts(spec, zmap)
    res = 1e4 / spec.mpp  # pixels per cm
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for ds in spec.levels:
            w, h = math.ceil(spec.width / ds), math.ceil(spec.height / ds)
            tif.write(
                _tiles(spec, zmap, ds),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(spec.tile, spec.tile),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=0 if ds == 1 else 1,
                resolution=(res / ds, res / ds),
                resolutionunit="CENTIMETER",
                description="MarrowScope synthetic slide (not a real smear)" if ds == 1 else None,
                metadata=None,
            )
    truth = {
        "spec": asdict(spec),
        "synthetic": True,
        "zones": list(ZONES),
        "zone_map": zmap.tolist(),
        "nucleated_counts": counts.tolist(),
    }
    path.with_suffix(".json").write_text(json.dumps(truth))
    return truth


def load_truth(slide_path: Path) -> tuple[SlideSpec, np.ndarray, np.ndarray]:
    """(spec, zone map, nucleated counts) from a slide's JSON sidecar."""
    truth = json.loads(Path(slide_path).with_suffix(".json").read_text())
    s = truth["spec"]
    spec = SlideSpec(**{**s, "levels": tuple(s["levels"])})
    return spec, np.array(truth["zone_map"], np.uint8), np.array(truth["nucleated_counts"])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--height", type=int, default=6144)
    return p


def main(args: argparse.Namespace) -> None:
    for k in range(args.count):
        spec = SlideSpec(width=args.width, height=args.height, seed=args.seed + k)
        path = args.out / f"slide_{k:03d}.tiff"
        write_slide(path, spec)
        log.info("wrote %s (%dx%d, seed %d)", path, spec.width, spec.height, spec.seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
