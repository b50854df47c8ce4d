"""Figures of the cell typer on real held-out cells, from `training.celltype`'s
`predictions.npz`: per-class precision / recall / F1, macro-F1 over the classes with enough
test cells and blast recall with patient-bootstrap 95 % CIs, the confusion matrix,
calibration (ECE and a reliability table) and the cross-source figure.

Why resample patients and not cells: cells of one patient are correlated (same smear,
stain and disease), so a cell-level bootstrap would give intervals far too narrow for the
question "how does this do on new patients".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.errors import InvalidInput

PROMYELOCYTE = "PMO"
"""Read as a blast equivalent in the `blast_equivalents` figure (WHO: the abnormal
promyelocytes of APL count toward the blast percentage)."""


def load_predictions(path: Path, split: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path} not found: run training.celltype on the real sets first")
    with np.load(path, allow_pickle=False) as z:
        if f"{split}_probs" not in z:
            raise InvalidInput(f"{path} has no {split!r} split (has {sorted(z.files)})")
        outputs = [str(o) for o in z["outputs"]]
        return {
            "outputs": np.array(outputs),
            "probs": z[f"{split}_probs"],
            "cells": z[f"{split}_cells"],
            "groups": z[f"{split}_groups"],
            "sources": z[f"{split}_sources"],
        }


def _cell_part(pred: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    from marrowscope.taxonomy import CODES

    names = [o for o in pred["outputs"].tolist() if o in CODES]
    return names, pred["probs"][:, : len(names)]


def per_class(y: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """code -> precision, recall, f1, support (true cells), for every class true or predicted."""
    out = {}
    for k in sorted(set(y.tolist()) | set(p.tolist())):
        tp = int(((y == k) & (p == k)).sum())
        n_true, n_pred = int((y == k).sum()), int((p == k).sum())
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[names[k]] = {"precision": prec, "recall": rec, "f1": f1, "support": n_true}
    return out


def macro_f1(y: np.ndarray, p: np.ndarray, classes: list[int]) -> float:
    f1s = []
    for k in classes:
        tp = ((y == k) & (p == k)).sum()
        denom = (y == k).sum() + (p == k).sum()
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s)) if f1s else float("nan")


def recall(y: np.ndarray, p: np.ndarray, k: int) -> float:
    n = (y == k).sum()
    return float(((y == k) & (p == k)).sum() / n) if n else float("nan")


def patient_bootstrap(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, metric, *, n_boot: int, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % CI of metric(y, p) over patients resampled with replacement."""
    ids, inverse = np.unique(groups, return_inverse=True)
    rows = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        pick = np.concatenate([rows[i] for i in rng.integers(0, len(ids), len(ids))])
        v = metric(y[pick], p[pick])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def patient_dependence(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, names: list[str], classes: list[int]
) -> dict[str, dict[str, Any]]:
    """How much each class's F1 rests on single patients: for each class of `classes`, its
    test cells, the patients holding them, the share of the two largest, and the range of
    its F1 when any one test patient is left out (every patient, so a patient who only
    receives false positives counts too).

    Why: a class whose cells come from two or three patients measures those patients'
    sign-out habits as much as the typer (the bootstrap CI shows the spread, not where it
    comes from)."""
    out: dict[str, dict[str, Any]] = {}
    ids = np.unique(groups)
    for k in classes:
        per_patient = np.array([int(((y == k) & (groups == g)).sum()) for g in ids])
        top2 = np.sort(per_patient)[::-1][:2]
        loo = [macro_f1(y[groups != g], p[groups != g], [k]) for g in ids]
        out[names[k]] = {
            "cells": int(per_patient.sum()),
            "patients": int((per_patient > 0).sum()),
            "top2_share": float(top2.sum() / max(per_patient.sum(), 1)),
            "f1": macro_f1(y, p, [k]),
            "f1_leave_one_patient_out": [float(min(loo)), float(max(loo))],
        }
    return out


def merged(y: np.ndarray, p: np.ndarray, into: int, members: list[int]) -> tuple:
    """Labels and predictions with every class of `members` relabelled `into`."""
    y2, p2 = y.copy(), p.copy()
    for m in members:
        y2[y2 == m], p2[p2 == m] = into, into
    return y2, p2


