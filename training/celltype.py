"""Train the cell-type / attribute classifier on crops cut from COCO annotations, or on a
single-cell ImageFolder set (ROOT/<CODE>/*.png, e.g. Matek et al.'s layout).

    python -m training.celltype --data data/synth --output runs/celltype --config cpu-demo

Crops: `marrowscope.imaging.crop_cells` with the serving crop size and padding
(`marrowscope.imaging.CELL_CROP_PAD_FRACTION`, recorded in the config), so training and
serving cut cells identically. Outputs: every taxonomy code (RBC included, so a detector
false positive on a red cell is typed RBC and not counted) then every attribute.
ImageFolder sets carry no patients: they are split at random, stratified by class, and the
attribute heads are not trained. Metrics (held-out split): `macro_f1`, `accuracy`,
`f1_<code>`, `auroc_<attr>`.

Real single-cell sets: `--data ../shared/data` (a folder holding `deepapl/` and/or `pbc/`)
trains on the sources named by config `real_train_sources`. DeepAPL is split by patient
(stratified by diagnosis, `split_seed`); PBC has no patient ids and stays in train/val
(`pbc_split="train_val"`, default) or is split by file (`"file"`). The held-out `test`
split is DeepAPL's test patients (PBC's file-split test cells when only PBC is trained
on); the source not trained on becomes the `external` split (all of PBC, or DeepAPL's test
patients) for the cross-source figure. Per-cell held-out probabilities go to
`<output>/predictions.npz` (`training.results real` reads them). The real sets have no
attribute labels: the attribute heads get no gradient there (`mix_synthetic` mixes in
synthetic crops that carry them; see the config).

Reviewed cells (`--corrections DIR`, an export of `python -m training.data.corrections`):
the hematologists' labelled crops join the data, split by accession with the config's
`split_seed` / `test_fraction` / `val_fraction`, so all cells of a case (and of every case
of its accession) sit on one side only. The analyses trained on (train + val) and held out
(test) are recorded in `corrections.json` beside the weights, which `python -m
training.evaluate corrections` and the promotion gate's `--corrections` read to compare
versions on cells neither has learned; the held-out ones give `corrections_accuracy`.

Stain / scanner robustness (config `stain_aug`): `none`; `hed` (Tellez et al. 2018: each
crop's optical densities projected on haematoxylin / eosin / DAB, scaled and shifted by
`stain_strength`), `hsv` (hue rotation, saturation and brightness scaling in YIQ) or
`both`; applied to training batches only.

Label noise (issue 23 §2): `label_smoothing` spreads that share of every target over all
classes; `pmo_bla_smoothing` e moves share e of a promyelocyte's target to blast and of a
blast's to promyelocyte (`marrowscope.models.celltype.soft_label_matrix`): the boundary
whose sign-out labels disagree between patients of the same cohort.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import JobConfig, UsageError, job_config, job_parser, run_main
from training.common_data import data_hash
from training.engine import (
    AmpStep,
    WeightEMA,
    build_for_training,
    device_and_amp,
    epoch_generator,
    fit,
    progress,
    seed_everything,
    train_batches,
    unsaved_predictor,
)
from training.tracking import finish, mlflow_run

log = logging.getLogger(__name__)
JOB = "celltype"


@dataclass
class CropSet:
    crops: np.ndarray
    """uint8[N, S, S, 3]."""
    cells: np.ndarray
    """int64[N] index into the cell codes of the outputs."""
    attributes: np.ndarray | None
    """float32[N, A] 0/1, None when the source has no attribute labels."""
    groups: np.ndarray | None = None
    """str[N] patient id per crop ("" when unknown), real sets only."""
    sources: np.ndarray | None = None
    """str[N] source set per crop (`deepapl` / `pbc`), real sets only."""


def outputs() -> list[str]:
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES

    return [*CODES, *ATTRIBUTE_CODES]


def coco_crops(data_dir, split: str, config: JobConfig, *, rbc_ratio: float | None) -> CropSet:
    """Crops of every annotated cell of the split's images (RBCs capped at `rbc_ratio` x
    the nucleated count when given, chosen with the seed)."""
    from marrowscope.imaging import CELL_CROP_PAD_FRACTION, crop_cells
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES
    from training.common_data import detection_items, read_rgb

    items, _ = detection_items(data_dir, split, config, "dataset")
    crops, cells, attrs = [], [], []
    for item in progress(items, desc=f"crops {split}"):
        if not len(item.boxes):
            continue
        unknown = sorted({c for c in item.codes if c not in CODES})
        if unknown:
            raise UsageError(f"{item.path}: categories {unknown} are not taxonomy codes")
        crops.append(
            crop_cells(read_rgb(item.path), item.boxes, config["crop_size"], CELL_CROP_PAD_FRACTION)
        )
        cells += [CODES.index(c) for c in item.codes]
        attrs += [[float(a.get(k, False)) for k in ATTRIBUTE_CODES] for a in item.attributes]
    if not cells:
        raise UsageError(f"{data_dir}: no annotated cells in split {split!r}")
    out = CropSet(
        np.concatenate(crops), np.array(cells, dtype=np.int64), np.array(attrs, dtype=np.float32)
    )
    if rbc_ratio is not None:
        rbc = CODES.index("RBC")
        is_rbc = out.cells == rbc
        cap = int(rbc_ratio * max(1, (~is_rbc).sum()))
        rng = np.random.default_rng(config["seed"])
        keep_rbc = rng.permutation(np.flatnonzero(is_rbc))[:cap]
        keep = np.sort(np.concatenate([np.flatnonzero(~is_rbc), keep_rbc]))
        out = CropSet(out.crops[keep], out.cells[keep], out.attributes[keep])
    log.info(
        "%s: %d crops (%s)",
        split,
        len(out.cells),
        ", ".join(
            f"{CODES[i]} {n}"
            for i, n in zip(*np.unique(out.cells, return_counts=True), strict=True)
        ),
    )
    return out


def imagefolder_crops(data_dir, config: JobConfig) -> dict[str, CropSet]:
    """train/val/test CropSets from a single-cell ImageFolder (random stratified split)."""
    from sklearn.model_selection import train_test_split

    from marrowscope.imaging import resize_for_model
    from marrowscope.taxonomy import CODES
    from training.data.imagefolder import iter_imagefolder, read_imagefolder

    items = read_imagefolder(data_dir)
    size = (config["crop_size"], config["crop_size"])
    crops = np.stack([resize_for_model(im, size) for im, _ in iter_imagefolder(items)])
    cells = np.array([CODES.index(c) for _, c in items], dtype=np.int64)
    idx = np.arange(len(cells))
    strat = cells if np.bincount(cells).max() > 1 and min(np.bincount(cells)[cells]) > 2 else None
    rest, test = train_test_split(
        idx, test_size=config["test_fraction"], random_state=config["split_seed"], stratify=strat
    )
    rel = config["val_fraction"] / (1 - config["test_fraction"])
    train, val = train_test_split(
        rest,
        test_size=rel,
        random_state=config["split_seed"],
        stratify=None if strat is None else cells[rest],
    )
    return {
        name: CropSet(crops[i], cells[i], None)
        for name, i in (("train", train), ("val", val), ("test", test))
    }


def is_real(data_dir) -> bool:
    """True for a folder holding the real single-cell sets (`deepapl/`, `pbc/`)."""
    from pathlib import Path

    return any((Path(data_dir) / s / "cells.csv").is_file() for s in REAL_SOURCES)


REAL_SOURCES = ("deepapl", "pbc")


def real_trained_on(config: JobConfig) -> str:
    """`training.trained_on` of a typer trained on the real sets: its `real_train_sources`,
    plus `synthetic` when synthetic crops are mixed in (`mix_synthetic`)."""
    from marrowscope.provenance import SYNTHETIC, join_sources

    mixed = [SYNTHETIC] if config.get("mix_synthetic") else []
    return join_sources([*config["real_train_sources"], *mixed])


def real_crops(data_dir, config: JobConfig, *, strict: bool = False) -> dict[str, CropSet]:
    """train / val / test (and `external`, see the module doc) CropSets from the real sets.

    Every image is decoded once; an unreadable one is logged on one line, counted and left
    out (`training.data.singlecell.load_crops`)."""
    from pathlib import Path

    from marrowscope.taxonomy import CODES
    from training.common_data import real_cell_splits
    from training.data.singlecell import load_crops

    train_on = list(config["real_train_sources"])
    unknown = [s for s in train_on if s not in REAL_SOURCES]
    if unknown or not train_on:
        raise UsageError(
            f"real_train_sources must be a non-empty subset of {REAL_SOURCES}, got {train_on}"
        )
    assigned = real_cell_splits(Path(data_dir), config, strict=strict)
    cache = Path(config["crop_cache"]) if config.get("crop_cache") else None
    records = [r for side in assigned.values() for r in side]
    crops, kept = load_crops(
        records, config["crop_size"], cache=cache, crop_mode=config.get("crop_mode", "image")
    )
    index = {r.path: i for i, r in enumerate(kept)}
    out: dict[str, CropSet] = {}
    for name, side in assigned.items():
        rows = [index[r.path] for r in side if r.path in index]
        recs = [kept[i] for i in rows]
        out[name] = CropSet(
            crops[rows].reshape(-1, *crops.shape[1:]),
            np.array([CODES.index(r.code) for r in recs], dtype=np.int64),
            None,
            np.array([r.patient_id or "" for r in recs], dtype=object),
            np.array([r.source for r in recs], dtype=object),
        )
    if config.get("mix_synthetic"):
        out["train"] = with_synthetic(out["train"], Path(config["mix_synthetic"]), config)
    trained = {k: v for k, v in out.items() if k != "external"}
    if "external" in out and not len(out["external"].cells):
        del out["external"]
    for name, cs in out.items():
        log.info(
            "%s: %d crops (%s)",
            name,
            len(cs.cells),
            ", ".join(
                f"{CODES[i]} {n}"
                for i, n in zip(*np.unique(cs.cells, return_counts=True), strict=True)
            ),
        )
    if not len(trained["train"].cells) or not len(trained["test"].cells):
        raise UsageError(f"{data_dir}: the real train or test split is empty")
    return out


def with_synthetic(real: CropSet, synth_dir, config: JobConfig) -> CropSet:
    """`real` plus the crops of a synthetic COCO set's train split (generated there with
    `mix_synthetic_cases` cases when absent). Real crops get NaN attribute targets (no
    labels: masked in the loss); synthetic crops keep theirs, so the attribute heads are
    trained on synthetic cells only, as the real sets carry no attribute labels."""
    from training.data.synth import generate_dataset
    from training.data.synth_cohort import SynthConfig

    if not (synth_dir / "annotations.json").is_file():
        generate_dataset(
            synth_dir,
            cases=int(config["mix_synthetic_cases"]),
            seed=int(config["seed"]) + 2022,
            config=SynthConfig(size=(640, 480)),
        )
    syn = coco_crops(synth_dir, "train", config, rbc_ratio=config["max_rbc_ratio"])
    n_attr = syn.attributes.shape[1]
    return CropSet(
        np.concatenate([real.crops, syn.crops]),
        np.concatenate([real.cells, syn.cells]),
        np.concatenate([np.full((len(real.cells), n_attr), np.nan, np.float32), syn.attributes]),
        np.concatenate([real.groups, np.full(len(syn.cells), "", dtype=object)]),
        np.concatenate([real.sources, np.full(len(syn.cells), "synthetic", dtype=object)]),
    )


def load_splits(data_dir, config: JobConfig, *, strict: bool = False) -> dict[str, CropSet]:
    if is_real(data_dir):
        return real_crops(data_dir, config, strict=strict)
    if (data_dir / "annotations.json").is_file():
        ratio = config["max_rbc_ratio"]
        return {
            "train": coco_crops(data_dir, "train", config, rbc_ratio=ratio),
            "val": coco_crops(data_dir, "val", config, rbc_ratio=None),
            "test": coco_crops(data_dir, "test", config, rbc_ratio=None),
        }
    return imagefolder_crops(data_dir, config)


CORRECTIONS_FILE = "corrections.json"
CORRECTIONS_SOURCE = "corrections"


def _concat(base: CropSet, extra: CropSet) -> CropSet:
    """`base` then `extra`; a side without attribute labels gets NaN rows (masked in the
    loss), without groups or sources "" (the COCO sets carry neither per crop)."""

    def column(cs: CropSet, name: str, fill: str) -> np.ndarray:
        value = getattr(cs, name)
        return np.full(len(cs.cells), fill, dtype=object) if value is None else value

    attributes = None
    if base.attributes is not None:
        nan = np.full((len(extra.cells), base.attributes.shape[1]), np.nan, np.float32)
        attributes = np.concatenate(
            [base.attributes, nan if extra.attributes is None else extra.attributes]
        )
    return CropSet(
        np.concatenate([base.crops, extra.crops]),
        np.concatenate([base.cells, extra.cells]),
        attributes,
        np.concatenate([column(base, "groups", ""), column(extra, "groups", "")]),
        np.concatenate([column(base, "sources", ""), column(extra, "sources", "")]),
    )


def with_corrections(
    splits: dict[str, CropSet], export_dir, config: JobConfig
) -> tuple[dict[str, CropSet], dict[str, Any]]:
    """`splits` with the reviewed cells of a corrections export added, split by accession
    (module docstring), and the record written to `corrections.json`."""
    import hashlib

    from marrowscope.taxonomy import CODES
    from training.data.corrections import MANIFEST, read_cells, split_groups

    try:
        cells = read_cells(Path(export_dir), config["crop_size"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not len(cells.codes):
        raise UsageError(f"--corrections {export_dir}: the export holds no cells")
    side = split_groups(
        cells.groups.tolist(),
        seed=config["split_seed"],
        test_fraction=config["test_fraction"],
        val_fraction=config["val_fraction"],
    )
    where = np.array([side[g] for g in cells.groups.tolist()])
    out = dict(splits)
    for name in ("train", "val", "test"):
        keep = where == name
        extra = CropSet(
            cells.crops[keep],
            np.array([CODES.index(c) for c in cells.codes[keep]], dtype=np.int64),
            None,
            np.array([f"corrections:{g}" for g in cells.groups[keep]], dtype=object),
            np.full(int(keep.sum()), CORRECTIONS_SOURCE, dtype=object),
        )
        out[name] = _concat(splits[name], extra)
    trained = sorted(set(cells.analyses[where != "test"].tolist()))
    record = {
        "export": str(export_dir),
        "manifest_sha256": hashlib.sha256((Path(export_dir) / MANIFEST).read_bytes()).hexdigest(),
        "trained_analyses": trained,
        "held_out_analyses": sorted(set(cells.analyses[where == "test"].tolist()) - set(trained)),
        "cells": {name: int((where == name).sum()) for name in ("train", "val", "test")},
    }
    log.info("corrections from %s: %s cells (train/val/test)", export_dir, record["cells"])
    return out, record


def load_training_data(args: argparse.Namespace, config: JobConfig) -> dict[str, CropSet]:
    """The job's splits: `--data` (`load_splits`) plus `--corrections` when given; the
    corrections record goes to `args.corrections_record`."""
    splits = load_splits(args.data, config, strict=args.strict)
    args.corrections_record = None
    if getattr(args, "corrections", None):
        splits, args.corrections_record = with_corrections(splits, args.corrections, config)
    return splits


def batch_loss(model, x, cells, attributes, cell_head: str, soft_targets=None):
    """Training loss of a batch: x FloatTensor[B, 3, S, S] in [0, 1]; `soft_targets`: the
    cell part's target distributions (`soft_label_matrix`), None for one-hot."""
    import torch
    import torch.nn.functional as F

    from marrowscope.models.celltype import celltype_loss

    logits = model(x)
    soft = None if soft_targets is None else soft_targets.to(logits.device)
    if attributes is None:  # no attribute labels: train the cell part only
        return celltype_loss(
            logits[:, : model.n_cells], cells, None, cell_head=cell_head, soft_targets=soft
        )
    known = ~torch.isnan(attributes).any(dim=1)
    if bool(known.all()):
        return celltype_loss(logits, cells, attributes, cell_head=cell_head, soft_targets=soft)
    # mixed real (no attribute labels, NaN) and synthetic rows: attributes on known rows only
    loss = celltype_loss(
        logits[:, : model.n_cells], cells, None, cell_head=cell_head, soft_targets=soft
    )
    if bool(known.any()):
        loss = loss + F.binary_cross_entropy_with_logits(
            logits[known, model.n_cells :], attributes[known].to(logits.dtype)
        )
    return loss


