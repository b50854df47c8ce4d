"""FHIR R4B DiagnosticReport Bundle (type `collection`) of one finished analysis.

Coding: every measurement uses the local CodeSystem `LOCAL_SYSTEM`. No LOINC code is used:
the LOINC blast/differential codes we could confirm specify a manual-count method or another
specimen, and a code must mean exactly the measurement (an AI count over submitted images).
Mapping to site LOINC codes is left to the LIS. HL7 "AI Transparency on FHIR": every
resource carries `meta.security` AIAST (v3-ObservationValue, "artificial intelligence
asserted"); a Device carries the pinned model versions and is referenced by every
Observation and by a Provenance whose targets are all generated resources. Heatmaps and
overlays are Media with `content.url` pointing at the gateway's PNG endpoints. A withheld
P(AML) on a succeeded case (result `aml.status` abstained) is a `p-aml` Observation without a
value: `dataAbsentReason` not-performed plus the local abstention code (e.g.
`pixel_size_required`) and the detail as text. Each genetic lesion by morphology (result
`npm1_morphology` / `apl_morphology`, the ensemble's P(NPM1 mutated | AML) / P(APL | AML);
`marrowscope.targets`) is an Observation `p-npm1-morphology` / `p-apl-morphology` (NPM1's
beside the whole-image `p-npm1-mutated`); withheld with P(AML), it carries the same
dataAbsentReason, not_applicable (called non-AML) a `not-applicable` one; an ensemble
without that output adds no Observation. The per-case domain check (result `domain`) is an
Observation `domain-score` (the score, its embedding / appearance components and the
threshold; interpretation `A` when out of domain; not_available: a dataAbsentReason with
the reason), and the conclusion carries the differential warning. The PDF report
(`services.gateway.pdf`) rides along as the DiagnosticReport's `presentedForm` (base64
`application/pdf`).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from marrowscope.targets import GeneticTarget, genetic_targets
from services.gateway.reading import SignOut, result_status, synthetic_text
from services.gateway.result import (
    AnalysisResult,
    DomainCheck,
    GeneticMorphologyCall,
    SlideSummary,
)

LOCAL_SYSTEM = "https://marrowscope.org/fhir/CodeSystem/marrowscope"
UCUM = "http://unitsofmeasure.org"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"


def _code(code: str, display: str) -> dict:
    return {"coding": [{"system": LOCAL_SYSTEM, "code": code, "display": display}], "text": display}


def _prob(value: float) -> dict:
    return {"value": round(float(value), 6), "unit": "probability", "system": UCUM, "code": "1"}


def _pct(value: float) -> dict:
    return {"value": round(float(value), 4), "unit": "%", "system": UCUM, "code": "%"}


def _withheld(reason: str, detail: str | None) -> dict:
    """dataAbsentReason of a value the gateway withheld (not-performed + local reason code)."""
    return {
        "coding": [
            {"system": DATA_ABSENT, "code": "not-performed"},
            {"system": LOCAL_SYSTEM, "code": reason},
        ],
        "text": detail,
    }


def report_status(sign_out: SignOut | None) -> str:
    """DiagnosticReport.status: AI only -> preliminary; signed out -> final; an amendment
    of an earlier sign-out -> amended (the same P / F / C as the ORU's OBR-25)."""
    return {"P": "preliminary", "F": "final", "C": "amended"}[result_status(sign_out)]


def build_bundle(
    *,
    analysis: dict,
    result: AnalysisResult,
    base_url: str = "",
    presented_form: bytes | None = None,
    sign_out: SignOut | None = None,
) -> dict:
    """analysis: {id, accession_id, finished_at (datetime|None)}; result: the analysis's
    result (a stored one: `AnalysisResult.model_validate`); presented_form: the PDF report
    (`services.gateway.pdf`), embedded as the DiagnosticReport's `presentedForm`; sign_out:
    the hematologist's sign-out from the review app: the DiagnosticReport is `preliminary`
    without one, `final` with one and `amended` when it replaces an earlier sign-out, with
    the reviewer as `resultsInterpreter` (a Practitioner) and as the Provenance's verifier.
    Returns
    the Bundle as a JSON-ready dict, validated by fhir.resources R4B."""
    from fhir.resources.R4B.bundle import Bundle

    meta = {"security": [AIAST]}
    issued = (analysis.get("finished_at") or datetime.now(UTC)).isoformat()
    urn = {name: f"urn:uuid:{uuid.uuid4()}" for name in ("report", "device", "provenance")}
    entries: list[tuple[str, dict]] = []
    dev_ref = {"reference": urn["device"], "display": "MarrowScope"}

    device = {
        "resourceType": "Device",
        "meta": meta,
        "status": "active",
        "deviceName": [{"name": "MarrowScope", "type": "user-friendly-name"}],
        "type": {"text": "AI software for bone-marrow smear analysis (decision support)"},
        "version": [
            {"type": {"text": stage}, "value": v.version}
            for stage, v in sorted(result.model_versions.items())
        ],
        "note": [{"text": result.disclaimer}],
    }

    def observation(code: str, display: str, **value) -> str:
        ref = f"urn:uuid:{uuid.uuid4()}"
        obs = {
            "resourceType": "Observation",
            "meta": meta,
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                        }
                    ]
                }
            ],
            "code": _code(code, display),
            "issued": issued,
            "device": dev_ref,
            **value,
        }
        entries.append((ref, obs))
        return ref

    results: list[str] = []
    if result.p_aml is not None:
        interp = "POS" if result.aml_positive else "NEG"
        results.append(
            observation(
                "p-aml",
                "Probability of acute myeloid leukemia (AI)",
                valueQuantity=_prob(result.p_aml),
                interpretation=[{"coding": [{"system": INTERPRETATION, "code": interp}]}],
                note=[{"text": f"threshold {result.aml_threshold}"}],
            )
        )
    aml = result.aml
    if result.outcome == "succeeded" and aml is not None and aml.status != "predicted":
        results.append(
            observation(
                "p-aml",
                "Probability of acute myeloid leukemia (AI)",
                dataAbsentReason=_withheld(aml.reason, aml.detail),
            )
        )
    if result.p_npm1 is not None:
        interp = "POS" if result.npm1_positive else "NEG"
        results.append(
            observation(
                "p-npm1-mutated",
                "Probability of NPM1 mutation (AI, mean over images)",
                valueQuantity=_prob(result.p_npm1),
                interpretation=[{"coding": [{"system": INTERPRETATION, "code": interp}]}],
                note=[{"text": f"threshold {result.npm1_threshold}"}],
            )
        )
    morph_texts = []
    for target in genetic_targets():
        morph: GeneticMorphologyCall | None = getattr(result, target.report_entry, None)
        if morph is None:
            continue
        ref = _morphology_observation(observation, target, morph, result.outcome)
        if ref is not None:
            results.append(ref)
        if morph.status == "predicted":
            morph_texts.append(f"; P({target.name} | AML) by morphology {morph.p:.3f}")
        elif morph.status == "abstained":
            morph_texts.append(f"; {target.code.upper()} by morphology withheld")
    by_code = {d.code: d for d in result.differential}
    if result.blast_percent is not None and "BLA" in by_code:
        b = by_code["BLA"]
        results.append(
            observation(
                "blast-percent",
                "Blasts per 100 counted nucleated cells (AI count)",
                valueQuantity=_pct(result.blast_percent),
                component=[
                    {
                        "code": _code("ci95-low", "Wilson 95% CI lower bound"),
                        "valueQuantity": _pct(100 * b.ci_low),
                    },
                    {
                        "code": _code("ci95-high", "Wilson 95% CI upper bound"),
                        "valueQuantity": _pct(100 * b.ci_high),
                    },
                ],
            )
        )
    if result.domain is not None:
        results.append(_domain_observation(result.domain, observation))
    results.append(
        observation(
            "counted-cells",
            "Nucleated cells counted (AI)",
            valueInteger=int(result.n_cells_counted),
        )
    )
    for d in result.differential:
        results.append(
            observation(
                f"count-{d.code}",
                f"{d.name} count (AI)",
                valueInteger=int(d.count),
                component=[
                    {
                        "code": _code("fraction", "fraction of counted cells"),
                        "valueQuantity": _pct(100 * d.fraction),
                    },
                    {
                        "code": _code("ci95-low", "Wilson 95% CI lower bound"),
                        "valueQuantity": _pct(100 * d.ci_low),
                    },
                    {
                        "code": _code("ci95-high", "Wilson 95% CI upper bound"),
                        "valueQuantity": _pct(100 * d.ci_high),
                    },
                ],
            )
        )

    media_links = []
    for im in result.images:
        kinds = [("overlay", "cell boxes coloured by type")]
        if im.heatmap_sha256:
            kinds.append(("heatmap", "occlusion heatmap (NPM1 model)"))
        for kind, what in kinds:
            ref = f"urn:uuid:{uuid.uuid4()}"
            url = f"{base_url}/v1/analyses/{analysis['id']}/images/{im.index}/{kind}.png"
            entries.append(
                (
                    ref,
                    _media(
                        meta, dev_ref, url, f"image {im.index}: {what}", size=(im.width, im.height)
                    ),
                )
            )
            media_links.append({"comment": f"image {im.index} {kind}", "link": {"reference": ref}})

    if result.slide is not None:
        media_links.append(
            _slide_media(result.slide, analysis["id"], base_url, meta, dev_ref, entries)
        )
        results.append(_slide_regions(result.slide, observation))

    if result.outcome == "abstained":
        conclusion = f"No AI call: {result.abstain_reason}"
    else:
        withheld_word = "not available" if aml and aml.status == "not_available" else "withheld"
        aml_text = (
            f"P(AML) {result.p_aml:.3f}"
            if result.p_aml is not None
            else f"P(AML) {withheld_word} ({aml and aml.reason}: {aml and aml.detail})"
        )
        npm1_text = (  # None on a succeeded case: single-cell images, no field to read
            "P(NPM1 mutated) not applicable (single-cell images)"
            if result.p_npm1 is None
            else f"P(NPM1 mutated) {result.p_npm1:.3f}"
        )
        if result.p_npm1_withheld:
            npm1_text = f"P(NPM1 mutated) not available: {result.p_npm1_withheld}"
        if aml is not None and aml.reason == "out_of_domain":
            npm1_text = "P(NPM1 mutated) withheld (out_of_domain)"
        warning = f" {result.differential_warning}" if result.differential_warning else ""
        synthetic = f" {synthetic_text(result)}" if result.synthetic_stages else ""
        conclusion = (
            f"{aml_text}; {npm1_text}{''.join(morph_texts)}; "
            f"blasts {result.blast_percent:.1f}% of "
            f"{result.n_cells_counted} counted cells.{warning}{synthetic} {result.disclaimer}"
        )
    reviewer_ref = f"urn:uuid:{uuid.uuid4()}"
    report = {
        "resourceType": "DiagnosticReport",
        "meta": meta,
        "status": report_status(sign_out),
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": analysis["accession_id"],
            },
            {"system": "https://marrowscope.org/fhir/analysis-id", "value": analysis["id"]},
        ],
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "HM",
                        "display": "Hematology",
                    }
                ]
            }
        ],
        "code": _code("marrowscope-analysis", "AI analysis of bone-marrow smear images"),
        "effectiveDateTime": issued,
        "issued": issued,
        "result": [{"reference": r} for r in results],
        "conclusion": conclusion,
    }
    if media_links:
        report["media"] = media_links
    if sign_out is not None:
        report["resultsInterpreter"] = [{"reference": reviewer_ref, "display": sign_out.reviewer}]
    if presented_form is not None:
        report["presentedForm"] = [
            {
                "contentType": "application/pdf",
                "language": "en",
                "data": base64.b64encode(presented_form).decode("ascii"),
                "title": f"MarrowScope report {analysis['accession_id']}",
            }
        ]
    provenance = {
        "resourceType": "Provenance",
        "meta": meta,
        "recorded": issued,
        "target": [{"reference": urn["report"]}] + [{"reference": r} for r, _ in entries],
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": dev_ref,
            }
        ],
    }
    practitioner: list[dict] = []
    if sign_out is not None:
        provenance["agent"].append(
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "verifier",
                        }
                    ]
                },
                "who": {"reference": reviewer_ref, "display": sign_out.reviewer},
            }
        )
        provenance["occurredDateTime"] = sign_out.signed_at.isoformat()
        if sign_out.comment:
            report["conclusion"] += f" Reviewer's comment: {sign_out.comment}"
        practitioner = [
            {
                "fullUrl": reviewer_ref,
                "resource": {"resourceType": "Practitioner", "name": [{"text": sign_out.reviewer}]},
            }
        ]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": issued,
        "entry": [
            {"fullUrl": urn["report"], "resource": report},
            {"fullUrl": urn["device"], "resource": device},
            *({"fullUrl": r, "resource": res} for r, res in entries),
            {"fullUrl": urn["provenance"], "resource": provenance},
            *practitioner,
        ],
    }
    return Bundle.model_validate(bundle).model_dump(mode="json", exclude_none=True)


