"""APL vs other AML from cell morphology on real patients (DeepAPL discovery cohort).

    python -m training.apl --workdir DIR --celltype-model models:/marrowscope-celltype@champion
    python -m training.apl --workdir DIR --train-typer-minutes 8   # no typer: train a quick one

Real data (`../shared/data/deepapl`, read its README; read by `training.data.deepapl`):
81 AML patients (60 non-APL, 21 APL), each a bag of ~160 signed-out single white cells.
Every cell is typed by a celltype model (probabilities and its penultimate embedding) and
measured (`marrowscope.morphometrics`); one case vector per patient is built by
`marrowscope.features.case_features`, the code path serving uses. Then, on the same
repeated patient-grouped stratified 5-fold CV (one patient = one group; `training.apl_cv`):

- (a) the ensemble's APL output: an `EnsembleNet` with `targets: ["aml", "apl"]` trained by
  `training.ensemble.train_mlp` (every patient here is AML, so only the APL head learns);
- (b) attention-based multiple-instance learning over the typer's cell embeddings (gated
  attention, Ilse et al. 2018; the approach of SCEMILA and DeepAPL);
- for context, a baseline from the pathologists' own sign-out differential (oracle labels).

Each is reported as patient-level AUROC: mean and SD over repeats (each repeat's pooled
out-of-fold AUROC) and a patient-bootstrap 95 % CI of the repeat-averaged out-of-fold
scores, beside Eckardt et al. (BMC Cancer 2022): 0.8575 on bone marrow. Results go to
`--results` (.md + .json); stage outputs are cached in the work directory.

`--save-mil DIR` writes the MIL model trained on every patient (the one whose attention is
reported) as a registrable `mil` model (`marrowscope.models.mil`: safetensors + config,
pinned to the celltype model and version whose embeddings it learned); `--register-mil`
also registers it as `marrowscope-mil` (metric `apl_auroc`: its CV AUROC) for
`python -m training.promote --model mil --version N`, which refuses it unless that
celltype version serves. Serve it with `MS_ENSEMBLE_MIL_MODEL_URI` and
`MS_GATEWAY_APL_MODEL=mil`.

Without a celltype model (`--celltype-model`), a quick typer is trained on the cohort's
signed-out cells (cell-type labels only, never the diagnosis; time-bounded). It has seen
the test patients' cells with their cell-type labels, which a typer trained elsewhere
would not have; the report says which typer was used.

Cost bounds on a shared 2-core CPU: cells are resized to the typer's crop size once
(cached); morphometrics are measured at half resolution on up to `--morph-cells` cells per
patient (the case vector's morphometric means and SDs are estimates from that sample; the
other cells count in the differential with `segmentation_ok` = 0, as serving does for a
cell it cannot measure).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import UsageError, run_main
from training.data.deepapl import DEFAULT_ROOT
from training.engine import progress

log = logging.getLogger(__name__)

DEFAULT_DATA = DEFAULT_ROOT
ECKARDT_2022_AUROC = 0.8575
"""APL vs non-APL AML AUROC from bone-marrow smears, Eckardt et al., BMC Cancer 2022."""

# ------------------------------------------------------------------ reader interface


@dataclass(frozen=True)
class AplCell:
    patient_id: str
    file: Path
    sign_out: str
    """the hematopathologist's folder name; "" when not signed out"""
    code: str | None
    """its taxonomy code (`marrowscope.taxonomy.SOURCE_CLASS_MAP`); None: not signed out"""


@dataclass(frozen=True)
class AplCohort:
    """What this experiment needs from the DeepAPL reader (`training.data.deepapl`):
    diagnosis per patient (1 = APL) and the readable cells."""

    apl: dict[str, int]
    cells: list[AplCell]

    @property
    def patients(self) -> list[str]:
        return sorted(self.apl)


def read_cohort(root: Path, *, verify: bool = True, strict: bool = False) -> AplCohort:
    """The shared DeepAPL reader's patients and readable cells (it logs and counts the
    unreadable ones and the class folders it does not know; `verify` decodes each once,
    `strict` stops on an unknown folder); patients without cells are left out. Reader
    errors become UsageError."""
    from marrowscope.taxonomy import UnknownCellType
    from training.data.coco import DatasetFormatError
    from training.data.deepapl import read_deepapl
    from training.data.singlecell import DataUnavailable

    try:
        data = read_deepapl(root, verify=verify, strict=strict)
    except (DataUnavailable, DatasetFormatError, UnknownCellType) as exc:
        raise UsageError(f"{root}: {exc}") from None
    cells = [AplCell(r.patient, r.path, r.source_class, r.code) for r in data.records]
    with_cells = {c.patient_id for c in cells}
    apl = {p: int(v.diagnosis == "APL") for p, v in data.patients.items() if p in with_cells}
    return AplCohort(apl, cells)


