"""Orchestration of one case over the model services (behind the `ModelClients` protocol).

Steps of `Pipeline._run`, one method each:
1. `_pin`: ModelMetadata of every needed service; those versions serve the whole analysis.
2. `_analyse_image`, per image: the case analysis of `marrowscope.case` over the
   segmentation and celltype services (`calls.ServedCellModels`: detection with
   morphometrics, crops of the typed (non-RBC) cells at the celltype crop size, typing in
   batches, cell calls).
3. `_aggregate`: differential with Wilson CIs and the case feature vector; quality control
   (fewer than MIN_CELLS counted cells: the case abstains, no probability).
4. `_predict`, concurrently: ensemble P(AML) (+ lineage check, + `morphology` P(NPM1 | AML)),
   npm1 per image (P(NPM1) of the case = mean of the per-image probabilities) and
5. `_explain` when asked (explain, mode cells, target npm1 at its pinned version).
With `apl_model` mil (`MS_GATEWAY_APL_MODEL`), step 1 also pins the MIL model (OIP model
`mil` on the ensemble service), step 2 asks celltype for each typed cell's embedding, and
step 4 sends the case's embeddings (every typed cell of every image: fields, cells and slide
regions alike) to the MIL model once: its P(APL | AML) is the report's `apl_morphology`
(`model` mil) and its attention weights each cell's `attention` and `importance`. No MIL
model, one of another embedding size, or one built on another celltype version than the
pinned one: `apl_morphology` is not_available with the reason; the rest of the case reports.
The domain check (`services.gateway.domain`, unless `domain_check` is off) asks celltype
for each typed cell's embedding and domain distances in step 2 and scores the case after
step 3 (`domain`, `differential_warning`); an out-of-domain case withholds P(AML), P(NPM1)
and the genetic calls (reason out_of_domain) with `domain_check` abstain.
Then `_conclude` sets the calls. The result is an `AnalysisResult` from step 2 on: each
step fills in typed parts (`ImageResult`, `AmlCall`, `GeneticMorphologyCall`, ...), and
`Outcome.result` is its JSON.

Single-cell cases (`input` "cells", a CellaVision-type export: each image is one cell):
`_analyse_cells` replaces step 2. No detection: each image is measured whole
(`case.measure_cell_image`: segmentation with BOXES_IN, at most `cells_concurrency` calls
at once) and resized whole to the crop size (`case.single_cell_crop`); the crops of all
images are typed together in batches of `celltype_batch` (`cells_concurrency` calls in
flight), so a 600-crop case costs ~10 celltype calls, not 600. The whole-image npm1 model
is not pinned or run (it reads fields of view, not crops: `p_npm1` None), explain is refused
(the metadata schema already rejects it), and the checks that assume fields
(`plausibility.image_too_small`, `implausible_cell_size`: a crop is small and its box holds
background) are skipped; the pixel-size rules of `units` stay.

Duplicates: an image whose bytes (sha256) already occur earlier in the case is analysed once
(`distinct_images`; the report's `duplicate_images_ignored`): one image sent 32 times had
counted as 352 cells and passed the cell floor.

Pixel size: each image is measured with the request's `um_per_px`, else the deployment's
`default_um_per_px`, else none (px). When the unit of the case's morphometric features
differs from the one the ensemble reports it learned, P(AML) is withheld (`aml` abstained
with a machine-readable reason, `services.gateway.units`), as is the NPM1-by-morphology call
from the same features; the rest of the report stands. So does a pixel size outside the
ensemble's training range, an image too small to hold whole cells, or detections whose size
in um no marrow cell has (`services.gateway.plausibility`).

Memory: each image is decoded once, cut into crops and reduced to the npm1 input size before
the next is decoded; full-size pixels of several images are never held together.

One deadline per run; every call gets the remaining time as its gRPC timeout and is
retried with exponential backoff on UNAVAILABLE / DEADLINE_EXCEEDED. `checkpoint(stage)` is
awaited at every stage boundary: it records the stage and raises `Cancelled` when the
analysis was cancelled (or the worker lost its lease).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np

from marrowscope import case
from marrowscope.errors import InvalidInput
from marrowscope.provenance import WITHHELD_PREFIX, is_synthetic
from marrowscope.stages import LINEAGE_UPSTREAMS, PIPELINE_MODELS, Stage
from services.gateway.calls import (
    PipelineFailure,
    ServedCellModels,
    ServiceCalls,
    TransientFailure,
    gather_or_cancel,
)
from services.gateway.clients import (
    MIL_MODEL,
    EnsembleOutput,
    FeatureUnits,
    MilOutput,
    ModelClients,
    ModelInfo,
    model_facts,
)
from services.gateway.config import GatewaySettings
from services.gateway.domain import check_domain, differential_warning, domain_abstention
from services.gateway.metrics import GatewayMetrics
from services.gateway.morphology import mil_morphology, morphology_calls
from services.gateway.plausibility import image_too_small, implausible_cell_size
from services.gateway.result import (
    RESULT_SCHEMA_VERSION,
    AmlCall,
    AnalysisResult,
    Cell,
    DifferentialEntry,
    ImageResult,
    MorphometricSummary,
    StageVersion,
)
from services.gateway.units import aml_abstention, case_unit, resolve_pixel_size

log = logging.getLogger(__name__)
InputKind = Literal["fields", "cells"]

__all__ = [
    "Cancelled",
    "CaseImage",
    "Outcome",
    "Pipeline",
    "PipelineFailure",
    "TransientFailure",
    "distinct_images",
]


class Cancelled(Exception):
    """The analysis was cancelled (or this worker no longer owns it)."""


@dataclass(frozen=True)
class CaseImage:
    index: int
    sha256: str
    data: bytes
    um_per_px: float | None = None


@dataclass
class Outcome:
    status: str  # succeeded | abstained | failed
    reason: str | None
    report: AnalysisResult | None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    """sha256 -> bytes the worker stores in the blob store (heatmaps as .npy)."""
    transient: bool = False
    """A failure caused by an unavailable or slow model service (may succeed later)."""

    @property
    def result(self) -> dict | None:
        """The report as the JSON the job store keeps (None when failed)."""
        return None if self.report is None else self.report.model_dump(mode="json")

    @result.setter
    def result(self, value: dict | None) -> None:
        """Replace the report by a result JSON (the worker adds a slide's `slide` section)."""
        self.report = None if value is None else AnalysisResult.model_validate(value)


def distinct_images(images: list[CaseImage]) -> tuple[list[CaseImage], list[int]]:
    """(the first image of each content digest, the indexes of the repeats ignored)."""
    seen: set[str] = set()
    kept, repeats = [], []
    for im in images:
        if im.sha256 in seen:
            repeats.append(im.index)
        else:
            seen.add(im.sha256)
            kept.append(im)
    return kept, repeats


def _input_hw(info: ModelInfo, name: str, *, square: bool = False) -> tuple[int, int]:
    spec = info.inputs.get(name)
    if spec is None or len(spec.shape) != 4 or min(spec.shape[1:3]) <= 0:
        raise PipelineFailure(
            f"{info.name} model metadata lacks a fixed {name} input [B, H, W, 3] (got {spec})"
        )
    h, w = int(spec.shape[1]), int(spec.shape[2])
    if square and h != w:
        raise PipelineFailure(f"{info.name} crops must be square, metadata says {h}x{w}")
    return h, w


@dataclass(frozen=True)
class Pinned:
    """What the metadata of the versions pinned for one analysis fixes."""

    infos: dict[str, ModelInfo]
    cells: ServedCellModels
    """The case analysis's model calls at the pinned segmentation and celltype versions."""
    npm1_hw: tuple[int, int] | None
    """The npm1 input size (None: npm1 not pinned, a single-cell case)."""
    mil: ModelInfo | None = None
    """The MIL model pinned for P(APL | AML) (`apl_model` mil and a usable one is served)."""
    mil_problem: tuple[str, str] | None = None
    """(reason, detail) why the MIL model cannot answer (`apl_model` mil only)."""
    domain: bool = False
    """Whether the domain check runs (`domain_check` not off): celltype then answers each
    cell's domain distances with its embeddings."""

    @property
    def versions(self) -> dict[str, str]:
        return {s: info.version for s, info in self.infos.items()}

    @property
    def embeddings(self) -> bool:
        """Whether the case's cells need their celltype embeddings (a MIL model is pinned,
        or the domain check runs)."""
        return self.mil is not None or self.domain


@dataclass(frozen=True)
class MilAnswer:
    """What step 4 got from the MIL model: its answer, or why there is none."""

    output: MilOutput | None
    problem: tuple[str, str] | None = None


@dataclass(eq=False)
class AnalysedImage:
    """One image after step 2: its result entry, its cells, and what steps 4-5 need."""

    entry: ImageResult
    analysis: case.ImageAnalysis
    npm1_input: np.ndarray | None
    """uint8[h, w, 3] at the npm1 input size (also the explained image); None for a
    single-cell image (npm1 not run)."""
    shape: tuple[int, int]
    """(H, W) of the submitted image."""


class Pipeline:
    def __init__(
        self,
        *,
        clients: ModelClients,
        settings: GatewaySettings,
        metrics: GatewayMetrics | None = None,
        checkpoint: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.clients = clients
        self.s = settings
        self.metrics = metrics
        self._checkpoint = checkpoint
        from marrowscope.imaging import ImageLimits

        self.limits = ImageLimits(
            max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels
        )
        self.stage_seconds: dict[str, float] = {}

    async def checkpoint(self, stage: str) -> None:
        if self._checkpoint is not None:
            await self._checkpoint(stage)

    def _timed(self, stage: str, started: float) -> None:
        dt = time.monotonic() - started
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + dt
        if self.metrics is not None:
            self.metrics.stage_seconds.labels(stage).observe(dt)

    async def run(
        self,
        *,
        analysis_id: str,
        images: list[CaseImage],
        explain: bool = False,
        input_kind: InputKind = "fields",
    ) -> Outcome:
        """Analyse one case (`input_kind` cells: each image is one cell). Raises Cancelled;
        failures come back as Outcome('failed')."""
        self.calls = ServiceCalls(self.clients, self.s, self.metrics)
        try:
            if input_kind == "cells" and explain:
                raise PipelineFailure("explain is not available for a single-cell case")
            return await self._run(analysis_id, images, explain, cells=input_kind == "cells")
        except PipelineFailure as exc:
            return Outcome("failed", str(exc), None, transient=isinstance(exc, TransientFailure))

    async def _run(
        self, analysis_id: str, images: list[CaseImage], explain: bool, *, cells: bool
    ) -> Outcome:
        images, repeats = distinct_images(images)
        if repeats:
            log.warning(
                "analysis %s: %d duplicate images ignored (indexes %s)",
                analysis_id,
                len(repeats),
                repeats,
            )
        pinned = await self._pin(explain, cells=cells)
        if cells:
            analysed = await self._analyse_cells(images, pinned)
        else:
            slots = asyncio.Semaphore(self.s.image_concurrency)

            async def one(im: CaseImage) -> AnalysedImage:
                async with slots:
                    return await self._analyse_image(im, pinned)

            analysed = await gather_or_cancel([one(im) for im in images])
        t = time.monotonic()
        summary = self._aggregate(analysed)
        report = self._report(
            analysis_id, analysed, summary, pinned, repeats=len(repeats), cells=cells
        )
        report.domain = check_domain(
            pinned.cells.domain,
            celltype_version=pinned.versions[Stage.CELLTYPE],
            settings=self.s,
            served=pinned.domain,
        )
        report.differential_warning = differential_warning(report.domain)
        if summary.n_counted < self.s.min_cells:
            self._timed("aggregate", t)
            return self._too_few_cells(report, pinned)
        report.attribute_fractions = summary.attribute_fractions()
        report.morphometrics = {
            f: MorphometricSummary(mean=mean, std=std)
            for f, (mean, std) in summary.morphometric_summary().items()
        }
        self._timed("aggregate", t)
        await self.checkpoint("aggregate")

        ens, artifacts, mil = await self._predict(analysed, summary, pinned, explain)
        self._check_lineage(ens.lineage, pinned.versions)
        await self.checkpoint("report")
        return self._conclude(
            report, analysed, ens, pinned, explain, artifacts, cells=cells, mil=mil
        )

    async def _pin(self, explain: bool, *, cells: bool = False) -> Pinned:
        """Step 1: the version of every needed service, and the input sizes it fixes."""
        t = time.monotonic()
        models = [s for s in PIPELINE_MODELS if not (cells and s == Stage.NPM1)]
        needed = [*models, *([Stage.EXPLAIN] if explain else [])]
        infos = await asyncio.gather(*(self.calls.metadata(s) for s in needed))
        by_stage = dict(zip(needed, infos, strict=True))
        served = ServedCellModels(
            self.calls,
            segmentation_version=by_stage[Stage.SEGMENTATION].version,
            celltype_version=by_stage[Stage.CELLTYPE].version,
            crop_size=_input_hw(by_stage[Stage.CELLTYPE], "CROPS", square=True)[0],
            batch=self.s.celltype_batch,
            concurrency=self.s.cells_concurrency,
        )
        npm1 = by_stage.get(Stage.NPM1)
        mil, problem = None, None
        if self.s.apl_model == "mil":
            mil, problem = await self._pin_mil(by_stage[Stage.CELLTYPE])
        if mil is not None:
            by_stage[MIL_MODEL] = mil
        pinned = Pinned(
            by_stage,
            served,
            None if npm1 is None else _input_hw(npm1, "IMAGE"),
            mil,
            problem,
            # a celltype service that declares no DOMAIN output (another OIP server, an older
            # version of ours) is not asked: the check reports not_available, the case runs
            domain=self.s.domain_check != "off" and "DOMAIN" in by_stage[Stage.CELLTYPE].outputs,
        )
        self._timed("pin", t)
        await self.checkpoint("pinned")
        return pinned

    async def _pin_mil(
        self, celltype: ModelInfo
    ) -> tuple[ModelInfo | None, tuple[str, str] | None]:
        """The MIL model's metadata, or why it cannot serve this case (not served; its
        embedding size is not the pinned celltype version's). Transient failures propagate."""
        try:
            info = await self.calls.metadata(MIL_MODEL)
        except TransientFailure:
            raise
        except PipelineFailure as exc:
            log.warning("no MIL model for P(APL): %s", exc)
            return None, ("no_mil_model", f"no MIL model is served ({exc})")
        want = info.inputs.get("CELL_EMBEDDINGS")
        have = celltype.outputs.get("EMBEDDINGS")
        d_mil = None if want is None or len(want.shape) != 2 else want.shape[1]
        d_ct = None if have is None or len(have.shape) != 2 else have.shape[1]
        if d_mil is None or d_ct is None or d_mil != d_ct or d_mil <= 0:
            return None, (
                "mil_lineage_mismatch",
                f"MIL version {info.version} reads {d_mil}-d cell embeddings, celltype version "
                f"{celltype.version} answers {d_ct or 'no'} embeddings",
            )
        return info, None

    async def _analyse_image(self, im: CaseImage, pinned: Pinned) -> AnalysedImage:
        """Step 2 for one image: decode, detect, type; the full-size pixels are dropped on
        return (only the npm1-sized copy is kept), and at most `image_concurrency` images of
        a case run at once."""
        from marrowscope.imaging import decode_image, resize_for_model

        t = time.monotonic()
        um, um_source = resolve_pixel_size(im.um_per_px, self.s.default_um_per_px)
        rgb = decode_image(im.data, limits=self.limits)
        smear = case.SmearImage(rgb, um, im.data)
        found = await pinned.cells.detect(smear)
        self._timed("segmentation", t)
        await self.checkpoint("segmentation")

        t = time.monotonic()
        try:
            analysis = await case.analyse_detections(
                pinned.cells, smear, found, embeddings=pinned.embeddings
            )
        except InvalidInput as exc:
            raise PipelineFailure(f"model outputs do not fit the case features: {exc}") from None
        assert pinned.npm1_hw is not None  # pinned for every fields case
        analysed = AnalysedImage(
            _image_entry(im, rgb.shape[:2], um, um_source, analysis),
            analysis,
            resize_for_model(rgb, pinned.npm1_hw),
            rgb.shape[:2],
        )
        self._timed("celltype", t)
        await self.checkpoint("celltype")
        return analysed

    async def _analyse_cells(self, images: list[CaseImage], pinned: Pinned) -> list[AnalysedImage]:
        """Step 2 of a single-cell case: each image measured whole (at most
        `cells_concurrency` segmentation calls at once) and cut to its crop, then every
        crop of the case typed in batches; only the crops are kept, never the pixels."""
        from marrowscope.imaging import decode_image

        t = time.monotonic()
        slots = asyncio.Semaphore(self.s.cells_concurrency)
        crop_size = pinned.cells.crop_size

        async def measure(im: CaseImage) -> tuple[case.MeasuredDetections, np.ndarray, tuple]:
            async with slots:
                um, um_source = resolve_pixel_size(im.um_per_px, self.s.default_um_per_px)
                rgb = decode_image(im.data, limits=self.limits)
                smear = case.SmearImage(rgb, um, im.data)
                try:
                    found = await case.measure_cell_image(pinned.cells, smear)
                except InvalidInput as exc:
                    raise PipelineFailure(f"segmentation answer does not fit: {exc}") from None
                return found, case.single_cell_crop(rgb, crop_size), (rgb.shape[:2], um, um_source)

        measured = await gather_or_cancel([measure(im) for im in images])
        self._timed("segmentation", t)
        await self.checkpoint("segmentation")

        t = time.monotonic()
        crops = np.stack([crop for _, crop, _ in measured])
        types = await pinned.cells.type_cells(crops, embeddings=pinned.embeddings)
        try:
            analyses = case.call_cell_images([found for found, _, _ in measured], types)
        except InvalidInput as exc:
            raise PipelineFailure(f"model outputs do not fit the case features: {exc}") from None
        analysed = [
            AnalysedImage(_image_entry(im, shape, um, source, analysis), analysis, None, shape)
            for im, (_, _, (shape, um, source)), analysis in zip(
                images, measured, analyses, strict=True
            )
        ]
        self._timed("celltype", t)
        await self.checkpoint("celltype")
        return analysed

    def _aggregate(self, analysed: list[AnalysedImage]) -> case.CaseAnalysis:
        """Step 3: the differential and the case vector over every image's cells."""
        try:
            return case.summarise([a.analysis for a in analysed])
        except InvalidInput as exc:
            raise PipelineFailure(f"model outputs do not fit the case features: {exc}") from None

    def _report(
        self,
        analysis_id: str,
        analysed: list[AnalysedImage],
        summary: case.CaseAnalysis,
        pinned: Pinned,
        *,
        repeats: int,
        cells: bool = False,
    ) -> AnalysisResult:
        """The result of an abstained case; the later steps add the calls."""
        from marrowscope.taxonomy import BLAST, cell_type

        differential = [
            DifferentialEntry(
                code=code,
                name=cell_type(code).name,
                count=d.count,
                fraction=d.fraction,
                ci_low=d.ci_low,
                ci_high=d.ci_high,
            )
            for code, d in summary.differential.items()
        ]
        blasts = summary.differential.get(BLAST)
        n_counted = summary.n_counted
        return AnalysisResult(
            schema_version=RESULT_SCHEMA_VERSION,
            analysis_id=analysis_id,
            input="cells" if cells else "fields",
            outcome="abstained",
            aml_threshold=self.s.aml_threshold,
            npm1_threshold=self.s.npm1_threshold,
            n_images=len(analysed),
            duplicate_images_ignored=repeats,
            n_cells_detected=summary.n_detected,
            n_cells_counted=n_counted,
            blast_percent=None if blasts is None or not n_counted else 100 * blasts.fraction,
            differential=differential,
            morphometrics_unit=case_unit([a.analysis.length_unit for a in analysed]),
            model_versions={
                s: StageVersion(model=s, version=v) for s, v in pinned.versions.items()
            },
            images=[a.entry for a in analysed],
            generated_at=datetime.now(UTC).isoformat(),
        )

    def _too_few_cells(self, report: AnalysisResult, pinned: Pinned) -> Outcome:
        """Quality control of step 3: no probability from too few cells."""
        reason = (
            f"too few cells for a reliable call: {report.n_cells_counted} counted (non-RBC) "
            f"cells, at least {self.s.min_cells} needed"
        )
        self._count_aml_abstention("too_few_cells")
        report.abstain_reason = reason
        report.aml = AmlCall(status="abstained", reason="too_few_cells", detail=reason)
        self._set_morphology(report, None, pinned, mil=MilAnswer(None, pinned.mil_problem))
        report.stage_seconds = dict(self.stage_seconds)
        self._provenance(report)
        return Outcome("abstained", reason, report)

    def _set_morphology(
        self,
        report: AnalysisResult,
        ens: EnsembleOutput | None,
        pinned: Pinned,
        aml_positive: bool | None = None,
        *,
        mil: MilAnswer | None = None,
        gate: AmlCall | None = None,
    ) -> None:
        """The genetic-lesion calls: the ensemble's heads, and with `apl_model` mil the APL
        call from the MIL model's answer (`mil`) instead. `gate`: the AML call that gates
        them when it is not the report's (P(AML) withheld by the model, but the case's
        features withheld for a reason of their own)."""
        use_mil = self.s.apl_model == "mil"
        gate = gate or report.aml
        assert gate is not None
        calls = morphology_calls(
            gate,
            ens,
            ensemble=pinned.infos[Stage.ENSEMBLE],
            aml_positive=aml_positive,
            settings=self.s,
            metrics=self.metrics,
            skip=("apl",) if use_mil else (),
        )
        if use_mil:
            answer = mil or MilAnswer(None, pinned.mil_problem)
            calls["apl_morphology"] = mil_morphology(
                gate,
                answer.output,
                answer.problem,
                mil_version="" if pinned.mil is None else pinned.mil.version,
                p_aml=report.p_aml,
                aml_positive=aml_positive,
                settings=self.s,
                metrics=self.metrics,
            )
        for entry, call in calls.items():
            setattr(report, entry, call)

    async def _predict(
        self,
        analysed: list[AnalysedImage],
        summary: case.CaseAnalysis,
        pinned: Pinned,
        explain: bool,
    ) -> tuple[EnsembleOutput, dict[str, bytes], MilAnswer | None]:
        """Steps 4 and 5 concurrently: the ensemble's answer; each image's `p_npm1` and,
        when asked, its cells' importances and heatmap (returned as artifacts); the MIL
        model's answer when one is pinned."""
        versions = pinned.versions
        artifacts: dict[str, bytes] = {}
        mil_task = None
        try:
            async with asyncio.TaskGroup() as tg:
                ens_task = tg.create_task(
                    self._ensemble(summary.features, list(summary.feature_names), versions)
                )
                if pinned.mil is not None:
                    mil_task = tg.create_task(self._mil(summary, pinned))
                if pinned.npm1_hw is not None:  # not for single-cell cases
                    tg.create_task(self._npm1(analysed, versions["npm1"]))
                if explain:
                    tg.create_task(self._explain(analysed, versions, artifacts))
        except BaseExceptionGroup as group:
            # surface the first domain error (siblings were cancelled by the TaskGroup)
            for exc in group.exceptions:
                if isinstance(exc, PipelineFailure | Cancelled):
                    raise exc from group
            raise
        mil = mil_task.result() if mil_task is not None else None
        return ens_task.result(), artifacts, mil

    def _conclude(
        self,
        report: AnalysisResult,
        analysed: list[AnalysedImage],
        ens: EnsembleOutput,
        pinned: Pinned,
        explain: bool,
        artifacts: dict[str, bytes],
        *,
        cells: bool = False,
        mil: MilAnswer | None = None,
    ) -> Outcome:
        """The calls of a case with enough cells: P(AML) unless withheld, P(NPM1) (not for
        single cells), and the genetic lesions by morphology."""
        npm1 = [a.entry.p_npm1 for a in analysed if a.entry.p_npm1 is not None]
        p_npm1 = None if cells else float(np.mean(npm1))
        abstention = domain_abstention(report.domain) or self._aml_abstention(
            report.morphometrics_unit,
            ens.feature_units,
            report.images,
            ensemble_version=pinned.versions["ensemble"],
            fields=not cells,
        )
        if abstention is not None and abstention["reason"] == "out_of_domain":
            p_npm1 = None  # the whole-image model learned the same labs' smears
            for a in analysed:
                a.entry.p_npm1 = None
        p_aml: float | None = ens.p_aml
        reason = None
        gate = None
        withheld = model_facts(self.clients, Stage.ENSEMBLE, ens.model_version).get(
            f"{WITHHELD_PREFIX}aml"
        )
        if withheld and (abstention is None or abstention["reason"] != "out_of_domain"):
            # the model has no P(AML) to give (the real-data set: no control cases); an
            # out-of-domain case still says so, as it withholds every call
            p_aml = None
            aml = AmlCall(
                status="not_available",
                reason="no_aml_model",
                detail=f"ensemble version {ens.model_version} gives no P(AML): {withheld}",
                model_length_unit=ens.feature_units.length,
            )
            if abstention is not None:  # the genetic heads read the same features
                gate = AmlCall(status="abstained", **abstention)
        elif abstention is None:
            aml = AmlCall(status="predicted", model_length_unit=ens.feature_units.length)
        else:
            # features in another unit than the model learned: the number means nothing
            p_aml = None
            aml = AmlCall(
                status="abstained", model_length_unit=ens.feature_units.length, **abstention
            )
            reason = f"P(AML) withheld ({abstention['reason']}): {abstention['detail']}"
            self._count_aml_abstention(abstention["reason"])
            log.warning(
                "analysis %s: P(AML) withheld: %s", report.analysis_id, abstention["reason"]
            )
        aml_positive = None if p_aml is None else p_aml >= self.s.aml_threshold
        report.outcome = "succeeded"
        report.p_aml = p_aml
        report.aml = aml
        report.aml_positive = aml_positive
        npm1_withheld = (
            None
            if cells
            else model_facts(self.clients, Stage.NPM1, pinned.versions[Stage.NPM1]).get(
                f"{WITHHELD_PREFIX}npm1"
            )
        )
        if npm1_withheld and p_npm1 is not None:
            p_npm1 = None
            for a in analysed:
                a.entry.p_npm1 = None
            report.p_npm1_withheld = (
                f"npm1 version {pinned.versions[Stage.NPM1]} gives no P(NPM1): {npm1_withheld}"
            )
        report.p_npm1 = p_npm1
        report.npm1_positive = None if p_npm1 is None else p_npm1 >= self.s.npm1_threshold
        self._set_morphology(report, ens, pinned, aml_positive, mil=mil, gate=gate)
        report.lineage = ens.lineage
        report.explained = explain
        if mil is not None and mil.output is not None:
            _write_attention(analysed, mil.output.attention, importance=not explain)
            report.importance_source = "mil_attention"
        if explain:
            report.importance_source = "explain_occlusion"
        report.stage_seconds = dict(self.stage_seconds)
        self._provenance(report)
        return Outcome("succeeded", reason, report, artifacts)

    def _provenance(self, report: AnalysisResult) -> None:
        """`trained_on` of every model that answered at its pinned version (and of the
        learned nucleus/cytoplasm split inside segmentation), and `synthetic_stages`: a
        report says which of its figures rest on a model that learned from synthetic
        data."""
        trained: dict[str, str] = {}
        for model, pinned in report.model_versions.items():
            facts = model_facts(self.clients, model, pinned.version)
            if facts.get("trained_on"):
                trained[model] = facts["trained_on"]
            if model == Stage.SEGMENTATION and facts.get("splitter_trained_on"):
                trained[Stage.NUCSEG] = facts["splitter_trained_on"]
        report.trained_on = trained
        report.synthetic_stages = [m for m, v in trained.items() if is_synthetic(v)]

    def _aml_abstention(
        self,
        features_unit: str,
        model: FeatureUnits,
        images: list[ImageResult],
        *,
        ensemble_version: str,
        fields: bool = True,
    ) -> dict | None:
        """The first reason to withhold P(AML): units, pixel size range, and for fields of
        view image size and cell size (a single-cell crop is small, and its box, the whole
        image, holds background)."""
        units = aml_abstention(
            features_unit,
            model,
            ensemble_version=ensemble_version,
            um_per_px=[im.um_per_px for im in images],
            tolerance=self.s.pixel_size_tolerance,
        )
        if units is not None or not fields:
            return units
        entries = [im.model_dump() for im in images]  # plausibility reads result entries
        return image_too_small(entries) or implausible_cell_size(entries)

    def _count_aml_abstention(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.aml_abstained.labels(reason).inc()

    async def _ensemble(
        self, vector: np.ndarray, names: list[str], versions: dict[str, str]
    ) -> EnsembleOutput:
        t = time.monotonic()
        out = await self.calls.ensemble(vector, names, versions["ensemble"])
        self._timed("ensemble", t)
        return out

    def _check_lineage(self, lineage: dict[str, str], versions: dict[str, str]) -> None:
        """The ensemble must have been trained on the pinned segmentation/celltype versions."""
        problems = []
        for upstream in LINEAGE_UPSTREAMS:
            want = lineage.get(upstream)
            if want != versions[upstream]:
                local = versions[upstream].startswith("local-")
                if self.s.allow_local_lineage and local:
                    log.warning("lineage of %s not verified (local model, allowed)", upstream)
                    continue
                problems.append(
                    f"ensemble {versions['ensemble']} was built on {upstream} "
                    f"{want or '(not reported)'}, pinned {upstream} is "
                    f"{versions[upstream]}"
                )
        if problems:
            raise PipelineFailure("incompatible pipeline: " + "; ".join(problems))

    async def _mil(self, summary: case.CaseAnalysis, pinned: Pinned) -> MilAnswer:
        """Step 4 with a MIL model: one call with every typed cell's embedding. A version the
        service no longer has, an invalid answer or a model built on another celltype version
        give no answer but the reason (the APL call is then not_available); transient
        failures propagate (the analysis is retried)."""
        assert pinned.mil is not None
        t = time.monotonic()
        embeddings = summary.embeddings
        if embeddings is None or len(embeddings) != len(summary.cells):
            raise PipelineFailure("the case's cells lack their celltype embeddings")
        try:
            out = await self.calls.mil(embeddings, pinned.mil.version)
        except TransientFailure:
            raise
        except PipelineFailure as exc:
            log.warning("MIL model gave no P(APL): %s", exc)
            return MilAnswer(None, ("no_mil_model", f"MIL {pinned.mil.version}: {exc}"))
        finally:
            self._timed("mil", t)
        celltype = pinned.versions[Stage.CELLTYPE]
        if out.lineage_celltype != celltype:
            if not (self.s.allow_local_lineage and celltype.startswith("local-")):
                return MilAnswer(
                    None,
                    (
                        "mil_lineage_mismatch",
                        f"MIL {pinned.mil.version} learned the embeddings of celltype "
                        f"{out.lineage_celltype or '(not reported)'}, pinned celltype is "
                        f"{celltype}",
                    ),
                )
            log.warning("MIL lineage not verified (local celltype model, allowed)")
        return MilAnswer(out)

    async def _npm1(self, analysed: list[AnalysedImage], version: str) -> None:
        """Step 4: each image's `p_npm1` from its npm1-sized copy."""
        t = time.monotonic()

        async def one(a: AnalysedImage) -> None:
            assert a.npm1_input is not None  # fields only
            a.entry.p_npm1 = await self.calls.npm1(a.npm1_input, version)

        await asyncio.gather(*(one(a) for a in analysed))
        self._timed("npm1", t)

    async def _explain(
        self, analysed: list[AnalysedImage], versions: dict[str, str], artifacts: dict[str, bytes]
    ) -> None:
        """Step 5: each cell's occlusion importance and each image's heatmap (an artifact
        named by its sha256), on the npm1 input of the pinned npm1 version."""
        t = time.monotonic()
        for a in analysed:
            x = a.npm1_input  # explain targets npm1
            assert x is not None  # explain is refused for single-cell cases
            (h, w), (hh, ww) = a.shape, x.shape[:2]
            sy, sx = hh / h, ww / w
            boxes = np.asarray(a.analysis.detections.boxes, np.float32).reshape(-1, 4)
            importance, heatmap = await self.calls.explain(
                x,
                boxes * np.array([sx, sy, sx, sy], np.float32),
                version=versions["explain"],
                npm1_version=versions["npm1"],
            )
            for cell, imp in zip(a.entry.cells, importance, strict=True):
                cell.importance = imp
            buf = io.BytesIO()
            np.save(buf, heatmap, allow_pickle=False)
            data = buf.getvalue()
            sha = hashlib.sha256(data).hexdigest()
            artifacts[sha] = data
            a.entry.heatmap_sha256 = sha
        self._timed("explain", t)


def _write_attention(
    analysed: list[AnalysedImage], attention: np.ndarray, *, importance: bool
) -> None:
    """Each typed cell's MIL attention weight (rows in case order: images in order, then
    typed detections in order) into its `attention`, and `importance` unless explained."""
    weights = iter(np.asarray(attention, np.float64).tolist())
    for a in analysed:
        for cell, call in zip(a.entry.cells, a.analysis.calls, strict=True):
            if call is None:
                continue
            cell.attention = min(1.0, max(0.0, next(weights)))
            if importance:
                cell.importance = cell.attention


def _image_entry(
    im: CaseImage,
    shape: tuple[int, int],
    um: float | None,
    um_source: str,
    analysis: case.ImageAnalysis,
) -> ImageResult:
    """The result entry of one image: every detection (a single-cell image: its one cell,
    boxed whole) with its detector label, score and call."""
    det = analysis.detections
    return ImageResult(
        index=im.index,
        sha256=im.sha256,
        width=shape[1],
        height=shape[0],
        um_per_px=um,
        um_per_px_source=um_source,
        n_detected=len(det),
        n_counted=analysis.n_counted,
        cells=[
            Cell(
                box=[float(v) for v in det.boxes[i]],
                detector_label=label,
                score=float(det.scores[i]),
                cell_type=None if call is None else call.cell_type,
                confidence=None if call is None else call.probs[call.cell_type],
            )
            for i, (label, call) in enumerate(zip(det.labels, analysis.calls, strict=True))
        ],
    )
