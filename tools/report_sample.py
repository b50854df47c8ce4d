"""A sample report of a SYNTHETIC case: the PDF, its first page as PNG (docs/), and the
ORU^R01 message, for the docs and the tests.

The case is one image of the synthetic smear generator with its ground-truth cells standing
in for detections and types, made-up probabilities and a heatmap of bumps on the blasts:
it shows the layout, and no figure in it is a measurement.

    python -m tools.report_sample --out DIR   # DIR/report.pdf, DIR/report-1.png, DIR/oru.hl7
"""

from __future__ import annotations

import argparse
import logging
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from marrowscope.features import wilson_interval
from marrowscope.taxonomy import BLAST, CELL_TYPES, COUNTED_CODES
from services.gateway.result import AnalysisResult

log = logging.getLogger(__name__)

SYNTHETIC_NOTE = "SYNTHETIC case (generated smear; made-up probabilities)"


def synthetic_case(
    size: tuple[int, int] = (640, 480), seed: int = 3
) -> tuple[np.ndarray, AnalysisResult]:
    """(uint8[H, W, 3] image, AnalysisResult) of one synthetic AML case whose cells are the
    generator's ground truth; importances peak on blasts."""
    from training.data.synth_cohort import SynthConfig, case_rng, sample_cohort
    from training.data.synth_render import render_image

    config = SynthConfig(size=size, images_per_case=1, aml_fraction=1.0)
    spec = sample_cohort(seed, 1, config)[0]
    image, instances = render_image(case_rng(seed, 0, 1), spec, config)
    names = {c.code: c.name for c in CELL_TYPES}
    cells = []
    for inst in instances:
        x, y, w, h = inst.bbox
        counted = inst.code in COUNTED_CODES
        blast = inst.code == BLAST
        cells.append(
            {
                "box": [x, y, x + w, y + h],
                "detector_label": "cell" if counted else inst.code,
                "score": 0.97,
                "cell_type": inst.code if counted else None,
                "confidence": 0.9 if counted else None,
                "importance": (0.6 + 0.4 * ((x + y) % 7) / 7) if blast else 0.1,
            }
        )
    counts = {c: sum(1 for cell in cells if cell["cell_type"] == c) for c in COUNTED_CODES}
    n = sum(counts.values())
    differential = []
    for code in COUNTED_CODES:
        low, high = wilson_interval(counts[code], n)
        differential.append(
            {
                "code": code,
                "name": names[code],
                "count": counts[code],
                "fraction": counts[code] / n if n else 0.0,
                "ci_low": low,
                "ci_high": high,
            }
        )
    versions = {s: {"model": s, "version": "3"} for s in ("segmentation", "celltype", "ensemble")}
    versions |= {s: {"model": s, "version": "2"} for s in ("npm1", "explain")}
    morph = {"threshold": 0.5, "threshold_source": "model", "model_version": "3"}
    result = AnalysisResult.model_validate(
        {
            "analysis_id": "a1b2c3d4e5f6",
            "outcome": "succeeded",
            "aml": {"status": "predicted", "model_length_unit": "um"},
            "p_aml": 0.934,
            "aml_threshold": 0.5,
            "aml_positive": True,
            "p_npm1": 0.71,
            "npm1_threshold": 0.5,
            "npm1_positive": True,
            "npm1_morphology": {
                "status": "predicted",
                "p": 0.68,
                "positive": True,
                "model": "ensemble",
                **morph,
            },
            "apl_morphology": {
                "status": "predicted",
                "p": 0.07,
                "positive": False,
                "model": "ensemble",
                **morph,
            },
            "n_images": 1,
            "n_cells_detected": len(cells),
            "n_cells_counted": n,
            "blast_percent": 100 * counts[BLAST] / n if n else None,
            "differential": differential,
            "morphometrics_unit": "um",
            "model_versions": versions,
            "explained": True,
            "importance_source": "explain_occlusion",
            "images": [
                {
                    "index": 0,
                    "sha256": "0" * 64,
                    "width": size[0],
                    "height": size[1],
                    "n_detected": len(cells),
                    "n_counted": n,
                    "um_per_px": config.um_per_px,
                    "um_per_px_source": "request",
                    "p_npm1": 0.71,
                    "heatmap_sha256": "1" * 64,
                    "cells": cells,
                }
            ],
            "generated_at": "2026-12-07T12:00:00+00:00",
        }
    )
    return image, result


