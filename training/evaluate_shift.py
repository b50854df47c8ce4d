"""The generalisation suite (issue 23 §1): how the cell typer holds on held-out patients,
under the controlled shifts of `training.shifts`, on sources it never saw, and how
calibrated it stays. `python -m training.results shift` runs it and writes
`bench/results/shift.{md,json}`.

Cell sets (all real data, see ../shared/data/README.md):
- `deepapl_test`: DeepAPL's held-out test patients of the typer's own split (its
  checkpoint's `split_seed` / fractions); a case = a patient.
- `pbc_heldout`: PBC cells the typer took no gradient from. With `pbc_split=train_val`
  (the real-cpu recipe) these are PBC's validation cells, which chose the checkpoint and
  the blast operating point: held out from training, not from model selection.
- `wbc_seg`: wbc-seg's labelled single white cells (120x120, another scanner, Jiangxi
  Tecom): a third source no typer is trained on.

Shifts are applied to the image as recorded (about 180 px for DeepAPL / PBC), before the
typer's whole-image resize, as a different scanner, optic or compression would be.

Figures per set and shift (`cell_metrics`): macro-F1 over the set's class list, F1 per
class, blast recall, the share of normal cells (`NORMAL_CODES`) called blasts, ECE of the
top-class confidence and the share of saturated calls (confidence >= `SATURATED`).
The DeepAPL class list is the fixed list of issue 23: the classes with >= 50 test cells
on every one of the five patient splits (`fixed_class_list`).

The report is a dict per model family (`typer` here; the APL models add `apl` with the
same shape: model name -> set -> shift -> figures); `shifted_crops` and `typer_outputs`
give any other family the held-out cells, and the typer's embeddings, under each shift.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.shifts import SHIFT_NAMES, apply_shift

log = logging.getLogger(__name__)

NORMAL_CODES = ("NGS", "NGB", "LYT", "MON", "EOS", "BAS")
"""Mature, counted, never-blast cells: a blast call on one of them is the false alarm the
issue counts (`normal_called_blast`)."""
SATURATED = 0.99
FIVE_SPLIT_SEEDS = (0, 1, 2, 3, 4)
FIXED_MIN_CELLS = 50
EXTERNAL_MIN_CELLS = 20
"""Class floor on PBC / wbc-seg (wbc-seg holds one basophil: its F1 is 0 or 1)."""
WBC_SEG_CODES = {
    "neutrophil": "NGS",
    "lymphocyte": "LYT",
    "monocyte": "MON",
    "eosinophil": "EOS",
    "basophil": "BAS",
}
CASE_SIZE = 128
"""Cells per pseudo-case on sets without patients (PBC, wbc-seg), for per-case adaptation."""


@dataclass
class CellSet:
    """Real single-cell images with their pathologist's code and case."""

    name: str
    images: list[np.ndarray]
    """uint8[H, W, 3] each, as recorded."""
    codes: np.ndarray
    """str[N] taxonomy code per image."""
    cases: np.ndarray
    """str[N] case per image (a patient, or a pseudo-case of `CASE_SIZE` cells)."""
    classes: list[str]
    """The class list its macro-F1 is read over."""
    note: str = ""


# ------------------------------------------------------------------ figures


def normal_called_blast(codes: np.ndarray, called: np.ndarray) -> float:
    """Share of the normal cells (`NORMAL_CODES`) called BLA; NaN without normal cells."""
    normal = np.isin(codes, NORMAL_CODES)
    return float((called[normal] == "BLA").mean()) if normal.any() else float("nan")


def fixed_class_list(test_counts: Sequence[dict[str, int]], min_cells: int) -> list[str]:
    """The classes with >= `min_cells` test cells on every split (issue 23's bar classes),
    in taxonomy order."""
    from marrowscope.taxonomy import CODES

    if not test_counts:
        return []
    return [c for c in CODES if all(counts.get(c, 0) >= min_cells for counts in test_counts)]


