"""The hematologists' corrections back into training: export the reviewed cells of the
gateway's job store as a dataset, and read that dataset back.

    python -m training.data.corrections export --since 2026-01-01 --out DIR \\
        [--tenant T] [--include-unsigned] [--db URL] [--images DIR] [--accession hashed|stored]

The job store and blob folder are the gateway's own (its `MS_GATEWAY_*` settings:
`MS_GATEWAY_DATABASE_URL`, `MS_GATEWAY_DATA_DIR`, `MS_GATEWAY_IMAGE_ROOT`), or `--db` /
`--images`. Cases signed out since `--since` (UTC date or ISO time; with `--include-unsigned`
also cases under review changed since then, with the labels they have so far). Every cell
the typer called or the reviewer drew is exported with its final label: the reviewer's
correction, or the model's call the reviewer kept (a signed-out case vouches for both).

    DIR/crops/<CODE>/<analysis>_<image>-<cell>.png   ImageFolder of the cells (`--crop-size`
                                                    px, cut as the gateway cuts them)
    DIR/images/<sha256>.png                          the fields the cells were cut from
    DIR/annotations.json                             COCO boxes of the complete fields only
                                                    (detection), taxonomy categories
    DIR/via.json                                     every exported field and its boxes as a
                                                    VIA 2 project (re-editing)
    DIR/manifest.jsonl                               one line per cell: provenance
    DIR/export.json                                  what was exported, when, from where

Detection targets: a field is one only when the reviewer marked its boxes complete in the
review app (every cell boxed, missed ones drawn, non-cells labelled ART) and excluded none
of it. Elsewhere the boxes are the detector's own proposals, and a cell nobody boxed (or a
cell in an excluded region, left out of the boxes) would teach the detector background.
On a complete field every cell but those labelled `ART` is a box, drawn ones included, in
its taxonomy category (`training.segmentation` maps them to the detector's `cell` / `RBC`;
a box nobody typed is `NIF`). Every COCO image carries `case_id` (the analysis),
`patient_id` (the accession key: the split unit), `image` (its index in the case) and
`boxes_complete`. Fields not marked complete still give crops for the typer and appear in
`via.json`, but have no detection record; `export.json` counts both (`detection_images`,
`crop_only_images`).

Provenance per cell: analysis id, accession (`hashed`: HMAC-SHA256 with
`MS_CORRECTIONS_SALT`, so cases of one accession still group together; `stored`: as the
gateway keeps it), tenant, reviewer, signed_at, state, amendments, every model version of the
analysis and the celltype version that made the call, the model's label and the final one,
and whether its field's boxes are complete. Nothing else of the case leaves the store (the
REST API keeps no patient data). Cells labelled `ART` (not a cell) stay in the crops but not
in the COCO boxes; excluded cells (images or regions the review app excluded) are listed in
the manifest without a crop or box.

Reading an export back: `read_cells` (the typer's crops), `read_detection` (the complete
fields), both split by accession with `split_groups` (`training.celltype` and
`training.segmentation --corrections DIR`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SUMMARY = "export.json"
COCO = "annotations.json"
NOT_A_CELL = frozenset({"ART"})
"""Final labels that say the detector's box holds no cell: no COCO box."""
UNTYPED = "NIF"
"""COCO category of a box on a complete field that has no label (the typer left it untyped
and the reviewer did not label it): a cell, not identified."""


