"""Workers: claim analyses from the job store, run the pipeline, deliver webhooks.

`python -m services.gateway.worker` runs workers alone (several processes may share one
PostgreSQL job store); the API process runs the same loop when `EMBEDDED_WORKER` is true.

Outages: before claiming, a worker asks the model services whether they are ready (at most
every `READY_CHECK_S`). While one that every analysis calls (segmentation, celltype,
ensemble) is down it claims nothing; while only npm1 or explain is down it claims the
analyses that do not call it (`Analysis.needs`: a single-cell case never calls npm1, only a
case with `options.explain` calls explain), and the others wait in the queue without
burning attempts. An analysis still waiting for a down service `REQUEUE_WINDOW_S` after its
submission fails. A run that still meets an unavailable service after its call retries is
requeued with backoff instead of failed, within the same window. So a model service that is
down for a while delays the analyses that need it instead of failing the queue.

Lanes: `WORKERS` case slots run the pipeline of every analysis; `SLIDE_WORKERS` slide slots
only prepare whole slides (open, score regions, cut tiles: minutes of CPU, no model call)
and hand the cut analysis back to the queue, so an image case never waits behind a slide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from marrowscope.slides import SlideError
from services.gateway import store
from services.gateway.blobs import BlobStore
from services.gateway.clients import ModelClients
from services.gateway.config import SERVICES, GatewaySettings
from services.gateway.container import build_services
from services.gateway.db import CORE_SERVICES, DEFAULT_TENANT, now
from services.gateway.doorbell import Doorbell
from services.gateway.hl7delivery import Hl7Dispatcher
from services.gateway.metrics import GatewayMetrics
from services.gateway.pdfsign import ReportSigner
from services.gateway.pipeline import Cancelled, CaseImage, Pipeline
from services.gateway.result import RESULT_SCHEMA_VERSION
from services.gateway.slidejob import expand_slide, roi_config, scan_checks
from services.gateway.slidestore import SlideStore, SlideStoreError, source_path
from services.gateway.webhooks import WebhookPolicy, backoff_s, deliver

log = logging.getLogger(__name__)

EXHAUSTED_CHECK_S = 5.0
"""How often a worker fails the analyses whose attempts ran out (`store.fail_exhausted`):
only a dead worker's lease expiring makes one, so every claim need not look."""

PROGRESS_EVERY_S = 0.5
"""Region scoring records its progress (and sees a cancel) at most this often."""


@dataclass
class _Claimed:
    id: str
    metadata: dict
    attempts: int
    tenant: str = DEFAULT_TENANT


