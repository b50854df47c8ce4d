"""The versioned JSON result of an analysis (`schema_version` "1.9").

One model from the first stage to the renderers: the pipeline fills it in step by step
(`services.gateway.pipeline`), the job store keeps its JSON, and the FHIR bundle (`fhir`)
and the overlay images (`render`) are built from it. Exported as JSON Schema at
`GET /v1/schemas/result` (`AnalysisResult.model_json_schema()`). Compatible additions (new optional
fields) bump the minor version; anything else bumps the major version. Results stored under
an older minor version still validate (their new fields are absent / None).

1.1: `aml` (whether P(AML) was reported and, if not, why), `morphometrics_unit`, per image
`um_per_px` and `um_per_px_source`.
1.2: `npm1_morphology` (P(NPM1 mutated | AML) from the ensemble's NPM1 head, beside the
whole-image `p_npm1`, whose fields keep their meaning).
1.3: `duplicate_images_ignored`; `aml.reason` also pixel_size_out_of_range, image_too_small,
implausible_cell_size. `apl_morphology` (P(APL | AML) from the ensemble's APL head), the same shape as
`npm1_morphology`: one `GeneticMorphologyCall` per genetic target of `marrowscope.targets`.
1.4: `input` (fields | cells | slide), `slide`.
1.5: `<target>_morphology.model` (which model produced the call: `ensemble`, its genetic
head, or `mil`, the attention-MIL model over the cells' celltype embeddings, when the
deployment serves APL from it: `MS_GATEWAY_APL_MODEL=mil`); per cell `attention` (the MIL
model's attention weight, summing to 1 over the case's typed cells) and `importance_source`
(what the per-cell `importance` holds); reasons `no_mil_model`, `mil_lineage_mismatch`.
1.6: `domain` (the per-case domain check: how far the case's cells sit from the pinned
typer's training cells) and `differential_warning`; abstention reason `out_of_domain`.
1.7: `review` (the hematologist's review from the review app: state, who signed and when,
the comment, amendments, and the reviewer's differential beside the model's). It is the
one field not fixed when the analysis finishes: the job store keeps the model's result, and
the JSON report adds the review as it stands when it is read, to results of every version.
1.8: `aml.status` not_available (reason `no_aml_model`: the pinned ensemble version
withholds P(AML), e.g. the real-data set, which has no control cases to learn it from);
`trained_on` (what each model's weights learned from, `marrowscope.provenance`),
`synthetic_stages` (the models among them that learned from synthetic data) and
`p_npm1_withheld` (why the whole-image P(NPM1) is absent: the pinned npm1 version withholds
it).
1.9: `review.complete_images` (the fields whose boxes the reviewer declared complete).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESULT_SCHEMA_VERSION = "1.9"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageVersion(_Model):
    model: str = Field(description="wire model name (segmentation, celltype, ...)")
    version: str = Field(description="model version pinned at the start and used for every call")


class DifferentialEntry(_Model):
    code: str = Field(description="taxonomy cell-type code, e.g. BLA")
    name: str
    count: int = Field(ge=0)
    fraction: float = Field(ge=0, le=1, description="count / counted cells")
    ci_low: float = Field(ge=0, le=1, description="Wilson 95 % lower bound of the fraction")
    ci_high: float = Field(ge=0, le=1, description="Wilson 95 % upper bound of the fraction")


class MorphometricSummary(_Model):
    mean: float
    std: float


AmlAbstentionReason = Literal[
    "too_few_cells",
    "pixel_size_required",
    "pixel_size_unexpected",
    "pixel_size_mixed",
    "pixel_size_out_of_range",
    "image_too_small",
    "implausible_cell_size",
    "out_of_domain",
]


class AmlCall(_Model):
    """Whether the AML prediction was made; an abstention withholds `p_aml` only.
    not_available (1.7): the pinned ensemble version has no P(AML) to give (`reason`
    no_aml_model, `detail` its own words); the genetic calls (P(lesion | AML)) still
    report, to be read against an AML diagnosis made elsewhere."""

    status: Literal["predicted", "abstained", "not_available"]
    reason: AmlAbstentionReason | Literal["no_aml_model"] | None = Field(
        None,
        description="machine-readable reason: no_aml_model when not_available (the "
        "pinned ensemble version withholds P(AML), `detail` says why); abstention reasons: "
        "too_few_cells (the whole case "
        "abstained); pixel_size_required (the ensemble learned morphometrics in um, the case "
        "was measured in px: send options.um_per_px); pixel_size_unexpected (the ensemble "
        "learned px, the case is in um); pixel_size_mixed (images with and without a pixel "
        "size); pixel_size_out_of_range (outside the ensemble's training pixel sizes by more "
        "than MS_GATEWAY_PIXEL_SIZE_TOLERANCE); image_too_small (an image under 20 um on its "
        "shorter side); implausible_cell_size (median detection size outside 4-50 um at the "
        "given pixel size); out_of_domain (the case's cells sit farther from the typer's "
        "training cells than its threshold: `domain`)",
    )
    detail: str | None = Field(None, description="the abstention reason for people")
    model_length_unit: Literal["um", "px", "unknown"] | None = Field(
        None,
        description="unit the ensemble learned its morphometric features in; unknown for "
        "models trained before it was recorded (not checked); None when not called",
    )


class GeneticMorphologyCall(_Model):
    """A genetic lesion by morphology: P(lesion | AML) from one of the ensemble's genetic
    heads (`marrowscope.targets`: NPM1 mutated, APL), read from the same case features as
    P(AML), or for APL from the attention-MIL model over the cells' embeddings (`model`
    mil). Independent of the whole-image `p_npm1`; withheld whenever P(AML) is
    (`aml.status` abstained)."""

    status: Literal["predicted", "abstained", "not_available", "not_applicable"] = Field(
        description="predicted: `p` is set; abstained: withheld for the reason P(AML) was "
        "(same features); not_available: the pinned ensemble version has no output for this "
        "target (model mil: no MIL model is served, or it was built on another celltype "
        "version than the pinned one); not_applicable: the case is called non-AML (p_aml below aml_threshold), and "
        "the head, trained on AML cases only, says nothing about it"
    )
    p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="P(lesion | AML); conditional on AML, so read it together with `p_aml`",
    )
    positive: bool | None = Field(None, description="p >= threshold; None unless predicted")
    threshold: float = Field(ge=0, le=1)
    threshold_source: Literal["model", "deployment"] = Field(
        description="model: recorded with the ensemble version; deployment: the gateway's "
        "setting (MS_GATEWAY_NPM1_THRESHOLD, MS_GATEWAY_APL_THRESHOLD; the model records "
        "none, or was not called)"
    )
    reason: (
        AmlAbstentionReason
        | Literal[
            "no_npm1_output", "no_apl_output", "not_aml", "no_mil_model", "mil_lineage_mismatch"
        ]
        | None
    ) = Field(
        None,
        description="machine-readable: the `aml.reason` when abstained; no_<target>_output "
        "(ensemble) or no_mil_model / mil_lineage_mismatch (mil) when not_available; not_aml "
        "when not_applicable",
    )
    detail: str | None = Field(None, description="the reason for people")
    model_version: str = Field(description="the pinned version of `model`")
    model: Literal["ensemble", "mil"] | None = Field(
        None,
        description="the model that produced the call (1.5): ensemble (its head for this "
        "target, over the case features) or mil (APL only: gated-attention MIL over the "
        "typed cells' celltype embeddings; its attention is each cell's `attention`); None "
        "before 1.5",
    )


class Cell(_Model):
    box: list[float] = Field(
        min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels of the submitted image"
    )
    detector_label: str
    score: float
    cell_type: str | None = Field(None, description="argmax counted type; None for RBC")
    confidence: float | None = None
    importance: float | None = Field(
        None,
        description="the cell's importance, per the result's `importance_source`: the MIL "
        "model's attention weight (mil_attention: over the case's typed cells the weights sum "
        "to 1; None for untyped detections) or the npm1 occlusion importance (explain)",
    )
    attention: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the MIL model's attention weight (1.5; only when `apl_morphology.model` "
        "is mil and it answered): the case's typed cells' weights sum to 1",
    )


class ImageResult(_Model):
    """One image of the case; for a single-cell case (metadata input cells) `cells` holds
    exactly one cell, detector_label `cell`, score 1.0, whose box is the whole image."""

    index: int
    sha256: str
    width: int
    height: int
    n_detected: int
    n_counted: int
    um_per_px: float | None = Field(None, description="pixel size the image was measured with")
    um_per_px_source: Literal["request", "deployment_default", "none"] | None = Field(
        None,
        description="where um_per_px came from: options.um_per_px, the deployment's "
        "MS_GATEWAY_DEFAULT_UM_PER_PX, or none (morphometrics in px)",
    )
    p_npm1: float | None = Field(None, description="whole-image P(NPM1); None for single cells")
    heatmap_sha256: str | None = Field(None, description="float32 heatmap artifact (explain)")
    cells: list[Cell]


class SlideRegion(_Model):
    """One region the slide's ROI selection picked; it is image `index` of the case."""

    index: int = Field(description="the case image this region became (selection order)")
    x: int = Field(description="left edge, level-0 pixels of the slide")
    y: int = Field(description="top edge, level-0 pixels")
    width: int
    height: int
    row: int = Field(description="row of the region grid")
    col: int = Field(description="column of the region grid")
    score: float = Field(ge=0, le=1, description="ROI quality (monolayer, focus, stain, debris)")
    cells_estimated: int = Field(ge=0, description="nucleated cells estimated at low power")
    n_counted: int | None = Field(None, ge=0, description="nucleated cells the pipeline counted")
    size_um: float | None = Field(None, description="region side in micrometres")
    overlay: str = Field(description="relative URL of the region's cell overlay")


