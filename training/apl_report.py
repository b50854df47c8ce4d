"""`training.apl`'s report: the JSON as computed and a Markdown reading of it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LABELS = {
    "case_vector_logistic": "(ii) case vector (differential + morphometrics), logistic",
    "pooled_embedding_logistic": "(ii) mean cell embedding, logistic",
    "ensemble_apl": "ensemble net's APL head over the case vector (served default today; "
    "uncalibrated)",
    "mil_fold_ensemble": "(i) gated-attention MIL, instance dropout + early stopping, "
    "inner-fold ensemble, temperature",
    "case_vector_plus_mil": "(iii) mean of case-vector logistic and MIL",
    "case_pooled_mil_average": "(iii) mean of case-vector, mean-embedding and MIL",
    "oracle_signout_differential_logistic": "pathologists' sign-out differential, logistic "
    "(oracle labels, context)",
}


def write_results(report: dict[str, Any], prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(render_markdown(report))
    log.info("wrote %s.{md,json}", prefix)


def _model_rows(res: dict[str, Any]) -> list[str]:
    return [
        f"| {LABELS[k]} | **{v['auroc_mean']:.3f}** | {v['auroc_sd']:.3f} | "
        f"{v['auroc_ci95'][0]:.3f}-{v['auroc_ci95'][1]:.3f} | {v['ece']:.3f} | "
        f"{v['brier']:.3f} | {v['saturated_share']:.2f} | "
        f"{v['score_min']:.4f}-{v['score_max']:.4f} |"
        for k, v in res.items()
        if k in LABELS
    ]


def _stability_rows(stability: dict[str, Any] | None) -> list[str]:
    if not stability:
        return ["No stability figure in this run (`--shifts ''`)."]
    shifts = stability["shifts"]
    head = [
        f"Stability (issue 23 §1 shifts; {stability['cells_per_patient']} cells per patient, "
        f"{stability['cells']} cells, re-typed and re-measured under each shift; every "
        "outer fold's model scores its own held-out patients; AUROC mean over repeats; bar: "
        "every drop within 0.05 of the unshifted subset):",
        "",
        "| model | unshifted subset | " + " | ".join(shifts) + " | worst drop | within 0.05 |",
        "|---|---|" + "---|" * len(shifts) + "---|---|",
    ]
    rows = [
        f"| {LABELS[k]} | {v['auroc_unshifted_subset']:.3f} | "
        + " | ".join(f"{v['auroc_by_shift'][s]:.3f}" for s in shifts)
        + f" | {v['worst_drop']:+.3f} | {'yes' if v['within_0_05'] else 'no'} |"
        for k, v in stability["by_model"].items()
    ]
    return [*head, *rows]


def _typer_caveat(typer: dict[str, Any]) -> list[str]:
    """What the typer saw of these patients: its embeddings are in-sample for any patient
    whose cells it trained on, which a typer trained elsewhere would not be."""
    if typer["source"] == "quick":
        training = typer["training"]
        return [
            "Caveat: no trained celltype model was given, so a quick ResNet18 was trained "
            f"here on the cohort's signed-out cells ({training.get('epochs_done')} epoch(s), "
            f"{training.get('seconds')} s on a shared CPU). It saw every patient's cells with "
            "their cell-type labels (never the diagnosis), so its embeddings are in-sample "
            "for the typer for every patient, held-out ones included; it is weak, so the "
            "embedding models are lower bounds of what a real typer gives.",
            "",
        ]
    return [
        "Caveat: the given typer's training split may include DeepAPL patients (the shared "
        "real typer trains on a patient split of this cohort); for those patients its "
        "embeddings and probabilities are in-sample for the typer (never for the "
        "diagnosis), which a typer trained elsewhere would not be.",
        "",
    ]


def render_markdown(r: dict[str, Any]) -> str:
    res = r["results"]
    typer = r["celltype_model"]
    choice = r["choice"]
    att_rows = [
        f"| {group} | {c} | {s['top10pct_share']:.3f} | {s['all_cells_share']:.3f} |"
        for group, shares in r["mil_attention_by_sign_out_class"].items()
        for c, s in list(shares.items())[:4]
    ]
    versus = [
        f"| {LABELS[k]} | {d['difference']:+.3f} | {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f} |"
        for k, d in choice["best_minus_model"].items()
        if k != choice["best"]
    ]
    cv = r["cv"]
    return "\n".join(
        [
            "# APL vs non-APL AML from cell morphology (real patients, DeepAPL)",
            "",
            f"{r['patients']} patients ({r['apl_patients']} APL), {r['cells']} cells "
            f"({r['unreadable_cells']} unreadable, skipped). Nested CV: outer "
            f"{cv['repeats']} x repeated patient-grouped stratified {cv['folds']}-fold (every "
            f"model on the same folds); inner {cv['inner_folds']} grouped folds of each "
            "outer-train set make every choice (MIL epochs / early stopping and instance "
            "dropout, logistic C, the temperature). Patient-level AUROC: mean and SD over "
            "repeats of each repeat's pooled out-of-fold AUROC; 95 % CI: stratified patient "
            "bootstrap of the repeat-averaged scores. ECE (10 bins), Brier and saturation "
            "(share of held-out scores outside [0.01, 0.99]; min-max) over the held-out "
            "probabilities of each repeat.",
            "",
            "```",
            r["command"],
            "```",
            "",
            "| model | AUROC | SD | 95 % CI | ECE | Brier | saturated | score range |",
            "|---|---|---|---|---|---|---|---|",
            *_model_rows(res),
            f"| pathologists' promyelocyte fraction alone (oracle, no training) | "
            f"{res['oracle_promyelocyte_fraction']['auroc']:.3f} | | | | | | |",
            f"| Eckardt et al., BMC Cancer 2022 (bone marrow, other patients) | "
            f"{r['reference']['eckardt_2022_bmc_cancer_auroc']} | | | | | | |",
            "",
            f"Best AUROC: `{choice['best']}`. Preferred (the simplest not worse: paired "
            "patient-bootstrap 95 % CI of the AUROC difference contains 0; simplest first: "
            f"case-vector logistic, mean-embedding logistic, ensemble net, MIL, averages): "
            f"**`{choice['preferred']}`**.",
            "",
            "| model | AUROC(best) - AUROC(model) | 95 % CI |",
            "|---|---|---|",
            *versus,
            "",
            *_stability_rows(r.get("stability")),
            "",
            f"Cell typer: {typer['source']} ({typer['arch']}, {typer['crop_size']} px crops, "
            f"embedding {typer['embedding_dim']}-d; `{typer['uri']}`). Morphometrics from up to "
            f"{r['morphometrics_cells_per_patient']} cells per patient at half resolution "
            "(px units).",
            "",
            *_served_line(r.get("served_model")),
            f"MIL on every patient (its recipe): {r['served_mil_choice']}. Where "
            "it looks (share of each sign-out class among a patient's top-10 % attended "
            "cells vs among all its cells, averaged over patients; top 4 per group):",
            "",
            "| patients | sign-out class | top-10 % share | all-cells share |",
            "|---|---|---|---|",
            *att_rows,
            "",
            *_typer_caveat(typer),
            *(f"Note: {n}\n" for n in r.get("notes", [])),
            "Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()),
            "",
        ]
    )


def _served_line(served: dict | None) -> list[str]:
    """The served model's line (reports before `--served-model` have none)."""
    if not served:
        return []
    return [
        f"Served model (`--save-mil`): `{served['run']}`, its nested-CV recipe fitted on every "
        f"patient ({served['choice']}).",
        "",
    ]
