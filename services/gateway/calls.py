"""The model-service calls of one analysis run, and the case analysis's model calls over them.

`ServiceCalls.call(service, make)` runs `make(timeout)` with the time left of the run's
deadline as its gRPC timeout, retrying UNAVAILABLE / DEADLINE_EXCEEDED with exponential
backoff (tenacity); `check_version` refuses an answer from another version than the one
pinned for the analysis. `metadata`, `ensemble`, `npm1` and `explain` are the calls of the
pipeline's later steps, each with the checks of its answer (probabilities in [0, 1], one
importance per cell; explain boxes sent in chunks of `explain_max_boxes`).

`ServedCellModels` is `marrowscope.case.CellModels` over the segmentation and celltype
services, so the gateway runs the same case analysis as training (`marrowscope.case`):
detection sends the file as submitted with the image's pixel size (`measure` adds the boxes
to measure: the segmentation service's BOXES_IN, no detection), typing sends the crops in
batches of `celltype_batch`, at most `cells_concurrency` calls at once, at the crop size the
pinned celltype version's metadata states (the service refuses a model trained with another padding than
`CELL_CROP_PAD_FRACTION`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from marrowscope.case import CellTypes, Detections, MeasuredDetections, SmearImage
from marrowscope.imaging import CELL_CROP_PAD_FRACTION
from marrowscope.stages import Stage
from services.gateway.clients import (
    MIL_MODEL,
    Classification,
    EnsembleOutput,
    MilOutput,
    ModelClients,
    ModelInfo,
    ServiceCallError,
)
from services.gateway.config import GatewaySettings
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class PipelineFailure(Exception):
    """The analysis fails with this reason (shown to the LIS)."""


class TransientFailure(PipelineFailure):
    """A model service stayed UNAVAILABLE / DEADLINE_EXCEEDED through the call's retries
    while the run still had time: the worker requeues the analysis. (A run that used up its
    whole deadline fails: rerunning it would cost the same.)"""


async def gather_or_cancel(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """The results of `calls` run concurrently, in order; when one raises, the others are
    cancelled (one failed call fails the analysis) and its exception propagates."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()