class Worker:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        sessions: sessionmaker,
        blobs: BlobStore,
        clients: ModelClients,
        metrics: GatewayMetrics,
        doorbell: Doorbell | None = None,
        pdf_signer: ReportSigner | None = None,
    ) -> None:
        self.s = settings
        self.pdf_signer = pdf_signer
        self.doorbell = doorbell or Doorbell()
        self._exhausted_checked_at = -float("inf")
        self.sessions = sessions
        self.blobs = blobs
        self.clients = clients
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ready_at = -float("inf")
        self._down: frozenset[str] = frozenset()
        self._ready_lock = asyncio.Lock()

    # -- readiness ------------------------------------------------------------------------
    async def services_down(self) -> frozenset[str]:
        """Model services not ready, asked at most every READY_CHECK_S (shared by the slots);
        a failed readiness call counts every service as down."""
        async with self._ready_lock:
            if time.monotonic() - self._ready_at < self.s.ready_check_s:
                return self._down
            try:
                ready = await self.clients.ready(timeout=self.s.ready_timeout_s)
                down = frozenset(s for s in SERVICES if not ready.get(s, False))
            except Exception:
                log.exception("readiness check failed; treating every service as down")
                down = frozenset(SERVICES)
            if down != self._down:
                if down:
                    log.warning("model services not ready: %s", ", ".join(sorted(down)))
                else:
                    log.info("every model service is ready again")
            self._down, self._ready_at = down, time.monotonic()
            return down

    def _forget_readiness(self) -> None:
        """Ask again before the next claim (a run just met an unavailable service)."""
        self._ready_at = -float("inf")

    # -- loops ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Run job loops (`workers` case slots, `slide_workers` slide slots: `store.Lane`),
        the outbox dispatcher and housekeeping until `stop` is set."""
        log.info(
            "worker %s started (%d case slots, %d slide slots)",
            self.owner,
            self.s.workers,
            self.s.slide_workers,
        )
        async with asyncio.TaskGroup() as tg:
            for _ in range(self.s.workers):
                tg.create_task(self._job_loop(stop, "cases"))
            for _ in range(self.s.slide_workers):
                tg.create_task(self._job_loop(stop, "slides"))
            tg.create_task(self._outbox_loop(stop))
            if self.s.hl7_destinations:
                tg.create_task(self._hl7_dispatcher().run(stop))
        log.info("worker %s stopped", self.owner)

    def _hl7_dispatcher(self) -> Hl7Dispatcher:
        return Hl7Dispatcher(
            sessions=self.sessions,
            blobs=self.blobs,
            destinations=self.s.hl7_destinations,
            base_url=self.s.public_base_url,
            metrics=self.metrics,
            poll_s=self.s.poll_interval_s,
            backoff=(self.s.hl7_backoff_s, self.s.hl7_backoff_max_s),
            pdf_signer=self.pdf_signer,
        )

    @staticmethod
    async def _sleep(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def _job_loop(self, stop: asyncio.Event, lane: store.Lane) -> None:
        while not stop.is_set():
            down = await self.services_down()
            try:
                if down:  # fail what has waited for a down service past its requeue window
                    await asyncio.to_thread(self._expire_waiting, down)
                if down & CORE_SERVICES:
                    # nothing can run: claim nothing, burn no attempts; look again at the
                    # next readiness check
                    await self._sleep(stop, max(self.s.poll_interval_s, self.s.ready_check_s))
                    continue
                # npm1 or explain down: only the analyses that call it stay queued
                self.doorbell.clear()
                claimed = await asyncio.to_thread(self._claim, down, lane)
            except Exception:
                log.exception("claiming a job failed; retrying")
                await self._sleep(stop, self.s.poll_interval_s * 4)
                continue
            if claimed is None:
                await self.doorbell.wait(stop, self.s.poll_interval_s)
                continue
            job = asyncio.create_task(self.process(claimed))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
            self.doorbell.ring()  # a slot is free: a loop that found none busy looks again
            if not job.done():  # shutting down: hand the analysis back to the queue
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
                await asyncio.to_thread(self._release, claimed.id)
            stopper.cancel()

    def _claim(self, down: frozenset[str], lane: store.Lane) -> _Claimed | None:
        """The oldest claimable analysis of `lane` that calls none of the services `down`,
        or None."""
        now = time.monotonic()
        if now - self._exhausted_checked_at >= EXHAUSTED_CHECK_S:  # housekeeping, not per claim
            self._exhausted_checked_at = now
            with self.sessions.begin() as session:
                for analysis_id in store.fail_exhausted(
                    session,
                    max_attempts=self.s.max_attempts,
                    hl7_tenants=self.s.hl7_destinations.keys(),
                ):
                    log.error("analysis %s failed: its workers kept dying", analysis_id)
        with self.sessions.begin() as session:
            a = store.claim_next(
                session, owner=self.owner, lease_s=self.s.lease_s, down=down, lane=lane
            )
            if a is None:
                return None
            log.info("claimed analysis %s (%s lane, attempt %d)", a.id, lane, a.attempts)
            return _Claimed(a.id, json.loads(a.metadata_json), a.attempts, a.tenant)

    def _release(self, analysis_id: str, delay_s: float = 0.0, stage: str | None = None) -> None:
        with self.sessions.begin() as session:
            store.release(
                session, analysis_id=analysis_id, owner=self.owner, delay_s=delay_s, stage=stage
            )
        log.info("released analysis %s back to the queue", analysis_id)

    def _expire_waiting(self, down: frozenset[str]) -> None:
        """Fail the queued analyses that call a service `down` past their requeue window."""
        with self.sessions.begin() as session:
            failed = store.fail_waited_too_long(
                session,
                window_s=self.s.requeue_window_s,
                down=down,
                hl7_tenants=self.s.hl7_destinations.keys(),
            )
        for analysis_id, reason in failed:
            log.error("analysis %s failed: %s", analysis_id, reason)
            self.metrics.finished.labels("failed").inc()

    def _requeue(self, analysis_id: str, reason: str) -> str | None:
        """Back to the queue after `reason` with backoff, or failed when its requeue window
        is over."""
        with self.sessions.begin() as session:
            return store.requeue_or_fail(
                session,
                analysis_id=analysis_id,
                owner=self.owner,
                reason=reason,
                window_s=self.s.requeue_window_s,
                backoff_s=self.s.requeue_backoff_s,
                backoff_max_s=self.s.requeue_backoff_max_s,
                hl7_tenants=self.s.hl7_destinations.keys(),
            )

    def _heartbeat(self, analysis_id: str, stage: str | None) -> tuple[bool, bool]:
        with self.sessions.begin() as session:
            return store.heartbeat(
                session,
                analysis_id=analysis_id,
                owner=self.owner,
                lease_s=self.s.lease_s,
                stage=stage,
            )

    def _finish(self, analysis_id: str, **kw) -> bool:
        with self.sessions.begin() as session:
            return store.finish(
                session,
                analysis_id=analysis_id,
                owner=self.owner,
                hl7_tenants=self.s.hl7_destinations.keys(),
                **kw,
            )

    # -- one analysis ---------------------------------------------------------------------
    async def process(self, claimed: _Claimed) -> None:
        analysis_id = claimed.id
        with self.sessions() as session:
            job = store.slide_job(session, analysis_id=analysis_id)
            slide_cut = None if job is None else job.expanded_at is not None
        if slide_cut is False:
            if not await self._cut_slide(claimed):
                return
            # prepared in a slide slot: the pipeline runs in a case slot, like any case
            await asyncio.to_thread(self._release, analysis_id, stage="slide_cut")
            return
        with self.sessions() as session:
            rows = store.images_of(session, analysis_id=analysis_id)
        images = [CaseImage(r.idx, r.sha256, self.blobs.get(r.sha256), r.um_per_px) for r in rows]

        async def checkpoint(stage: str) -> None:
            owned, cancel = await asyncio.to_thread(self._heartbeat, analysis_id, stage)
            if not owned:
                raise Cancelled("lease lost")
            if cancel:
                raise Cancelled("cancelled by request")

        pipeline = Pipeline(
            clients=self.clients, settings=self.s, metrics=self.metrics, checkpoint=checkpoint
        )
        run = asyncio.create_task(
            pipeline.run(
                analysis_id=analysis_id,
                images=images,
                explain=bool(claimed.metadata.get("options", {}).get("explain")),
                input_kind=claimed.metadata.get("input", "fields"),
            )
        )
        lost = asyncio.Event()
        beat = asyncio.create_task(self._beat(analysis_id, run, lost))
        try:
            outcome = await run
        except Cancelled as exc:
            if str(exc) == "lease lost":
                log.warning("analysis %s: lease lost, another worker owns it", analysis_id)
                return
            if await asyncio.to_thread(
                self._finish, analysis_id, status="cancelled", reason="cancelled by request"
            ):
                self.metrics.finished.labels("cancelled").inc()
            return
        except asyncio.CancelledError:
            if lost.is_set():  # our heartbeat stopped the run: someone else owns it now
                log.warning("analysis %s: lease lost during a stage", analysis_id)
                return
            raise
        except Exception:
            log.exception("analysis %s: internal error", analysis_id)
            await asyncio.to_thread(
                self._finish,
                analysis_id,
                status="failed",
                reason="internal gateway error (see the gateway log)",
            )
            self.metrics.finished.labels("failed").inc()
            return
        finally:
            beat.cancel()
        if outcome.transient:
            self._forget_readiness()
            state = await asyncio.to_thread(self._requeue, analysis_id, outcome.reason or "")
            if state == "queued":
                log.warning("analysis %s requeued: %s", analysis_id, outcome.reason)
                self.metrics.finished.labels("requeued").inc()
                return
            if state is None:
                log.warning("analysis %s: outcome discarded, lease lost", analysis_id)
                return
            self.metrics.finished.labels("failed").inc()
            log.info("analysis %s failed: requeue window over", analysis_id)
            return
        if slide_cut is not None and outcome.result is not None:
            outcome.result = await asyncio.to_thread(self._with_slide, analysis_id, outcome.result)
        try:
            for data in outcome.artifacts.values():
                await asyncio.to_thread(self.blobs.put, data)
            finished = await asyncio.to_thread(
                self._finish,
                analysis_id,
                status=outcome.status,
                reason=outcome.reason,
                result=outcome.result,
                schema_version=RESULT_SCHEMA_VERSION,
            )
        except Exception:
            log.exception("analysis %s: storing the outcome failed", analysis_id)
            outcome.status = "failed"
            finished = await asyncio.to_thread(
                self._finish,
                analysis_id,
                status="failed",
                reason="internal gateway error while storing the result (see the gateway log)",
            )
        if finished:
            self.metrics.finished.labels(outcome.status).inc()
            log.info("analysis %s %s", analysis_id, outcome.status)
            domain = None if outcome.report is None else outcome.report.domain
            if domain is not None and domain.status == "out_of_domain":
                self.metrics.out_of_domain.labels(claimed.tenant).inc()
        else:
            log.warning("analysis %s: outcome discarded, lease lost", analysis_id)

    # -- whole slides ---------------------------------------------------------------------
    async def _cut_slide(self, claimed: _Claimed) -> bool:
        """Select the slide's regions and make them the analysis's images (`slidejob`).
        False when the analysis ended here: the slide cannot become a case (failed with the
        slide's error code), cancelled between tiles, or the lease was lost."""
        analysis_id = claimed.id
        spec = claimed.metadata.get("slide") or {}
        um_per_px = claimed.metadata.get("options", {}).get("um_per_px")
        config = roi_config(self.s, spec.get("cell_target"))
        with self.sessions() as session:
            job = store.slide_job(session, analysis_id=analysis_id)
            assert job is not None
            source = json.loads(job.source_json)

        def record(done: int, total: int, stage: str) -> None:
            owned, cancel = self._slide_progress(analysis_id, done, total, stage)
            if not owned:
                raise Cancelled("lease lost")
            if cancel:
                raise Cancelled("cancelled by request")

        async def progress(done: int, total: int) -> None:
            await asyncio.to_thread(record, done, total, "slide_tiles")

        last = -float("inf")

        def scoring(done: int, total: int) -> None:
            # called from the scoring thread before every region: a few writes a second
            # at most, but the first and the last always (regions_total is known at once)
            nonlocal last
            if 0 < done < total and time.monotonic() - last < PROGRESS_EVERY_S:
                return
            last = time.monotonic()
            record(done, total, "slide_scoring")

        async def cut() -> bool:
            path = await asyncio.to_thread(
                source_path, SlideStore.from_settings(self.s), source, tenant=claimed.tenant
            )
            exp = await expand_slide(
                path,
                config=config,
                put_blob=self.blobs.put,
                checkpoint=progress,
                scoring=scoring,
                checks=scan_checks(self.s),
                um_per_px=um_per_px,
            )
            thumb_sha, _ = await asyncio.to_thread(self.blobs.put, exp.thumbnail)
            selection = {
                **exp.selection,
                "regions": [t.region for t in exp.tiles],
                "slide": exp.slide,
                "um_per_px": exp.um_per_px,
                "source": source,
            }
            tiles = [
                store.NewImage(t.sha256, t.size_bytes, t.width, t.height, "png") for t in exp.tiles
            ]

            def attach() -> bool:
                with self.sessions.begin() as session:
                    return store.attach_tiles(
                        session,
                        analysis_id=analysis_id,
                        owner=self.owner,
                        tiles=tiles,
                        um_per_px=exp.um_per_px,
                        selection=selection,
                        thumbnail_sha256=thumb_sha,
                    )

            if not await asyncio.to_thread(attach):
                raise Cancelled("lease lost")
            log.info(
                "analysis %s: slide cut into %d tiles (%s, ~%d cells)",
                analysis_id,
                len(tiles),
                exp.selection["stop_reason"],
                exp.selection["cells"],
            )
            return True

        run = asyncio.create_task(cut())
        lost = asyncio.Event()
        beat = asyncio.create_task(self._beat(analysis_id, run, lost))
        try:
            return await run
        except Cancelled as exc:
            if str(exc) != "lease lost" and await asyncio.to_thread(
                self._finish, analysis_id, status="cancelled", reason="cancelled by request"
            ):
                self.metrics.finished.labels("cancelled").inc()
            return False
        except asyncio.CancelledError:
            if lost.is_set():
                log.warning("analysis %s: lease lost while cutting the slide", analysis_id)
                return False
            raise
        except (SlideError, SlideStoreError) as exc:
            log.warning("analysis %s: slide refused: %s", analysis_id, exc)
            if await asyncio.to_thread(
                self._finish,
                analysis_id,
                status="failed",
                reason=f"slide_{exc.code}: {exc.message}",
            ):
                self.metrics.finished.labels("failed").inc()
            return False
        finally:
            beat.cancel()

    def _slide_progress(
        self, analysis_id: str, done: int, total: int, stage: str
    ) -> tuple[bool, bool]:
        with self.sessions.begin() as session:
            return store.slide_progress(
                session,
                analysis_id=analysis_id,
                owner=self.owner,
                done=done,
                total=total,
                stage=stage,
            )

    def _with_slide(self, analysis_id: str, result: dict) -> dict:
        """The result with its `slide` section: the regions used, with the cells the pipeline
        counted in each, and the thumbnail (validated against the result schema)."""
        from services.gateway.result import AnalysisResult

        with self.sessions() as session:
            job = store.slide_job(session, analysis_id=analysis_id)
            assert job is not None and job.selection_json is not None
            sel = json.loads(job.selection_json)
            thumb = job.thumbnail_sha256
        counted = {im["index"]: im["n_counted"] for im in result.get("images", [])}
        regions = [
            {
                **r,
                "n_counted": counted.get(r["index"]),
                "overlay": f"/v1/analyses/{analysis_id}/images/{r['index']}/overlay.png",
            }
            for r in sel["regions"]
        ]
        result = {
            **result,
            "input": "slide",
            "slide": {
                "source": sel["source"],
                **sel["slide"],
                "um_per_px": sel["um_per_px"],
                "regions": regions,
                "candidates": sel["candidates"],
                "cell_target": sel["target"],
                "cells_estimated": sel["cells"],
                "cells_counted": sum(v or 0 for v in counted.values()),
                "stop_reason": sel["stop_reason"],
                "thumbnail": f"/v1/analyses/{analysis_id}/slide.png",
                "thumbnail_sha256": thumb,
            },
        }
        return AnalysisResult.model_validate(result).model_dump(mode="json")

    async def _beat(self, analysis_id: str, run: asyncio.Task, lost: asyncio.Event) -> None:
        """Renew the lease during long stages; stop the run when the lease is lost."""
        while not run.done():
            await asyncio.sleep(self.s.heartbeat_s)
            try:
                owned, _ = await asyncio.to_thread(self._heartbeat, analysis_id, None)
            except Exception:
                log.exception("heartbeat of %s failed; retrying", analysis_id)
                continue
            if not owned:
                lost.set()
                run.cancel()
                return

    # -- webhooks -------------------------------------------------------------------------
    async def _outbox_loop(self, stop: asyncio.Event) -> None:
        import httpx

        secret = self.s.webhook_secret.get_secret_value() if self.s.webhook_secret else None
        async with httpx.AsyncClient(follow_redirects=False) as client:
            while not stop.is_set():
                try:
                    sent = await self._deliver_due(client, secret)
                except Exception:
                    log.exception("outbox delivery round failed")
                    sent = 0
                if not sent:
                    await self._sleep(stop, self.s.poll_interval_s)

    async def _deliver_due(self, client, secret: str | None) -> int:
        def claim():
            with self.sessions.begin() as session:
                rows = store.claim_outbox(session, lease_s=self.s.webhook_timeout_s * 3)
                return [(r.id, r.url, r.payload, r.attempts) for r in rows]

        rows = await asyncio.to_thread(claim)
        for outbox_id, url, payload, attempts in rows:
            if secret is None:
                ok, err = False, "MS_GATEWAY_WEBHOOK_SECRET is not set; refusing to send unsigned"
            else:
                ok, err = await deliver(
                    client,
                    url=url,
                    body=payload.encode(),
                    event_id=outbox_id,
                    secret=secret,
                    timeout=self.s.webhook_timeout_s,
                    policy=WebhookPolicy.from_settings(self.s),
                )
            done = attempts + 1
            nxt = (
                None
                if done >= self.s.webhook_max_attempts
                else now()
                + backoff_s(done, base=self.s.webhook_backoff_s, cap=self.s.webhook_backoff_max_s)
            )
            self.metrics.webhooks.labels("delivered" if ok else "failed").inc()
            if not ok:
                log.warning("webhook %s attempt %d failed: %s", outbox_id, done, err)

            def record(oid=outbox_id, ok=ok, err=err, nxt=nxt):
                with self.sessions.begin() as session:
                    store.outbox_result(
                        session, outbox_id=oid, ok=ok, error=err, next_attempt_at=nxt
                    )

            await asyncio.to_thread(record)
        return len(rows)


async def serve_workers(settings: GatewaySettings) -> None:
    """Standalone worker process: migrate, then run until SIGTERM/SIGINT."""
    services = build_services(settings)
    clients = services.make_clients()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, registry=services.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(
        settings=settings,
        sessions=services.sessions,
        blobs=services.blobs,
        clients=clients,
        metrics=services.metrics,
        pdf_signer=services.pdf_signer,
    )
    try:
        await worker.run(stop)
    finally:
        await clients.close()
        services.engine.dispose()


def main() -> None:
    from services.gateway.cli import parse_cli

    parse_cli(
        "python -m services.gateway.worker",
        "A standalone MarrowScope analysis worker (claims queued analyses from the job store).",
    )
    settings = GatewaySettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    asyncio.run(serve_workers(settings))


if __name__ == "__main__":
    main()
