"""Synthetic cohort: generator settings and the per-case ground truth (label, differential).

A case is sampled once, before any image is drawn, so that the case-level truth (AML label,
NPM1 status, VAF, target blast fraction, per-case attribute rates) does not depend on how
the rendering is split across worker processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from marrowscope.taxonomy import BLAST, COUNTED_CODES

# Blast diameter ~12-18 um; at 0.27 um/px a blast is ~44-67 px across (the issue asks for
# 40-70 px at 640x480, the typical size of an ROI crop from a 50-63x objective).
DEFAULT_UM_PER_PX = 0.27
REFERENCE_SIZE = (640, 480)

# Healthy adult marrow differential (percent of nucleated cells; textbook reference ranges,
# centre values). Blasts are drawn separately from their own 0-5 % range.
CONTROL_DIFFERENTIAL: dict[str, float] = {
    "PMO": 3.5,
    "MYB": 12.0,
    "MMZ": 12.0,
    "NGB": 14.0,
    "NGS": 14.0,
    "EOS": 3.0,
    "BAS": 0.5,
    "MON": 3.0,
    "LYT": 13.0,
    "PLM": 1.5,
    "EBO": 22.0,
}
# Non-blast remainder in AML: maturation is suppressed (few late granulocytes), residual
# lymphocytes and erythroid cells dominate.
AML_REMAINDER: dict[str, float] = {
    "PMO": 5.0,
    "MYB": 7.0,
    "MMZ": 5.0,
    "NGB": 5.0,
    "NGS": 7.0,
    "EOS": 1.5,
    "BAS": 0.7,
    "MON": 7.0,
    "LYT": 25.0,
    "PLM": 2.5,
    "EBO": 20.0,
}
LABELS = ("control", "aml")


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator. Sizes in pixels (width, height); um_per_px in micrometres."""

    size: tuple[int, int] = REFERENCE_SIZE
    um_per_px: float = DEFAULT_UM_PER_PX
    images_per_case: int = 3
    """Maximum images per case; each case draws its count uniformly from 1..images_per_case."""
    jpeg_quality: int | None = None
    stain_hue: float = 0.0
    """Hue rotation of every stain colour, degrees (domain shift knob)."""
    stain_intensity: float = 1.0
    """Multiplier on optical density (pale < 1 < dark)."""
    blur: float = 0.6
    """Gaussian blur sigma in pixels (defocus)."""
    illumination: float = 0.08
    """Strength of the illumination gradient and vignetting (0 = flat field)."""
    crowding: float = 1.0
    """Multiplier on cell density; higher values also allow more overlap."""
    rbc_contact: float = 0.0
    """Mean number of extra red cells placed touching each nucleated cell, overlapping its
    rim (the white cell lies on top): the crowded fields where a classical split leaks into
    red cells. 0 = off (outputs unchanged from before the knob)."""
    label_noise: float = 0.0
    """Fraction of counted-cell annotations whose category is flipped to another type."""
    aml_fraction: float = 0.5
    npm1_fraction: float = 0.33
    """Fraction of AML cases that are NPM1-mutated."""
    min_visible: float = 0.35
    """Annotations whose visible area is below this fraction of the full cell are dropped."""

    def __post_init__(self) -> None:
        w, h = self.size
        checks = [
            (w >= 32 and h >= 32, f"size must be at least 32x32 pixels, got {w}x{h}"),
            (
                0.05 <= self.um_per_px <= 5.0,
                f"um_per_px must be in [0.05, 5], got {self.um_per_px}",
            ),
            (
                self.images_per_case >= 1,
                f"images_per_case must be >= 1, got {self.images_per_case}",
            ),
            (
                self.jpeg_quality is None or 1 <= self.jpeg_quality <= 100,
                f"jpeg_quality must be in 1..100, got {self.jpeg_quality}",
            ),
            (
                0.1 <= self.stain_intensity <= 5.0,
                f"stain_intensity must be in [0.1, 5], got {self.stain_intensity}",
            ),
            (
                -180.0 <= self.stain_hue <= 180.0,
                f"stain_hue must be in [-180, 180], got {self.stain_hue}",
            ),
            (0.0 <= self.blur <= 20.0, f"blur must be in [0, 20], got {self.blur}"),
            (
                0.0 <= self.illumination <= 0.9,
                f"illumination must be in [0, 0.9], got {self.illumination}",
            ),
            (0.05 <= self.crowding <= 5.0, f"crowding must be in [0.05, 5], got {self.crowding}"),
            (
                0.0 <= self.rbc_contact <= 10.0,
                f"rbc_contact must be in [0, 10], got {self.rbc_contact}",
            ),
            (
                0.0 <= self.label_noise <= 1.0,
                f"label_noise must be in [0, 1], got {self.label_noise}",
            ),
            (
                0.0 <= self.aml_fraction <= 1.0,
                f"aml_fraction must be in [0, 1], got {self.aml_fraction}",
            ),
            (
                0.0 <= self.npm1_fraction <= 1.0,
                f"npm1_fraction must be in [0, 1], got {self.npm1_fraction}",
            ),
            (
                0.0 <= self.min_visible < 1.0,
                f"min_visible must be in [0, 1), got {self.min_visible}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


@dataclass(frozen=True)
class CaseSpec:
    """Ground truth of one synthetic case, fixed before rendering.

    `type_probs` is the nucleated-cell differential (sums to 1 over COUNTED_CODES);
    the `p_*` fields are per-blast probabilities of each drawn attribute.
    """

    index: int
    case_id: str
    patient_id: str
    label: str  # "control" | "aml"
    npm1_status: str  # "mutated" | "wild_type" | "na"
    vaf: float | None
    blast_fraction: float
    type_probs: dict[str, float]
    n_images: int
    p_cup: float = 0.0
    p_nucleoli: float = 0.5
    p_condensed: float = 0.0
    p_auer: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def aml_label(self) -> int:
        return int(self.label == "aml")

    @property
    def group(self) -> str:
        """control | aml_npm1_wt | aml_npm1_mut (used for previews and summaries)."""
        if self.label == "control":
            return "control"
        return "aml_npm1_mut" if self.npm1_status == "mutated" else "aml_npm1_wt"


def _differential(
    rng: np.random.Generator, base: dict[str, float], blast: float
) -> dict[str, float]:
    keys = list(base)
    alpha = np.array([base[k] for k in keys]) / sum(base.values()) * 40.0  # ~15 % relative sd
    rest = rng.dirichlet(alpha)
    probs = {BLAST: blast} | {k: float(v) * (1.0 - blast) for k, v in zip(keys, rest, strict=True)}
    return {k: probs[k] for k in COUNTED_CODES}


def sample_case(
    rng: np.random.Generator, index: int, label: str, npm1: str, config: SynthConfig
) -> CaseSpec:
    """Draw one case's differential and attribute rates for a fixed label and NPM1 status."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    n_images = int(rng.integers(1, config.images_per_case + 1))
    vaf: float | None = None
    if label == "control":
        blast = float(rng.uniform(0.0, 0.05))
        probs = _differential(rng, CONTROL_DIFFERENTIAL, blast)
        # Normal myeloblasts often show a nucleolus; nothing NPM1-like.
        rates = dict(
            p_cup=0.0, p_nucleoli=float(rng.uniform(0.3, 0.6)), p_condensed=0.0, p_auer=0.0
        )
    else:
        blast = float(rng.uniform(0.20, 0.95))
        probs = _differential(rng, AML_REMAINDER, blast)
        has_auer = rng.random() < (0.25 if npm1 == "mutated" else 0.45)
        p_auer = float(rng.uniform(0.05, 0.30)) if has_auer else 0.0
        if npm1 == "mutated":
            vaf = float(rng.uniform(0.10, 0.50))
            rates = dict(
                p_cup=float(rng.uniform(0.35, 0.85)),
                p_nucleoli=float(rng.uniform(0.0, 0.2)),
                p_condensed=float(rng.uniform(0.4, 0.8)),
                p_auer=p_auer,
            )
        else:
            rates = dict(
                p_cup=float(rng.uniform(0.0, 0.06)),
                p_nucleoli=float(rng.uniform(0.55, 0.95)),
                p_condensed=float(rng.uniform(0.0, 0.15)),
                p_auer=p_auer,
            )
    return CaseSpec(
        index=index,
        case_id=f"C{index + 1:04d}",
        patient_id=f"P{index + 1:04d}",
        label=label,
        npm1_status=npm1,
        vaf=vaf,
        blast_fraction=blast,
        type_probs=probs,
        n_images=n_images,
        **rates,
    )


def case_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Independent generator per (seed, case, stream): output does not depend on workers."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def sample_cohort(seed: int, cases: int, config: SynthConfig) -> list[CaseSpec]:
    """All cases of a data set. Label counts are exact: round(aml_fraction * cases) AML, of
    which round(npm1_fraction * n_aml) NPM1-mutated, in a seeded random order."""
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    n_aml = round(config.aml_fraction * cases)
    n_mut = round(config.npm1_fraction * n_aml)
    groups = ["aml_mut"] * n_mut + ["aml_wt"] * (n_aml - n_mut) + ["control"] * (cases - n_aml)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(cases)
    specs = []
    for index in range(cases):
        group = groups[order[index]]
        label = "control" if group == "control" else "aml"
        npm1 = {"control": "na", "aml_mut": "mutated", "aml_wt": "wild_type"}[group]
        specs.append(sample_case(case_rng(seed, index, 0), index, label, npm1, config))
    return specs