def split_test_counts(data_dir: Path, config: dict[str, Any], seeds: Iterable[int]) -> list:
    """DeepAPL test cells per code on each `split_seed` (the split manifests only: cheap)."""
    from training.common_data import real_cell_splits

    out = []
    for seed in seeds:
        cfg = {**config, "split_seed": seed, "real_train_sources": ["deepapl"]}
        codes = [r.code for r in real_cell_splits(data_dir, cfg)["test"]]
        out.append({c: codes.count(c) for c in sorted(set(codes))})
    return out


def cell_metrics(
    codes: np.ndarray, probs: np.ndarray, names: Sequence[str], classes: Sequence[str]
) -> dict[str, Any]:
    """Figures of one set under one shift. codes str[N]; probs float[N, >= C] whose first
    C columns are the cell codes `names`. macro-F1 is over `classes`; `f1` covers every
    class of the list or with true cells (PMO, say, outside the fixed list)."""
    from training.evaluate_real import calibration, macro_f1, recall

    names = list(names)
    cell = probs[:, : len(names)]
    called = np.array(names)[cell.argmax(1)] if len(cell) else np.array([], dtype=str)
    index = {c: i for i, c in enumerate(names)}
    y = np.array([index[c] for c in codes], dtype=np.int64)
    p = cell.argmax(1)
    ks = [index[c] for c in classes]
    present = set(codes.tolist())
    conf = cell.max(1) / np.maximum(cell.sum(1), 1e-12) if len(cell) else np.zeros(0)
    return {
        "n": int(len(codes)),
        "macro_f1": macro_f1(y, p, ks),
        "f1": {c: macro_f1(y, p, [index[c]]) for c in names if c in classes or c in present},
        "blast_recall": recall(y, p, index["BLA"]),
        "normal_called_blast": normal_called_blast(codes, called),
        "ece": calibration(conf, (y == p).astype(float))["ece"] if len(y) else float("nan"),
        "saturated": float((conf >= SATURATED).mean()) if len(conf) else float("nan"),
    }