def _media(
    meta: dict, dev_ref: dict, url: str, title: str, *, size: tuple[int, int] | None = None
) -> dict:
    """A PNG the gateway serves at `url`, as a FHIR Media resource (width/height when known)."""
    media: dict = {
        "resourceType": "Media",
        "meta": meta,
        "status": "completed",
        "type": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}
            ]
        },
        "device": dev_ref,
    }
    if size is not None:
        media["width"], media["height"] = size
    media["content"] = {"contentType": "image/png", "url": url, "title": title}
    return media


def _slide_media(
    slide: SlideSummary, analysis_id: str, base_url: str, meta: dict, dev_ref: dict, entries: list
) -> dict:
    """The slide thumbnail with the selected regions drawn, as a Media entry; its link."""
    ref = f"urn:uuid:{uuid.uuid4()}"
    url = f"{base_url}/v1/analyses/{analysis_id}/slide.png"
    title = f"slide thumbnail: {len(slide.regions)} regions selected, numbered in selection order"
    entries.append((ref, _media(meta, dev_ref, url, title)))
    return {"comment": "slide thumbnail with the selected regions", "link": {"reference": ref}}


def _slide_regions(slide: SlideSummary, observation: Callable[..., str]) -> str:
    """One Observation: how many regions were used and why the selection stopped, with a
    component per region (its level-0 box and the nucleated cells counted in it)."""
    return observation(
        "slide-regions",
        "Whole-slide regions analysed (automatic ROI selection)",
        valueInteger=len(slide.regions),
        note=[
            {
                "text": f"{slide.cells_counted} nucleated cells counted in "
                f"{len(slide.regions)} of {slide.candidates} candidate regions; target "
                f"{slide.cell_target} cells; stopped: {slide.stop_reason}"
            }
        ],
        component=[
            {
                "code": {"text": f"region {r.index + 1}"},
                "valueString": f"x={r.x} y={r.y} w={r.width} h={r.height} "
                f"(level-0 px); score {r.score:.2f}; cells counted {r.n_counted}",
            }
            for r in slide.regions
        ],
    )