class SlideSummary(_Model):
    """How a whole slide became this case (analyses submitted with `POST /v1/slides`)."""

    source: dict[str, str] = Field(description="{store, path} or {upload}")
    width: int = Field(description="level-0 width in pixels")
    height: int
    levels: int
    vendor: str
    um_per_px: float | None
    regions: list[SlideRegion]
    candidates: int = Field(ge=0, description="regions of the grid that were scored")
    cell_target: int = Field(ge=1, description="nucleated cells the selection aimed for")
    cells_estimated: int = Field(ge=0, description="cells the selected regions hold (low power)")
    cells_counted: int = Field(ge=0, description="nucleated cells counted in them")
    stop_reason: Literal["target_reached", "slide_exhausted"]
    thumbnail: str = Field(description="relative URL: the slide with the regions drawn")
    thumbnail_sha256: str


class DomainCheck(_Model):
    """How far the case's cells sit from the cells the pinned celltype version was trained
    on (`marrowscope.domain`; 1.6). Scores: 1 = a typical training cell."""

    status: Literal["in_domain", "out_of_domain", "not_available"] = Field(
        description="out_of_domain: `score` above `threshold`; not_available: the pinned "
        "typer carries no (calibrated) domain reference, nothing is withheld for it"
    )
    action: Literal["abstain", "warn"] = Field(
        description="the deployment's MS_GATEWAY_DOMAIN_CHECK: abstain withholds P(AML), "
        "P(NPM1) and the genetic calls of an out-of-domain case; warn only flags it"
    )
    score: float | None = Field(None, ge=0, description="max(embedding, appearance)")
    embedding: float | None = Field(
        None, ge=0, description="median over the cells of the typer-embedding distance"
    )
    appearance: float | None = Field(
        None, ge=0, description="median over the cells of the colour/scale distance"
    )
    threshold: float | None = Field(None, description="recorded with the celltype version")
    n_cells: int = Field(0, ge=0, description="typed cells scored")
    reason: Literal["no_domain_reference", "domain_reference_not_calibrated", "no_cells"] | None = (
        None
    )
    detail: str | None = None
    celltype_version: str = Field(description="the typer version whose reference was used")


