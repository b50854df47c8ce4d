"""APL vs other AML from cell morphology on real patients (DeepAPL discovery cohort).

    python -m training.apl --workdir DIR --celltype-model models:/marrowscope-celltype@champion
    python -m training.apl --workdir DIR --train-typer-minutes 8   # no typer: train a quick one

Real data (`../shared/data/deepapl`, read its README; read by `training.data.deepapl`):
81 AML patients (60 non-APL, 21 APL), each a bag of ~160 signed-out single white cells.
Every cell is typed by a celltype model (probabilities and its penultimate embedding) and
measured (`marrowscope.morphometrics`); one case vector per patient is built by
`marrowscope.features.case_features`, the code path serving uses. Then nested CV
(`training.apl_cv`): outer = repeated patient-grouped stratified 5-fold CV (one patient =
one group), inner = grouped folds of each outer-train set, on which every choice is made
(`training.apl_models`):

- case-vector and mean-cell-embedding logistic regressions (C chosen inside);
- the ensemble net's APL output (`EnsembleNet`, `targets: ["aml", "apl"]`, its config
  fixed: the product's default today);
- gated-attention MIL over the typer's cell embeddings (Ilse et al. 2018; the approach of
  SCEMILA and DeepAPL) with instance dropout and random instance sampling, early-stopped
  on the inner folds, the inner-fold models averaged (fold ensemble) and temperature-scaled
  on their inner out-of-fold logits;
- averages of those calibrated probabilities; for context, the pathologists' own sign-out
  differential (oracle labels).

Each is reported as patient-level AUROC (mean and SD over repeats, patient-bootstrap 95 %
CI), ECE, Brier and saturation (held-out scores outside [0.01, 0.99]), beside Eckardt et
al. (BMC Cancer 2022): 0.8575 on bone marrow; the simplest model not worse than the best
(paired bootstrap) is named. The stability figure (`training.apl_stability`, `--shifts`)
rescores each outer fold's held-out patients with their cells under `training.shifts`.
Results go to `--results` (.md + .json, `training.apl_report`); stage outputs are cached
in the work directory.

`--save-mil DIR` writes the served bag model, fitted by its nested-CV recipe on every
patient, as a registrable `mil` model (`marrowscope.models.mil`: safetensors + config with
its calibration, pinned to the celltype model and version whose embeddings it learned).
`--served-model` picks it: `mean-embedding` (default), the calibrated logistic regression on
each patient's mean cell embedding, the simplest model that met the stability bar of the
generalisation suite (issue 23 §3; MIL missed it under pixel-size shifts), or `mil`, the
gated-attention fold ensemble (whose attention the report shows either way); `--register-mil`
also registers it as `marrowscope-mil` (metric `apl_auroc`: its nested-CV AUROC) for
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
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.apl_stability import DEFAULT_SHIFTS
from training.cli import UsageError, run_main
from training.data.deepapl import DEFAULT_ROOT
from training.engine import progress

log = logging.getLogger(__name__)

DEFAULT_DATA = DEFAULT_ROOT
SERVED_MODELS = {"mean-embedding": "pooled_embedding_logistic", "mil": "mil_fold_ensemble"}
"""`--served-model` choices -> the nested-CV run whose recipe the served model repeats."""
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
    cohort: AplCohort, size: int, cache: Path, crop_mode: str = "image"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crops uint8[N, size, size, 3] cut for the typer (`marrowscope.case.single_cell_crop`,
    `crop_mode`), half uint8[N, h, w, 3] at half resolution for morphometrics, keep
    bool[N]) for `cohort.cells`; unreadable files are reported and skipped (keep False, zero
    pixels). Cached in `cache` (npz)."""
    from marrowscope.case import single_cell_crop
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
        crops[i] = single_cell_crop(image, size, crop_mode)
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