class ServiceCalls:
    """The calls of one run: one deadline (`settings.deadline_s`, from construction)."""

    def __init__(
        self,
        clients: ModelClients,
        settings: GatewaySettings,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.clients = clients
        self.s = settings
        self.metrics = metrics
        self.deadline = Deadline(settings.deadline_s)

    async def call(self, service: str, make: Callable[[float], Awaitable[T]]) -> T:
        """Run `make(timeout)` with the remaining deadline, retrying transient failures."""
        from tenacity import (
            AsyncRetrying,
            retry_if_exception,
            stop_after_attempt,
            wait_exponential,
        )

        attempts = 0

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, ServiceCallError) and exc.transient

        def out_of_time(_state: Any) -> bool:
            return self.deadline.remaining() <= 0.05

        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception()
            log.warning(
                "%s call failed (%s), attempt %d; retrying",
                service,
                getattr(exc, "code", exc),
                state.attempt_number,
            )
            if self.metrics is not None:
                self.metrics.call_retries.labels(service, getattr(exc, "code", "?")).inc()

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.s.call_attempts) | out_of_time,
                wait=wait_exponential(multiplier=self.s.retry_initial_s, max=self.s.retry_max_s),
                retry=retry_if_exception(transient),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    remaining = self.deadline.remaining()
                    if remaining <= 0:
                        raise PipelineFailure(self._deadline_reason(service))
                    attempts += 1
                    try:
                        # wait_for guards against a client that ignores its timeout
                        return await asyncio.wait_for(make(remaining), remaining + 1.0)
                    except TimeoutError:
                        raise ServiceCallError(
                            service, "DEADLINE_EXCEEDED", "no answer within the deadline"
                        ) from None
        except ServiceCallError as exc:
            if self.deadline.remaining() <= 0.05:
                raise PipelineFailure(self._deadline_reason(service)) from exc
            if exc.transient:
                raise TransientFailure(
                    f"{service} service unavailable after {attempts} attempts ({exc.code})"
                ) from exc
            raise PipelineFailure(f"{service} service error {exc.code}: {exc.message}") from exc
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _deadline_reason(self, service: str) -> str:
        return f"deadline of {self.s.deadline_s:g} s exceeded while calling the {service} service"

    @staticmethod
    def check_version(service: str, pinned: str, answered: str) -> None:
        if answered and answered != pinned:
            raise PipelineFailure(
                f"{service} answered with model version {answered} but "
                f"{pinned} was pinned for this analysis"
            )

    async def metadata(self, service: str) -> ModelInfo:
        return await self.call(
            service, lambda timeout: self.clients.metadata(service, timeout=timeout)
        )

    async def ensemble(self, vector: np.ndarray, names: list[str], version: str) -> EnsembleOutput:
        """P(AML), the genetic heads and their thresholds for the case vector float32[F]."""
        out = await self.call(
            Stage.ENSEMBLE,
            lambda timeout: self.clients.ensemble(
                np.asarray(vector, np.float32), names, version=version, timeout=timeout
            ),
        )
        self.check_version(Stage.ENSEMBLE, version, out.model_version)
        for what, v in (
            ("probability", out.p_aml),
            *((f"P({t.upper()})", p) for t, p in out.p_targets.items()),
            *((f"{t.upper()} threshold", th) for t, th in out.thresholds.items()),
        ):
            if v is not None and not 0.0 <= v <= 1.0:  # NaN fails the comparison too
                raise PipelineFailure(f"ensemble returned an invalid {what} {v!r}")
        return out

    async def mil(self, embeddings: np.ndarray, version: str) -> MilOutput:
        """P(APL | AML) and one attention weight per cell from embeddings float32[N, D]
        (the MIL model at `version`); the weights are checked (finite, >= 0, one per cell,
        summing to 1 within 1e-3) and renormalised to sum to 1 exactly."""
        out = await self.call(
            MIL_MODEL,
            lambda timeout: self.clients.mil(
                np.asarray(embeddings, np.float32), version=version, timeout=timeout
            ),
        )
        self.check_version(MIL_MODEL, version, out.model_version)
        if not 0.0 <= out.p_apl <= 1.0:  # NaN fails the comparison too
            raise PipelineFailure(f"mil returned an invalid probability {out.p_apl!r}")
        a = np.asarray(out.attention, np.float64).reshape(-1)
        if len(a) != len(embeddings):
            raise PipelineFailure(f"mil returned {len(a)} attention weights for {len(embeddings)}")
        if not np.isfinite(a).all() or (a < 0).any() or abs(a.sum() - 1.0) > 1e-3:
            raise PipelineFailure("mil returned attention weights that are not a distribution")
        return MilOutput(
            out.p_apl,
            (a / a.sum()).astype(np.float32),
            out.model_version,
            out.lineage_celltype,
            out.lineage_celltype_model,
        )

    async def npm1(self, image: np.ndarray, version: str) -> float:
        """P(NPM1 mutated) of one image uint8[h, w, 3] at the npm1 input size."""
        p = await self.call(
            Stage.NPM1, lambda timeout: self.clients.npm1(image, version=version, timeout=timeout)
        )
        if not 0.0 <= p <= 1.0 or not np.isfinite(p):
            raise PipelineFailure(f"npm1 returned an invalid probability {p!r}")
        return float(p)

    async def explain(
        self, image: np.ndarray, boxes: np.ndarray, *, version: str, npm1_version: str
    ) -> tuple[list[float], np.ndarray]:
        """(one occlusion importance per box, the heatmap float32[h', w']) of the npm1 model
        at `npm1_version` on `image` (its input size), boxes float32[N, 4] x1, y1, x2, y2 in
        it."""
        # the explain service caps boxes per call (MAX_BOXES): send chunks; its cells-mode
        # heatmap is zero outside the boxes, so chunks paint disjoint parts of one map
        step = self.s.explain_max_boxes
        importance: list[float] = []
        heatmap: np.ndarray | None = None
        for start in range(0, max(len(boxes), 1), step):
            out = await self.call(
                Stage.EXPLAIN,
                lambda timeout, b=boxes[start : start + step]: self.clients.explain(
                    image,
                    b,
                    version=version,
                    target_model=Stage.NPM1,
                    target_version=npm1_version,
                    timeout=timeout,
                ),
            )
            importance.extend(float(v) for v in out.cell_importance)
            part = np.asarray(out.heatmap, np.float32)
            heatmap = part if heatmap is None else np.where(part != 0, part, heatmap)
        if len(importance) != len(boxes) or heatmap is None:
            raise PipelineFailure(
                f"explain returned {len(importance)} importances for {len(boxes)} cells"
            )
        return importance, heatmap


