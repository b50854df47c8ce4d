"""Prometheus metrics of the gateway; labels never carry accession ids or patient data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from services.gateway.db import STATUSES

log = logging.getLogger(__name__)

STAGES = ("pin", "segmentation", "celltype", "aggregate", "ensemble", "npm1", "explain", "report")


class _JobsCollector:
    """Jobs by status and queue depth, read from the job store at scrape time (so every
    replica and worker process reports the same truth)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self):
        try:
            counts = self._counts()
        except Exception as exc:  # a scrape must not fail because the database is away
            log.warning("job store unavailable for metrics: %s", exc)
            return
        jobs = GaugeMetricFamily(
            "marrowscope_gateway_analyses", "Analyses by status", labels=["status"]
        )
        for s in STATUSES:
            jobs.add_metric([s], counts.get(s, 0))
        yield jobs
        yield GaugeMetricFamily(
            "marrowscope_gateway_queue_depth",
            "Analyses waiting for a worker",
            value=counts.get("queued", 0),
        )


class _ReviewAgreementCollector:
    """Reviewer agreement per celltype version, model's cell type and tenant, over every
    signed-out case, read from the job store at scrape time (`review.outcomes`): a sign-out
    or an amendment shows at the next scrape, in every replica alike."""

    def __init__(self, totals: Callable[[], Mapping[tuple[str, str, str, bool], int]]) -> None:
        self._totals = totals

    def collect(self):
        try:
            totals = self._totals()
        except Exception as exc:  # a scrape must not fail because the database is away
            log.warning("job store unavailable for review metrics: %s", exc)
            return
        labels = ["tenant", "celltype_version", "cell_type"]
        cells = GaugeMetricFamily(
            "marrowscope_gateway_reviewed_cells",
            "Cells the typer called, in signed-out cases, by tenant, the celltype version "
            "that called them and the type it called",
            labels=labels,
        )
        kept = GaugeMetricFamily(
            "marrowscope_gateway_review_kept_cells",
            "Of those, cells whose type the reviewer kept",
            labels=labels,
        )
        ratio = GaugeMetricFamily(
            "marrowscope_gateway_review_agreement_ratio",
            "Reviewer agreement: kept / reviewed cells, per tenant, celltype version and "
            'called type (every type together: cell_type="all")',
            labels=labels,
        )
        n: dict[tuple[str, str, str], list[int]] = {}
        for (tenant, version, code, was_kept), count in totals.items():
            for key in ((tenant, version, code), (tenant, version, "all")):
                entry = n.setdefault(key, [0, 0])
                entry[0] += count
                entry[1] += count if was_kept else 0
        for key, (total, k) in sorted(n.items()):
            cells.add_metric(list(key), total)
            kept.add_metric(list(key), k)
            ratio.add_metric(list(key), k / total if total else 0.0)
        yield cells
        yield kept
        yield ratio


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.stage_seconds = Histogram(
            "marrowscope_gateway_stage_seconds",
            "Wall time of one pipeline stage",
            ["stage"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.finished = Counter(
            "marrowscope_gateway_analyses_finished_total",
            "Analyses finished by this process",
            ["status"],
            registry=self.registry,
        )
        self.aml_abstained = Counter(
            "marrowscope_gateway_aml_abstained_total",
            "Analyses whose P(AML) was withheld, by reason (pixel_size_required: a LIS that "
            "sends no options.um_per_px to an ensemble that learned um)",
            ["reason"],
            registry=self.registry,
        )
        self.npm1_morphology = Counter(
            "marrowscope_gateway_npm1_morphology_total",
            "NPM1-by-morphology calls (the ensemble's P(NPM1 | AML)) by status: predicted, "
            "abstained (with P(AML)), not_available (the ensemble version has no NPM1 head)",
            ["status"],
            registry=self.registry,
        )
        self.genetic_morphology = Counter(
            "marrowscope_gateway_genetic_morphology_total",
            "Genetic-lesion-by-morphology calls (the ensemble's P(lesion | AML), one per "
            "genetic target: npm1, apl) by target and status: predicted, abstained, "
            "not_available, not_applicable",
            ["target", "status"],
            registry=self.registry,
        )
        self.call_retries = Counter(
            "marrowscope_gateway_model_call_retries_total",
            "Retried model calls",
            ["service", "code"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "marrowscope_gateway_webhook_deliveries_total",
            "Webhook delivery attempts",
            ["outcome"],
            registry=self.registry,
        )
        self.hl7_messages = Counter(
            "marrowscope_gateway_hl7_messages_total",
            "HL7 ORU^R01 delivery attempts over MLLP by outcome: delivered (AA), retry (no "
            "connection or ACK, or AE), parked (AR, or AE too often: waits for a person)",
            ["outcome"],
            registry=self.registry,
        )
        self.requests = Counter(
            "marrowscope_gateway_http_requests_total",
            "HTTP requests by route template (unrouted: no route), method and status",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "marrowscope_gateway_http_request_duration_seconds",
            "Wall time of one HTTP request, from its first byte in to its last byte out, by "
            "route template, method and status class (2xx, 4xx, ...)",
            ["route", "method", "status_class"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.body_timeouts = Counter(
            "marrowscope_gateway_body_timeouts_total",
            "Requests whose body stalled longer than MS_GATEWAY_BODY_IDLE_TIMEOUT_S (408; a "
            "partial slide upload is removed), by route template",
            ["route"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "marrowscope_gateway_client_disconnects_total",
            "Requests whose client went away before the response, by route template",
            ["route"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "marrowscope_gateway_rejected_requests_total",
            "Requests answered with a 4xx/5xx status, by route template and status (401: "
            "bad keys, 413: oversized uploads, 422: invalid input, 429: rate limits)",
            ["route", "status"],
            registry=self.registry,
        )

        self.out_of_domain = Counter(
            "marrowscope_gateway_out_of_domain_cases_total",
            "Finished analyses whose cells sit outside the pinned typer's training domain "
            "(result domain.status out_of_domain), by tenant: a new scanner or stain shows "
            "up here first",
            ["tenant"],
            registry=self.registry,
        )

    def watch_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobsCollector(counts))

    def watch_reviews(self, totals: Callable[[], Mapping[tuple[str, str, str, bool], int]]) -> None:
        """Serve the reviewer-agreement gauges from `totals` ((tenant, celltype version,
        called type, kept) -> cells over the signed-out cases)."""
        self.registry.register(_ReviewAgreementCollector(totals))