def _morphology_method(morph: GeneticMorphologyCall) -> dict:
    """Observation.method naming the model that produced the call (result 1.5 `model`)."""
    if morph.model == "mil":
        text = f"attention MIL over the cells' celltype embeddings (mil {morph.model_version})"
    elif morph.model == "ensemble":
        text = f"ensemble genetic head over the case features (ensemble {morph.model_version})"
    else:
        return {}
    return {"method": {"text": text}}


def _morphology_observation(
    observation: Callable[..., str],
    target: GeneticTarget,
    morph: GeneticMorphologyCall,
    outcome: str,
) -> str | None:
    """The `<target>_morphology` entry as an Observation (reference), None when there is
    nothing to say (no such output, or the whole case abstained)."""
    status = morph.status
    if status == "predicted":
        interp = "POS" if morph.positive else "NEG"
        return observation(
            target.fhir_code,
            target.fhir_display,
            **_morphology_method(morph),
            valueQuantity=_prob(morph.p),
            interpretation=[{"coding": [{"system": INTERPRETATION, "code": interp}]}],
            note=[
                {
                    "text": f"conditional on AML; threshold {morph.threshold} "
                    f"({morph.threshold_source})"
                }
            ],
        )
    if outcome != "succeeded":
        return None
    if status == "abstained":
        return observation(
            target.fhir_code,
            target.fhir_display,
            dataAbsentReason=_withheld(morph.reason, morph.detail),
        )
    if status == "not_applicable":
        # called non-AML: the head (trained on AML cases) has nothing to say about the case
        return observation(
            target.fhir_code,
            target.fhir_display,
            dataAbsentReason={
                "coding": [
                    {"system": DATA_ABSENT, "code": "not-applicable"},
                    {"system": LOCAL_SYSTEM, "code": morph.reason},
                ],
                "text": morph.detail,
            },
        )
    return None