def ensemble_candidate(names, config, out: Path):
    """The product's ensemble net (`train_mlp`, targets aml + apl) as a `FixedCandidate`:
    its config makes every choice, so nothing is tuned on the inner folds; it returns its
    P(APL | AML) as it comes (uncalibrated). Every patient here is AML (aml label 1)."""
    from training.apl_models import FixedCandidate
    from training.cli import JobConfig
    from training.ensemble import train_mlp

    def train(data, rows: np.ndarray, seed: int):
        labels = np.stack([np.ones(len(rows)), data.y[rows]], axis=1).astype(np.float32)
        cfg = JobConfig.of("ensemble", {**config.as_dict(), "seed": seed})
        model, _ = train_mlp(
            cfg, names, data.case[rows], labels, None, None, output=out, checkpoint=False
        )
        return lambda d, r: model.predict_targets(d.case[r])["apl"].numpy()

    return FixedCandidate("ensemble_apl", train)


def cohort_data(cohort: AplCohort, cells: Any, names: list[str], tables=None):
    """`AplData` of `cohort` from `CellArrays` (only `cells.keep` rows): each patient's bag
    of embeddings and case vector. Returns (data, bag_rows: cell indices per patient)."""
    from training.apl_models import AplData

    _, table = case_table(cohort, cells.probs, names, cells.morph, cells.keep)
    index = {p: i for i, p in enumerate(cohort.patients)}
    rows: list[list[int]] = [[] for _ in cohort.patients]
    for i, c in enumerate(cohort.cells):
        if cells.keep[i] and c.patient_id in index:
            rows[index[c.patient_id]].append(i)
    bag_rows = [np.array(r, dtype=int) for r in rows]
    bags = [cells.embeds[r].astype(np.float32) for r in bag_rows]
    y = np.array([cohort.apl[p] for p in cohort.patients])
    return AplData(y, bags, table, dict(tables or {})), bag_rows


def mean_embedding_model(fitted: Any) -> tuple[Any, dict[str, Any]]:
    """The servable module of a fitted mean-embedding logistic (`training.apl_models`
    `_FittedLogistic` on the `pooled` table) and its choices."""
    from marrowscope.models.mil import MeanEmbeddingLogistic

    if fitted.table != "pooled":
        raise ValueError(f"a mean-embedding model fits the pooled table, not {fitted.table!r}")
    module = MeanEmbeddingLogistic.from_sklearn(
        fitted.model, temperature=fitted.temperature, bias=fitted.bias
    )
    return module, dict(fitted.choice)


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
    # the MIL model learned from the DeepAPL patients' cells, typed by `typer`
    save_mil(
        model,
        directory,
        celltype=celltype,
        training={"cv_apl_auroc": auroc, "trained_on": "deepapl"},
    )
    # the directory's name only: results files never hold this machine's paths
    out: dict[str, Any] = {"directory": f"DIR/{directory.name}", "celltype": celltype}
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
    cohort: AplCohort, bags_rows: list[np.ndarray], bags: list[np.ndarray], y, model: Any
) -> dict[str, Any]:
    """Which signed-out classes a MIL model attends to: per diagnosis, the share of each
    sign-out class among each patient's top-10 % attended cells (averaged over patients)
    beside its share among all the patient's cells."""
    import torch

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
    return out


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
    p.add_argument(
        "--served-model",
        choices=tuple(SERVED_MODELS),
        default="mean-embedding",
        help="what --save-mil writes: the mean-embedding logistic (default) or the MIL",
    )
    p.add_argument("--crop-size", type=int, default=64, help="quick typer's crop size")
    p.add_argument("--morph-cells", type=int, default=64, help="measured cells per patient")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner-folds", type=int, default=4, help="nested CV's inner folds")
    p.add_argument("--mil-epochs", type=int, default=40, help="MIL's most epochs (early stop)")
    p.add_argument("--mil-cells", type=int, default=64, help="MIL: cells per bag per step")
    p.add_argument(
        "--instance-dropouts", type=float, nargs="+", default=[0.0, 0.5], help="MIL grid"
    )
    p.add_argument(
        "--shifts",
        default=",".join(DEFAULT_SHIFTS),
        help="stability figure: shifts (training.shifts names, comma-separated; '' for none)",
    )
    p.add_argument("--shift-cells", type=int, default=16, help="stability: cells per patient")
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


