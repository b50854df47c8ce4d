"""The per-case domain check's reference and its calibration (issue 23 §5).

    python -m training.domain --typer DIR/typer/model --workdir DIR/domain \\
        [--data ../shared/data] [--cells-per-case 30] [--install]

`fit_reference` builds a `marrowscope.domain.DomainReference` from the typer's training
cells (PCA of the embeddings + Ledoit-Wolf covariances, scikit-learn); `training.celltype`
calls `reference_for_training` at the end of training and saves it next to the weights
(`domain.json`), with a threshold from its validation cases.

The command does the same for an existing typer and measures the check on real data. Cases:
- in domain, calibration: the typer's validation DeepAPL patients (a patient's cells are a
  case) and pseudo-cases of `--cells-per-case` PBC validation cells; the threshold is the
  score at which at most `--max-abstain` (5 %) of them would abstain, times `MARGIN`;
- in domain, held out: the typer's test DeepAPL patients (the abstention figure);
- out of domain: wbc-seg's cells and BCCD's white-cell boxes (other scanners, never trained
  on) as pseudo-cases, and with a reference fitted on one source only (leave-one-source-
  out: DeepAPL only -> PBC out, PBC only -> DeepAPL out) the source it leaves out;
- the deterministic shifts of `training.shifts` applied to the held-out patients' images.
It writes `<workdir>/domain.json` (the calibrated reference; `--install` also copies it into
the typer's directory) and `bench/results/domain.{md,json}` (`--report-dir`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.domain import (
    APPEARANCE_FEATURES,
    APPEARANCE_TOLERANCE,
    REFERENCE_FILE,
    DomainReference,
    appearance_features,
    case_score,
)
from training.cli import UsageError

log = logging.getLogger(__name__)

N_COMPONENTS = 16
"""PCA dimensions of the embedding: enough for the typer's classes, few enough that a
Ledoit-Wolf covariance of a few thousand cells is well determined."""
MAX_FIT_CELLS = 6000
"""Training cells the reference is fitted on at most (seeded draw): fitting is cheap, the
typer's forward pass over every training cell is not."""
CELLS_PER_CASE = 30
MAX_ABSTAIN = 0.05
MARGIN = 1.5
"""The threshold is MARGIN x the calibrated quantile. Why: a typer's validation patients
are few (13 for `real-cpu`) and understate how far the next patients' cells spread; on the
real typer, held-out patients reached 1.45x the validation quantile while other scanners'
cells sat at 2.8x and more (bench/results/domain.md), so the margin keeps new patients in
domain and still calls another scanner out of it."""


def fit_reference(
    embeddings: np.ndarray,
    crops: np.ndarray,
    *,
    n_components: int = N_COMPONENTS,
    info: dict[str, Any] | None = None,
) -> DomainReference:
    """The reference of cells with embeddings float[N, D] and crops uint8[N, S, S, 3]
    (N > n_components), threshold None (see `calibrate`)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    emb = np.asarray(embeddings, np.float64)
    if emb.ndim != 2 or len(emb) != len(crops):
        raise UsageError(f"{len(crops)} crops for embeddings of shape {list(emb.shape)}")
    k = min(n_components, emb.shape[1], len(emb) - 1)
    if k < 1 or len(emb) < 2 * len(APPEARANCE_FEATURES):
        raise UsageError(f"too few cells ({len(emb)}) to fit a domain reference")
    pca = PCA(n_components=k, random_state=0).fit(emb)
    z = pca.transform(emb)
    app = appearance_features(crops)
    emb_cov = LedoitWolf().fit(z)
    app_cov = LedoitWolf().fit(app)
    unit = DomainReference(
        pca_mean=pca.mean_.astype(np.float64),
        pca_components=pca.components_.astype(np.float64),
        embedding_mean=emb_cov.location_,
        embedding_precision=np.linalg.pinv(emb_cov.covariance_),
        appearance_mean=app_cov.location_,
        appearance_precision=np.linalg.pinv(
            app_cov.covariance_ + np.diag(np.square(APPEARANCE_TOLERANCE))
        ),
        cell_scale=np.ones(2),
        info={"n_cells": int(len(emb)), "n_components": int(k), **(info or {})},
    )
    # a typical training cell scores 1 on each component
    scale = np.median(unit.cell_scores(emb, crops).astype(np.float64), axis=0)
    return replace(unit, cell_scale=np.maximum(scale, 1e-9))


def pseudo_cases(n: int, cells_per_case: int, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of disjoint pseudo-cases of `cells_per_case` cells drawn from n cells
    without patients (seeded); the remainder is dropped, one short case when n is small."""
    order = np.random.default_rng(seed).permutation(n)
    if n < cells_per_case:
        return [order] if n else []
    return [order[i : i + cells_per_case] for i in range(0, n - cells_per_case + 1, cells_per_case)]


