"""Synthetic MGG-like bone-marrow smear data sets with complete ground truth.

Writes the dataset folder of docs/CONTRACTS.md: `images/<case_id>_<k>.png` (`.jpg` when
`--jpeg-quality` is set), `annotations.json` (COCO, compressed-RLE cell and nucleus masks,
per-cell `attributes`) and `cases.csv` (training.data.manifest). Morphology follows
DESIGN.md: control marrow (blasts 0-5 %), AML (blasts 20-95 %, Auer rods in some cases),
NPM1-mutated AML (cup-like nuclei, perinuclear clearing, condensed chromatin) versus wild
type (prominent nucleoli). Default resolution 0.27 um/px: a 12-18 um blast is 44-67 px.

Everything measured on these images is synthetic, functional evidence only.

    python -m training.data.synth --out data/synth --cases 40 --seed 1 --preview
    python -m training.data.synth --bench
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from marrowscope.taxonomy import BLAST, CATEGORY_IDS, COUNTED_CODES, coco_categories

from .manifest import CaseRecord, write_manifest
from .synth_cohort import CaseSpec, SynthConfig, case_rng, sample_case, sample_cohort
from .synth_render import NUCLEATED_PER_FIELD, CellInstance, render_image, rle_from_crop

__all__ = [
    "CaseSpec",
    "CellInstance",
    "DatasetSummary",
    "SynthConfig",
    "benchmark",
    "generate_dataset",
    "render_image",
    "sample_cohort",
]

GENERATOR = "marrowscope.synth"
VERSION = "1"
log = logging.getLogger(__name__)


@dataclass
class DatasetSummary:
    out_dir: Path
    cases_by_group: dict[str, int]
    images: int
    cells_by_type: dict[str, int]
    dropped: int
    unplaced: int
    flipped: int
    seconds: float
    records: list[CaseRecord] = field(default_factory=list, repr=False)

    def format(self) -> str:
        cells = ", ".join(f"{k} {v}" for k, v in self.cells_by_type.items())
        groups = ", ".join(f"{k} {v}" for k, v in self.cases_by_group.items())
        return (
            f"synthetic data set {self.out_dir}: {sum(self.cases_by_group.values())} cases "
            f"({groups}); {self.images} images in {self.seconds:.1f} s "
            f"({self.images / max(self.seconds, 1e-9):.1f} images/s)\n"
            f"cells annotated: {sum(self.cells_by_type.values())} ({cells})\n"
            f"dropped (visible area below threshold): {self.dropped}; "
            f"not placed (no room): {self.unplaced}; label-noise flips: {self.flipped}"
        )


def _case_cell_types(rng, spec: CaseSpec, config: SynthConfig) -> list[list[str]]:
    """Nucleated cell types per image; the blast count is fixed to the case's blast fraction
    (stochastic rounding) so that small cases still respect the label's blast range."""
    w, h = config.size
    field_ = w * h * config.um_per_px**2 / (640 * 480 * 0.27**2)
    counts = rng.poisson(NUCLEATED_PER_FIELD * config.crowding * field_, size=spec.n_images)
    total = int(counts.sum())
    n_bla = int(np.floor(spec.blast_fraction * total + rng.random()))
    others = [c for c in COUNTED_CODES if c != BLAST]
    p = np.array([spec.type_probs[c] for c in others])
    types = [BLAST] * n_bla + list(rng.choice(others, size=total - n_bla, p=p / p.sum()))
    types = [types[i] for i in rng.permutation(total)]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [types[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _render_case(job: tuple[CaseSpec, int, SynthConfig, str]) -> dict:
    """Render and write every image of one case (runs in a worker process)."""
    from PIL import Image

    spec, seed, config, out_dir = job
    rng = case_rng(seed, spec.index, 1)
    noise_rng = case_rng(seed, spec.index, 2)
    width, height = config.size
    stats: dict[str, int] = {}
    images, anns = [], []
    ext = "png" if config.jpeg_quality is None else "jpg"
    for k, types in enumerate(_case_cell_types(rng, spec, config)):
        image, cells = render_image(rng, spec, config, cell_types=types, stats=stats)
        name = f"images/{spec.case_id}_{k}.{ext}"
        pil = Image.fromarray(image)
        if config.jpeg_quality is None:
            pil.save(Path(out_dir) / name, format="PNG", compress_level=1)
        else:
            pil.save(
                Path(out_dir) / name,
                format="JPEG",
                quality=config.jpeg_quality,
                subsampling=0,
                optimize=False,
            )
        images.append(
            {
                "file_name": name,
                "width": width,
                "height": height,
                "case_id": spec.case_id,
                "patient_id": spec.patient_id,
                "um_per_px": config.um_per_px,
            }
        )
        for c in cells:
            x, y = int(c.bbox[0]), int(c.bbox[1])
            code = c.code
            if code in COUNTED_CODES and noise_rng.random() < config.label_noise:
                code = str(noise_rng.choice([o for o in COUNTED_CODES if o != c.code]))
            ann = {
                "image_index": k,
                "category_id": CATEGORY_IDS[code],
                "true_category_id": CATEGORY_IDS[c.code],
                "bbox": list(c.bbox),
                "area": c.area,
                "iscrowd": 0,
                "segmentation": rle_from_crop(c.mask, x, y, height, width),
            }
            if c.nucleus_mask is not None:
                ann["nucleus_segmentation"] = rle_from_crop(c.nucleus_mask, x, y, height, width)
            ann["attributes"] = dict(c.attributes)
            anns.append(ann)
    counted = [a for a in anns if a["true_category_id"] != CATEGORY_IDS["RBC"]]
    n_bla = sum(a["true_category_id"] == CATEGORY_IDS[BLAST] for a in counted)
    blast_pct = 100.0 * n_bla / len(counted) if counted else None
    return {"images": images, "annotations": anns, "stats": stats, "blast_pct": blast_pct}


def generate_dataset(
    out_dir: str | Path,
    *,
    cases: int,
    seed: int,
    config: SynthConfig,
    workers: int = 1,
    preview: bool = False,
    args: dict | None = None,
) -> DatasetSummary:
    """Generate a data set folder; identical arguments give byte-identical files, whatever
    the number of workers (each case has its own seed stream)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    specs = sample_cohort(seed, cases, config)
    jobs = [(s, seed, config, str(out)) for s in specs]
    if workers == 1:
        results = [_render_case(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, cases)) as pool:
            results = list(pool.imap(_render_case, jobs, chunksize=1))

    coco_images, coco_anns, records = [], [], []
    stats: Counter[str] = Counter()
    cells: Counter[str] = Counter()
    code_by_id = {v: k for k, v in CATEGORY_IDS.items()}
    flipped = 0
    for spec, res in zip(specs, results, strict=True):
        first_id = len(coco_images) + 1
        for im in res["images"]:
            coco_images.append({"id": len(coco_images) + 1, **im})
        for a in res["annotations"]:
            a = dict(a)
            a["image_id"] = first_id + a.pop("image_index")
            flipped += a["category_id"] != a["true_category_id"]
            cells[code_by_id[a["category_id"]]] += 1
            coco_anns.append({"id": len(coco_anns) + 1, **a})
        stats.update(res["stats"])
        records.append(
            CaseRecord(
                case_id=spec.case_id,
                patient_id=spec.patient_id,
                image_paths=tuple(im["file_name"] for im in res["images"]),
                aml_label=spec.aml_label,
                npm1_status=spec.npm1_status,
                vaf=spec.vaf,
                blast_pct=res["blast_pct"],
            )
        )
    info = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "args": args if args is not None else {"cases": cases, "seed": seed, **config.as_dict()},
        "label_noise": config.label_noise,
        "label_noise_flipped": flipped,
        "dropped_annotations": stats.get("dropped", 0),
        "description": "synthetic MGG-like bone-marrow smears (functional evidence only)",
    }
    coco = {
        "info": info,
        "images": coco_images,
        "annotations": coco_anns,
        "categories": coco_categories(),
    }
    (out / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
    write_manifest(out / "cases.csv", records)
    if preview:
        from .synth_preview import write_preview

        write_preview(out, coco, specs)
    groups = Counter(s.group for s in specs)
    return DatasetSummary(
        out,
        dict(sorted(groups.items())),
        len(coco_images),
        {c: cells[c] for c in CATEGORY_IDS if cells[c]},
        stats.get("dropped", 0),
        stats.get("unplaced", 0),
        flipped,
        time.perf_counter() - t0,
        records,
    )


def benchmark(
    sizes=((640, 480), (2560, 1920)), n: int = 10, seed: int = 0, config: SynthConfig | None = None
) -> dict[str, float]:
    """Single-process rendering throughput (render_image, no file writing): images/s per
    size, keyed "WxH"."""
    base = config or SynthConfig()
    out = {}
    for w, h in sizes:
        cfg = replace(base, size=(w, h))
        spec = sample_case(case_rng(seed, 0), 0, "aml", "wild_type", cfg)
        rng = case_rng(seed, 0, 1)
        render_image(rng, spec, cfg)  # warm-up: texture bank, imports
        t0 = time.perf_counter()
        for _ in range(n):
            render_image(rng, spec, cfg)
        out[f"{w}x{h}"] = n / (time.perf_counter() - t0)
    return out


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32 pixels, got {text!r}")
    return w, h


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.data.synth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SynthConfig()
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=d.size, help="WxH pixels (default 640x480)")
    p.add_argument("--um-per-px", type=float, default=d.um_per_px)
    p.add_argument(
        "--images-per-case",
        type=int,
        default=d.images_per_case,
        help="maximum k; each case has 1..k images",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--preview", action="store_true", help="also write preview.png")
    p.add_argument("--jpeg-quality", type=int, default=None)
    p.add_argument("--stain-hue", type=float, default=d.stain_hue, help="degrees")
    p.add_argument("--stain-intensity", type=float, default=d.stain_intensity)
    p.add_argument("--blur", type=float, default=d.blur, help="Gaussian sigma, px")
    p.add_argument("--illumination", type=float, default=d.illumination)
    p.add_argument("--crowding", type=float, default=d.crowding)
    p.add_argument(
        "--rbc-contact",
        type=float,
        default=d.rbc_contact,
        help="mean red cells touching each nucleated cell (0 = off)",
    )
    p.add_argument("--label-noise", type=float, default=d.label_noise)
    p.add_argument("--aml-fraction", type=float, default=d.aml_fraction)
    p.add_argument("--npm1-fraction", type=float, default=d.npm1_fraction)
    p.add_argument("--min-visible", type=float, default=d.min_visible)
    p.add_argument("--bench", action="store_true", help="measure rendering speed and exit")
    return p


def main(argv: list[str] | None = None) -> DatasetSummary | dict[str, float]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.bench:
        res = benchmark()
        for k, v in res.items():
            print(f"{k}: {v:.2f} images/s (one process, synthetic render only)")
        return res
    if args.out is None:
        parser.error("--out is required (unless --bench)")
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        config = SynthConfig(
            size=args.size,
            um_per_px=args.um_per_px,
            images_per_case=args.images_per_case,
            jpeg_quality=args.jpeg_quality,
            stain_hue=args.stain_hue,
            stain_intensity=args.stain_intensity,
            blur=args.blur,
            illumination=args.illumination,
            crowding=args.crowding,
            rbc_contact=args.rbc_contact,
            label_noise=args.label_noise,
            aml_fraction=args.aml_fraction,
            npm1_fraction=args.npm1_fraction,
            min_visible=args.min_visible,
        )
    except ValueError as e:
        parser.error(str(e))
    recorded = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("out", "workers", "preview", "bench")
    }  # output-neutral
    recorded["size"] = list(args.size)
    summary = generate_dataset(
        args.out,
        cases=args.cases,
        seed=args.seed,
        config=config,
        workers=args.workers,
        preview=args.preview,
        args=recorded,
    )
    print(summary.format())
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
