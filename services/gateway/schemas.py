"""API schemas: `XCreate` is what the LIS sends, `XPublic` what it gets back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from services.gateway.config import UM_PER_PX_RANGE, check_um_per_px
from services.gateway.result import AnalysisResult

Status = Literal["queued", "running", "succeeded", "failed", "abstained", "cancelled"]


class AnalysisOptions(BaseModel):
    # strict: JSON true is not a pixel size and "yes" is not a flag (no silent coercion)
    model_config = ConfigDict(extra="forbid", strict=True)

    explain: bool = Field(False, description="compute occlusion heatmaps (npm1, cells mode)")
    um_per_px: float | None = Field(
        None,
        description=f"pixel size in micrometres ({UM_PER_PX_RANGE[0]:g}-{UM_PER_PX_RANGE[1]:g}), "
        "forwarded to segmentation (morphometrics in "
        "um/um^2; without it px/px^2, or the deployment's MS_GATEWAY_DEFAULT_UM_PER_PX). When "
        "the ensemble learned its morphometric features in um and no pixel size is known, the "
        "result withholds P(AML): result.aml = {status: abstained, reason: "
        "pixel_size_required}, and NPM1 by morphology (result.npm1_morphology) with it; "
        "counts, the whole-image p_npm1 and images are still reported. Outside the pixel "
        "sizes the ensemble was trained on (by more than MS_GATEWAY_PIXEL_SIZE_TOLERANCE), "
        "P(AML) is withheld too (reason pixel_size_out_of_range)",
    )

    @field_validator("um_per_px")
    @classmethod
    def _plausible_pixel_size(cls, value: float | None) -> float | None:
        return check_um_per_px(value)


class AnalysisCreate(BaseModel):
    """The JSON `metadata` part of `POST /v1/analyses`."""

    model_config = ConfigDict(extra="forbid", strict=True)

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
    input: Literal["fields", "cells"] = Field(
        "fields",
        description="fields: each image is a field of view; cells are detected on it. cells: "
        "each image is one cell (a CellaVision-type single-cell export): no detection, the "
        "whole image is the cell's box, measured and typed; up to MS_GATEWAY_MAX_CELL_IMAGES "
        "images of at most MS_GATEWAY_MAX_CELL_IMAGE_PIXELS each; the whole-image NPM1 model "
        "is not run (p_npm1 None) and options.explain is refused",
    )
    options: AnalysisOptions = Field(default_factory=AnalysisOptions)
    webhook_url: AnyHttpUrl | None = Field(
        None, description="POSTed a signed notification when the analysis finishes"
    )

    @model_validator(mode="after")
    def _cells_not_explained(self) -> AnalysisCreate:
        if self.input == "cells" and self.options.explain:
            raise ValueError(
                "options.explain is not available with input cells: occlusion over a "
                "single-cell image says nothing about which cells drove the call"
            )
        return self

    @model_serializer(mode="wrap")
    def _fields_by_default(self, handler: SerializerFunctionWrapHandler) -> dict:
        # the stored metadata and the Idempotency-Key content hash of a fields case stay
        # what they were before `input` existed
        doc = handler(self)
        if doc.get("input") == "fields":
            del doc["input"]
        return doc


class SlideSource(BaseModel):
    """Which slide: one in a configured slide store (`store` + `path`, relative to the store's
    root) or one uploaded with `PUT /v1/slide-uploads` (`upload`, the id it returned)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    store: str | None = Field(None, min_length=1, max_length=64, description="slide store name")
    path: str | None = Field(None, min_length=1, max_length=1024, description="path in the store")
    upload: str | None = Field(None, max_length=80, description="id from PUT /v1/slide-uploads")
    cell_target: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="nucleated cells the region selection aims for "
        "(default MS_GATEWAY_SLIDE_CELL_TARGET, 500)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SlideSource:
        by_ref = self.store is not None or self.path is not None
        if by_ref == (self.upload is not None):
            raise ValueError("give either store and path, or upload")
        if by_ref and (self.store is None or self.path is None):
            raise ValueError("a slide reference needs both store and path")
        return self

    def source(self) -> dict[str, str]:
        if self.upload is not None:
            return {"upload": self.upload}
        assert self.store is not None and self.path is not None
        return {"store": self.store, "path": self.path}


class SlideAnalysisCreate(AnalysisCreate):
    """The JSON body of `POST /v1/slides`: the case metadata of `POST /v1/analyses` plus the
    slide. `options.um_per_px` overrides the pixel size the slide file records."""

    slide: SlideSource

    @model_validator(mode="after")
    def _slide_is_fields(self) -> SlideAnalysisCreate:
        if self.input != "fields":
            raise ValueError("a slide is cut into fields: input must be fields")
        return self


class SlideUploaded(BaseModel):
    upload: str = Field(description='name this slide as {"upload": ...} in POST /v1/slides')
    sha256: str
    size_bytes: int
    width: int
    height: int
    levels: int
    um_per_px: float | None


class SlideProgress(BaseModel):
    phase: Literal["waiting", "scoring", "cutting", "cut"] = Field(
        "waiting",
        description="waiting for a slide slot; scoring the regions; cutting the selected "
        "ones into tiles; cut (the tiles are the case's images)",
    )
    regions_total: int | None = Field(
        None,
        description="regions to score (phase scoring) or to cut (cutting, cut); None before "
        "the worker opened the slide",
    )
    regions_done: int = Field(0, description="regions scored or cut so far, as `phase` says")


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
    slide: SlideProgress | None = Field(
        None, description="whole-slide analyses: how far cutting the slide into tiles is"
    )
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