def case_indices(
    groups: np.ndarray | None, n: int, cells_per_case: int, seed: int = 0
) -> list[np.ndarray]:
    """A case per patient (non-empty `groups`) and pseudo-cases of the cells without one."""
    g = np.full(n, "", dtype=object) if groups is None else np.asarray(groups, dtype=object)
    cases = [np.flatnonzero(g == p) for p in sorted({str(x) for x in g.tolist()} - {""})]
    loose = np.flatnonzero(g == "")
    return cases + [loose[i] for i in pseudo_cases(len(loose), cells_per_case, seed)]


def scores_of(cell_scores: np.ndarray, cases: Iterable[np.ndarray]) -> np.ndarray:
    """float64[C] case scores (`marrowscope.domain.case_score`) of each index array."""
    return np.array([case_score(cell_scores[idx]).score for idx in cases], np.float64)


def calibrate(scores: Sequence[float] | np.ndarray, max_abstain: float = MAX_ABSTAIN) -> float:
    """The smallest threshold at which at most `max_abstain` of the in-domain case
    `scores` lie above it (a case abstains when its score is above the threshold)."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    if not len(s):
        raise UsageError("no in-domain cases to calibrate the domain threshold on")
    allowed = int(np.floor(max_abstain * len(s) + 1e-9))
    return float(s[min(allowed, len(s) - 1)])


def reference_for_training(
    typer: Any,
    train_crops: np.ndarray,
    val_crops: np.ndarray,
    val_groups: np.ndarray | None,
    *,
    seed: int,
    info: dict[str, Any],
    cells_per_case: int = CELLS_PER_CASE,
) -> DomainReference:
    """The reference a freshly trained typer (`marrowscope.inference.CellTyper`) is saved
    with: fitted on (at most `MAX_FIT_CELLS` of) its training crops, threshold calibrated
    on its validation cases (patients, else pseudo-cases). `training.celltype` calls it."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(train_crops))[:MAX_FIT_CELLS])
    _, emb = typer.predict_with_embeddings(train_crops[pick])
    ref = fit_reference(emb, train_crops[pick], info=info)
    if not len(val_crops):
        log.warning("no validation cells: the domain reference is not calibrated")
        return ref
    _, val_emb = typer.predict_with_embeddings(val_crops)
    cases = case_indices(val_groups, len(val_crops), cells_per_case, seed)
    threshold = MARGIN * calibrate(scores_of(ref.cell_scores(val_emb, val_crops), cases))
    log.info("domain reference: %d cells, threshold %.3f", len(pick), threshold)
    return replace(ref, threshold=threshold, info={**ref.info, "calibration_cases": len(cases)})


# --- the command: real-data calibration and report -----------------------------------------


@dataclass
class CellSet:
    """Cells of one source/side: crops uint8[N, S, S, 3], patient per cell ("" = none)."""

    name: str
    crops: np.ndarray
    groups: np.ndarray

    def cases(self, cells_per_case: int, seed: int = 0) -> list[np.ndarray]:
        return case_indices(self.groups, len(self.crops), cells_per_case, seed)