def augment(
    x, stain: str = "none", strength: float = 0.0, geometry: float = 0.0, photometric: float = 0.0
):
    """Random flips and 90-degree rotations of a batch [B, 3, S, S] (training split only),
    a per-image zoom / shift (`geometric_jitter`), the colour / stain jitter named by
    `stain` (see `stain_jitter`) and then the photometric / optical jitter
    (`training.photometric.photometric_jitter`, 0 = off)."""
    import torch

    from training.photometric import photometric_jitter

    if torch.rand(()) < 0.5:
        x = x.flip(3)
    if torch.rand(()) < 0.5:
        x = x.flip(2)
    x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(2, 3))
    return photometric_jitter(
        stain_jitter(geometric_jitter(x, geometry), stain, strength), photometric
    )


def geometric_jitter(x, amount: float):
    """Per-image random rotation (any angle), zoom U(1 - a, 1 + a) and shift U(-a, a) of
    the crop side, with border reflection. Why: scanners and analysers differ in pixel size
    and in how they centre the cell; the typer must not key on either. 0 returns x."""
    import torch
    import torch.nn.functional as F

    if amount <= 0:
        return x
    b = x.shape[0]
    angle = torch.rand(b, device=x.device) * (2 * torch.pi)
    zoom = 1 + (torch.rand(b, device=x.device) * 2 - 1) * amount
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * amount * 2  # grid units: side = 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# Ruifrok & Johnston's H&E-DAB stain vectors (as scikit-image's rgb_from_hed); Giemsa-type
# stains are not H&E, but the projection still separates a nuclear (blue-purple) and a
# cytoplasmic (pink) optical-density axis, which is what scanner and stain batches move.
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


