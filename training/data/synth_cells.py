"""Drawing one synthetic cell: shape, nucleus, chromatin, granules, attributes.

Every cell is built in a small local patch from signed distance fields (positive inside),
then turned into optical density (Beer-Lambert absorbance, 3 channels): the renderer
composites patches into the image and converts density to RGB. All drawing is vectorised
numpy on the patch; nothing loops over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from marrowscope.taxonomy import ATTRIBUTE_CODES

Float = np.float32


@dataclass(frozen=True)
class Morph:
    """Per-type morphology. Diameters in micrometres; colours are RGB transmitted at unit
    density; `nc` is nucleus diameter / cell diameter."""

    diam: tuple[float, float, float, float]  # mean, sd, lo, hi
    nc: float
    shape: str  # round | kidney | band | seg | bilobed
    ecc: float  # nucleus offset from the cell centre, fraction of the radius
    chrom: str  # fine | medium | lacy | coarse
    nuc: tuple[int, int, int]
    nuc_d: float
    cyto: tuple[int, int, int]
    cyto_d: float
    gran: tuple[str, tuple[int, int, int], float] | None = None  # texture, colour, strength
    vacuoles: float = 0.0
    hof: bool = False
    cyto_alt: tuple[int, int, int] | None = None  # second cytoplasm colour mixed per cell


MORPH: dict[str, Morph] = {
    "BLA": Morph(
        (15.0, 1.8, 11.5, 19.0),
        0.80,
        "round",
        0.08,
        "fine",
        (128, 82, 168),
        0.85,
        (140, 165, 215),
        0.75,
    ),
    "PMO": Morph(
        (19.0, 2.0, 14.0, 24.0),
        0.62,
        "round",
        0.22,
        "medium",
        (120, 76, 160),
        0.85,
        (160, 172, 215),
        0.7,
        ("granule", (140, 40, 110), 1.1),
    ),
    "MYB": Morph(
        (15.0, 1.6, 11.0, 19.0),
        0.58,
        "round",
        0.22,
        "medium",
        (105, 62, 148),
        0.95,
        (212, 182, 205),
        0.8,
        ("granule", (185, 115, 160), 0.5),
    ),
    "MMZ": Morph(
        (14.0, 1.5, 10.5, 18.0),
        0.58,
        "kidney",
        0.12,
        "coarse",
        (100, 58, 142),
        1.0,
        (220, 190, 202),
        0.8,
        ("granule", (185, 120, 160), 0.35),
    ),
    "NGB": Morph(
        (12.5, 1.3, 9.5, 16.0),
        0.0,
        "band",
        0.0,
        "coarse",
        (92, 52, 135),
        1.05,
        (224, 196, 206),
        0.8,
        ("granule", (190, 125, 165), 0.3),
    ),
    "NGS": Morph(
        (12.5, 1.3, 9.5, 16.0),
        0.0,
        "seg",
        0.0,
        "coarse",
        (88, 48, 130),
        1.1,
        (224, 196, 206),
        0.8,
        ("granule", (190, 125, 165), 0.3),
    ),
    "EOS": Morph(
        (14.0, 1.4, 11.0, 17.5),
        0.0,
        "bilobed",
        0.0,
        "coarse",
        (98, 58, 140),
        1.0,
        (235, 200, 190),
        0.6,
        ("coarse_granule", (232, 112, 74), 1.5),
    ),
    "BAS": Morph(
        (12.5, 1.3, 10.0, 15.5),
        0.0,
        "bilobed",
        0.0,
        "medium",
        (110, 70, 150),
        0.9,
        (215, 200, 215),
        0.6,
        ("coarse_granule", (70, 28, 100), 1.6),
    ),
    "MON": Morph(
        (17.0, 2.0, 13.0, 22.0),
        0.60,
        "kidney",
        0.12,
        "lacy",
        (132, 92, 168),
        0.8,
        (182, 184, 212),
        0.8,
        ("granule", (170, 120, 170), 0.2),
        vacuoles=0.7,
    ),
    "LYT": Morph(
        (9.0, 1.2, 6.5, 12.5),
        0.86,
        "round",
        0.08,
        "coarse",
        (82, 46, 122),
        1.15,
        (150, 176, 222),
        0.7,
    ),
    "PLM": Morph(
        (13.0, 1.6, 9.5, 17.0),
        0.52,
        "round",
        0.38,
        "coarse",
        (88, 52, 128),
        1.05,
        (96, 116, 190),
        0.95,
        hof=True,
    ),
    "EBO": Morph(
        (11.0, 1.8, 7.5, 15.0),
        0.70,
        "round",
        0.06,
        "coarse",
        (66, 36, 102),
        1.25,
        (108, 130, 200),
        0.85,
        cyto_alt=(196, 166, 186),
    ),
}
RBC_COLOUR = (226, 150, 160)
BG_COLOUR = (236, 226, 232)
NUCLEOLUS_COLOUR = (150, 150, 205)
AUER_COLOUR = (178, 44, 96)


@dataclass
class Sprite:
    """One drawn cell in a local patch whose top-left pixel is (x0, y0) in image coordinates.

    alpha: float32[h, w] coverage in [0, 1]; nucleus: bool[h, w] (None for RBC);
    od: float32[h, w, 3] optical density of the cell itself."""

    code: str
    x0: int
    y0: int
    alpha: np.ndarray
    nucleus: np.ndarray | None
    od: np.ndarray
    attributes: dict[str, bool] = field(default_factory=dict)


class Stain:
    """Per-image stain: maps RGB colours to optical density with a hue rotation (around the
    grey axis) and an intensity factor."""

    def __init__(self, hue_deg: float, intensity: float) -> None:
        t = np.deg2rad(hue_deg)
        k = np.ones(3) / np.sqrt(3.0)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        self.rot = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
        self.intensity = intensity

    def od(self, rgb) -> np.ndarray:
        base = -np.log(np.clip(np.asarray(rgb, dtype=np.float64), 1, 255) / 255.0)
        return np.clip(self.rot @ base, 0.0, None).astype(Float) * Float(self.intensity)


@lru_cache(maxsize=8)
def texture_bank(um_per_px: float, size: int = 384) -> dict[str, np.ndarray]:
    """Tileable noise textures (float32[size, size]) scaled to the resolution; fixed seed so
    that the bank is identical in every process."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(20220901)

    def smooth(sigma_um: float) -> np.ndarray:
        a = gaussian_filter(
            rng.standard_normal((size, size)), max(sigma_um / um_per_px, 0.5), mode="wrap"
        )
        return ((a - a.mean()) / (a.std() + 1e-9)).astype(Float)

    def dots(frac: float, sigma_um: float) -> np.ndarray:
        pts = (rng.random((size, size)) < frac).astype(np.float64)
        a = gaussian_filter(pts, max(sigma_um / um_per_px, 0.45), mode="wrap")
        return np.clip(a / (np.quantile(a, 0.995) + 1e-9), 0, 1).astype(Float)

    return {
        "fine": smooth(0.18),
        "medium": smooth(0.35),
        "lacy": smooth(0.5),
        "coarse": np.tanh(1.6 * smooth(0.55)).astype(Float),
        "blob": smooth(2.0),
        "granule": dots(0.05 * um_per_px**2 / 0.073, 0.2),
        "coarse_granule": dots(0.09 * um_per_px**2 / 0.073, 0.38),
    }