def _typer(model_dir: Path) -> Any:
    from marrowscope.inference import CellTyper
    from marrowscope.models import load_model

    return CellTyper(load_model(model_dir), device="cpu")


def _real_sets(
    data: Path, config: dict[str, Any], size: int, cache: Path | None, crop_mode: str = "image"
) -> dict[str, Any]:
    """(crops, records) per side of the typer's split (`training.common_data.
    real_cell_splits`), decoded in one `load_crops` call as the typer's training does, so
    its crop cache (`--crop-cache`) serves them."""
    from training.common_data import real_cell_splits
    from training.data.singlecell import load_crops

    assigned = real_cell_splits(data, config)
    crops, kept = load_crops(
        [r for side in assigned.values() for r in side], size, cache=cache, crop_mode=crop_mode
    )
    row = {r.path: i for i, r in enumerate(kept)}
    out: dict[str, Any] = {}
    for side, records in assigned.items():
        recs = [r for r in records if r.path in row]
        out[side] = (crops[[row[r.path] for r in recs]].reshape(-1, size, size, 3), recs)
    return out


def _cellset(name: str, crops: np.ndarray, records: Sequence[Any], keep: Any) -> CellSet:
    rows = [i for i, r in enumerate(records) if keep(r)]
    groups = np.array([records[i].patient_id or "" for i in rows], dtype=object)
    return CellSet(name, crops[rows].reshape(-1, *crops.shape[1:]), groups)


def _external_sets(data: Path, size: int, crop_mode: str = "image") -> list[CellSet]:
    """wbc-seg single cells (cut as a single-cell case is, `crop_mode`) and BCCD's WBC boxes cut
    like a field of view's cells; each skipped with a log line when absent."""
    from marrowscope.case import single_cell_crop
    from marrowscope.imaging import CELL_CROP_PAD_FRACTION, crop_cells
    from training.common_data import read_rgb

    out = []
    wbc = sorted((data / "wbc-seg" / "images").glob("*.png"))
    if wbc:
        crops = np.stack([single_cell_crop(read_rgb(p), size, crop_mode) for p in wbc])
        out.append(CellSet("wbc-seg", crops, np.full(len(crops), "", dtype=object)))
    else:
        log.warning("%s/wbc-seg not found: no wbc-seg cases", data)
    if (data / "bccd" / "Annotations").is_dir():
        from training.data.voc import read_voc

        dataset = read_voc(data / "bccd")
        by_image = dataset.annotations_by_image()
        parts = []
        for im in dataset.images:
            boxes = [a.bbox for a in by_image[im.id] if a.category == "WBC"]
            if boxes:
                xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32)
                image = read_rgb(dataset.image_path(im))
                parts.append(crop_cells(image, xyxy, size, CELL_CROP_PAD_FRACTION))
        crops = np.concatenate(parts)
        out.append(CellSet("bccd", crops, np.full(len(crops), "", dtype=object)))
    else:
        log.warning("%s/bccd not found: no BCCD cases", data)
    return out


def _shifted(images: Sequence[np.ndarray], size: int, shift: str) -> np.ndarray:
    """The images under `shift` (applied at the recorded size), resized whole."""
    from marrowscope.imaging import resize_for_model
    from training.shifts import apply_shift

    return np.stack([resize_for_model(apply_shift(im, shift), (size, size)) for im in images])