# ------------------------------------------------------------------ cells -> arrays


def load_cells(
    cohort: AplCohort, size: int, cache: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crops uint8[N, size, size, 3], half uint8[N, h, w, 3] at half resolution for
    morphometrics, keep bool[N]) for `cohort.cells`; unreadable files are reported and
    skipped (keep False, zero pixels). Cached in `cache` (npz)."""
    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import decode_image, resize_for_model

    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if len(data["keep"]) == len(cohort.cells) and data["crops"].shape[1] == size:
            return data["crops"], data["half"], data["keep"]
    n = len(cohort.cells)
    crops = np.zeros((n, size, size, 3), np.uint8)
    half = np.zeros((n, 91, 90, 3), np.uint8)
    keep = np.ones(n, bool)
    bad = []
    for i, cell in enumerate(progress(cohort.cells, desc="decode cells")):
        try:
            image = decode_image(cell.file.read_bytes())
        except (InvalidInput, OSError) as exc:
            keep[i] = False
            bad.append(f"{cell.file.name}: {exc}")
            continue
        crops[i] = resize_for_model(image, (size, size))
        half[i] = resize_for_model(image, (91, 90))
    if bad:
        log.warning("%d unreadable cell images skipped, e.g. %s", len(bad), bad[:3])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, crops=crops, half=half, keep=keep)
    return crops, half, keep


def sign_out_codes(cohort: AplCohort) -> list[str | None]:
    """Taxonomy code of each cell's sign-out folder (None: not signed out)."""
    return [c.code for c in cohort.cells]


def train_quick_typer(
    crops: np.ndarray, codes: list[str | None], keep: np.ndarray, out: Path, *, minutes: float
) -> Path:
    """A ResNet18 celltype model (softmax head) trained on the signed-out cells for at most
    `minutes` (epochs until the budget is spent), saved under `out`; returns its directory.
    Non-counted classes (smudge cells, platelets) are learned too, so that serving-like
    typing can leave them out of the differential. Attribute heads stay untrained (no
    attribute labels on these cells)."""
    import torch

    from marrowscope.models import build_model, make_config, save_model
    from training.celltype import augment, batch_loss, outputs
    from training.engine import AmpStep, epoch_generator, seed_everything

    if (out / "config.json").is_file():
        return out
    names = outputs()
    labelled = [(i, c) for i, c in enumerate(codes) if c is not None and keep[i]]
    idx = [i for i, _ in labelled]
    y = torch.tensor([names.index(c) for _, c in labelled])
    x = torch.from_numpy(crops[idx])
    seed_everything(0)
    config = make_config(
        "celltype",
        "resnet18",
        outputs=names,
        crop_size=int(crops.shape[1]),
        cell_head="softmax",
        hyperparameters={"lr": 0.003, "weight_decay": 1e-4, "minutes": minutes},
        training={"data": "deepapl sign-out cells (quick typer, training.apl)", "seed": 0},
    )
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=1e-4)
    step = AmpStep(optimizer, amp=False)
    start, epoch = time.monotonic(), 0
    model.train()
    while time.monotonic() - start < minutes * 60:
        total, steps = 0.0, 0
        order = torch.randperm(len(y), generator=epoch_generator(0, epoch))
        for batch in progress(order.split(64), desc=f"quick typer epoch {epoch + 1}"):
            xb = augment(x[batch].permute(0, 3, 1, 2).float().div(255.0))
            total += step(batch_loss(model, xb, y[batch], None, "softmax"))
            steps += 1
            if time.monotonic() - start > minutes * 60:
                break
        epoch += 1
        for group in optimizer.param_groups:
            group["lr"] *= 0.8
        log.info(
            "quick typer epoch %d: loss %.4f (%.0f s)",
            epoch,
            total / steps,
            time.monotonic() - start,
        )
    model.eval()
    config["training"]["epochs_done"] = epoch
    config["training"]["seconds"] = round(time.monotonic() - start, 1)
    return save_model(model, config, out)