def calibration(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top-class confidence (equal-width bins) and the
    reliability table (bin, n, mean confidence, accuracy)."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        c, a = float(conf[m].mean()), float(correct[m].mean())
        ece += m.mean() * abs(c - a)
        table.append({"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int(m.sum()),
                      "confidence": c, "accuracy": a})  # fmt: skip
    return {"ece": float(ece), "reliability": table}


def real_report(path: Path, *, min_cells: int = 50, n_boot: int = 1000) -> dict[str, Any]:
    """Every held-out figure of the main run (DeepAPL test patients)."""
    from marrowscope.taxonomy import BLAST

    pred = load_predictions(path, "test")
    names, probs = _cell_part(pred)
    y, p = pred["cells"], probs.argmax(1)
    groups = pred["groups"]
    counts = np.bincount(y, minlength=len(names))
    big = [k for k in range(len(names)) if counts[k] >= min_cells]
    blast = names.index(BLAST)
    mf1 = macro_f1(y, p, big)
    mf1_ci = patient_bootstrap(y, p, groups, lambda a, b: macro_f1(a, b, big), n_boot=n_boot)
    br = recall(y, p, blast)
    br_ci = patient_bootstrap(y, p, groups, lambda a, b: recall(a, b, blast), n_boot=n_boot)
    present = sorted(set(y.tolist()) | set(p.tolist()))
    confusion = [[int(((y == t) & (p == q)).sum()) for q in present] for t in present]
    conf = probs.max(1) / np.maximum(probs.sum(1), 1e-12)
    # blast equivalents (WHO: the abnormal promyelocytes of APL count as blasts): PMO read as
    # BLA on both sides, the bar's other classes unchanged
    pmo = names.index(PROMYELOCYTE)
    y_be, p_be = merged(y, p, blast, [pmo])
    big_be = [k for k in big if k != pmo]
    return {
        "n_cells": int(len(y)),
        "n_patients": int(len(np.unique(groups))),
        "classes_min_cells": [names[k] for k in big],
        "macro_f1": mf1,
        "macro_f1_ci": list(mf1_ci),
        "macro_f1_all_classes": macro_f1(y, p, sorted(set(y.tolist()))),
        "blast_recall": br,
        "blast_recall_ci": list(br_ci),
        "accuracy": float((y == p).mean()),
        "per_class": per_class(y, p, names),
        "confusion": {"labels": [names[k] for k in present], "matrix": confusion},
        "calibration": calibration(conf, (y == p).astype(float)),
        "patient_dependence": patient_dependence(y, p, groups, names, big),
        "blast_equivalents": {
            "classes": [names[k] for k in big_be],
            "macro_f1": macro_f1(y_be, p_be, big_be),
            "macro_f1_ci": list(
                patient_bootstrap(
                    y_be, p_be, groups, lambda a, b: macro_f1(a, b, big_be), n_boot=n_boot
                )
            ),
            "recall": recall(y_be, p_be, blast),
        },
        "n_boot": n_boot,
    }


def cross_source(path: Path, *, min_cells: int = 1) -> dict[str, Any]:
    """macro-F1 / accuracy on the `external` split (the source not trained on), over the
    classes it shares with the training source (taken from the run's `test` split, which
    comes from the training source) with at least `min_cells` cells on both sides, and the
    in-source figure for comparison. Why the floor: a class with a handful of cells in one
    source (DeepAPL has 8 test basophils) is neither learned nor measured there, so it
    would only add noise to the shift we want to see."""
    test = load_predictions(path, "test")
    ext = load_predictions(path, "external")
    names, _ = _cell_part(test)

    def enough(cells: np.ndarray) -> set[int]:
        ks, ns = np.unique(cells, return_counts=True)
        return {int(k) for k, n in zip(ks, ns, strict=True) if n >= min_cells}

    shared = sorted(enough(ext["cells"]) & enough(test["cells"]))
    out: dict[str, Any] = {"shared_classes": [names[k] for k in shared], "min_cells": min_cells}
    for label, pred in (("in_source", test), ("external", ext)):
        _, probs = _cell_part(pred)
        keep = np.isin(pred["cells"], shared)
        y, p = pred["cells"][keep], probs[keep].argmax(1)
        out[label] = {
            "source": sorted(set(pred["sources"].tolist())),
            "n_cells": int(keep.sum()),
            "macro_f1": macro_f1(y, p, shared),
            "accuracy": float((y == p).mean()) if len(y) else float("nan"),
        }
    return out


def _fmt_ci(v: float, ci: list[float]) -> str:
    return f"{v:.3f} (95 % CI {ci[0]:.3f}-{ci[1]:.3f})"


def _stain_sentence(xs: dict[str, Any]) -> str:
    """One sentence comparing the stain options (`training.results.REAL_STAIN_OPTIONS`) by
    mean cross-source macro-F1."""
    by_aug: dict[str, list[float]] = {}
    for key, r in xs.items():
        by_aug.setdefault(key.split("_", 2)[2], []).append(r["external"]["macro_f1"])
    if len(by_aug) < 2:
        return ""
    means = {a: float(np.mean(v)) for a, v in by_aug.items()}
    best = max(means, key=means.__getitem__)
    return (
        "Cross-source macro-F1, mean of both directions, by stain option: "
        + ", ".join(f"{a} {m:.3f}" for a, m in sorted(means.items()))
        + f" (best: {best}, used by the main run; single short runs, no repeat seeds). "
    )


def _dependence_lines(t: dict[str, Any]) -> list[str]:
    """The "how much rests on single patients" section (absent in older payloads)."""
    dep, be = t.get("patient_dependence"), t.get("blast_equivalents")
    if not dep or not be:
        return []
    lines = [
        "",
        "## How much each figure rests on single patients",
        "",
        "Per class of the bar: the held-out patients holding its cells, the share of the two "
        "largest, and the range of its F1 when any one of the "
        f"{t['n_patients']} test patients is left out.",
        "",
        "| class | test cells | patients | two largest | F1 | F1, one patient left out |",
        "|---|---|---|---|---|---|",
    ]
    for code, d in dep.items():
        lo, hi = d["f1_leave_one_patient_out"]
        lines.append(
            f"| {code} | {d['cells']} | {d['patients']} | {d['top2_share']:.0%} | "
            f"{d['f1']:.3f} | {lo:.3f}-{hi:.3f} |"
        )
    lines += [
        "",
        f"Blast equivalents (WHO counts the abnormal promyelocytes of APL toward the blast "
        f"percentage): with {PROMYELOCYTE} read as BLA on both sides, macro-F1 over "
        f"{', '.join(be['classes'])} is {_fmt_ci(be['macro_f1'], be['macro_f1_ci'])} and "
        f"blast-equivalent recall {be['recall']:.3f}. This is a reading aid, not the bar: "
        "the differential reports PMO and BLA apart.",
    ]
    return lines


def _splits_lines(payload: dict[str, Any]) -> list[str]:
    """The same recipe on other patient splits (`training.results.REAL_SPLIT_SEEDS`)."""
    other = payload.get("other_splits") or {}
    if not other:
        return []
    rows = {"split_0": payload["test"], **other}
    lines = [
        "",
        "## Other patient splits (same recipe, other held-out patients)",
        "",
        "`split_seed` 0 is the main run above; each other row trains and tests the same "
        "recipe on another patient-grouped split (the bar's classes are those with >= 50 test "
        "cells in that split).",
        "",
        "| split | test patients | test cells | bar classes | macro-F1 (95 % CI) | blast recall "
        "| PMO F1 (test cells) | blast-equivalent macro-F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        pmo = r["per_class"].get(PROMYELOCYTE, {"f1": float("nan"), "support": 0})
        lines.append(
            f"| {key.removeprefix('split_')} | {r['n_patients']} | {r['n_cells']} | "
            f"{', '.join(r['classes_min_cells'])} | {_fmt_ci(r['macro_f1'], r['macro_f1_ci'])} "
            f"| {r['blast_recall']:.3f} | {pmo['f1']:.3f} ({pmo['support']}) | "
            f"{r['blast_equivalents']['macro_f1']:.3f} |"
        )
    f1s = [r["macro_f1"] for r in rows.values()]
    recalls = [r["blast_recall"] for r in rows.values()]
    lines += [
        "",
        f"Over the {len(rows)} splits: macro-F1 mean {np.mean(f1s):.3f} (range "
        f"{min(f1s):.3f}-{max(f1s):.3f}), blast recall mean {np.mean(recalls):.3f} (range "
        f"{min(recalls):.3f}-{max(recalls):.3f}).",
        "",
        "Commands:",
        "",
        "```",
        *[payload["runs"][k]["command"] for k in other],
        "```",
    ]
    return lines


def real_markdown(payload: dict[str, Any]) -> str:
    """The committed report (no absolute paths: commands carry DIR)."""
    t = payload["test"]
    main = payload["runs"]["main"]
    lines = [
        "# Cell typer on real leukemic cells (DeepAPL + PBC)",
        "",
        "**Real data.** "
        + (
            f"Trained on {', '.join(['DeepAPL (patient-grouped split)', 'PBC (train/val only)'])}"
            f"; tested on {t['n_cells']} signed-out cells of {t['n_patients']} held-out DeepAPL "
            f"patients never seen in training. Macro-F1 over the {len(t['classes_min_cells'])} "
            f"classes with >= 50 test cells ({', '.join(t['classes_min_cells'])}): "
            f"**{_fmt_ci(t['macro_f1'], t['macro_f1_ci'])}**; blast recall "
            f"**{_fmt_ci(t['blast_recall'], t['blast_recall_ci'])}** (CIs: {t['n_boot']} "
            f"bootstrap resamples of patients). Calibration ECE {t['calibration']['ece']:.3f}. "
            f"Bar (macro-F1 >= 0.80 and blast recall >= 0.90): "
            f"**{'met' if t['macro_f1'] >= 0.80 and t['blast_recall'] >= 0.90 else 'not met'}**. "
            f"{_stain_sentence(payload.get('cross_source') or {})}"
            f"Training {main['seconds'] / 60:.0f} min on {payload['machine']}. The attribute "
            "heads (Auer rods, nucleoli, cup-like nucleus, chromatin) have no labels in these "
            "sets: they are trained on synthetic crops only (masked loss), and their outputs "
            "on real cells are unvalidated."
        ),
        "",
        "Command (DIR = the work dir; the data is read from ../shared/data):",
        "",
        "```",
        main["command"],
        "```",
        "",
        "## Per class (held-out patients)",
        "",
        "| class | precision | recall | F1 | test cells |",
        "|---|---|---|---|---|",
    ]
    for code, m in t["per_class"].items():
        lines.append(
            f"| {code} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
            f"{m['support']} |"
        )
    lines += [
        "",
        f"Accuracy {t['accuracy']:.3f}; macro-F1 over every class present "
        f"{t['macro_f1_all_classes']:.3f} (classes with few test cells are noisy).",
        "",
        "## Confusion matrix (rows: pathologist, columns: typer)",
        "",
        "| | " + " | ".join(t["confusion"]["labels"]) + " |",
        "|---" * (len(t["confusion"]["labels"]) + 1) + "|",
    ]
    for label, row in zip(t["confusion"]["labels"], t["confusion"]["matrix"], strict=True):
        lines.append(f"| **{label}** | " + " | ".join(str(v) for v in row) + " |")
    lines += _dependence_lines(t)
    lines += _splits_lines(payload)
    cal = t["calibration"]
    lines += [
        "",
        f"## Calibration (top-class confidence, ECE {cal['ece']:.3f})",
        "",
        "| confidence bin | cells | mean confidence | accuracy |",
        "|---|---|---|---|",
    ]
    for r in cal["reliability"]:
        lines.append(f"| {r['bin']} | {r['n']} | {r['confidence']:.3f} | {r['accuracy']:.3f} |")
    xs = payload.get("cross_source") or {}
    if xs:
        lines += [
            "",
            "## Cross-source (scanner / stain shift) and the stain comparison",
            "",
            "Each row is a separate, shorter run trained on one source only and tested on the "
            "other source's cells of the classes both share with at least "
            f"{next(iter(xs.values())).get('min_cells', 1)} cells on each side (in-source: the "
            "training source's own held-out cells, same classes). Options: `aug` = HED + YIQ "
            "colour jitter in training (`stain_aug=both`), `norm` = per-image background "
            "normalisation inside the model (`stain_norm=background`, so serving applies it "
            "too), `aug+norm` = both, `none` = neither.",
            "",
            "| trained on | stain option | shared classes | in-source macro-F1 | cross-source "
            "macro-F1 | cross-source accuracy | cells |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, r in sorted(xs.items()):
            _, src, aug = key.split("_", 2)
            lines.append(
                f"| {src} | {aug} | {', '.join(r['shared_classes'])} | "
                f"{r['in_source']['macro_f1']:.3f} | {r['external']['macro_f1']:.3f} | "
                f"{r['external']['accuracy']:.3f} | {r['external']['n_cells']} |"
            )
        lines += ["", "Commands:", "", "```"]
        lines += [payload["runs"][k]["command"] for k in sorted(xs)]
        lines += ["```"]
    from marrowscope.taxonomy import SOURCE_CLASS_MAP, cell_type

    lines += [
        "",
        "## Source folder -> taxonomy code",
        "",
        "From `marrowscope.taxonomy.SOURCE_CLASS_MAP` (the reasons are in its docstring). "
        "Non-counted codes are typed but left out of the differential; "
        "`marrowscope.features.non_counted_summary` counts them per case.",
        "",
        "| source | folder | code | counted |",
        "|---|---|---|---|",
    ]
    for source, table in SOURCE_CLASS_MAP.items():
        for folder, code in table.items():
            counted = "-" if code is None else ("yes" if cell_type(code).counted else "no")
            lines.append(
                f"| {source} | {folder or '(empty: not signed out)'} | "
                f"{code or 'none (not used by the typer)'} | {counted} |"
            )
    return "\n".join(lines) + "\n"