def stain_jitter(x, mode: str, strength: float):
    """Per-image colour jitter of x FloatTensor[B, 3, S, S] in [0, 1].

    `hed`: optical density OD = -log(x) projected on the H, E, D stain axes, each scaled by
    U(1 - s, 1 + s) and shifted by U(-s, s), projected back (Tellez et al., 2018).
    `hsv`: in YIQ, chroma rotated by U(-s, s) * pi/2 (hue), scaled by U(1 - 2s, 1 + 2s)
    (saturation); luma scaled by U(1 - s, 1 + s) (brightness). `both`: hed then hsv.
    `none` returns x. Why: the typer must not key on one scanner's background colour; a
    typer trained without it dropped from macro-F1 0.70 to 0.21 on another scanner's cells.
    """
    import torch

    if mode == "none" or strength <= 0:
        return x
    if mode not in ("hed", "hsv", "both"):
        raise UsageError(f"stain_aug must be none, hed, hsv or both, got {mode!r}")
    b = x.shape[0]
    s = float(strength)

    def u(lo: float, hi: float, *shape: int):
        return torch.rand(b, *shape, device=x.device) * (hi - lo) + lo

    if mode in ("hed", "both"):
        m = torch.tensor(_RGB_FROM_HED, device=x.device, dtype=x.dtype)
        od = -torch.log(x.clamp(min=1e-3))  # [B, 3, S, S]
        stains = torch.einsum("bchw,cd->bdhw", od, torch.linalg.inv(m))
        stains = stains * u(1 - s, 1 + s, 3, 1, 1) + u(-s, s, 3, 1, 1)
        x = torch.exp(-torch.einsum("bdhw,dc->bchw", stains, m)).clamp(0, 1)
    if mode in ("hsv", "both"):
        to_yiq = torch.tensor(
            ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)),
            device=x.device,
            dtype=x.dtype,
        )
        yiq = torch.einsum("bchw,dc->bdhw", x, to_yiq)
        theta = u(-s, s) * (torch.pi / 2)
        sat = u(max(0.0, 1 - 2 * s), 1 + 2 * s)
        cos, sin = torch.cos(theta) * sat, torch.sin(theta) * sat
        i, q = yiq[:, 1], yiq[:, 2]
        c, n = cos[:, None, None], sin[:, None, None]
        y = yiq[:, 0] * u(1 - s, 1 + s)[:, None, None]
        yiq = torch.stack([y, c * i - n * q, n * i + c * q], dim=1)
        x = torch.einsum("bdhw,cd->bchw", yiq, torch.linalg.inv(to_yiq)).clamp(0, 1)
    return x