def summarise(by_shift: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Worst shift (lowest macro-F1), mean and largest drop from `none`, worst
    normal-called-blast share over the shifts."""
    base = by_shift["none"]["macro_f1"]
    drops = {s: base - m["macro_f1"] for s, m in by_shift.items() if s != "none"}
    if not drops:
        return {"worst_shift": None, "mean_drop": 0.0, "max_drop": 0.0}
    worst = max(drops, key=drops.__getitem__)
    ncb = [m["normal_called_blast"] for m in by_shift.values()]
    return {
        "worst_shift": worst,
        "worst_macro_f1": by_shift[worst]["macro_f1"],
        "max_drop": drops[worst],
        "mean_drop": float(np.mean(list(drops.values()))),
        "max_normal_called_blast": float(np.nanmax(ncb)) if np.isfinite(ncb).any() else None,
    }


# ------------------------------------------------------------------ cells and shifts


def _decode(paths: Iterable[Path]) -> tuple[list[np.ndarray], list[int]]:
    """Decoded images and the indices that decoded (an unreadable file is logged, skipped)."""
    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import ImageLimits, decode_image

    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(decode_image(Path(path).read_bytes(), limits=ImageLimits(min_side=1)))
            kept.append(i)
        except (InvalidInput, OSError) as exc:
            log.warning("%s: unreadable image (%s), skipped", path, exc)
    return images, kept


def _pseudo_cases(n: int, seed: int = 0) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    cases = np.empty(n, dtype=object)
    cases[order] = [f"chunk{i // CASE_SIZE}" for i in range(n)]
    return cases.astype(str)


def _from_records(
    name: str, records: list, classes: list[str], cases: np.ndarray | None, note: str
) -> CellSet:
    images, kept = _decode(r.path for r in records)
    codes = np.array([records[i].code for i in kept], dtype=str)
    case_ids = _pseudo_cases(len(kept)) if cases is None else cases[kept]
    return CellSet(name, images, codes, case_ids, classes, note)


def _classes_with(codes: Iterable[str], min_cells: int) -> list[str]:
    from marrowscope.taxonomy import CODES

    codes = list(codes)
    return [c for c in CODES if codes.count(c) >= min_cells]


def real_cell_sets(data_dir: Path, config: dict[str, Any], fixed: list[str]) -> list[CellSet]:
    """The suite's cell sets for a typer trained with `config` (its split), those present."""
    from training.common_data import real_cell_splits

    sides = real_cell_splits(data_dir, config)
    out = []
    test = [r for r in sides["test"] if r.source == "deepapl"]
    if test:
        out.append(
            _from_records(
                "deepapl_test",
                test,
                fixed,
                np.array([r.patient for r in test], dtype=str),
                f"{len({r.patient for r in test})} held-out patients",
            )
        )
    if "pbc" in config["real_train_sources"]:
        which = "test" if any(r.source == "pbc" for r in sides["test"]) else "val"
        pbc = [r for r in sides[which] if r.source == "pbc"]
        note = f"PBC {'validation' if which == 'val' else 'test'} cells: no gradient from them" + (
            ", but they chose the checkpoint and the blast operating point"
            if which == "val"
            else ""
        )
    else:
        pbc = [r for r in sides["external"] if r.source == "pbc"]
        note = "all of PBC (not trained on)"
    if pbc:
        codes = [r.code for r in pbc]
        out.append(
            _from_records("pbc_heldout", pbc, _classes_with(codes, EXTERNAL_MIN_CELLS), None, note)
        )
    wbc = wbc_seg_cells(data_dir / "wbc-seg")
    if wbc is not None:
        out.append(wbc)
    return out


def wbc_seg_cells(root: Path) -> CellSet | None:
    """wbc-seg's labelled cells (None when the folder is absent)."""
    from training.evaluate_morphometrics import wbc_seg_labels

    labels = wbc_seg_labels(root)
    if not labels:
        return None
    ids = sorted(i for i, name in labels.items() if name in WBC_SEG_CODES)
    images, kept = _decode(root / "images" / f"{i}.png" for i in ids)
    codes = np.array([WBC_SEG_CODES[labels[ids[k]]] for k in kept], dtype=str)
    classes = _classes_with(codes.tolist(), EXTERNAL_MIN_CELLS)
    note = f"another scanner, never trained on; classes with >= {EXTERNAL_MIN_CELLS} cells"
    return CellSet("wbc_seg", images, codes, _pseudo_cases(len(kept)), classes, note)


SCALE_CLASSES = ("NGS", "LYT", "MON")
"""Classes present in every set whose size the scale figure compares."""


def relative_cell_size(cell_set: CellSet, *, per_class: int = 40) -> dict[str, dict[str, Any]]:
    """Per class of `SCALE_CLASSES`: the median equivalent diameter of the cell (classical
    `marrowscope.morphometrics.segment_cell`, the same method on every set) as a fraction of
    the image side, over up to `per_class` cells. A typer resizes each whole image to its
    crop size, so two sets whose fractions differ by x show the same cell x apart in size:
    the scale shift between them, to read beside the suite's pixel-size shifts."""
    from marrowscope.morphometrics import segment_cell

    out: dict[str, dict[str, Any]] = {}
    for code in SCALE_CLASSES:
        rows = np.flatnonzero(cell_set.codes == code)[:per_class]
        if len(rows) == 0:
            continue
        fractions = []
        for i in rows:
            image = cell_set.images[i]
            area = float(segment_cell(image).sum())
            fractions.append(2.0 * np.sqrt(area / np.pi) / float(np.mean(image.shape[:2])))
        out[code] = {"cells": int(len(rows)), "median_fraction": float(np.median(fractions))}
    return out


def shifted_crops(
    images: Sequence[np.ndarray], shift: str, size: int, crop_mode: str = "image"
) -> np.ndarray:
    """uint8[N, size, size, 3]: each image under `shift` (at its recorded resolution), then
    cut for the model as the typer's training crops and a single-cell case are
    (`marrowscope.case.single_cell_crop`: resized whole, or the central cell's box found on
    the shifted image)."""
    from marrowscope.case import single_cell_crop

    if not images:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([single_cell_crop(apply_shift(im, shift), size, crop_mode) for im in images])


def typer_outputs(
    typer: Any, cells: CellSet, crops: np.ndarray, *, case_norm: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32[N, K], embeddings float32[N, D]) of `cells` given as `crops`
    (`shifted_crops(cells.images, shift, typer.crop_size)`); with `case_norm`, each case's
    cells are typed together with the BatchNorm statistics re-estimated on them
    (`CellTyper.predict_with_embeddings(case_norm=True)`)."""
    if not case_norm:
        return typer.predict_with_embeddings(crops)  # type: ignore[no-any-return]
    probs = np.zeros((len(crops), len(typer.names)), np.float32)
    embeds = np.zeros((len(crops), typer.embedding_dim), np.float32)
    for case in np.unique(cells.cases):
        rows = np.flatnonzero(cells.cases == case)
        probs[rows], embeds[rows] = typer.predict_with_embeddings(crops[rows], case_norm=True)
    return probs, embeds


def evaluate_typers(
    typers: dict[str, tuple[Any, bool]],
    sets: Sequence[CellSet],
    *,
    shifts: Sequence[str] = SHIFT_NAMES,
) -> dict[str, dict[str, Any]]:
    """typer name -> set name -> {"n", "classes", "note", "shifts": {shift: cell_metrics},
    "summary"}. `typers`: name -> (CellTyper, case_norm). Each set is shifted once per
    shift and every typer reads the same crops."""
    from marrowscope.taxonomy import CODES

    out: dict[str, dict[str, Any]] = {name: {} for name in typers}
    for cells in sets:
        by_shift: dict[str, dict[str, Any]] = {name: {} for name in typers}
        crops: dict[tuple[int, str], np.ndarray] = {}
        for shift in shifts:
            crops.clear()  # one shift's crops in memory at a time, per crop size and mode
            for name, (typer, case_norm) in typers.items():
                cut = (typer.crop_size, getattr(typer, "crop_mode", "image"))
                if cut not in crops:
                    crops[cut] = shifted_crops(cells.images, shift, *cut)
                probs, _ = typer_outputs(typer, cells, crops[cut], case_norm=case_norm)
                names = [c for c in typer.names if c in CODES]
                m = cell_metrics(cells.codes, probs, names, cells.classes)
                by_shift[name][shift] = m
                log.info("%s %s %s: macro-F1 %.3f", name, cells.name, shift, m["macro_f1"])
        for name in typers:
            out[name][cells.name] = {
                "n": len(cells.codes),
                "classes": list(cells.classes),
                "note": cells.note,
                "shifts": by_shift[name],
                "summary": summarise(by_shift[name]),
            }
    return out


def run_config(run_dir: Path) -> dict[str, Any]:
    """The training config of a `training.celltype` run (from its checkpoint)."""
    import torch

    from training.engine import CHECKPOINT_FILE

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --typer takes a training.celltype --output folder"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return json.loads(state["config"])  # type: ignore[no-any-return]


def split_bar(runs: Sequence[Path], classes: list[str]) -> dict[str, Any]:
    """Issue-11 bar over the fixed class list: macro-F1 and blast recall of each run's own
    held-out patients (its predictions.npz), and their mean over the splits given."""
    from training.evaluate_real import _cell_part, load_predictions, macro_f1, recall

    rows = {}
    for run in runs:
        pred = load_predictions(Path(run) / "predictions.npz", "test")
        names, probs = _cell_part(pred)
        y, p = pred["cells"], probs.argmax(1)
        ks = [names.index(c) for c in classes]
        seed = run_config(run).get("split_seed", 0)
        rows[str(seed)] = {
            "macro_f1": macro_f1(y, p, ks),
            "blast_recall": recall(y, p, names.index("BLA")),
        }
    f1s = [r["macro_f1"] for r in rows.values()]
    recalls = [r["blast_recall"] for r in rows.values()]
    return {
        "splits": rows,
        "mean_macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "mean_blast_recall": float(np.mean(recalls)) if recalls else float("nan"),
        "met": bool(f1s and np.mean(f1s) >= 0.80 and np.mean(recalls) >= 0.90),
    }


# ------------------------------------------------------------------ report


def _f(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def shift_markdown(payload: dict[str, Any]) -> str:
    """The committed report (commands carry DIR, no absolute paths)."""
    from training.shifts import SHIFTS

    typers: dict[str, Any] = payload["typer"]
    fixed = payload["fixed_classes"]
    lines = [
        "# Generalisation suite: cell typer (real data)",
        "",
        "**Real data** (DeepAPL held-out patients, PBC healthy donors, wbc-seg's labelled cells "
        "from another scanner; ../shared/data/README.md). The shifts are controlled, "
        "deterministic transforms of those real images (`training.shifts`), not synthetic "
        f"cells. Machine: {payload['machine']}.",
        "",
        "Command (DIR = the work dir):",
        "",
        "```",
        payload["command"],
        *[r["command"] for r in payload.get("runs", {}).values()],
        "```",
        "",
        "## Class list of the bar",
        "",
        f"Classes with >= {fixed['min_cells']} DeepAPL test cells on every one of the "
        f"{len(fixed['seeds'])} patient splits (`split_seed` {', '.join(map(str, fixed['seeds']))}): "
        f"**{', '.join(fixed['classes'])}**. DeepAPL macro-F1 below is read over this list; PMO "
        "is never merged into BLA (its own F1 is in the per-class tables even when it misses "
        "the floor on a split).",
        "",
        "| split_seed | " + " | ".join(fixed["classes"]) + " |",
        "|---" * (len(fixed["classes"]) + 1) + "|",
        *[
            f"| {seed} | " + " | ".join(str(counts.get(c, 0)) for c in fixed["classes"]) + " |"
            for seed, counts in zip(fixed["seeds"], fixed["test_counts"], strict=True)
        ],
        "",
        "## Bars (issue 23 §2) per typer",
        "",
        "| typer | DeepAPL held-out macro-F1 | worst shift (macro-F1) | mean / max drop "
        "(bar: max <= 0.05) | blast recall | PBC normal called BLA | wbc-seg macro-F1 | "
        "wbc-seg normal called BLA (bar <= 2 %) | ECE | saturated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in typers.items():
        d = t["sets"].get("deepapl_test")
        pbc = t["sets"].get("pbc_heldout")
        wbc = t["sets"].get("wbc_seg")
        none = d["shifts"]["none"] if d else {}
        s = d["summary"] if d else {}
        lines.append(
            f"| {name} | {_f(none.get('macro_f1'))} | {s.get('worst_shift')} "
            f"({_f(s.get('worst_macro_f1'))}) | {_f(s.get('mean_drop'))} / {_f(s.get('max_drop'))} "
            f"| {_f(none.get('blast_recall'))} "
            f"| {_f(pbc['shifts']['none']['normal_called_blast']) if pbc else '-'} "
            f"| {_f(wbc['shifts']['none']['macro_f1']) if wbc else '-'} "
            f"| {_f(wbc['shifts']['none']['normal_called_blast']) if wbc else '-'} "
            f"| {_f(none.get('ece'))} | {_f(none.get('saturated'))} |"
        )
    descr = {s.name: s.description for s in SHIFTS}
    for set_name in dict.fromkeys(k for t in typers.values() for k in t["sets"]):
        first = next(t["sets"][set_name] for t in typers.values() if set_name in t["sets"])
        lines += [
            "",
            f"## {set_name}: macro-F1 under each shift",
            "",
            f"{first['n']} cells, {first['note']}; classes {', '.join(first['classes'])}.",
            "",
            "| shift | " + " | ".join(typers) + " |",
            "|---" * (len(typers) + 1) + "|",
        ]
        for shift in [s for s in SHIFT_NAMES if s in first["shifts"]]:  # the JSON sorts keys
            cells = [
                _f(t["sets"][set_name]["shifts"][shift]["macro_f1"])
                if set_name in t["sets"]
                else "-"
                for t in typers.values()
            ]
            lines.append(f"| {shift} ({descr.get(shift, '')}) | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Unshifted, per typer: blast recall, normal cells called BLA, ECE, saturated share, F1 per class.",
            "",
            "| typer | blast recall | normal called BLA | ECE | saturated | F1 per class |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in typers.items():
            if set_name not in t["sets"]:
                continue
            m = t["sets"][set_name]["shifts"]["none"]
            per = ", ".join(f"{c} {_f(v)}" for c, v in m["f1"].items())
            lines.append(
                f"| {name} | {_f(m['blast_recall'])} | {_f(m['normal_called_blast'])} | "
                f"{_f(m['ece'])} | {_f(m['saturated'])} | {per} |"
            )
    xs = payload.get("cross_source") or {}
    if xs:
        lines += [
            "",
            "## Leave one source out",
            "",
            "Trained on one source only (the `xs_` runs of `training.results real`, same stain "
            "option as the typer), tested on the other source's cells of the classes both hold "
            "with >= 50 cells, and on wbc-seg.",
            "",
            "| trained on | shared classes | in-source macro-F1 | cross-source macro-F1 | "
            "wbc-seg macro-F1 | wbc-seg normal called BLA |",
            "|---|---|---|---|---|---|",
        ]
        for key, r in xs.items():
            w = r.get("wbc_seg") or {}
            lines.append(
                f"| {key} | {', '.join(r['shared_classes'])} | {_f(r['in_source']['macro_f1'])} | "
                f"{_f(r['external']['macro_f1'])} | {_f(w.get('macro_f1'))} | "
                f"{_f(w.get('normal_called_blast'))} |"
            )
    bar = payload.get("split_bar")
    if bar:
        lines += [
            "",
            "## Issue-11 bar over the fixed class list",
            "",
            f"Mean over the splits that exist ({len(bar['splits'])} of {len(fixed['seeds'])}): "
            f"macro-F1 **{_f(bar['mean_macro_f1'])}**, blast recall **{_f(bar['mean_blast_recall'])}** "
            f"(bar: >= 0.80 and >= 0.90, {'met' if bar['met'] else 'not met'}).",
            "",
            "| split_seed | macro-F1 | blast recall |",
            "|---|---|---|",
            *[
                f"| {k} | {_f(v['macro_f1'])} | {_f(v['blast_recall'])} |"
                for k, v in bar["splits"].items()
            ],
        ]
        if len(bar["splits"]) < len(fixed["seeds"]):
            lines += [
                "",
                "The other splits: `"
                + payload["split_command"]
                + "` for K in the missing seeds, then rerun the suite with `--split-run DIR/real-cpu-splitK`.",
            ]
    sizes = payload.get("cell_size") or {}
    if sizes:
        names = list(sizes)
        lines += [
            "",
            "## Scale of each set",
            "",
            "Median equivalent cell diameter as a fraction of the image side (classical "
            "segmentation, the same method on every set; up to 40 cells per class). A typer "
            "resizes each whole image to its crop size, so the ratio between two sets is the "
            "scale shift between them (compare the pixel-size +-15 % shifts).",
            "",
            "| class | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
            *[
                f"| {code} | "
                + " | ".join(
                    _f(sizes[n][code]["median_fraction"]) if code in sizes[n] else "-"
                    for n in names
                )
                + " |"
                for code in SCALE_CLASSES
            ],
        ]
    lines += [
        "",
        "Families: `typer` is reported here; the APL models add an `apl` section of the same "
        "shape (model -> set -> shift -> figures) through `training.evaluate_shift.shifted_crops` "
        "/ `typer_outputs`.",
    ]
    return "\n".join(lines) + "\n"