def type_cells(
    typer: Any, crops: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32[N, K] in the typer's `names` order, penultimate embeddings
    float32[N, D]) of uint8[N, S, S, 3] crops: one forward pass gives both, the
    probabilities exactly as `CellTyper.predict` computes them."""
    # serving's own call (the celltype service's EMBEDDINGS), in chunks for the progress bar
    probs, embeds = [], []
    for start in progress(range(0, len(crops), batch_size), desc="type cells"):
        p, e = typer.predict_with_embeddings(crops[start : start + batch_size], batch_size)
        probs.append(p)
        embeds.append(e)
    if not probs:
        return np.zeros((0, len(typer.names)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(probs), np.concatenate(embeds)


def measure_sample(
    cohort: AplCohort, half: np.ndarray, keep: np.ndarray, per_patient: int, cache: Path
) -> np.ndarray:
    """Morphometrics float32[N, len(FEATURE_NAMES)] of up to `per_patient` readable cells
    per patient (a fixed random sample, seed 0); other rows keep `segmentation_ok` = 0."""
    from marrowscope.morphometrics import FEATURE_NAMES, measure_cell

    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if data["morph"].shape[0] == len(cohort.cells) and int(data["per_patient"]) == per_patient:
            return data["morph"]
    rng = np.random.default_rng(0)
    chosen: list[int] = []
    by_patient: dict[str, list[int]] = {}
    for i, c in enumerate(cohort.cells):
        if keep[i]:
            by_patient.setdefault(c.patient_id, []).append(i)
    for rows in by_patient.values():
        chosen += sorted(rng.permutation(rows)[:per_patient].tolist())
    morph = np.zeros((len(cohort.cells), len(FEATURE_NAMES)), np.float32)
    for i in progress(chosen, desc="morphometrics"):
        morph[i] = measure_cell(half[i]).as_vector()
    np.savez(cache, morph=morph, per_patient=per_patient)
    return morph


def case_table(
    cohort: AplCohort, probs: np.ndarray, names: list[str], morph: np.ndarray, keep: np.ndarray
) -> tuple[tuple[str, ...], np.ndarray]:
    """One case vector per patient (`cohort.patients` order) by `case_features`, from
    every readable cell. A typer without some attribute output gets 0 for it (logged)."""
    from marrowscope.features import CellCall, case_feature_names, case_features
    from marrowscope.morphometrics import FEATURE_NAMES
    from marrowscope.taxonomy import ATTRIBUTE_CODES

    missing = [a for a in ATTRIBUTE_CODES if a not in names]
    if missing:
        log.warning("celltype model has no %s output: those case features are 0", missing)
    rows: dict[str, list[CellCall]] = {p: [] for p in cohort.patients}
    for i, cell in enumerate(cohort.cells):
        if not keep[i]:
            continue
        p = dict(zip(names, (float(v) for v in probs[i]), strict=True))
        p.update(dict.fromkeys(missing, 0.0))
        m = dict(zip(FEATURE_NAMES, (float(v) for v in morph[i]), strict=True))
        rows[cell.patient_id].append(CellCall(probs=p, morph=m))
    table = np.stack([case_features(rows[pid])[1] for pid in cohort.patients])
    return case_feature_names(), table


def sign_out_differential(cohort: AplCohort) -> tuple[list[str], np.ndarray]:
    """The pathologists' differential per patient: fraction of each sign-out folder among the
    patient's signed-out cells (every folder, smudge cells included), `cohort.patients` order."""
    classes = sorted({c.sign_out for c in cohort.cells if c.sign_out})
    counts = {p: np.zeros(len(classes)) for p in cohort.patients}
    for c in cohort.cells:
        if c.sign_out:
            counts[c.patient_id][classes.index(c.sign_out)] += 1
    table = np.stack([counts[p] / max(1.0, counts[p].sum()) for p in cohort.patients])
    return classes, table


# ------------------------------------------------------------------ the experiment


def ensemble_fit_predict(names, table: np.ndarray, y: np.ndarray, config, out: Path):
    """A `fit_predict` training the product's ensemble net (`train_mlp`, targets aml + apl)
    per fold and returning its P(APL | AML); every patient here is AML (aml label 1)."""
    from training.cli import JobConfig
    from training.ensemble import train_mlp

    labels = np.stack([np.ones(len(y)), y], axis=1).astype(np.float32)

    def fit_predict(tr: np.ndarray, te: np.ndarray, fit_seed: int) -> np.ndarray:
        cfg = JobConfig.of("ensemble", {**config.as_dict(), "seed": fit_seed})
        model, _ = train_mlp(
            cfg, names, table[tr], labels[tr], None, None, output=out, checkpoint=False
        )
        return model.predict_targets(table[te])["apl"].numpy()

    return fit_predict