def evaluate_probs(probs: np.ndarray, data: CropSet) -> dict[str, float]:
    """Cell metrics from probabilities float[N, K] in `outputs()` order."""
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES
    from training.evaluate_metrics import celltype_report

    pred = probs[:, : len(CODES)].argmax(1)
    y_true = [CODES[i] for i in data.cells]
    y_pred = [CODES[i] for i in pred]
    if data.attributes is None:
        return celltype_report(y_true, y_pred, {}, {})
    # attribute figures over the cells that carry attribute labels (reviewed cells: NaN)
    known = ~np.isnan(data.attributes).any(axis=1)
    attr_true = {a: data.attributes[known, j] for j, a in enumerate(ATTRIBUTE_CODES)}
    attr_score = {a: probs[known, len(CODES) + j] for j, a in enumerate(ATTRIBUTE_CODES)}
    if known.all():
        return celltype_report(y_true, y_pred, attr_true, attr_score)
    cells = celltype_report(y_true, y_pred, {}, {})
    keep = np.flatnonzero(known)
    attrs = celltype_report(
        [y_true[i] for i in keep], [y_pred[i] for i in keep], attr_true, attr_score
    )
    return {**cells, **{k: v for k, v in attrs.items() if k not in cells}}


def per_source_macro_f1(probs: np.ndarray, data: CropSet, *, prefix: str) -> dict[str, float]:
    """`<prefix>macro_f1_<source>` for each source of a split that mixes sources (DeepAPL's
    patients and PBC's healthy donors in the real validation split), else nothing.

    Why: the pooled figure mixes another scanner's healthy cells, which the typer finds
    easier, into the leukemic patients', so it overstates the figure on DeepAPL patients
    (where the test figure comes from); each source's curve is logged on its own too."""
    if data.sources is None or len(set(data.sources.tolist())) < 2:
        return {}
    out = {}
    for source in sorted(set(data.sources.tolist())):
        keep = data.sources == source
        part = CropSet(data.crops[keep], data.cells[keep], None)
        out[f"{prefix}macro_f1_{source}"] = evaluate_probs(probs[keep], part)["macro_f1"]
    return out