class ReviewSummary(_Model):
    """The hematologist's review of the case in the review app (1.7). The model's figures
    stay where they are (`differential`, `blast_percent`, ...); these are the reviewer's,
    recomputed from the reviewed labels by the same function."""

    state: Literal["unreviewed", "in_review", "signed_out", "amended"] = Field(
        description="unreviewed: nobody has changed or signed it; in_review: corrections "
        "under way (or reopened for an amendment); signed_out: final; amended: signed out "
        "again after a reopening"
    )
    reviewer: str | None = Field(None, description="display name of who signed it out")
    signed_at: str | None = Field(None, description="ISO 8601 UTC time of the sign-out")
    comment: str | None = Field(None, description="the sign-out comment")
    amendments: int = Field(0, ge=0, description="times the case was reopened after sign-out")
    corrected_cells: int = Field(0, ge=0, description="cells whose type the reviewer changed")
    n_cells_counted: int | None = Field(
        None, ge=0, description="nucleated cells counted with the reviewed labels"
    )
    blast_percent: float | None = Field(
        None, description="blasts per 100 counted cells, reviewed labels"
    )
    differential: list[DifferentialEntry] = Field(
        default_factory=list,
        description="the reviewer's differential (empty while unreviewed)",
    )
    complete_images: list[int] = Field(
        default_factory=list,
        description="indices of the fields whose boxes the reviewer declared complete (every "
        "cell boxed): the ones the corrections export gives the detector to learn from (1.9)",
    )