def withheld(result: AnalysisResult) -> AnalysisResult:
    """`result` with P(AML) withheld (pixel_size_required), NPM1 by morphology withheld with
    it and APL by morphology not applicable: every not-predicted status a report words."""
    aml, npm1, apl = result.aml, result.npm1_morphology, result.apl_morphology
    assert aml is not None and npm1 is not None and apl is not None
    none = {"p": None, "positive": None}
    return result.model_copy(
        update={
            "p_aml": None,
            "aml_positive": None,
            "aml": aml.model_copy(
                update={
                    "status": "abstained",
                    "reason": "pixel_size_required",
                    "detail": "send options.um_per_px",
                }
            ),
            "npm1_morphology": npm1.model_copy(
                update={"status": "abstained", "reason": "pixel_size_required", **none}
            ),
            "apl_morphology": apl.model_copy(
                update={"status": "not_applicable", "reason": "not_aml", **none}
            ),
        }
    )


def too_few_cells() -> AnalysisResult:
    """A case that abstained as a whole (3 counted cells): no calls, no image shown."""
    detail = "too few cells for a reliable call: 3 counted (non-RBC) cells, at least 20 needed"
    return AnalysisResult.model_validate(
        {
            "analysis_id": "a-few",
            "outcome": "abstained",
            "abstain_reason": detail,
            "aml": {"status": "abstained", "reason": "too_few_cells", "detail": detail},
            "aml_threshold": 0.5,
            "npm1_threshold": 0.5,
            "n_images": 1,
            "n_cells_detected": 3,
            "n_cells_counted": 3,
            "differential": [],
            "model_versions": {"segmentation": {"model": "segmentation", "version": "3"}},
            "images": [],
            "generated_at": "2026-12-07T12:00:00+00:00",
        }
    )


def synthetic_heatmap(result: AnalysisResult, shape: tuple[int, int]) -> np.ndarray:
    """float32[h, w]: a Gaussian bump on every blast of image 0 (coarse, like occlusion)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for c in result.images[0].cells:
        if c.cell_type == BLAST:
            cx, cy = (c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2
            out += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 30.0**2))
    return out


def main(argv: list[str] | None = None) -> None:
    from services.gateway.hl7 import build_oru
    from services.gateway.pdf import Figure, build_pdf
    from services.gateway.reading import CaseHeader
    from services.gateway.render import heatmap_png, overlay_png

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    args.out.mkdir(parents=True, exist_ok=True)
    image, result = synthetic_case()
    im = result.images[0]
    figure = Figure(
        im,
        overlay_png(image, im.cells),
        heatmap_png(image, synthetic_heatmap(result, image.shape[:2])),
    )
    case = CaseHeader(
        analysis_id=result.analysis_id,
        accession="SYNTH-0001",
        specimen_type="bone_marrow_aspirate",
        stain="MGG",
        submitted_at=datetime(2026, 12, 7, 11, 58, tzinfo=UTC),
        finished_at=datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
    )
    pdf = build_pdf(case=case, result=result, figure=figure, note=SYNTHETIC_NOTE)
    (args.out / "report.pdf").write_bytes(pdf)
    url = f"https://marrowscope.example/v1/analyses/{case.analysis_id}/report?format=pdf"
    oru = build_oru(case=case, result=result, control_id=f"{case.analysis_id}-1", pdf_url=url)
    (args.out / "oru.hl7").write_text(oru.replace("\r", "\n") + "\n")
    subprocess.run(
        ["pdftoppm", "-png", "-r", "80", str(args.out / "report.pdf"), str(args.out / "report")],
        check=True,
    )
    log.info("wrote %s", sorted(p.name for p in args.out.iterdir()))


if __name__ == "__main__":
    main()