def train(
    config: JobConfig,
    args: argparse.Namespace,
    *,
    trial: Any = None,
    splits: dict[str, CropSet] | None = None,
) -> tuple[Any, dict, dict]:
    import torch

    from marrowscope.imaging import CELL_CROP_PAD_FRACTION
    from marrowscope.inference import CellTyper
    from marrowscope.models import make_config

    seed_everything(config["seed"])
    device, amp = device_and_amp(args.device, config["amp"])
    splits = splits or load_training_data(args, config)
    corrections = getattr(args, "corrections_record", None)
    hp = {
        "head_dropout": config["dropout"],
        "crop_pad_fraction": CELL_CROP_PAD_FRACTION,
        "lr": config["lr"],
        "weight_decay": config["weight_decay"],
        "lr_gamma": config["lr_gamma"],
        "epochs": config["epochs"],
        "stain_aug": config.get("stain_aug", "none"),
        "stain_strength": config.get("stain_strength", 0.0),
        "class_balance": config.get("class_balance", 0.0),
        "geometric_aug": config.get("geometric_aug", 0.0),
        "photometric_aug": config.get("photometric_aug", 0.0),
        "lr_schedule": config.get("lr_schedule", "exponential"),
        "weight_ema": config.get("weight_ema", 0.0),
        "label_smoothing": config.get("label_smoothing", 0.0),
        "pmo_bla_smoothing": config.get("pmo_bla_smoothing", 0.0),
    }
    model_config = make_config(
        "celltype",
        config["arch"],
        outputs=outputs(),
        crop_size=config["crop_size"],
        cell_head=config["cell_head"],
        stain_norm=config.get("stain_norm", "none"),
        crop_mode=config.get("crop_mode", "image"),
        hyperparameters=hp,
        training={
            "data_hash": data_hash(args.data),
            "seed": config["seed"],
            "config_name": config["config_name"],
            **({"corrections_sha256": corrections["manifest_sha256"]} if corrections else {}),
            **({"trained_on": real_trained_on(config)} if is_real(args.data) else {}),
        },
    )
    model = build_for_training(model_config, device, config.get("init_weights"))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    if config.get("lr_schedule", "exponential") == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, config["epochs"]), eta_min=config["lr"] * 0.01
        )
    elif config.get("lr_schedule", "exponential") == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["lr_gamma"])
    else:
        raise UsageError(
            f"lr_schedule must be exponential or cosine, got {config['lr_schedule']!r}"
        )
    decay = float(config.get("weight_ema", 0.0))
    step = AmpStep(optimizer, amp=amp, ema=WeightEMA(model, decay) if decay > 0 else None)
    tr = splits["train"]
    x_all = torch.from_numpy(tr.crops)
    y_all = torch.from_numpy(tr.cells)
    a_all = None if tr.attributes is None else torch.from_numpy(tr.attributes)

    from marrowscope.errors import InvalidInput
    from marrowscope.models.celltype import soft_label_matrix
    from marrowscope.taxonomy import CODES

    try:
        soft_targets = soft_label_matrix(
            CODES,
            smoothing=float(config.get("label_smoothing", 0.0)),
            pairs=[("PMO", "BLA", float(config.get("pmo_bla_smoothing", 0.0)))],
        )
    except InvalidInput as exc:
        raise UsageError(str(exc)) from None
    balance = float(config.get("class_balance", 0.0))
    counts = np.bincount(tr.cells, minlength=model.n_cells).astype(np.float64)
    sample_w = torch.from_numpy(np.maximum(counts, 1.0)[tr.cells] ** -balance)

    def train_epoch(epoch: int) -> float:
        g = epoch_generator(config["seed"], epoch)
        if balance > 0:  # draw an epoch of cells with weight count^-balance (rare classes)
            order = torch.multinomial(sample_w, len(y_all), replacement=True, generator=g)
        else:
            order = torch.randperm(len(y_all), generator=g)
        chunks = order.split(config["batch_size"])
        chunks = chunks[: config["max_steps_per_epoch"] or len(chunks)]

        def batches():  # augmented here, outside the autocast of the loss
            for idx in chunks:
                x = x_all[idx].permute(0, 3, 1, 2).float().div(255.0).to(device)
                x = augment(
                    x,
                    config.get("stain_aug", "none"),
                    config.get("stain_strength", 0.0),
                    config.get("geometric_aug", 0.0),
                    config.get("photometric_aug", 0.0),
                )
                yield x, y_all[idx].to(device), None if a_all is None else a_all[idx].to(device)

        return train_batches(
            batches(),
            lambda b: batch_loss(model, *b, config["cell_head"], soft_targets),
            step,
            desc=f"epoch {epoch + 1}",
            total=len(chunks),
        )

    def typer() -> CellTyper:
        return unsaved_predictor(CellTyper, model, model_config, device, amp)

    def validate(epoch: int) -> dict[str, float]:
        probs = typer().predict(splits["val"].crops)
        m = evaluate_probs(probs, splits["val"])
        model.train()
        return {
            "val_macro_f1": m["macro_f1"],
            "val_accuracy": m["accuracy"],
            **per_source_macro_f1(probs, splits["val"], prefix="val_"),
        }

    out = args.output / (f"trial-{trial.number}" if trial is not None else "")
    fit(
        model=model,
        step=step,
        scheduler=scheduler,
        epochs=config["epochs"],
        train_epoch=train_epoch,
        validate=validate if len(splits["val"].cells) else None,
        output=out,
        config=config.as_dict(),
        resume=args.resume,
        trial=trial,
        monitor="val_macro_f1",
        checkpoint=trial is None,
    )
    model.eval()
    target = float(config.get("blast_recall_target", 0.0))
    if target > 0 and trial is None and len(splits["val"].cells):
        bias = blast_operating_point(typer().predict(splits["val"].crops), splits["val"], target)
        model_config["logit_bias"] = {"BLA": bias}
        model.logit_bias[model.outputs.index("BLA")] = bias
        metrics_extra = {"blast_logit_bias": bias}
    else:
        metrics_extra = {}
    held_out = splits["val"] if trial is not None else splits["test"]
    probs = typer().predict(held_out.crops)
    metrics = {**evaluate_probs(probs, held_out), **metrics_extra}
    if held_out.sources is not None and (held_out.sources == CORRECTIONS_SOURCE).any():
        mine = held_out.sources == CORRECTIONS_SOURCE
        hits = probs[mine, : model.n_cells].argmax(1) == held_out.cells[mine]
        metrics["corrections_accuracy"] = float(hits.mean())
    if trial is None and held_out.groups is not None:  # real sets: keep per-cell answers
        saved = {"test": (probs, held_out)}
        if "external" in splits:
            ext = splits["external"]
            ext_probs = typer().predict(ext.crops)
            saved["external"] = (ext_probs, ext)
            metrics.update({f"external_{k}": v for k, v in evaluate_probs(ext_probs, ext).items()})
        save_predictions(out / PREDICTIONS_FILE, saved)
    log.info(
        "%s %s",
        "val" if trial is not None else "test",
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    if trial is None:
        save_domain_reference(typer(), splits, config, out)
        if corrections:
            import json

            (out / CORRECTIONS_FILE).write_text(json.dumps(corrections, indent=2) + "\n")
    return model, model_config, metrics


def save_domain_reference(typer, splits: dict[str, CropSet], config: JobConfig, out) -> None:
    """`<out>/domain.json`: the per-case domain check's reference of the trained typer
    (`training.domain`), which `finish` saves beside the weights. Synthetic crops mixed in
    for the attribute heads are left out: the check is about the cells of real cases."""
    from marrowscope.domain import REFERENCE_FILE
    from training.domain import reference_for_training

    def real(cs: CropSet) -> CropSet:
        if cs.sources is None:
            return cs
        keep = cs.sources != "synthetic"
        return CropSet(cs.crops[keep], cs.cells[keep], None, cs.groups[keep], cs.sources[keep])

    train, val = real(splits["train"]), real(splits["val"])
    reference = reference_for_training(
        typer,
        train.crops,
        val.crops,
        val.groups,
        seed=config["seed"],
        info={
            "typer_config": config["config_name"],
            # a numpy array on real data: `or []` would ask for its truth value
            "sources": sorted({str(x) for x in (() if train.sources is None else train.sources)}),
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    reference.save(out)
    log.info("domain reference: %s", out / REFERENCE_FILE)


PREDICTIONS_FILE = "predictions.npz"


def blast_operating_point(probs: np.ndarray, data: CropSet, target: float) -> float:
    """The smallest logit added to BLA (0 to 4 in steps of 0.05) at which blast recall on
    `data` (the validation patients) reaches `target`; 4 when none does.

    Why: a missed blast costs more than a blast called on a monocyte (the blast count drives
    the AML call), so the typer's operating point is set for blast recall on patients it did
    not learn from, and the same bias is applied wherever the model runs (its config)."""
    from marrowscope.taxonomy import CODES

    bla = CODES.index("BLA")
    is_bla = data.cells == bla
    if not is_bla.any():
        return 0.0
    logp = np.log(np.clip(probs[:, : len(CODES)], 1e-12, None))
    for bias in np.arange(0.0, 4.0001, 0.05):
        logp_b = logp.copy()
        logp_b[:, bla] += bias
        if float((logp_b[is_bla].argmax(1) == bla).mean()) >= target:
            log.info(
                "blast operating point: BLA logit +%.2f (val blast recall >= %.2f)", bias, target
            )
            return round(float(bias), 2)
    log.warning("val blast recall stays below %.2f up to a BLA logit of +4", target)
    return 4.0


def save_predictions(path, splits: dict[str, tuple[np.ndarray, CropSet]]) -> None:
    """Per-cell held-out answers: `<split>_probs` float32[N, K] (`outputs()` order),
    `<split>_cells` int64[N], `<split>_groups` / `<split>_sources` str[N], and `outputs`."""
    arrays: dict[str, np.ndarray] = {"outputs": np.array(outputs())}
    for name, (probs, data) in splits.items():
        arrays[f"{name}_probs"] = np.asarray(probs, dtype=np.float32)
        arrays[f"{name}_cells"] = data.cells
        arrays[f"{name}_groups"] = np.asarray(data.groups, dtype=str)
        arrays[f"{name}_sources"] = np.asarray(data.sources, dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    log.info("wrote %s", path)


def get_args_parser() -> argparse.ArgumentParser:
    p = job_parser(JOB, __doc__)
    p.add_argument(
        "--strict",
        action="store_true",
        help="real data: stop on a class folder the taxonomy does not map (default: keep "
        "its cells unlabelled and report the folder)",
    )
    p.add_argument(
        "--corrections",
        type=Path,
        default=None,
        metavar="DIR",
        help="also train on a corrections export (python -m training.data.corrections), "
        "split by accession",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, float] | None:
    config = job_config(JOB, args)
    if args.hpo_trials:
        from training.hpo import run_hpo

        splits = load_training_data(args, config)
        run_hpo(
            args,
            config,
            job=JOB,
            monitor="macro_f1",
            train_trial=lambda cfg, trial: train(cfg, args, trial=trial, splits=splits)[2],
        )
        return None

    with mlflow_run(args, JOB, config) as run:
        from marrowscope.domain import REFERENCE_FILE

        model, model_config, metrics = train(config, args)
        extra = [args.output / REFERENCE_FILE]
        if getattr(args, "corrections_record", None):
            extra.append(args.output / CORRECTIONS_FILE)
        finish(
            kind=JOB,
            args=args,
            run=run,
            model=model,
            model_config=model_config,
            metrics=metrics,
            config=config,
            extra_files=extra,
        )
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
