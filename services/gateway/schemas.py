"""API schemas: `XCreate` is what the LIS sends, `XPublic` what it gets back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from services.gateway.result import AnalysisResult

Status = Literal["queued", "running", "succeeded", "failed", "abstained", "cancelled"]


class AnalysisOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    explain: bool = Field(False, description="compute occlusion heatmaps (npm1, cells mode)")
    um_per_px: float | None = Field(
        None,
        gt=0,
        le=10,
        description="pixel size in micrometres, forwarded to segmentation (morphometrics in "
        "um/um^2; without it px/px^2, or the deployment's MS_GATEWAY_DEFAULT_UM_PER_PX). When "
        "the ensemble learned its morphometric features in um and no pixel size is known, the "
        "result withholds P(AML): result.aml = {status: abstained, reason: "
        "pixel_size_required}, and NPM1 by morphology (result.npm1_morphology) with it; "
        "counts, the whole-image p_npm1 and images are still reported",
    )


class AnalysisCreate(BaseModel):
    """The JSON `metadata` part of `POST /v1/analyses`."""

    model_config = ConfigDict(extra="forbid")

    accession_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="the LIS accession number (printable ASCII)",
    )
    specimen_type: Literal["bone_marrow_aspirate", "bone_marrow_smear", "peripheral_blood"] = (
        "bone_marrow_aspirate"
    )
    stain: Literal["MGG", "Wright", "Wright-Giemsa", "Giemsa"] = "MGG"
    options: AnalysisOptions = Field(default_factory=AnalysisOptions)
    webhook_url: AnyHttpUrl | None = Field(
        None, description="POSTed a signed notification when the analysis finishes"
    )


class ImagePublic(BaseModel):
    index: int
    sha256: str
    width: int
    height: int
    format: str
    size_bytes: int


class AnalysisPublic(BaseModel):
    id: str
    status: Status
    accession_id: str
    specimen_type: str
    stain: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stage: str | None = Field(None, description="current or last pipeline stage")
    reason: str | None = Field(
        None,
        description="why it failed, abstained or was cancelled; "
        "on a succeeded analysis, why P(AML) was withheld (result.aml)",
    )
    cancel_requested: bool = False
    images: list[ImagePublic]
    result: AnalysisResult | None = None


class AnalysisAccepted(BaseModel):
    id: str
    status: Status
    location: str


class AnalysisPage(BaseModel):
    items: list[AnalysisPublic]
    total: int
    limit: int
    offset: int


class ErrorPublic(BaseModel):
    error: str = Field(description="machine-readable error code")
    detail: str = Field(description="what was wrong, for people")


def ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)