SIMPLEST_FIRST: tuple[str, ...] = (
    "case_vector_logistic",
    "pooled_embedding_logistic",
    "ensemble_apl",
    "mil_fold_ensemble",
    "case_vector_plus_mil",
    "case_pooled_mil_average",
)
"""the compared models, simplest first: the preferred model is the first one not worse than
the best (paired patient-bootstrap CI of the AUROC difference includes 0)"""


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Cohort, typer, cells, their typing (probabilities, embeddings) and morphometrics,
    each cached in the work directory."""
    from marrowscope.inference import CellTyper, load_predictor

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    cohort = read_cohort(args.data, strict=args.strict)
    args.workdir.mkdir(parents=True, exist_ok=True)

    def load_typer(uri: str, tracking_uri: str | None = None) -> CellTyper:
        typer = load_predictor(uri, tracking_uri=tracking_uri)
        if not isinstance(typer, CellTyper):
            raise UsageError(f"--celltype-model is a {typer.kind} model, not celltype")
        return typer

    if args.celltype_model:
        typer = load_typer(args.celltype_model, args.tracking_uri)
        size, typer_uri, typer_kind = typer.crop_size, args.celltype_model, "given"
        if not typer_uri.startswith("models:/"):
            typer_uri = "MODEL_DIR"
    else:
        size, typer_kind = args.crop_size, "quick"
    mode = typer.crop_mode if args.celltype_model else "image"
    suffix = "" if mode == "image" else f"-{mode}"
    crops, half, keep = load_cells(
        cohort, size, args.workdir / f"cells-{size}{suffix}.npz", crop_mode=mode
    )
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
    return {
        "cohort": cohort,
        "typer": typer,
        "typer_uri": typer_uri,
        "typer_kind": typer_kind,
        "size": size,
        "probs": probs,
        "embeds": embeds,
        "morph": morph,
        "keep": keep,
        "timings": timings,
    }


def shifted_runs(
    args: argparse.Namespace,
    prep: dict[str, Any],
    cohort: AplCohort,
    cells: Any,
    runs: dict[str, Any],
    tables: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The stability figure (`training.apl_stability`): every run's outer-fold models
    rescore the held-out patients' subset of cells, as recorded and under each shift."""
    from training.apl_stability import measure, shifted_cells, stability_table, subset_rows

    names = list(prep["typer"].names)
    patients = [c.patient_id for c in cohort.cells]
    rows = subset_rows(patients, cells.keep, cells.morph, args.shift_cells)
    reference_data, _ = cohort_data(cohort, cells.restricted(rows), names, tables)
    reference = {k: run.rescore(reference_data) for k, run in runs.items()}
    shifted: dict[str, dict[str, np.ndarray]] = {}
    files = [c.file for c in cohort.cells]
    for shift in args.shifts:
        t = time.monotonic()
        crops, half = shifted_cells(
            files, rows, shift, prep["size"], getattr(prep["typer"], "crop_mode", "image")
        )
        probs, embeds = type_cells(prep["typer"], crops)
        data, _ = cohort_data(
            cohort, cells.replaced(rows, probs, embeds, measure(half)), names, tables
        )
        shifted[shift] = {k: run.rescore(data) for k, run in runs.items()}
        prep["timings"][f"shift_{shift}_s"] = time.monotonic() - t
    y = np.array([cohort.apl[p] for p in cohort.patients])
    return {
        "cells_per_patient": args.shift_cells,
        "cells": int(len(rows)),
        "shifts": list(args.shifts),
        "by_model": stability_table(y, reference, shifted),
    }


def preferred_model(
    y: np.ndarray, runs: dict[str, Any], results: dict[str, Any], n_boot: int
) -> dict[str, Any]:
    """The simplest model (`SIMPLEST_FIRST`) not worse than the best by AUROC: the
    paired patient-bootstrap 95 % CI of AUROC(best) - AUROC(model) contains 0."""
    from training.apl_cv import paired_auroc_difference

    compared = [k for k in SIMPLEST_FIRST if k in runs]
    best = max(compared, key=lambda k: results[k]["auroc_mean"])
    versus = {
        k: paired_auroc_difference(y, runs[best].oof.mean(0), runs[k].oof.mean(0), n_boot=n_boot)
        for k in compared
    }
    chosen = next(k for k in compared if versus[k]["ci95"][0] <= 0.0)
    return {"best": best, "preferred": chosen, "best_minus_model": versus}