def parse_since(text: str) -> float:
    """Epoch seconds of a UTC date (`2026-01-31`) or ISO time (naive = UTC)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is not a date (YYYY-MM-DD) or ISO time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def accession_key(accession: str, tenant: str, *, mode: str, salt: str) -> str:
    """How the accession appears in the export and groups the splits."""
    if mode == "stored":
        return accession
    digest = hmac.new(salt.encode(), f"{tenant}\0{accession}".encode(), hashlib.sha256)
    return "acc-" + digest.hexdigest()[:20]


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    cases: int
    cells: int
    corrected: int
    by_class: dict[str, int]
    images: int = 0
    detection_images: int = 0
    """fields marked boxes-complete (and not excluded): in `annotations.json`"""
    detection_boxes: int = 0


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def export(
    sessions: Any,
    blobs: Any,
    *,
    out: Path,
    since: float,
    tenant: str | None = None,
    include_unsigned: bool = False,
    accession_mode: str = "hashed",
    salt: str = "",
    crop_size: int = 128,
) -> ExportSummary:
    """Write the dataset of the module docstring from a gateway job store (`sessions`, a
    sessionmaker) and its blob store. Refuses a non-empty `out` (nothing is overwritten)."""
    from sqlalchemy import and_, or_, select

    from marrowscope.case import single_cell_crop
    from marrowscope.imaging import crop_cells, decode_image
    from services.gateway import store
    from services.gateway.db import Analysis, CaseReview, Reviewer
    from services.gateway.review.cells import complete_from, exclusions_from
    from services.gateway.review.outcomes import celltype_version, reviewed_cells, state_of
    from training.data.coco import Annotation, Dataset, ImageRecord, write_coco
    from training.data.via import write_via

    if accession_mode not in ("hashed", "stored"):
        raise ValueError(f"accession must be hashed or stored, got {accession_mode!r}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; export into a new folder")
    wanted = and_(CaseReview.state == "signed_out", CaseReview.signed_at >= since)
    if include_unsigned:
        wanted = or_(wanted, and_(CaseReview.state != "signed_out", CaseReview.updated_at >= since))
    query = select(CaseReview, Analysis).join(Analysis, Analysis.id == CaseReview.analysis_id)
    query = query.where(wanted)
    if tenant is not None:
        query = query.where(Analysis.tenant == tenant)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    images: list[ImageRecord] = []
    annotations: list[Annotation] = []
    targets: set[int] = set()
    """ids of the images that are detection targets (boxes complete, nothing excluded)"""
    by_class: Counter[str] = Counter()
    n_cases = n_cells = n_corrected = 0
    with sessions() as session, (out / MANIFEST).open("w") as manifest:
        for review, a in session.execute(query.order_by(Analysis.created_at, Analysis.id)):
            result = store.result_of(session, analysis_id=a.id)
            if result is None:
                continue
            signer = session.get(Reviewer, review.signed_by) if review.signed_by else None
            stored = {im.idx: im for im in store.images_of(session, analysis_id=a.id)}
            cells = reviewed_cells(result, review)
            group = accession_key(a.accession, a.tenant, mode=accession_mode, salt=salt)
            complete = {m.image for m in complete_from(review.complete_json)}
            excluded = {x.image for x in exclusions_from(review.excluded_json)}
            common = {
                "analysis_id": a.id,
                "accession": group,
                "tenant": a.tenant,
                "reviewer": signer.display_name if signer else None,
                "reviewer_id": review.signed_by,
                "signed_at": _iso(review.signed_at) if review.state == "signed_out" else None,
                "state": state_of(review),
                "amendments": review.amendments,
                "input": result.get("input") or "fields",
                "model_versions": {
                    k: str(v.get("version"))
                    for k, v in (result.get("model_versions") or {}).items()
                },
                "celltype_version": celltype_version(result),
            }
            n_cases += 1
            for index in sorted({c.image for c in cells} | complete):
                image = stored.get(index)
                mine = [c for c in cells if c.image == index]
                # a cell nobody boxed would teach the detector background, and so would
                # the cells of an excluded region: only whole, untouched, complete fields
                target = common["input"] != "cells" and index in complete and index not in excluded
                if image is None:
                    log.warning(
                        "analysis %s: image %d is not stored; its cells are left out", a.id, index
                    )
                    continue
                rgb = decode_image(blobs.get(image.sha256))
                file_name = f"images/{image.sha256}.png"
                if not (out / file_name).is_file():
                    from PIL import Image as PILImage

                    PILImage.fromarray(rgb).save(out / file_name)
                record = ImageRecord(
                    id=len(images) + 1,
                    file_name=file_name,
                    width=int(rgb.shape[1]),
                    height=int(rgb.shape[0]),
                    case_id=a.id,
                    patient_id=group,
                    um_per_px=image.um_per_px,
                    extra={"image": index, "boxes_complete": target},
                )
                images.append(record)
                if target:
                    targets.add(record.id)
                usable = [c for c in mine if c.label is not None and not c.excluded]
                if not usable:
                    crops = np.zeros((0, crop_size, crop_size, 3), np.uint8)
                elif common["input"] == "cells":
                    crops = np.stack([single_cell_crop(rgb, crop_size) for _ in usable])
                else:
                    crops = crop_cells(rgb, np.array([c.box for c in usable]), crop_size)
                crop_of = {c.id: crops[i] for i, c in enumerate(usable)}
                for c in mine:
                    crop_path = None
                    if c.id in crop_of:
                        assert c.label is not None
                        crop_path = f"crops/{c.label}/{a.id}_{c.id.replace('.', '-')}.png"
                        (out / crop_path).parent.mkdir(exist_ok=True)
                        from PIL import Image as PILImage

                        PILImage.fromarray(crop_of[c.id]).save(out / crop_path)
                        by_class[c.label] += 1
                        n_cells += 1
                        n_corrected += c.corrected
                    if (
                        not c.excluded
                        and c.label not in NOT_A_CELL
                        and (c.label is not None or target)
                    ):
                        x1, y1, x2, y2 = c.box
                        annotations.append(
                            Annotation(
                                id=len(annotations) + 1,
                                image_id=record.id,
                                # a box the typer left untyped is still a cell on a complete
                                # field: "not identifiable"
                                category=str(c.label or UNTYPED),
                                bbox=(x1, y1, x2 - x1, y2 - y1),
                                extra={
                                    "cell": c.id,
                                    "model_label": c.model_code,
                                    "corrected": c.corrected,
                                    "added": c.added,
                                },
                            )
                        )
                    line = {
                        **common,
                        "cell": c.id,
                        "image": c.image,
                        "image_file": file_name,
                        "box": list(c.box),
                        "crop": crop_path,
                        "original_label": c.model_code,
                        "corrected_label": c.label,
                        "corrected": c.corrected,
                        "added": c.added,
                        "excluded": c.excluded,
                        "boxes_complete": target,
                    }
                    manifest.write(json.dumps(line, sort_keys=True) + "\n")
    dataset = Dataset(images=images, annotations=annotations, root=out.resolve())
    detection = Dataset(
        images=[im for im in images if im.id in targets],
        annotations=[x for x in annotations if x.image_id in targets],
        root=out.resolve(),
        info={"description": "reviewed fields with complete boxes", "source": "corrections"},
    )
    write_coco(detection, out / COCO)
    write_via(dataset, out / "via.json")
    n_boxes = len(detection.annotations)
    summary = {
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "since": _iso(since),
        "tenant": tenant,
        "include_unsigned": include_unsigned,
        "accession": accession_mode,
        "crop_size": crop_size,
        "cases": n_cases,
        "cells": n_cells,
        "corrected": n_corrected,
        "by_class": dict(sorted(by_class.items())),
        "images": len(images),
        "detection_images": len(targets),
        "crop_only_images": len(images) - len(targets),
        "detection_boxes": n_boxes,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return ExportSummary(
        out,
        n_cases,
        n_cells,
        n_corrected,
        dict(sorted(by_class.items())),
        images=len(images),
        detection_images=len(targets),
        detection_boxes=n_boxes,
    )


# -- reading an export back ----------------------------------------------------------------


@dataclass(frozen=True)
class CorrectedCells:
    """The exported cells that have a crop, in manifest order."""

    crops: np.ndarray
    """uint8[N, S, S, 3] at the requested crop size."""
    codes: np.ndarray
    """str[N] final labels (the reviewer's)."""
    model_codes: np.ndarray
    """str[N] the typer's call ("" for cells the reviewer drew)."""
    groups: np.ndarray
    """str[N] accession key: cases of one accession share it (split unit)."""
    analyses: np.ndarray
    """str[N] analysis ids."""
    versions: np.ndarray
    """str[N] the celltype version that made the call."""
    tenants: np.ndarray
    """str[N]."""


def read_manifest(export_dir: Path) -> list[dict[str, Any]]:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{export_dir} holds no {MANIFEST}: not a corrections export")
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def split_groups(
    groups: Iterable[str], *, seed: int, test_fraction: float, val_fraction: float
) -> dict[str, str]:
    """Accession key -> `train` / `val` / `test`: the groups in a seeded random order, the
    first `test_fraction` of them held out (at least one when there are two or more), the
    next `val_fraction` for validation. Every job that trains on an export splits it with
    this; over the same groups with one config's seed and fractions, an accession sits on
    the same side for each."""
    unique = sorted(set(groups))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n = len(order)
    n_test = max(1, round(test_fraction * n)) if n >= 2 else 0
    n_val = round(val_fraction * n) if n - n_test >= 2 else 0
    side = {g: "train" for g in order}
    side.update({g: "test" for g in order[:n_test]})
    side.update({g: "val" for g in order[n_test : n_test + n_val]})
    return side


def read_detection(export_dir: Path) -> Any:
    """The export's detection targets as a `training.data.coco.Dataset` (taxonomy
    categories; each image's `patient_id` is its accession key, `case_id` its analysis):
    the fields the reviewers marked boxes-complete. Raises ValueError for a folder that is
    not an export, an export written before fields could be marked complete, and images
    missing on disk; an export with no complete field gives an empty dataset."""
    from training.data.coco import read_coco

    export_dir = Path(export_dir)
    read_manifest(export_dir)  # not an export: say so before anything else
    path = export_dir / COCO
    if not path.is_file():
        raise ValueError(f"{export_dir} holds no {COCO}: not a corrections export")
    dataset = read_coco(path, check_images=False)
    old = [im.file_name for im in dataset.images if im.extra.get("boxes_complete") is not True]
    if old:
        raise ValueError(
            f"{path} lists fields without the reviewer's boxes-complete mark ({old[0]}, ...): "
            "it was exported before fields could be marked complete; export again"
        )
    missing = [im.file_name for im in dataset.images if not (export_dir / im.file_name).is_file()]
    if missing:
        raise ValueError(
            f"{export_dir}: {len(missing)} of the {len(dataset.images)} fields in {COCO} are "
            f"missing on disk ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    return dataset


def read_cells(export_dir: Path, crop_size: int) -> CorrectedCells:
    """Every exported cell with a crop whose label the taxonomy knows, resized to
    `crop_size` (an unknown label raises: the export and the taxonomy disagree)."""
    from PIL import Image as PILImage

    from marrowscope.imaging import resize_for_model
    from marrowscope.taxonomy import CODES

    rows = [r for r in read_manifest(export_dir) if r.get("crop")]
    unknown = sorted({r["corrected_label"] for r in rows} - set(CODES))
    if unknown:
        raise ValueError(f"{export_dir}: labels {unknown} are not taxonomy codes")
    crops = np.zeros((len(rows), crop_size, crop_size, 3), dtype=np.uint8)
    for i, r in enumerate(rows):
        with PILImage.open(Path(export_dir) / r["crop"]) as im:
            crops[i] = resize_for_model(np.asarray(im.convert("RGB")), (crop_size, crop_size))

    def column(key: str) -> np.ndarray:
        return np.array([str(r.get(key) or "") for r in rows], dtype=object)

    return CorrectedCells(
        crops,
        column("corrected_label"),
        column("original_label"),
        column("accession"),
        column("analysis_id"),
        column("celltype_version"),
        column("tenant"),
    )


def recorded_agreement(export_dir: Path) -> dict[str, dict[str, Any]]:
    """Reviewer agreement with the calls as they were made in production, per celltype
    version and tenant (`services.gateway.review.outcomes.agreement` over the manifest)."""
    from services.gateway.review.outcomes import agreement

    counts: dict[str, Counter[tuple[str, str, str, bool]]] = {}
    for r in read_manifest(export_dir):
        if r.get("excluded") or r.get("added") or not r.get("original_label"):
            continue
        key = (r["tenant"], r["celltype_version"], r["original_label"], not r["corrected"])
        counts.setdefault(r["celltype_version"], Counter())[key] += 1
    out: dict[str, dict[str, Any]] = {}
    for version, c in sorted(counts.items()):
        tenants = sorted({k[0] for k in c})
        out[version] = {
            **agreement(c.items()),
            "by_tenant": {
                t: agreement((k, n) for k, n in c.items() if k[0] == t)["overall"] for t in tenants
            },
        }
    return out


# -- command line ----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.data.corrections",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the reviewed cells as a training dataset")
    e.add_argument("--since", required=True, help="UTC date (YYYY-MM-DD) or ISO time")
    e.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    e.add_argument("--tenant", default=None, help="only this tenant's cases")
    e.add_argument("--include-unsigned", action="store_true", help="also cases under review")
    e.add_argument("--db", default=None, help="job store URL (default: the gateway's settings)")
    e.add_argument("--images", type=Path, default=None, help="blob folder (default: gateway's)")
    e.add_argument("--accession", choices=("hashed", "stored"), default="hashed")
    e.add_argument("--crop-size", type=int, default=128, help="crop side in pixels")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    from sqlalchemy import create_engine

    from services.gateway.blobs import BlobStore
    from services.gateway.config import GatewaySettings
    from services.gateway.db import make_sessionmaker

    try:
        since = parse_since(args.since)
        if args.crop_size < 8:
            raise ValueError("--crop-size must be >= 8")
        settings = GatewaySettings()
        # a plain engine: the gateway's own begins SQLite transactions IMMEDIATE (a write
        # lock), and a read-only export must not hold up the gateway's writers
        engine = create_engine(args.db or settings.database_url)
        salt = os.environ.get("MS_CORRECTIONS_SALT", "")
        if args.accession == "hashed" and not salt:
            log.warning(
                "MS_CORRECTIONS_SALT is not set: hashed accessions can be recovered by "
                "hashing guessed accession numbers; set a secret salt"
            )
        summary = export(
            make_sessionmaker(engine),
            BlobStore(args.images or settings.image_root or settings.data_dir / "images"),
            out=args.out,
            since=since,
            tenant=args.tenant,
            include_unsigned=args.include_unsigned,
            accession_mode=args.accession,
            salt=salt,
            crop_size=args.crop_size,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"exported {summary.cells} cells ({summary.corrected} corrected) of {summary.cases} "
        f"cases to {summary.out}: "
        + (", ".join(f"{k} {v}" for k, v in summary.by_class.items()) or "nothing")
        + f"; {summary.detection_images} of {summary.images} fields with complete boxes "
        f"({summary.detection_boxes} boxes for the detector)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
