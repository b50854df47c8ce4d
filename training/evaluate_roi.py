"""ROI selection measured: held-out synthetic slides against their zone ground truth, and the
43 real low-magnification overview fields (DeepAPL) as a sanity check.

    python -m training.evaluate_roi --out bench/results --figure docs/roi_overview.png
    python -m training.evaluate_roi --slides 1 --width 2048 --height 1536 --no-real  # quick

Synthetic (SYNTHETIC data, `training.data.synth_slide`): `--slides` slides with seeds from
`--seed` (default 100: disjoint from the tests' seed 3 and the generator's defaults) are
written, read back through OpenSlide and scored with `marrowscope.roi.score_slide`; per slide
the ROI-quality AUROC (score vs "block is monolayer", scikit-learn), the monolayer precision
of `select_regions` (fraction of selected regions in the monolayer) and the estimated vs
true nucleated cells of the selection. The bars (issue 12): AUROC >= 0.95, precision >= 0.95.

Real (`--overviews`, default ../shared/data/deepapl/overviews.csv): each field is scored
with `score_image` at `--overview-um-per-px` (default 0.4: these JPEGs record no pixel size;
their red cells measure ~18.5 px across, 7.5 um / 18.5 px = 0.4) and selected with the
default `RoiConfig`. Reported: how many fields are judged smears (a selection, not
`not_a_smear`), regions selected per field, why the rest were refused. No region ground
truth exists for these: it is a sanity check, not an accuracy.

Writes `roi.json` and `roi.md` under `--out`; `--figure` draws one real field with its
scored regions (`--figure-index` into the CSV).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.roi import Region, RoiConfig, score_image, score_slide, select_regions
from marrowscope.slides import SlideError, open_slide

log = logging.getLogger(__name__)

AUROC_BAR = 0.95
PRECISION_BAR = 0.95
REAL_UM_PER_PX = 0.4


def evaluate_synthetic_slide(path: Path) -> dict[str, Any]:
    """AUROC, monolayer precision and cell counts of one synthetic slide with a sidecar."""
    from sklearn.metrics import roc_auc_score

    from training.data.synth_slide import ZONE, load_truth

    spec, zmap, counts = load_truth(path)
    config = RoiConfig(region_um=spec.block * spec.mpp)
    with open_slide(path) as slide:
        regions = score_slide(slide, config)
    truth = [bool(zmap[r.row, r.col] == ZONE["monolayer"]) for r in regions]
    selection = select_regions(regions, config)
    inside = [bool(zmap[r.row, r.col] == ZONE["monolayer"]) for r in selection.regions]
    return {
        "slide": path.name,
        "seed": spec.seed,
        "size": [spec.width, spec.height],
        "candidates": len(regions),
        "monolayer_blocks": int(sum(truth)),
        "auroc": float(roc_auc_score(truth, [r.score for r in regions])),
        "selected": len(selection.regions),
        "monolayer_precision": float(np.mean(inside)),
        "cells_estimated": selection.cells,
        "cells_true": int(sum(counts[r.row, r.col] for r in selection.regions)),
        "stop_reason": selection.stop_reason,
    }


def evaluate_synthetic(
    workdir: Path, *, slides: int, seed: int, width: int, height: int
) -> dict[str, Any]:
    """Write `slides` synthetic slides under `workdir` and evaluate each."""
    from training.data.synth_slide import SlideSpec, write_slide

    rows = []
    for k in range(slides):
        spec = SlideSpec(width=width, height=height, block=256, levels=(1, 4, 16), seed=seed + k)
        path = workdir / f"roi_{spec.seed}.tiff"
        write_slide(path, spec)
        rows.append(evaluate_synthetic_slide(path))
        log.info("synthetic slide %s: %s", path.name, rows[-1])
    aurocs = [r["auroc"] for r in rows]
    precisions = [r["monolayer_precision"] for r in rows]
    return {
        "synthetic": True,
        "slides": rows,
        "auroc_min": min(aurocs),
        "auroc_median": float(np.median(aurocs)),
        "monolayer_precision_min": min(precisions),
        "monolayer_precision_median": float(np.median(precisions)),
        "bars_met": min(aurocs) >= AUROC_BAR and min(precisions) >= PRECISION_BAR,
    }


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def evaluate_overview(
    rgb: np.ndarray, um_per_px: float, config: RoiConfig | None = None
) -> tuple[dict[str, Any], list[Region], list[Region]]:
    """(row of the report, every scored region, the selected ones) for one real field."""
    config = config or RoiConfig()
    regions = score_image(rgb, um_per_px=um_per_px, config=config)
    row: dict[str, Any] = {
        "candidates": len(regions),
        "best_score": max((r.score for r in regions), default=0.0),
        "nuclei": sum(r.features.nuclei for r in regions),
    }
    try:
        selection = select_regions(regions, config)
    except SlideError as exc:
        why = "no_nucleated_cells" if row["nuclei"] == 0 else "no_region_above_min_score"
        return {**row, "smear": False, "code": exc.code, "why": why, "selected": 0}, regions, []
    return (
        {**row, "smear": True, "selected": len(selection.regions), "cells": selection.cells},
        regions,
        selection.regions,
    )


def evaluate_real(csv_path: Path, um_per_px: float) -> dict[str, Any]:
    """Every field of the overviews CSV (`patient_id,file`, files relative to the CSV)."""
    with csv_path.open(newline="") as fh:
        entries = list(csv.DictReader(fh))
    rows = []
    for entry in entries:
        row, _, _ = evaluate_overview(load_rgb(csv_path.parent / entry["file"]), um_per_px)
        rows.append({"patient_id": entry["patient_id"], "file": entry["file"], **row})
    smears = [r for r in rows if r["smear"]]
    refused: dict[str, int] = {}
    for r in rows:
        if not r["smear"]:
            refused[r["why"]] = refused.get(r["why"], 0) + 1
    return {
        "synthetic": False,
        "overviews": len(rows),
        "um_per_px": um_per_px,
        "judged_smears": len(smears),
        "regions_per_field": rows[0]["candidates"] if rows else 0,
        "selected_per_smear_median": float(np.median([r["selected"] for r in smears]))
        if smears
        else 0.0,
        "refused": refused,
        "fields": rows,
    }


def draw_regions(
    rgb: np.ndarray, regions: list[Region], selected: list[Region], path: Path, max_side: int = 900
) -> Path:
    """PNG of `rgb` with every region outlined (colour from red, score 0, to green, score 1)
    and its score written; selected regions drawn thick and numbered in selection order."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(rgb)
    scale = min(1.0, max_side / max(im.size))
    if scale < 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)))
    draw = ImageDraw.Draw(im)
    order = {(r.row, r.col): k + 1 for k, r in enumerate(selected)}
    for r in regions:
        box = [round(v * scale) for v in (r.x, r.y, r.x + r.size - 1, r.y + r.size - 1)]
        colour = (round(255 * (1 - r.score)), round(160 * r.score), 0)
        number = order.get((r.row, r.col))
        draw.rectangle(box, outline=colour, width=5 if number else 2)
        label = f"{r.score:.2f} n={r.features.nuclei}" + (f"  #{number}" if number else "")
        draw.rectangle(
            [box[0] + 4, box[1] + 4, box[0] + 8 + 7 * len(label), box[1] + 18], fill="white"
        )
        draw.text((box[0] + 6, box[1] + 5), label, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(colors=192).save(path, optimize=True)  # palette PNG: a docs figure, not data
    return path


def markdown(result: dict[str, Any]) -> str:
    s, r = result.get("synthetic_eval"), result.get("real_eval")
    lines = ["# ROI selection (`python -m training.evaluate_roi`)", ""]
    if s:
        lines += [
            "## Synthetic slides (SYNTHETIC, zone ground truth)",
            "",
            "| slide | seed | candidates | AUROC | selected | in monolayer | cells est / true |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in s["slides"]:
            lines.append(
                f"| {row['slide']} | {row['seed']} | {row['candidates']} | {row['auroc']:.3f} "
                f"| {row['selected']} | {row['monolayer_precision']:.3f} | "
                f"{row['cells_estimated']} / {row['cells_true']} |"
            )
        lines += [
            "",
            f"AUROC min {s['auroc_min']:.3f}, monolayer precision min "
            f"{s['monolayer_precision_min']:.3f} (bars {AUROC_BAR} / {PRECISION_BAR}: "
            f"{'met' if s['bars_met'] else 'NOT met'}).",
            "",
        ]
    if r:
        lines += [
            "## Real overview fields (DeepAPL, no region ground truth: sanity check)",
            "",
            f"{r['judged_smears']} of {r['overviews']} fields judged smears at "
            f"{r['um_per_px']} um/px ({r['regions_per_field']} candidate regions per field, "
            f"median {r['selected_per_smear_median']:g} selected per smear); refused: "
            f"{r['refused'] or 'none'}.",
            "",
        ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    from marrowscope.paths import shared_data_dir

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--slides", type=int, default=3, help="held-out synthetic slides")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=3072)
    p.add_argument(
        "--overviews", type=Path, default=shared_data_dir() / "deepapl" / "overviews.csv"
    )
    p.add_argument("--overview-um-per-px", type=float, default=REAL_UM_PER_PX)
    p.add_argument("--no-real", action="store_true", help="skip the real overview fields")
    p.add_argument("--figure", type=Path, default=None, help="PNG of one real field")
    p.add_argument("--figure-index", type=int, default=1)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.slides < 0 or args.overview_um_per_px <= 0:
        raise SystemExit("--slides must be >= 0 and --overview-um-per-px positive")
    real = not args.no_real
    if real and not args.overviews.is_file():
        raise SystemExit(f"{args.overviews} not found (or pass --no-real)")
    if args.figure and not real:
        raise SystemExit("--figure draws a real field: drop --no-real")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="marrowscope-roi-") as tmp:
        if args.slides:
            result["synthetic_eval"] = evaluate_synthetic(
                args.workdir or Path(tmp),
                slides=args.slides,
                seed=args.seed,
                width=args.width,
                height=args.height,
            )
    if real:
        result["real_eval"] = evaluate_real(args.overviews, args.overview_um_per_px)
    if args.figure:
        with args.overviews.open(newline="") as fh:
            entry = list(csv.DictReader(fh))[args.figure_index]
        rgb = load_rgb(args.overviews.parent / entry["file"])
        _, regions, selected = evaluate_overview(rgb, args.overview_um_per_px)
        result["figure"] = {"path": str(args.figure), "file": entry["file"]}
        draw_regions(rgb, regions, selected, args.figure)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roi.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "roi.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