def save_mil_artifact(
    model: Any,
    directory: Path,
    typer: Any,
    *,
    auroc: float,
    register: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Save (and with `register`, register) the MIL model pinned to `typer`'s version."""
    from marrowscope.stages import Stage
    from training.apl_cv import save_mil

    celltype = {"name": Stage.CELLTYPE.registered_name, "version": str(typer.version)}
    save_mil(model, directory, celltype=celltype, training={"cv_apl_auroc": auroc})
    out: dict[str, Any] = {"directory": str(directory), "celltype": celltype}
    if register:
        from marrowscope.registry import register_model_dir

        if not celltype["version"].isdigit():
            raise UsageError(
                f"--register-mil: celltype version {celltype['version']} is not a registry "
                "version; give --celltype-model models:/marrowscope-celltype/N"
            )
        out["registered_version"] = register_model_dir(
            "mil",
            directory,
            metrics={"apl_auroc": float(auroc)},
            params={},
            data_hash="deepapl",
            lineage={"celltype": celltype["version"]},
            tracking_uri=tracking_uri,
        )
    log.info("MIL model saved to %s (celltype %s)", directory, celltype)
    return out


def attention_by_class(
    cohort: AplCohort, bags_rows: list[np.ndarray], bags: list[np.ndarray], y, *, epochs: int
) -> tuple[dict[str, Any], Any]:
    """Train one MIL model on every patient and say which signed-out classes it attends to:
    per diagnosis, the share of each sign-out class among each patient's top-10 % attended
    cells (averaged over patients) beside its share among all the patient's cells. Returns
    (that table, the model)."""
    import torch

    from training.apl_cv import train_mil

    model = train_mil(bags, y, seed=0, epochs=epochs)
    out: dict[str, Any] = {}
    for label, group in ((1, "APL"), (0, "non-APL AML")):
        top_share: dict[str, list[float]] = {}
        all_share: dict[str, list[float]] = {}
        for rows, bag, yi in zip(bags_rows, bags, y, strict=True):
            if yi != label:
                continue
            with torch.inference_mode():
                a = model(torch.as_tensor(bag))[1].numpy()
            top = rows[np.argsort(-a)[: max(1, len(a) // 10)]]
            classes = [cohort.cells[i].sign_out or "(not signed out)" for i in rows]
            top_classes = [cohort.cells[i].sign_out or "(not signed out)" for i in top]
            for c in set(classes):
                top_share.setdefault(c, []).append(top_classes.count(c) / len(top_classes))
                all_share.setdefault(c, []).append(classes.count(c) / len(classes))
        n = sum(1 for yi in y if yi == label)
        out[group] = {
            c: {
                "top10pct_share": round(float(np.sum(top_share[c]) / n), 4),
                "all_cells_share": round(float(np.sum(all_share[c]) / n), 4),
            }
            for c in sorted(top_share, key=lambda c: -np.sum(top_share[c]))
        }
    return out, model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.apl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the deepapl folder")
    p.add_argument("--workdir", type=Path, required=True, help="cache and quick-typer folder")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop on a class folder the taxonomy does not map (default: report it)",
    )
    p.add_argument(
        "--celltype-model",
        help="celltype model (models:/... URI or model directory); absent: train a quick "
        "typer on the signed-out cells (--train-typer-minutes)",
    )
    p.add_argument("--train-typer-minutes", type=float, default=8.0)
    p.add_argument(
        "--save-mil",
        type=Path,
        default=None,
        help="write the MIL model trained on every patient here (a registrable mil model)",
    )
    p.add_argument(
        "--register-mil",
        action="store_true",
        help="with --save-mil and a registry --celltype-model: register it as marrowscope-mil",
    )
    p.add_argument("--crop-size", type=int, default=64, help="quick typer's crop size")
    p.add_argument("--morph-cells", type=int, default=64, help="measured cells per patient")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mil-epochs", type=int, default=40)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--config", default="cpu-demo", help="ensemble config (training/configs)")
    p.add_argument(
        "--results",
        type=Path,
        default=Path("bench/results/apl"),
        help="write RESULTS.md and RESULTS.json",
    )
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--signed-out-only",
        action="store_true",
        help="use only the cells the pathologists signed out (sensitivity check)",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from marrowscope.inference import CellTyper, load_predictor
    from training.apl_cv import (
        logistic_fit_predict,
        mil_fit_predict,
        repeated_grouped_cv,
        summarise,
    )
    from training.cli import JobConfig, load_job_config

    if args.celltype_model is None and args.train_typer_minutes <= 0:
        raise UsageError("give --celltype-model or a positive --train-typer-minutes")
    if args.register_mil and (args.save_mil is None or not args.celltype_model):
        raise UsageError(
            "--register-mil needs --save-mil and a registered --celltype-model: the MIL "
            "model is pinned to the celltype version whose embeddings it learned"
        )
    import torch

    # the CV models are tiny: on a shared CPU, extra intra-op threads only spin and wait
    # (one 65-patient MLP epoch took ~1 s with the default threads under load)
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    cohort = read_cohort(args.data, strict=args.strict)
    patients = cohort.patients
    y = np.array([cohort.apl[p] for p in patients])
    log.info("%d patients (%d APL), %d cells", len(y), y.sum(), len(cohort.cells))
    config = JobConfig.of(
        "ensemble", load_job_config("ensemble", args.config, ['targets=["aml","apl"]'])
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.celltype_model:
        size = None
        typer_uri, typer_kind = args.celltype_model, "given"
    else:
        size, typer_kind = args.crop_size, "quick"

    def load_typer(uri: str, tracking_uri: str | None = None) -> CellTyper:
        typer = load_predictor(uri, tracking_uri=tracking_uri)
        if not isinstance(typer, CellTyper):
            raise UsageError(f"--celltype-model is a {typer.kind} model, not celltype")
        return typer

    if size is None:
        typer = load_typer(args.celltype_model, args.tracking_uri)
        size = typer.crop_size
    crops, half, keep = load_cells(cohort, size, args.workdir / f"cells-{size}.npz")
    timings["decode_s"] = time.monotonic() - t0
    if typer_kind == "quick":
        t = time.monotonic()
        typer_dir = train_quick_typer(
            crops,
            sign_out_codes(cohort),
            keep,
            args.workdir / "quick-typer",
            minutes=args.train_typer_minutes,
        )
        timings["typer_train_s"] = time.monotonic() - t
        typer = load_typer(str(typer_dir))
        typer_uri = "DIR/quick-typer"
    t = time.monotonic()
    typed = args.workdir / f"typed-{typer.version[:24]}.npz"
    if typed.is_file():
        d = np.load(typed)
        probs, embeds = d["probs"], d["embeds"]
    else:
        probs, embeds = type_cells(typer, crops)
        np.savez(typed, probs=probs, embeds=embeds)
    timings["type_s"] = time.monotonic() - t
    t = time.monotonic()
    morph = measure_sample(
        cohort, half, keep, args.morph_cells, args.workdir / f"morph-{args.morph_cells}.npz"
    )
    timings["morphometrics_s"] = time.monotonic() - t
    if args.signed_out_only:
        # sensitivity check: not-signed-out cells are ~46 % of an APL patient's cells and
        # ~4 % of the others', so anything that tells them apart could stand in for APL
        keep = keep & np.array([bool(c.sign_out) for c in cohort.cells])
        present = {c.patient_id for c, k in zip(cohort.cells, keep, strict=True) if k}
        if dropped := sorted(set(cohort.apl) - present):
            log.warning("patients without signed-out cells left out: %s", dropped)
        cohort = AplCohort({p: v for p, v in cohort.apl.items() if p in present}, cohort.cells)
        patients = cohort.patients
        y = np.array([cohort.apl[p] for p in patients])
    names, table = case_table(cohort, probs, list(typer.names), morph, keep)
    index = {p: i for i, p in enumerate(patients)}
    rows: list[list[int]] = [[] for _ in patients]
    for i, c in enumerate(cohort.cells):
        if keep[i]:
            rows[index[c.patient_id]].append(i)
    bag_rows = [np.array(r, dtype=int) for r in rows]
    bags = [embeds[r].astype(np.float32) for r in bag_rows]
    classes, diff = sign_out_differential(cohort)

    cv = {"folds": args.folds, "repeats": args.repeats, "seed": 0}
    runs = {
        "ensemble_apl": ensemble_fit_predict(names, table, y, config, args.workdir / "cv"),
        "mil_attention": mil_fit_predict(bags, y, epochs=args.mil_epochs),
        "case_features_logistic": logistic_fit_predict(table, y),
        "oracle_signout_differential_logistic": logistic_fit_predict(diff, y),
    }
    results: dict[str, Any] = {}
    for name, fit_predict in runs.items():
        t = time.monotonic()
        oof = repeated_grouped_cv(
            y, patients, fit_predict, folds=args.folds, repeats=args.repeats, seed=0
        )
        results[name] = summarise(y, oof, n_boot=args.n_boot)
        timings[f"cv_{name}_s"] = time.monotonic() - t
        log.info(
            "%s: AUROC %.3f +- %.3f", name, results[name]["auroc_mean"], results[name]["auroc_sd"]
        )
    pmo = diff[:, classes.index("Promyelocyte")]
    results["oracle_promyelocyte_fraction"] = {
        "auroc": float(roc_auc_score(y, pmo)),
        "note": "no training: the fraction itself is the score",
    }
    best = max(("ensemble_apl", "mil_attention"), key=lambda k: results[k]["auroc_mean"])
    t = time.monotonic()
    attention, mil_model = attention_by_class(cohort, bag_rows, bags, y, epochs=args.mil_epochs)
    timings["attention_s"] = time.monotonic() - t
    saved_mil = None
    if args.save_mil is not None:
        saved_mil = save_mil_artifact(
            mil_model,
            args.save_mil,
            typer,
            auroc=results["mil_attention"]["auroc_mean"],
            register=args.register_mil,
            tracking_uri=args.tracking_uri,
        )
    timings["total_s"] = time.monotonic() - t0
    typer_config = typer.config
    report = {
        "what": "APL vs non-APL AML, patient level, DeepAPL discovery cohort (real data)",
        "command": command_line(args),
        "patients": int(len(y)),
        "apl_patients": int(y.sum()),
        "cells": int(keep.sum()),
        "unreadable_cells": int((~keep).sum()),
        "cv": cv,
        "celltype_model": {
            "source": typer_kind,
            "uri": typer_uri,
            "arch": typer_config["arch"],
            "crop_size": typer_config["crop_size"],
            "embedding_dim": int(embeds.shape[1]),
            "training": typer_config.get("training", {}),
        },
        "morphometrics_cells_per_patient": args.morph_cells,
        "signed_out_only": bool(args.signed_out_only),
        "reference": {"eckardt_2022_bmc_cancer_auroc": ECKARDT_2022_AUROC},
        "results": results,
        "better_of_ensemble_and_mil": best,
        "mil_attention_by_sign_out_class": attention,
        "saved_mil": saved_mil,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    write_results(report, args.results)
    return report


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the run, with DIR placeholders instead of local paths."""
    parts = ["python -m training.apl", "--workdir DIR"]
    if args.data != DEFAULT_DATA:
        parts.append("--data DATA")
    if args.celltype_model:
        model = args.celltype_model
        parts.append(f"--celltype-model {model if model.startswith('models:/') else 'MODEL_DIR'}")
    else:
        parts.append(f"--train-typer-minutes {args.train_typer_minutes:g}")
    parts += [
        f"--morph-cells {args.morph_cells}",
        f"--folds {args.folds} --repeats {args.repeats} --mil-epochs {args.mil_epochs}",
        *(["--signed-out-only"] if args.signed_out_only else []),
    ]
    return " ".join(parts)


def write_results(report: dict[str, Any], prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(render_markdown(report))
    log.info("wrote %s.{md,json}", prefix)


def render_markdown(r: dict[str, Any]) -> str:
    res = r["results"]
    labels = {
        "ensemble_apl": "(a) ensemble net, APL output, over the case vector",
        "mil_attention": "(b) gated-attention MIL over the typer's cell embeddings",
        "case_features_logistic": "case vector, logistic regression (context)",
        "oracle_signout_differential_logistic": "pathologists' sign-out differential, "
        "logistic regression (oracle labels, context)",
    }
    rows = [
        f"| {labels[k]} | **{v['auroc_mean']:.3f}** | {v['auroc_sd']:.3f} | "
        f"{v['auroc_ci95'][0]:.3f}-{v['auroc_ci95'][1]:.3f} |"
        for k, v in res.items()
        if k in labels
    ]
    typer = r["celltype_model"]
    att = r["mil_attention_by_sign_out_class"]
    att_rows = [
        f"| {group} | {c} | {s['top10pct_share']:.3f} | {s['all_cells_share']:.3f} |"
        for group, shares in att.items()
        for c, s in list(shares.items())[:4]
    ]
    return "\n".join(
        [
            "# APL vs non-APL AML from cell morphology (real patients, DeepAPL)",
            "",
            f"{r['patients']} patients ({r['apl_patients']} APL), {r['cells']} cells "
            f"({r['unreadable_cells']} unreadable, skipped); patient-level AUROC, "
            f"{r['cv']['repeats']} x repeated patient-grouped stratified {r['cv']['folds']}-fold "
            "CV (every model on the same folds). Mean and SD over repeats of each repeat's "
            "pooled out-of-fold AUROC; 95 % CI: stratified patient bootstrap "
            f"({res['ensemble_apl']['n_boot']} resamples) of the repeat-averaged scores.",
            "",
            "```",
            r["command"],
            "```",
            "",
            "| model | AUROC mean | SD (repeats) | 95 % CI |",
            "|---|---|---|---|",
            *rows,
            f"| pathologists' promyelocyte fraction alone (oracle, no training) | "
            f"{res['oracle_promyelocyte_fraction']['auroc']:.3f} | | |",
            f"| Eckardt et al., BMC Cancer 2022 (bone marrow, other patients) | "
            f"{r['reference']['eckardt_2022_bmc_cancer_auroc']} | | |",
            "",
            f"Better of (a) and (b): `{r['better_of_ensemble_and_mil']}`.",
            "",
            "Served: both paths exist; the default is still the ensemble's APL head "
            "(`targets` with `apl`: `P_APL`, report `apl_morphology` with `model: "
            '"ensemble"`), so nothing changes until a deployment switches. To serve MIL: '
            "write and register the model (`--save-mil DIR --register-mil` with a "
            "registered `--celltype-model`; config pinned to that celltype version), "
            "promote it (`python -m training.promote --model mil --version V`; refused "
            "unless that celltype version is serving), set "
            "`MS_ENSEMBLE_MIL_MODEL_URI=models:/marrowscope-mil@champion` (the ensemble "
            "service then also serves the OIP model `mil`: `CELL_EMBEDDINGS` FP32 [N, D] "
            "-> `P_APL`, `ATTENTION` FP32 [N]) and `MS_GATEWAY_APL_MODEL=mil`. The "
            "gateway then asks celltype for each cell's `EMBEDDINGS`, sends all of a "
            'case\'s typed cells in one call, reports `apl_morphology` with `model: "mil"`'
            " and writes each cell's attention to `attention` and `importance` (schema "
            "1.5). Without a usable MIL model the APL entry is `not_available` and the "
            "rest of the report stands. MIL's lead here (0.839 vs 0.813) is inside both "
            "CIs, so the switch is a deployment choice, not a default.",
            "",
            f"Cell typer: {typer['source']} ({typer['arch']}, {typer['crop_size']} px crops, "
            f"embedding {typer['embedding_dim']}-d; `{typer['uri']}`). Morphometrics from up to "
            f"{r['morphometrics_cells_per_patient']} cells per patient at half resolution "
            "(px units).",
            "",
            "Where the MIL model looks (one model trained on every patient; share of each "
            "sign-out class among a patient's top-10 % attended cells vs among all its cells, "
            "averaged over patients; top 4 per group):",
            "",
            "| patients | sign-out class | top-10 % share | all-cells share |",
            "|---|---|---|---|",
            *att_rows,
            "",
            *(
                [
                    "Caveat: no trained celltype model was given, so a quick ResNet18 was trained "
                    f"here on the cohort's signed-out cells ({typer['training'].get('epochs_done')} "
                    f"epoch(s), {typer['training'].get('seconds')} s on a shared CPU). It saw the "
                    "test patients' cells with their cell-type labels (never the diagnosis), "
                    "which a typer trained elsewhere would not; it is weak, so (a) and (b) are "
                    "lower bounds of what a real typer gives. Rerun with `--celltype-model`.",
                    "",
                ]
                if typer["source"] == "quick"
                else []
            ),
            *(f"Note: {n}\n" for n in r.get("notes", [])),
            "Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()),
            "",
        ]
    )


if __name__ == "__main__":
    run_main(main, get_args_parser())