def _rank_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic (ties count half): the same number as
    sklearn's roc_auc_score, without its input validation, which dominated a 1,000-sample
    bootstrap's time."""
    from scipy.stats import rankdata

    ranks = rankdata(s)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc(in_scores: np.ndarray, out_scores: np.ndarray, n_boot: int = 1000) -> dict[str, float]:
    """Out-of-domain (positive) vs in-domain case scores, with a bootstrap 95 % CI."""
    from training.evaluate_metrics import bootstrap_ci

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))].astype(int)
    s = np.r_[in_scores, out_scores]
    lo, hi = bootstrap_ci(y, s, _rank_auroc, n_boot=n_boot, seed=0)
    return {
        "auroc": _rank_auroc(y, s),
        "ci_low": lo,
        "ci_high": hi,
        "n_in": int(len(in_scores)),
        "n_out": int(len(out_scores)),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Fit, calibrate and evaluate the check for the typer in `args.typer`."""
    from training.cli import load_job_config

    typer = _typer(args.typer)
    size = typer.crop_size
    name = args.config or typer.config.get("training", {}).get("config_name", "real-cpu")
    config = load_job_config("celltype", name, args.overrides)
    sets = _real_sets(args.data, config, size, args.crop_cache, typer.crop_mode)
    tr_crops, tr_recs = sets["train"]
    va_crops, va_recs = sets["val"]
    te_crops, te_recs = sets["test"]
    is_dap = lambda r: r.source == "deepapl"  # noqa: E731
    is_pbc = lambda r: r.source == "pbc"  # noqa: E731
    cellsets = {
        "train_deepapl": _cellset("train_deepapl", tr_crops, tr_recs, is_dap),
        "train_pbc": _cellset("train_pbc", tr_crops, tr_recs, is_pbc),
        "val_deepapl": _cellset("val_deepapl", va_crops, va_recs, is_dap),
        "val_pbc": _cellset("val_pbc", va_crops, va_recs, is_pbc),
        "test_deepapl": _cellset("test_deepapl", te_crops, te_recs, is_dap),
    }
    for cs in _external_sets(args.data, size, typer.crop_mode):
        cellsets[cs.name] = cs
    emb = {}
    for key, cs in cellsets.items():
        log.info("embedding %s: %d cells", key, len(cs.crops))
        emb[key] = typer.predict_with_embeddings(cs.crops)[1]
    n = args.cells_per_case

    def fit(keys: Sequence[str], info: dict[str, Any]) -> DomainReference:
        crops = np.concatenate([cellsets[k].crops for k in keys])
        e = np.concatenate([emb[k] for k in keys])
        pick = np.sort(np.random.default_rng(0).permutation(len(e))[:MAX_FIT_CELLS])
        return fit_reference(e[pick], crops[pick], info=info)

    components: dict[str, list[list[float]]] = {}
    """(embedding, appearance) per case under the main reference, for re-deriving figures."""

    def case_scores(ref: DomainReference, key: str) -> np.ndarray:
        cs = cellsets[key]
        cell = ref.cell_scores(emb[key], cs.crops)
        if ref.info.get("sources") == ["deepapl", "pbc"]:
            components[key] = _components(cell, cs.cases(n))
        return scores_of(cell, cs.cases(n))

    typer_info = {
        "typer_config": name,
        "typer_data_hash": typer.config.get("training", {}).get("data_hash", ""),
    }
    ref = fit(["train_deepapl", "train_pbc"], {"sources": ["deepapl", "pbc"], **typer_info})
    calib = np.r_[case_scores(ref, "val_deepapl"), case_scores(ref, "val_pbc")]
    threshold = args.margin * calibrate(calib, args.max_abstain)
    ref = replace(ref, threshold=threshold)
    held_in = case_scores(ref, "test_deepapl")
    external = {k: case_scores(ref, k) for k in ("wbc-seg", "bccd") if k in cellsets}
    report: dict[str, Any] = {
        "typer_config": name,
        "note": args.note,
        "cells_per_case": n,
        "threshold": threshold,
        "margin": args.margin,
        "max_abstain": args.max_abstain,
        "calibration_cases": int(len(calib)),
        "held_out_patients": int(len(held_in)),
        "held_out_abstained": float((held_in > threshold).mean()),
        "external": {},
        "leave_one_source_out": {},
        "shifts": {},
    }
    for key, scores in external.items():
        report["external"][key] = {
            **_auroc(held_in, scores, args.bootstrap),
            "abstained": float((scores > threshold).mean()),
            "median_score": float(np.median(scores)),
        }
    if external:
        report["external"]["all"] = _auroc(
            held_in, np.concatenate(list(external.values())), args.bootstrap
        )
    # leave-one-source-out references: fitted and calibrated without the left-out source
    for kept, left in (("deepapl", "pbc"), ("pbc", "deepapl")):
        loso = fit([f"train_{kept}"], {"sources": [kept], **typer_info})
        if kept == "deepapl":
            cal, ins = case_scores(loso, "val_deepapl"), case_scores(loso, "test_deepapl")
            outs = case_scores(loso, "val_pbc")
        else:  # PBC has no held-out patients: its validation pseudo-cases, split in two
            pbc = case_scores(loso, "val_pbc")
            cal, ins = pbc[::2], pbc[1::2]
            outs = case_scores(loso, "test_deepapl")
        t = args.margin * calibrate(cal, args.max_abstain)
        report["leave_one_source_out"][f"{kept}_only"] = {
            "left_out": left,
            **_auroc(ins, outs, args.bootstrap),
            "threshold": t,
            "in_abstained": float((ins > t).mean()),
            "out_abstained": float((outs > t).mean()),
        }
    from training.common_data import read_rgb
    from training.shifts import STRONG_SHIFT_NAMES

    originals = [read_rgb(r.path) for r in te_recs if is_dap(r)]
    patients = cellsets["test_deepapl"].cases(n)
    for shift in args.shifts:
        shifted = _shifted(originals, size, shift)
        e = typer.predict_with_embeddings(shifted)[1]
        cell = ref.cell_scores(e, shifted)
        scores = scores_of(cell, patients)
        components[f"shift:{shift}"] = _components(cell, patients)
        parts = np.array(components[f"shift:{shift}"])
        report["shifts"][shift] = {
            "median_embedding": float(np.median(parts[:, 0])),
            "median_appearance": float(np.median(parts[:, 1])),
            "kind": "strong" if shift in STRONG_SHIFT_NAMES else "tolerated",
            "abstained": float((scores > threshold).mean()),
            "median_score": float(np.median(scores)),
            "auroc_vs_unshifted": _auroc(held_in, scores, 1)["auroc"],
        }
        log.info("shift %s: %.0f %% abstain", shift, 100 * report["shifts"][shift]["abstained"])
    report["case_components"] = components
    ref = replace(ref, info={**ref.info, "calibration": _summary(report)})
    args.workdir.mkdir(parents=True, exist_ok=True)
    ref.save(args.workdir)
    if args.install:
        shutil.copyfile(args.workdir / REFERENCE_FILE, Path(args.typer) / REFERENCE_FILE)
    return report


def _components(cell_scores: np.ndarray, cases: Sequence[np.ndarray]) -> list[list[float]]:
    out = []
    for idx in cases:
        score = case_score(cell_scores[idx])
        out.append([round(score.embedding, 5), round(score.appearance, 5)])
    return out


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the reference carries about its own calibration."""
    return {
        k: report[k]
        for k in ("threshold", "cells_per_case", "calibration_cases", "held_out_abstained")
    } | {"external_auroc": report["external"].get("all", {}).get("auroc")}


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "domain.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / "domain.md").write_text(render_markdown(report))
    log.info("wrote %s/domain.{json,md}", out_dir)


def render_markdown(r: dict[str, Any]) -> str:
    def ci(d: dict[str, Any]) -> str:
        return f"{d['auroc']:.3f} ({d['ci_low']:.3f}-{d['ci_high']:.3f})"

    lines = [
        "# Per-case domain check (issue 23 §5), real data",
        "",
        f"Typer config `{r['typer_config']}`; pseudo-cases of {r['cells_per_case']} cells where a "
        "set has no patients. Threshold "
        f"{r['threshold']:.3f} = {r['margin']} x the score that at most "
        f"{100 * r['max_abstain']:.0f} % of {r['calibration_cases']} in-domain validation cases "
        "exceed (`training.domain.MARGIN`).",
        *(["", r["note"]] if r.get("note") else []),
        "",
        "Reproduce: `python -m training.domain --typer DIR/typer/model --workdir DIR/domain` "
        "(cases: `training/domain.py`; every figure on real data).",
        "",
        f"In-domain held-out DeepAPL patients abstained: {100 * r['held_out_abstained']:.1f} % "
        f"of {r['held_out_patients']}.",
        "",
        "## Unseen sources vs held-out patients (main reference)",
        "",
        "| out-of-domain set | cases | AUROC (95 % CI) | abstained |",
        "|---|---|---|---|",
    ]
    for key, d in r["external"].items():
        abst = f"{100 * d['abstained']:.0f} %" if "abstained" in d else ""
        lines.append(f"| {key} | {d['n_out']} | {ci(d)} | {abst} |")
    lines += [
        "",
        "## Leave-one-source-out references",
        "",
        "| reference | left out | in / out cases | AUROC (95 % CI) | in abstained | out abstained |",
        "|---|---|---|---|---|---|",
    ]
    for key, d in r["leave_one_source_out"].items():
        lines.append(
            f"| {key} | {d['left_out']} | {d['n_in']} / {d['n_out']} | {ci(d)} | "
            f"{100 * d['in_abstained']:.0f} % | {100 * d['out_abstained']:.0f} % |"
        )
    lines += [
        "",
        "## Shifts of the held-out patients' images (`training.shifts`)",
        "",
        "| shift | meant to be | patients abstained | median score | AUROC vs unshifted |",
        "|---|---|---|---|---|",
    ]
    for key, d in r["shifts"].items():
        meant = "out of domain" if d["kind"] == "strong" else "tolerated"
        lines.append(
            f"| {key} | {meant} | {100 * d['abstained']:.0f} % | {d['median_score']:.2f} | "
            f"{d['auroc_vs_unshifted']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    from training.shifts import SHIFT_NAMES, STRONG_SHIFT_NAMES

    p = argparse.ArgumentParser(
        prog="python -m training.domain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--typer", type=Path, required=True, help="celltype model directory")
    p.add_argument("--workdir", type=Path, required=True, help="where domain.json is written")
    p.add_argument("--data", type=Path, default=None, help="real data root (../shared/data)")
    p.add_argument("--config", default=None, help="the typer's config (default: its own)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--crop-cache", type=Path, default=None, help="load_crops cache folder")
    p.add_argument("--cells-per-case", type=int, default=CELLS_PER_CASE)
    p.add_argument("--max-abstain", type=float, default=MAX_ABSTAIN)
    p.add_argument("--margin", type=float, default=MARGIN, help="threshold = margin x quantile")
    p.add_argument("--shifts", nargs="*", default=[*SHIFT_NAMES[1:], *STRONG_SHIFT_NAMES])
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the AUROC CIs")
    p.add_argument("--report-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--note", default="", help="a line for the report (which typer, caveats)")
    p.add_argument("--install", action="store_true", help="copy domain.json into --typer")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from training.data.singlecell import DEFAULT_DATA_ROOT
    from training.shifts import SHIFT_NAMES, STRONG_SHIFT_NAMES

    if args.data is None:
        args.data = DEFAULT_DATA_ROOT
    if not (args.typer / "config.json").is_file():
        raise UsageError(f"--typer {args.typer} is not a model directory (no config.json)")
    if args.cells_per_case < 1 or not 0 <= args.max_abstain < 1:
        raise UsageError("--cells-per-case must be >= 1 and --max-abstain in [0, 1)")
    known = (*SHIFT_NAMES, *STRONG_SHIFT_NAMES)
    unknown = sorted(set(args.shifts) - set(known))
    if unknown:
        raise UsageError(f"unknown shifts {unknown}; known: {', '.join(known)}")
    report = measure(args)
    write_report(report, args.report_dir)
    return report


if __name__ == "__main__":
    from training.cli import run_main

    run_main(main, get_args_parser())