def _domain_observation(check: DomainCheck, observation: Callable[..., str]) -> str:
    """The per-case domain check (result 1.6 `domain`) as an Observation (reference)."""
    display = "Distance of the case's cells from the cell-type model's training cells (AI)"
    if check.score is None or check.threshold is None:
        return observation(
            "domain-score",
            display,
            dataAbsentReason=_withheld(check.reason or "not_available", check.detail),
        )

    def number(value: float | None) -> dict:
        return {"value": round(float(value or 0.0), 6), "unit": "1", "system": UCUM, "code": "1"}

    out = check.status == "out_of_domain"
    return observation(
        "domain-score",
        display,
        valueQuantity=number(check.score),
        interpretation=[{"coding": [{"system": INTERPRETATION, "code": "A" if out else "N"}]}],
        component=[
            {
                "code": _code("domain-embedding", "cell-embedding distance"),
                "valueQuantity": number(check.embedding),
            },
            {
                "code": _code("domain-appearance", "colour and scale distance"),
                "valueQuantity": number(check.appearance),
            },
            {
                "code": _code("domain-threshold", "threshold of the celltype version"),
                "valueQuantity": number(check.threshold),
            },
        ],  # fmt: skip
        note=[
            {
                "text": f"{check.status}; action {check.action}; celltype "
                f"{check.celltype_version}; {check.n_cells} cells"
            }
        ],
    )