class AnalysisResult(_Model):
    """What the gateway concludes for one case. `p_aml`/`p_npm1` are None when abstained;
    `p_aml` alone is None when `aml.status` is abstained on a succeeded case, and then
    `npm1_morphology` and `apl_morphology` are abstained too."""

    schema_version: Literal[
        "1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8", "1.9"
    ] = RESULT_SCHEMA_VERSION
    analysis_id: str
    input: Literal["fields", "cells", "slide"] = Field(
        "fields",
        description="what the case was made of (1.4): fields of view, single-cell images "
        "(`metadata.input = cells`: one cell per image, no whole-image NPM1 call) or a whole "
        "slide (`POST /v1/slides`: the selected regions, see `slide`)",
    )
    outcome: Literal["succeeded", "abstained"]
    abstain_reason: str | None = None
    aml: AmlCall | None = Field(None, description="whether P(AML) was computed (None before 1.1)")
    p_aml: float | None = Field(None, ge=0, le=1)
    aml_threshold: float
    aml_positive: bool | None = None
    p_npm1: float | None = Field(
        None,
        ge=0,
        le=1,
        description="mean of the per-image P(NPM1 mutated) over the case's images; None when "
        "abstained, and not applicable (None) for a single-cell case (metadata input cells): "
        "the whole-image NPM1 model reads fields of view, not single-cell crops",
    )
    npm1_threshold: float
    npm1_positive: bool | None = Field(None, description="p_npm1 >= npm1_threshold")
    p_npm1_withheld: str | None = Field(
        None,
        description="why `p_npm1` is None on a case of fields of view (1.7): the pinned npm1 "
        "version withholds it (its config's `withheld`, e.g. no real NPM1 labels to learn "
        "from)",
    )
    npm1_morphology: GeneticMorphologyCall | None = Field(
        None,
        description="NPM1 by morphology (the ensemble's P(NPM1 mutated | AML)); None before 1.2",
    )
    apl_morphology: GeneticMorphologyCall | None = Field(
        None,
        description="APL (PML-RARA) by morphology (the ensemble's P(APL | AML)); None before 1.3",
    )
    n_images: int = Field(description="distinct images analysed (repeats not counted)")
    duplicate_images_ignored: int = Field(
        0,
        ge=0,
        description="images of the case whose content (sha256) repeats an earlier one; "
        "analysed once, so repeats add no cells",
    )
    n_cells_detected: int
    n_cells_counted: int = Field(description="nucleated cells (RBC excluded)")
    blast_percent: float | None = Field(None, description="blasts per 100 counted cells")
    differential: list[DifferentialEntry]
    differential_warning: str | None = Field(
        None,
        description="why the differential needs care (1.6): the cells look unlike the "
        "typer's training cells (`domain` out_of_domain), so its counts may be wrong",
    )
    domain: DomainCheck | None = Field(
        None,
        description="the per-case domain check (1.6); None when the deployment turns "
        "it off (MS_GATEWAY_DOMAIN_CHECK=off)",
    )
    attribute_fractions: dict[str, float] = Field(default_factory=dict)
    morphometrics: dict[str, MorphometricSummary] = Field(default_factory=dict)
    morphometrics_unit: Literal["um", "px", "mixed"] | None = Field(
        None,
        description="length unit of `morphometrics` and of the ensemble's morphometric "
        "features (areas in unit^2); mixed when some images had a pixel size and others not",
    )
    model_versions: dict[str, StageVersion]
    lineage: dict[str, str] = Field(
        default_factory=dict, description="upstream versions the ensemble reported"
    )
    trained_on: dict[str, str] = Field(
        default_factory=dict,
        description="what each model that answered learned from (1.7; `marrowscope."
        "provenance`): model (as in `model_versions`, plus nucseg for the learned "
        "nucleus/cytoplasm split) -> its data sets, `+`-joined: real sets (bccd, deepapl, "
        "pbc, wbc-seg), synthetic, untrained (its outputs are withheld) or unknown",
    )
    synthetic_stages: list[str] = Field(
        default_factory=list,
        description="the models of `trained_on` that learned (also) from synthetic data "
        "(1.7): what they contribute is not a real-data figure",
    )
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    explained: bool = False
    importance_source: Literal["mil_attention", "explain_occlusion"] | None = Field(
        None,
        description="what each cell's `importance` holds (1.5): explain_occlusion when the "
        "analysis was explained (the npm1 occlusion importance), else mil_attention when the "
        "MIL model answered (its attention, as `attention`); None: no importance",
    )
    images: list[ImageResult]
    slide: SlideSummary | None = Field(
        None, description="whole-slide analyses only (1.4): regions used and the thumbnail"
    )
    review: ReviewSummary | None = Field(
        None,
        description="the hematologist's review as it stands when the report is read (1.7; "
        "the JSON report adds it to results of every version)",
    )
    generated_at: str
    disclaimer: str = (
        "AI-generated decision support; not a diagnosis. Review by a qualified "
        "hematologist is required."
    )