class DomainRows:
    """Every typed cell's domain distances (celltype's DOMAIN output) over one analysis, in
    answer order: the case score is a median, so the order of the cells does not matter.
    `missing`: some answer came without them (the pinned version has no reference)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.thresholds: set[float | None] = set()
        self.missing = False

    def add(self, answer: Classification, n: int) -> None:
        if answer.domain is None:
            self.missing = True
            return
        rows = np.asarray(answer.domain, np.float32)
        if rows.shape != (n, 2) or not np.isfinite(rows).all():
            raise PipelineFailure(f"celltype answered domain distances {list(rows.shape)} for {n}")
        self.rows.append(rows)
        self.thresholds.add(answer.domain_threshold)

    def scores(self) -> np.ndarray | None:
        """float32[N, 2] of every typed cell, None when any answer lacked them."""
        if self.missing or not self.rows:
            return None
        return np.concatenate(self.rows)


class ServedCellModels:
    """`marrowscope.case.CellModels` over the segmentation and celltype services at the
    versions pinned for the analysis."""

    crop_pad_fraction = CELL_CROP_PAD_FRACTION

    def __init__(
        self,
        calls: ServiceCalls,
        *,
        segmentation_version: str,
        celltype_version: str,
        crop_size: int,
        batch: int,
        concurrency: int = 1,
    ) -> None:
        self.clients = calls.clients
        self.calls = calls
        self.segmentation_version = segmentation_version
        self.celltype_version = celltype_version
        self.crop_size = crop_size
        self.batch = batch
        self.concurrency = concurrency
        self.domain = DomainRows()

    async def detect(self, image: SmearImage) -> MeasuredDetections:
        return await self._segment(image, None)

    async def measure(self, image: SmearImage, boxes: np.ndarray) -> MeasuredDetections:
        found = await self._segment(image, np.asarray(boxes, np.float32).reshape(-1, 4))
        if len(found.detections) != len(boxes):
            raise PipelineFailure(
                f"segmentation measured {len(found.detections)} boxes for {len(boxes)} sent"
            )
        return found

    async def _segment(self, image: SmearImage, boxes: np.ndarray | None) -> MeasuredDetections:
        from marrowscope.imaging import encode_png

        data = image.encoded if image.encoded is not None else encode_png(image.pixels)
        um = image.um_per_px
        seg = await self.calls.call(
            Stage.SEGMENTATION,
            lambda timeout: self.clients.segment(
                data,
                version=self.segmentation_version,
                timeout=timeout,
                um_per_px=um,
                **({} if boxes is None else {"boxes": boxes}),
            ),
        )
        self.calls.check_version(Stage.SEGMENTATION, self.segmentation_version, seg.model_version)
        # a service that does not say its unit measured in um exactly when given a size
        unit = seg.length_unit or ("px" if um is None else "um")
        if unit != "um" and unit != "px":
            raise PipelineFailure(f"segmentation reported an unknown length unit {unit!r}")
        detections = Detections(seg.boxes, seg.scores, tuple(seg.labels))
        return MeasuredDetections(detections, seg.features, tuple(seg.feature_names), unit)

    async def type_cells(self, crops: np.ndarray, *, embeddings: bool = False) -> CellTypes:
        """Batches of `batch` crops, at most `concurrency` calls in flight, answers in order;
        with `embeddings`, each crop's embedding too (celltype's EMBEDDINGS output)."""
        slots = asyncio.Semaphore(self.concurrency)
        ask = {"embeddings": True} if embeddings else {}

        async def one(batch: np.ndarray) -> tuple[np.ndarray, tuple[str, ...], np.ndarray | None]:
            async with slots:
                cls = await self.calls.call(
                    Stage.CELLTYPE,
                    lambda timeout: self.clients.classify(
                        batch, version=self.celltype_version, timeout=timeout, **ask
                    ),
                )
            self.calls.check_version(Stage.CELLTYPE, self.celltype_version, cls.model_version)
            probs = np.asarray(cls.probs, np.float32)
            if probs.shape[0] != len(batch):
                raise PipelineFailure(f"celltype answered {probs.shape[0]} rows for {len(batch)}")
            emb = None
            if embeddings:
                if cls.embeddings is None or len(cls.embeddings) != len(batch):
                    raise PipelineFailure(f"celltype answered no embedding per crop ({len(batch)})")
                emb = np.asarray(cls.embeddings, np.float32)
                self.domain.add(cls, len(batch))
            return probs, tuple(cls.names), emb

        starts = range(0, len(crops), self.batch)
        answers = await gather_or_cancel([one(crops[s : s + self.batch]) for s in starts])
        if not answers:
            empty = np.zeros((0, 0), np.float32)
            return CellTypes(empty, (), empty if embeddings else None)
        names = answers[0][1]
        if any(n != names for _, n, _ in answers):
            raise PipelineFailure("celltype answered other output names within one analysis")
        probs = np.concatenate([p for p, _, _ in answers])
        if not embeddings:
            return CellTypes(probs, names)
        parts = [e for _, _, e in answers if e is not None]
        if len({e.shape[1] for e in parts}) != 1:
            raise PipelineFailure("celltype answered embeddings of different sizes")
        return CellTypes(probs, names, np.concatenate(parts))