def _tex(bank, name, rng, h, w) -> np.ndarray:
    t = bank[name]
    n = t.shape[0]
    oy, ox = rng.integers(0, n, size=2)
    return t[np.ix_((np.arange(h) + oy) % n, (np.arange(w) + ox) % n)]


def _disc(x, y, cx, cy, r):
    return r - np.hypot(x - cx, y - cy)


def _capsule(x, y, p0, p1, r):
    d = np.subtract(p1, p0)
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return r - np.hypot(x - p0[0] - t * d[0], y - p0[1] - t * d[1])


def _blob(x, y, cx, cy, a, b, angle, rng, wobble):
    """Ellipse with a few low harmonics on its outline (approximate signed distance)."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    cx, cy, a, b = np.float32(cx), np.float32(cy), np.float32(a), np.float32(b)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    rho, th = np.hypot(u, v), np.arctan2(v, u)
    r = a * b / np.sqrt((b * np.cos(th)) ** 2 + (a * np.sin(th)) ** 2 + 1e-9)
    for k in (2, 3, 5):
        amp, ph = np.float32(wobble * rng.normal() / k), np.float32(rng.uniform(0, 2 * np.pi))
        r = r * (1 + amp * np.cos(k * th + ph))
    return r - rho


def _alpha(sdf, edge=1.0):
    return np.clip(sdf / edge + 0.5, 0, 1).astype(Float)


def _nucleus_sdf(m: Morph, code: str, x, y, radius, rng, cup: bool):
    """Signed distance of the nucleus, the pale clearing zone (or None) and its centre."""
    ang = rng.uniform(0, 2 * np.pi)
    if m.shape in ("round", "kidney"):
        rn = radius * m.nc * np.exp(rng.normal(0, 0.05))
        off = radius * m.ecc * rng.uniform(0.3, 1.0)
        cx, cy = off * np.cos(ang), off * np.sin(ang)
        e = rng.uniform(0, 0.12)
        sdf = _blob(x, y, cx, cy, rn * (1 + e), rn * (1 - e), rng.uniform(0, np.pi), rng, 0.04)
        clear = None
        if m.shape == "kidney" or cup:
            # Indentation (kidney) or deep invagination (cup-like, NPM1): remove a disc
            # straddling the nuclear edge; in the cup its area becomes the clearing zone.
            d_ang = ang + rng.normal(0, 0.5) + (0 if cup else np.pi)
            rr = rn * (rng.uniform(0.38, 0.5) if cup else rng.uniform(0.45, 0.6))
            dist = rn * (rng.uniform(0.6, 0.8) if cup else rng.uniform(0.95, 1.1))
            hole = _disc(x, y, cx + dist * np.cos(d_ang), cy + dist * np.sin(d_ang), rr)
            sdf = np.minimum(sdf, -hole)
            if cup:
                clear = hole + rr * 0.35  # a slightly wider pale halo than the cup itself
        return sdf, clear, (cx, cy)
    if m.shape == "band":
        ra, w = radius * rng.uniform(0.45, 0.58), radius * rng.uniform(0.14, 0.19)
        span = np.deg2rad(rng.uniform(190, 290))
        rho, th = np.hypot(x, y), np.arctan2(y, x)
        dth = np.angle(np.exp(1j * (th - ang)))
        on_arc = np.abs(dth) <= span / 2
        ends = [(ra * np.cos(ang + s * span / 2), ra * np.sin(ang + s * span / 2)) for s in (-1, 1)]
        d_end = np.minimum(*[np.hypot(x - ex, y - ey) for ex, ey in ends])
        d = np.where(on_arc, np.abs(rho - ra), d_end)
        return w * (1 + 0.15 * np.cos(3 * th)) - d, None, (0.0, 0.0)
    n = 2 if m.shape == "bilobed" else int(rng.choice([2, 3, 3, 4, 4, 5]))
    ra = radius * (0.42 if n > 2 else 0.36)
    lobe_r = radius * (0.31 if n == 2 else rng.uniform(0.2, 0.25))
    span = np.deg2rad(min(70 * (n - 1), 280) if n > 2 else 180)
    angles = ang + np.linspace(-span / 2, span / 2, n)
    centres = [(ra * np.cos(a), ra * np.sin(a)) for a in angles]
    sdf = np.full(x.shape, -1e3, dtype=np.float32)
    for c in centres:
        sdf = np.maximum(
            sdf,
            _blob(
                x,
                y,
                c[0],
                c[1],
                lobe_r * rng.uniform(0.95, 1.15),
                lobe_r * rng.uniform(0.8, 0.95),
                rng.uniform(0, np.pi),
                rng,
                0.05,
            ),
        )
    for a, b in zip(centres[:-1], centres[1:], strict=True):
        sdf = np.maximum(sdf, _capsule(x, y, a, b, radius * 0.05))
    return sdf, None, (0.0, 0.0)


def draw_cell(
    rng: np.random.Generator,
    code: str,
    cx: float,
    cy: float,
    um_per_px: float,
    stain: Stain,
    flags: dict[str, bool] | None = None,
) -> Sprite:
    """Draw a nucleated cell of type `code` centred at image position (cx, cy) pixels.

    `flags` requests attributes (only meaningful for blasts; other types draw their own
    typical morphology and report it). Returns the Sprite with the attributes as drawn.
    """
    m = MORPH[code]
    flags = flags or {}
    mean, sd, lo, hi = m.diam
    radius = float(np.clip(rng.normal(mean, sd), lo, hi)) / 2 / um_per_px
    half = int(np.ceil(radius * 1.25)) + 2
    ix, iy = int(round(cx)), int(round(cy))
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    x -= np.float32(cx - ix)
    y -= np.float32(cy - iy)
    cell_sdf = _blob(
        x,
        y,
        0.0,
        0.0,
        radius * rng.uniform(1.0, 1.1),
        radius * rng.uniform(0.9, 1.0),
        rng.uniform(0, np.pi),
        rng,
        0.05,
    )
    alpha = _alpha(cell_sdf)
    cup = bool(flags.get("cup_like_nucleus"))
    mm = m
    if code == "BLA" and flags.get("auer_rod"):
        mm = Morph(**{**m.__dict__, "nc": m.nc * 0.88, "ecc": 0.2})
    nuc_sdf, clear, (ncx, ncy) = _nucleus_sdf(mm, code, x, y, radius, rng, cup)
    nuc_sdf = np.minimum(nuc_sdf, cell_sdf - 1.5)
    nuc_a = _alpha(nuc_sdf)
    bank = texture_bank(round(um_per_px, 4))
    h, w = x.shape
    jit = lambda s: Float(np.exp(rng.normal(0, s)))  # noqa: E731

    cyto_rgb = np.asarray(m.cyto, float)
    if m.cyto_alt is not None:  # erythroblast maturation: basophilic -> polychromatic
        cyto_rgb = cyto_rgb + rng.uniform(0, 1) * (np.asarray(m.cyto_alt) - cyto_rgb)
    cyto_od = stain.od(cyto_rgb * np.exp(rng.normal(0, 0.05, 3))) * jit(0.12)
    cyto_den = m.cyto_d * (1 + 0.12 * _tex(bank, "blob", rng, h, w))
    if clear is not None or m.hof:
        if clear is None:  # plasma-cell Golgi zone next to the nucleus, towards the centre
            d = np.hypot(ncx, ncy) + 1e-6
            rn = radius * m.nc
            clear = _disc(x, y, ncx - ncx / d * rn * 0.9, ncy - ncy / d * rn * 0.9, rn * 0.5)
        cyto_den = cyto_den * (1 - 0.75 * _alpha(clear, 2.0))
    condensed = bool(flags.get("condensed_chromatin")) or m.chrom == "coarse"
    chrom = "coarse" if condensed else m.chrom
    contrast = {"fine": 0.12, "medium": 0.22, "lacy": 0.32, "coarse": 0.42}[chrom]
    if code == "BLA" and condensed:
        contrast = 0.3
    nuc_den = m.nuc_d * jit(0.1) * (1 + contrast * _tex(bank, chrom, rng, h, w))
    if code == "BLA" and condensed:
        nuc_den = nuc_den * 1.12
    nuc_rgb = np.asarray(m.nuc, float) * np.exp(rng.normal(0, 0.05, 3))
    nuc_od = stain.od(nuc_rgb)

    nucleoli = bool(flags.get("prominent_nucleoli")) or (code == "PMO" and rng.random() < 0.3)
    nucleolus_a = np.zeros_like(nuc_a)
    if nucleoli:
        rn = radius * mm.nc
        for _ in range(int(rng.integers(1, 4))):
            r_, a_ = rn * np.sqrt(rng.uniform(0, 0.35)), rng.uniform(0, 2 * np.pi)
            rad = rng.uniform(0.9, 1.6) / um_per_px
            nucleolus_a = np.maximum(
                nucleolus_a,
                _alpha(_disc(x, y, ncx + r_ * np.cos(a_), ncy + r_ * np.sin(a_), rad), 1.5),
            )
        nucleolus_a *= nuc_a
    nucl_od = stain.od(NUCLEOLUS_COLOUR)
    n_od = (nuc_den * (1 - 0.35 * nucleolus_a))[..., None] * (
        nuc_od * (1 - nucleolus_a[..., None]) + nucl_od * nucleolus_a[..., None]
    )
    od = (1 - nuc_a)[..., None] * (cyto_den[..., None] * cyto_od) + nuc_a[..., None] * n_od

    if m.vacuoles and rng.random() < m.vacuoles:
        vac = np.zeros_like(alpha)
        for _ in range(int(rng.integers(1, 6))):
            r_, a_ = radius * rng.uniform(0.5, 0.85), rng.uniform(0, 2 * np.pi)
            vac = np.maximum(
                vac,
                _alpha(
                    _disc(x, y, r_ * np.cos(a_), r_ * np.sin(a_), rng.uniform(0.5, 1.3) / um_per_px)
                ),
            )
        od = od * (1 - 0.8 * vac * (1 - nuc_a))[..., None]
    if m.gran is not None:
        tex, colour, strength = m.gran
        g = _tex(bank, tex, rng, h, w) * strength * jit(0.2)
        over = np.ones_like(nuc_a) if code == "BAS" else (1 - 0.7 * nuc_a)
        g = g * over * _alpha(cell_sdf - 1.0)
        od = od * (1 - 0.5 * np.clip(g, 0, 1))[..., None] + g[..., None] * stain.od(colour)
    auer = code == "BLA" and bool(flags.get("auer_rod"))
    if auer:
        rn = radius * mm.nc
        a_ = np.arctan2(-ncy, -ncx) + rng.normal(0, 0.3)
        r_ = min(radius * 0.9 - 1, max(rn - np.hypot(ncx, ncy), 0) + 0.5 * (radius - rn))
        px, py = r_ * np.cos(a_), r_ * np.sin(a_)
        half_len = rng.uniform(1.5, 3.0) / um_per_px
        t = a_ + np.pi / 2 + rng.normal(0, 0.3)
        rod = _capsule(
            x,
            y,
            (px - half_len * np.cos(t), py - half_len * np.sin(t)),
            (px + half_len * np.cos(t), py + half_len * np.sin(t)),
            max(0.3 / um_per_px, 0.7),
        )
        rod_a = _alpha(rod) * alpha
        od = od + (1.3 * rod_a)[..., None] * stain.od(AUER_COLOUR)
    attrs = {a: False for a in ATTRIBUTE_CODES}
    attrs.update(
        auer_rod=auer,
        prominent_nucleoli=nucleoli,
        cup_like_nucleus=cup,
        condensed_chromatin=condensed,
    )
    return Sprite(
        code,
        ix - half,
        iy - half,
        alpha,
        (nuc_a >= 0.5) & (alpha >= 0.5),
        (od * alpha[..., None]).astype(Float),
        attrs,
    )


def draw_rbc(
    rng: np.random.Generator, cx: float, cy: float, um_per_px: float, stain: Stain
) -> Sprite:
    """A red cell: pale pink disc (7-8.5 um) with central pallor; no nucleus."""
    radius = rng.uniform(7.0, 8.5) / 2 / um_per_px
    half = int(np.ceil(radius * 1.15)) + 2
    ix, iy = int(round(cx)), int(round(cy))
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    x -= np.float32(cx - ix)
    y -= np.float32(cy - iy)
    sdf = _blob(
        x,
        y,
        0.0,
        0.0,
        radius * rng.uniform(1.0, 1.08),
        radius * rng.uniform(0.92, 1.0),
        rng.uniform(0, np.pi),
        rng,
        0.03,
    )
    alpha = _alpha(sdf)
    rho = np.hypot(x, y) / radius
    den = (
        0.6
        * (1 - rng.uniform(0.55, 0.8) * np.exp(-((rho / 0.45) ** 2)))
        * Float(np.exp(rng.normal(0, 0.1)))
    )
    od = (alpha * den)[..., None] * stain.od(
        np.asarray(RBC_COLOUR) * np.exp(rng.normal(0, 0.03, 3))
    )
    return Sprite(
        "RBC",
        ix - half,
        iy - half,
        alpha,
        None,
        od.astype(Float),
        {a: False for a in ATTRIBUTE_CODES},
    )
