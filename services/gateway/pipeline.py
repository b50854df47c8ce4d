"""Orchestration of one case over the model services (behind the `ModelClients` protocol).

Order: pin versions (ModelMetadata of every needed service) -> per image: segmentation,
crops of the counted (non-RBC) cells at the celltype crop size, celltype in batches ->
quality control (fewer than MIN_CELLS counted cells: abstain, no probability) -> per case:
differential with Wilson CIs and the case feature vector (`marrowscope.features`) ->
concurrently: ensemble P(AML) (+ lineage check, + `morphology` P(NPM1 | AML)), npm1 per image
(P(NPM1) of the case = mean of the per-image probabilities), explanations when asked
(explain, mode cells, target npm1 at its pinned version).

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

import numpy as np

from marrowscope.stages import LINEAGE_UPSTREAMS, PIPELINE_MODELS, Stage
from services.gateway.calls import (
    PipelineFailure,
    ServedCellModels,
    ServiceCalls,
    TransientFailure,
)
from services.gateway.clients import EnsembleOutput, ModelClients, ModelInfo
from services.gateway.config import GatewaySettings
from services.gateway.metrics import GatewayMetrics
from services.gateway.morphology import morphology_calls
from services.gateway.plausibility import image_too_small, implausible_cell_size
from services.gateway.result import RESULT_SCHEMA_VERSION
from services.gateway.units import aml_abstention, case_unit, resolve_pixel_size

log = logging.getLogger(__name__)


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
    result: dict | None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    """sha256 -> bytes the worker stores in the blob store (heatmaps as .npy)."""
    transient: bool = False
    """A failure caused by an unavailable or slow model service (may succeed later)."""


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


def _finalize(result: dict) -> dict:
    """Drop working fields and validate against the published result schema."""
    from services.gateway.result import AnalysisResult

    for entry in result["images"]:
        entry.pop("_boxes", None)
    return AnalysisResult.model_validate(result).model_dump(mode="json")


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
        self, *, analysis_id: str, images: list[CaseImage], explain: bool = False
    ) -> Outcome:
        """Analyse one case. Raises Cancelled; failures come back as Outcome('failed')."""
        self.calls = ServiceCalls(self.s, self.metrics)
        try:
            return await self._run(analysis_id, images, explain)
        except PipelineFailure as exc:
            return Outcome("failed", str(exc), None, transient=isinstance(exc, TransientFailure))

    async def _run(self, analysis_id: str, images: list[CaseImage], explain: bool) -> Outcome:
        from marrowscope import case
        from marrowscope.errors import InvalidInput
        from marrowscope.imaging import decode_image, resize_for_model

        t0 = time.monotonic()
        images, repeats = distinct_images(images)
        if repeats:
            log.warning(
                "analysis %s: %d duplicate images ignored (indexes %s)",
                analysis_id,
                len(repeats),
                repeats,
            )
        needed = [*PIPELINE_MODELS, *([Stage.EXPLAIN] if explain else [])]
        infos = await asyncio.gather(
            *(
                self.calls.call(s, lambda t, s=s: self.clients.metadata(s, timeout=t))
                for s in needed
            )
        )
        pinned = dict(zip(needed, infos, strict=True))
        versions = {s: i.version for s, i in pinned.items()}
        models = ServedCellModels(
            self.clients,
            self.calls,
            segmentation_version=versions["segmentation"],
            celltype_version=versions["celltype"],
            crop_size=_input_hw(pinned["celltype"], "CROPS", square=True)[0],
            batch=self.s.celltype_batch,
        )
        npm1_hw = _input_hw(pinned["npm1"], "IMAGE")
        self._timed("pin", t0)
        await self.checkpoint("pinned")

        per_image: list[dict] = []
        analysed: list[case.ImageAnalysis] = []
        pixels: dict[int, np.ndarray] = {}  # npm1-sized copies; full-size decodes are dropped
        shapes: dict[int, tuple[int, int]] = {}
        for im in images:
            t = time.monotonic()
            um, um_source = resolve_pixel_size(im.um_per_px, self.s.default_um_per_px)
            rgb = decode_image(im.data, limits=self.limits)
            pixels[im.index] = resize_for_model(rgb, npm1_hw)
            shapes[im.index] = rgb.shape[:2]
            smear = case.SmearImage(rgb, um, im.data)
            found = await models.detect(smear)
            self._timed("segmentation", t)
            await self.checkpoint("segmentation")

            t = time.monotonic()
            try:
                analysis = await case.analyse_detections(models, smear, found)
            except InvalidInput as exc:
                raise PipelineFailure(
                    f"model outputs do not fit the case features: {exc}"
                ) from None
            analysed.append(analysis)
            det = analysis.detections
            img_cells = [
                {
                    "box": [float(v) for v in det.boxes[i]],
                    "detector_label": lab,
                    "score": float(det.scores[i]),
                    "cell_type": None if call is None else call.cell_type,
                    "confidence": None if call is None else call.probs[call.cell_type],
                }
                for i, (lab, call) in enumerate(zip(det.labels, analysis.calls, strict=True))
            ]
            per_image.append(
                {
                    "index": im.index,
                    "sha256": im.sha256,
                    "width": rgb.shape[1],
                    "height": rgb.shape[0],
                    "um_per_px": um,
                    "um_per_px_source": um_source,
                    "n_detected": len(det),
                    "n_counted": analysis.n_counted,
                    "cells": img_cells,
                    "_boxes": det.boxes,
                }
            )
            del rgb, smear  # before the next image is decoded
            self._timed("celltype", t)
            await self.checkpoint("celltype")

        t = time.monotonic()
        try:
            summary = case.summarise(analysed)
        except InvalidInput as exc:
            raise PipelineFailure(f"model outputs do not fit the case features: {exc}") from None
        n_counted, diff = summary.n_counted, summary.differential
        names, vector = summary.feature_names, summary.features
        units = [a.length_unit for a in analysed]
        base = self._base_result(analysis_id, images, per_image, diff, versions, n_counted)
        base["duplicate_images_ignored"] = len(repeats)
        base["morphometrics_unit"] = features_unit = case_unit(units)
        if n_counted < self.s.min_cells:
            reason = (
                f"too few cells for a reliable call: {n_counted} counted (non-RBC) cells, "
                f"at least {self.s.min_cells} needed"
            )
            self._timed("aggregate", t)
            self._count_aml_abstention("too_few_cells")
            aml = {"status": "abstained", "reason": "too_few_cells", "detail": reason}
            base.update(
                outcome="abstained",
                abstain_reason=reason,
                aml=aml,
                **morphology_calls(
                    aml, None, ensemble=pinned["ensemble"], settings=self.s, metrics=self.metrics
                ),
                stage_seconds=dict(self.stage_seconds),
            )
            return Outcome("abstained", reason, _finalize(base))
        base["attribute_fractions"] = summary.attribute_fractions()
        base["morphometrics"] = {
            f: {"mean": mean, "std": std}
            for f, (mean, std) in summary.morphometric_summary().items()
        }
        self._timed("aggregate", t)
        await self.checkpoint("aggregate")

        artifacts: dict[str, bytes] = {}
        try:
            async with asyncio.TaskGroup() as tg:
                ens_task = tg.create_task(self._ensemble(vector, list(names), versions))
                npm1_task = tg.create_task(self._npm1(images, pixels, versions["npm1"]))
                expl_task = (
                    tg.create_task(self._explain(per_image, pixels, shapes, versions, artifacts))
                    if explain
                    else None
                )
        except BaseExceptionGroup as group:
            # surface the first domain error (siblings were cancelled by the TaskGroup)
            for exc in group.exceptions:
                if isinstance(exc, PipelineFailure | Cancelled):
                    raise exc from group
            raise
        ens, p_npm1_each = ens_task.result(), npm1_task.result()
        p_aml, lineage = ens.p_aml, ens.lineage
        self._check_lineage(lineage, versions)
        await self.checkpoint("report")

        p_npm1 = float(np.mean(list(p_npm1_each.values())))
        for entry in per_image:
            entry["p_npm1"] = p_npm1_each[entry["index"]]
        if expl_task is not None:
            expl_task.result()
        abstention = self._aml_abstention(
            features_unit, ens.feature_units, per_image, ensemble_version=versions["ensemble"]
        )
        aml = {"status": "predicted", "model_length_unit": ens.feature_units.length}
        reason = None
        if abstention is not None:
            # features in another unit than the model learned: the number means nothing
            p_aml = None
            aml.update(status="abstained", **abstention)
            reason = f"P(AML) withheld ({abstention['reason']}): {abstention['detail']}"
            self._count_aml_abstention(abstention["reason"])
            log.warning("analysis %s: P(AML) withheld: %s", analysis_id, abstention["reason"])
        aml_positive = None if p_aml is None else p_aml >= self.s.aml_threshold
        base.update(
            outcome="succeeded",
            p_aml=p_aml,
            aml=aml,
            aml_positive=aml_positive,
            p_npm1=p_npm1,
            npm1_positive=p_npm1 >= self.s.npm1_threshold,
            **morphology_calls(
                aml,
                ens,
                ensemble=pinned["ensemble"],
                aml_positive=aml_positive,
                settings=self.s,
                metrics=self.metrics,
            ),
            lineage=lineage,
            explained=explain,
            stage_seconds=dict(self.stage_seconds),
        )
        return Outcome("succeeded", reason, _finalize(base), artifacts)

    def _aml_abstention(
        self, features_unit: str, model, per_image: list[dict], *, ensemble_version: str
    ) -> dict | None:
        """The first reason to withhold P(AML): units, pixel size range, image size, cell size."""
        return (
            aml_abstention(
                features_unit,
                model,
                ensemble_version=ensemble_version,
                um_per_px=[e["um_per_px"] for e in per_image],
                tolerance=self.s.pixel_size_tolerance,
            )
            or image_too_small(per_image)
            or implausible_cell_size(per_image)
        )

    def _count_aml_abstention(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.aml_abstained.labels(reason).inc()

    def _base_result(self, analysis_id, images, per_image, diff, versions, n_counted) -> dict:
        from marrowscope.taxonomy import BLAST, cell_type

        entries = [
            {
                "code": code,
                "name": cell_type(code).name,
                "count": d.count,
                "fraction": d.fraction,
                "ci_low": d.ci_low,
                "ci_high": d.ci_high,
            }
            for code, d in diff.items()
        ]
        blasts = next((e for e in entries if e["code"] == BLAST), None)
        for entry in per_image:
            entry.setdefault("p_npm1", None)
            entry.setdefault("heatmap_sha256", None)
        return {
            "schema_version": RESULT_SCHEMA_VERSION,
            "analysis_id": analysis_id,
            "outcome": "abstained",
            "abstain_reason": None,
            "p_aml": None,
            "aml_threshold": self.s.aml_threshold,
            "aml_positive": None,
            "p_npm1": None,
            "npm1_threshold": self.s.npm1_threshold,
            "npm1_positive": None,
            "n_images": len(images),
            "n_cells_detected": sum(e["n_detected"] for e in per_image),
            "n_cells_counted": n_counted,
            "blast_percent": None if blasts is None or not n_counted else 100 * blasts["fraction"],
            "differential": entries,
            "model_versions": {s: {"model": s, "version": v} for s, v in versions.items()},
            "images": per_image,
            "generated_at": datetime.now(UTC).isoformat(),
        }

    async def _ensemble(
        self, vector: np.ndarray, names: list[str], versions: dict[str, str]
    ) -> EnsembleOutput:
        t = time.monotonic()
        out = await self.calls.call(
            "ensemble",
            lambda tm: self.clients.ensemble(
                np.asarray(vector, np.float32), names, version=versions["ensemble"], timeout=tm
            ),
        )
        self.calls.check_version("ensemble", versions["ensemble"], out.model_version)
        self._timed("ensemble", t)
        for what, v in (
            ("probability", out.p_aml),
            *((f"P({t.upper()})", p) for t, p in out.p_targets.items()),
            *((f"{t.upper()} threshold", th) for t, th in out.thresholds.items()),
        ):
            if v is not None and not 0.0 <= v <= 1.0:  # NaN fails the comparison too
                raise PipelineFailure(f"ensemble returned an invalid {what} {v!r}")
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

    async def _npm1(self, images, pixels, version) -> dict[int, float]:
        t = time.monotonic()

        async def one(im: CaseImage) -> float:
            x = pixels[im.index]
            p = await self.calls.call(
                "npm1", lambda tm: self.clients.npm1(x, version=version, timeout=tm)
            )
            if not 0.0 <= p <= 1.0 or not np.isfinite(p):
                raise PipelineFailure(f"npm1 returned an invalid probability {p!r}")
            return float(p)

        probs = await asyncio.gather(*(one(im) for im in images))
        self._timed("npm1", t)
        return {im.index: p for im, p in zip(images, probs, strict=True)}

    async def _explain(self, per_image, pixels, shapes, versions, artifacts) -> None:
        t = time.monotonic()
        for entry in per_image:
            x = pixels[entry["index"]]  # the npm1 input: explain targets npm1
            (h, w), (hh, ww) = shapes[entry["index"]], x.shape[:2]
            sy, sx = hh / h, ww / w
            boxes = np.asarray(entry["_boxes"], np.float32).reshape(-1, 4)
            scaled = boxes * np.array([sx, sy, sx, sy], np.float32)
            # the explain service caps boxes per call (MAX_BOXES): send chunks; its cells-mode
            # heatmap is zero outside the boxes, so chunks paint disjoint parts of one map
            step = self.s.explain_max_boxes
            importance: list[float] = []
            heatmap: np.ndarray | None = None
            for start in range(0, max(len(scaled), 1), step):
                out = await self.calls.call(
                    "explain",
                    lambda tm, x=x, b=scaled[start : start + step]: self.clients.explain(
                        x,
                        b,
                        version=versions["explain"],
                        target_model="npm1",
                        target_version=versions["npm1"],
                        timeout=tm,
                    ),
                )
                importance.extend(float(v) for v in out.cell_importance)
                part = np.asarray(out.heatmap, np.float32)
                heatmap = part if heatmap is None else np.where(part != 0, part, heatmap)
            if len(importance) != len(boxes):
                raise PipelineFailure(
                    f"explain returned {len(importance)} importances for {len(boxes)} cells"
                )
            for cell, imp in zip(entry["cells"], importance, strict=True):
                cell["importance"] = imp
            buf = io.BytesIO()
            np.save(buf, np.asarray(heatmap, np.float32), allow_pickle=False)
            data = buf.getvalue()
            sha = hashlib.sha256(data).hexdigest()
            artifacts[sha] = data
            entry["heatmap_sha256"] = sha
        self._timed("explain", t)
