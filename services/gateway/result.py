"""The versioned JSON result of an analysis (`schema_version` "1.0").

Exported as JSON Schema at `GET /v1/schemas/result`. Compatible additions (new optional
fields) bump the minor version; anything else bumps the major version.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESULT_SCHEMA_VERSION = "1.0"


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


class Cell(_Model):
    box: list[float] = Field(min_length=4, max_length=4,
                             description="x1, y1, x2, y2 in pixels of the submitted image")
    detector_label: str
    score: float
    cell_type: str | None = Field(None, description="argmax counted type; None for RBC")
    confidence: float | None = None
    importance: float | None = Field(None, description="occlusion importance (explain only)")


class ImageResult(_Model):
    index: int
    sha256: str
    width: int
    height: int
    n_detected: int
    n_counted: int
    p_npm1: float | None = None
    heatmap_sha256: str | None = Field(None, description="float32 heatmap artifact (explain)")
    cells: list[Cell]


class AnalysisResult(_Model):
    """What the gateway concludes for one case. `p_aml`/`p_npm1` are None when abstained."""

    schema_version: Literal["1.0"] = RESULT_SCHEMA_VERSION
    analysis_id: str
    outcome: Literal["succeeded", "abstained"]
    abstain_reason: str | None = None
    p_aml: float | None = Field(None, ge=0, le=1)
    aml_threshold: float
    aml_positive: bool | None = None
    p_npm1: float | None = Field(
        None, ge=0, le=1,
        description="mean of the per-image P(NPM1 mutated) over the case's images")
    npm1_threshold: float
    npm1_positive: bool | None = None
    n_images: int
    n_cells_detected: int
    n_cells_counted: int = Field(description="nucleated cells (RBC excluded)")
    blast_percent: float | None = Field(None, description="blasts per 100 counted cells")
    differential: list[DifferentialEntry]
    attribute_fractions: dict[str, float] = Field(default_factory=dict)
    morphometrics: dict[str, MorphometricSummary] = Field(default_factory=dict)
    model_versions: dict[str, StageVersion]
    lineage: dict[str, str] = Field(default_factory=dict,
                                    description="upstream versions the ensemble reported")
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    explained: bool = False
    images: list[ImageResult]
    generated_at: str
    disclaimer: str = ("AI-generated decision support; not a diagnosis. Review by a qualified "
                       "hematologist is required.")