def main(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from marrowscope.features import case_feature_names
    from training.apl_cv import grouped_folds, nested_cv, nested_folds, summarise
    from training.apl_models import LogisticCandidate, MilCandidate, combined_run
    from training.apl_report import write_results
    from training.apl_stability import CellArrays
    from training.cli import JobConfig, load_job_config
    from training.shifts import get_shift

    if args.celltype_model is None and args.train_typer_minutes <= 0:
        raise UsageError("give --celltype-model or a positive --train-typer-minutes")
    if args.register_mil and (args.save_mil is None or not args.celltype_model):
        raise UsageError(
            "--register-mil needs --save-mil and a registered --celltype-model: the MIL "
            "model is pinned to the celltype version whose embeddings it learned"
        )
    try:
        args.shifts = [get_shift(s).name for s in args.shifts.split(",") if s]
    except KeyError as exc:
        raise UsageError(f"--shifts: {exc.args[0]}") from None
    import torch

    # the CV models are tiny: on a shared CPU, extra intra-op threads only spin and wait
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    prep = prepare(args)
    timings = prep["timings"]
    cohort, keep = prep["cohort"], prep["keep"]
    if args.signed_out_only:
        # sensitivity check: not-signed-out cells are ~46 % of an APL patient's cells and
        # ~4 % of the others', so anything that tells them apart could stand in for APL
        keep = keep & np.array([bool(c.sign_out) for c in cohort.cells])
        present = {c.patient_id for c, k in zip(cohort.cells, keep, strict=True) if k}
        if dropped := sorted(set(cohort.apl) - present):
            log.warning("patients without signed-out cells left out: %s", dropped)
        cohort = AplCohort({p: v for p, v in cohort.apl.items() if p in present}, cohort.cells)
    patients = cohort.patients
    cells = CellArrays(prep["probs"], prep["embeds"], prep["morph"], keep)
    classes, diff = sign_out_differential(cohort)
    tables = {"signout": diff}
    data, bag_rows = cohort_data(cohort, cells, list(prep["typer"].names), tables)
    y = data.y
    log.info("%d patients (%d APL), %d cells", len(y), y.sum(), int(keep.sum()))
    config = JobConfig.of(
        "ensemble", load_job_config("ensemble", args.config, ['targets=["aml","apl"]'])
    )

    mil = MilCandidate(
        instance_dropouts=tuple(args.instance_dropouts),
        max_epochs=args.mil_epochs,
        max_cells=args.mil_cells,
    )
    pooled = LogisticCandidate("pooled_embedding_logistic", "pooled")
    candidates = [
        LogisticCandidate("case_vector_logistic", "case"),
        pooled,
        ensemble_candidate(case_feature_names(), config, args.workdir / "cv"),
        mil,
    ]
    oracle = LogisticCandidate("oracle_signout_differential_logistic", "signout")
    outer = nested_folds(
        y, patients, folds=args.folds, repeats=args.repeats, inner_folds=args.inner_folds
    )
    runs: dict[str, Any] = {}
    for candidate in [*candidates, oracle]:
        t = time.monotonic()
        runs[candidate.name] = nested_cv(data, y, candidate, outer)
        timings[f"cv_{candidate.name}_s"] = time.monotonic() - t
    runs["case_vector_plus_mil"] = combined_run(
        [runs["case_vector_logistic"], runs["mil_fold_ensemble"]]
    )
    runs["case_pooled_mil_average"] = combined_run(
        [
            runs[k]
            for k in ("case_vector_logistic", "pooled_embedding_logistic", "mil_fold_ensemble")
        ]
    )
    results: dict[str, Any] = {}
    for name, run in runs.items():
        results[name] = {
            **summarise(y, run.oof, n_boot=args.n_boot),
            "choices": [m.choice for _, m in run.fitted],
        }
        log.info(
            "%s: AUROC %.3f, ECE %.3f, saturated %.2f",
            name,
            results[name]["auroc_mean"],
            results[name]["ece"],
            results[name]["saturated_share"],
        )
    pmo = diff[:, classes.index("Promyelocyte")]
    results["oracle_promyelocyte_fraction"] = {
        "auroc": float(roc_auc_score(y, pmo)),
        "note": "no training: the fraction itself is the score",
    }
    choice = preferred_model(y, runs, results, args.n_boot)
    stability = None
    if args.shifts:
        compared = {k: runs[k] for k in SIMPLEST_FIRST}
        stability = shifted_runs(args, prep, cohort, cells, compared, tables)
    # the MIL whose attention the report shows: its recipe on every patient (inner folds
    # over all of them)
    t = time.monotonic()
    everyone = np.arange(len(y))
    inner_all = grouped_folds(y, np.asarray(patients), everyone, folds=args.inner_folds, seed=0)
    served = mil.fit(data, everyone, inner_all, 0)
    attention = attention_by_class(cohort, bag_rows, data.bags, y, served.model)
    timings["served_mil_s"] = time.monotonic() - t
    served_run = SERVED_MODELS[args.served_model]
    served_model, served_choice = served.model, served.choice
    if args.served_model == "mean-embedding":
        served_model, served_choice = mean_embedding_model(pooled.fit(data, everyone, inner_all, 0))
    saved_mil = None
    if args.save_mil is not None:
        saved_mil = save_mil_artifact(
            served_model,
            args.save_mil,
            prep["typer"],
            auroc=results[served_run]["auroc_mean"],
            register=args.register_mil,
            tracking_uri=args.tracking_uri,
        )
        saved_mil["model"] = served_run
    timings["total_s"] = time.monotonic() - t0
    typer_config = prep["typer"].config
    report = {
        "what": "APL vs non-APL AML, patient level, DeepAPL discovery cohort (real data)",
        "command": command_line(args),
        "patients": int(len(y)),
        "apl_patients": int(y.sum()),
        "cells": int(keep.sum()),
        "unreadable_cells": int((~prep["keep"]).sum()),
        "cv": {
            "folds": args.folds,
            "repeats": args.repeats,
            "inner_folds": args.inner_folds,
            "seed": 0,
        },
        "celltype_model": {
            "source": prep["typer_kind"],
            "uri": prep["typer_uri"],
            "arch": typer_config["arch"],
            "crop_size": typer_config["crop_size"],
            "embedding_dim": int(prep["embeds"].shape[1]),
            "training": typer_config.get("training", {}),
        },
        "morphometrics_cells_per_patient": args.morph_cells,
        "signed_out_only": bool(args.signed_out_only),
        "reference": {"eckardt_2022_bmc_cancer_auroc": ECKARDT_2022_AUROC},
        "results": results,
        "choice": choice,
        "stability": stability,
        "served_mil_choice": served.choice,
        "served_model": {"run": served_run, "choice": served_choice},
        "mil_attention_by_sign_out_class": attention,
        "saved_mil": saved_mil,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    write_results(report, args.results)
    return report


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the run, with DIR placeholders instead of local paths."""
    none = "''"  # an empty --shifts: no stability figure
    parts = ["python -m training.apl", "--workdir DIR"]
    if args.data != DEFAULT_DATA:
        parts.append("--data DATA")
    if args.celltype_model:
        model = args.celltype_model
        parts.append(f"--celltype-model {model if model.startswith('models:/') else 'MODEL_DIR'}")
    else:
        parts.append(f"--train-typer-minutes {args.train_typer_minutes:g}")
        parts.append(f"--crop-size {args.crop_size}")
    parts += [
        f"--morph-cells {args.morph_cells}",
        f"--folds {args.folds} --repeats {args.repeats} --inner-folds {args.inner_folds}",
        f"--mil-epochs {args.mil_epochs} --mil-cells {args.mil_cells}",
        "--instance-dropouts " + " ".join(f"{d:g}" for d in args.instance_dropouts),
        f"--shifts {','.join(args.shifts) or none} --shift-cells {args.shift_cells}",
        *(["--signed-out-only"] if args.signed_out_only else []),
        *([f"--served-model {args.served_model}"] if args.served_model != "mean-embedding" else []),
    ]
    return " ".join(parts)


if __name__ == "__main__":
    run_main(main, get_args_parser())
