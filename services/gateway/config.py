"""Gateway settings: one pydantic-settings class, environment prefix `MS_GATEWAY_`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from marrowscope.stages import SERVED, Stage
from services.gateway.mllp import Hl7Destination

SERVICES: tuple[str, ...] = SERVED

UM_PER_PX_RANGE = (0.05, 5.0)
"""Physically plausible pixel sizes (um) of a smear image: 100x oil objectives give ~0.07,
a 10x overview ~1-2; outside it a value is a typo or a unit mix-up (nm, mm, DPI), and tiny
values underflow float32 in the morphometrics."""


def check_um_per_px(value: float | None) -> float | None:
    """The pixel size when finite and in `UM_PER_PX_RANGE`; ValueError with why otherwise."""
    if value is None:
        return None
    lo, hi = UM_PER_PX_RANGE
    if not math.isfinite(value):
        raise ValueError(f"um_per_px must be a finite number of micrometres per pixel, got {value}")
    if not lo <= value <= hi:
        raise ValueError(
            f"um_per_px {value:g} is not a plausible pixel size: it must lie between {lo:g} and "
            f"{hi:g} um per pixel (smear scans are typically 0.1-0.5)"
        )
    return value


class GatewaySettings(BaseSettings):
    """Every knob of the gateway; each field reads `MS_GATEWAY_<FIELD>` from the environment."""

    # attribute docstrings become field descriptions: `--help` prints them
    model_config = SettingsConfigDict(
        env_prefix="MS_GATEWAY_", extra="ignore", use_attribute_docstrings=True
    )

    data_dir: Path = Path(".marrowscope/gateway")
    database_url: str = ""
    """SQLAlchemy URL; empty means `sqlite:///<data_dir>/gateway.db` (WAL mode)."""
    image_root: Path | None = None
    """Content-addressed image and artifact files; default `<data_dir>/images`."""
    host: str = "127.0.0.1"
    port: int = 8080

    segmentation_addr: str = f"127.0.0.1:{Stage.SEGMENTATION.grpc_port}"
    celltype_addr: str = f"127.0.0.1:{Stage.CELLTYPE.grpc_port}"
    ensemble_addr: str = f"127.0.0.1:{Stage.ENSEMBLE.grpc_port}"
    npm1_addr: str = f"127.0.0.1:{Stage.NPM1.grpc_port}"
    explain_addr: str = f"127.0.0.1:{Stage.EXPLAIN.grpc_port}"
    lb_policy: str = Field("", pattern="^(|round_robin)$")
    """`round_robin`: balance every model call over all replicas of a service (needs a
    headless Service: the address names every pod); empty = one connection per address."""
    lb_refresh_s: float = Field(30.0, gt=0)
    """With `lb_policy`: re-resolve each address this often, so a new replica gets traffic."""
    clients_factory: str = ""
    """`module:function` returning a `ModelClients` (called with the settings); empty = OIP."""

    deadline_s: float = Field(300.0, gt=0)
    """One deadline per analysis run; every model call gets the remaining time as timeout."""
    call_attempts: int = Field(4, ge=1)
    """Attempts per model call on UNAVAILABLE / DEADLINE_EXCEEDED."""
    retry_initial_s: float = Field(0.25, ge=0)
    retry_max_s: float = Field(5.0, ge=0)
    ready_timeout_s: float = Field(2.0, gt=0)

    default_um_per_px: float | None = None
    """Pixel size (um) for images submitted without `options.um_per_px`, for deployments
    whose scanner is fixed; unset: such images are measured in px and, when the ensemble
    learned um, the report withholds P(AML) (`aml.reason` `pixel_size_required`)."""
    pixel_size_tolerance: float = Field(0.25, ge=0, le=4)
    """How far a case's pixel size may lie outside the range the ensemble was trained on
    (its `feature_um_per_px_min|max`), as a fraction: with 0.25 and training at 0.25-0.3 um/px,
    0.2-0.375 um/px is accepted. Outside it the ensemble sees cells of sizes it never learned
    (a control read P(AML) 1.0 at 10 um/px), so P(AML) is withheld
    (`pixel_size_out_of_range`)."""
    min_cells: int = Field(50, ge=1)
    """Fewer counted (non-RBC) cells over the case -> status `abstained`, no probability."""
    npm1_threshold: float = Field(0.5, ge=0, le=1)
    apl_threshold: float = Field(0.5, ge=0, le=1)
    """Threshold of the APL-by-morphology call when the ensemble records none (and of the
    MIL model's call)."""
    apl_model: Literal["ensemble", "mil"] = "ensemble"
    """Which model reports P(APL | AML): `ensemble` (its `apl` head over the case vector) or
    `mil` (the attention-MIL model over the cells' celltype embeddings, served as the OIP
    model `mil` by the ensemble service with `MS_ENSEMBLE_MIL_MODEL_URI`; its attention
    weights become each cell's `importance`). With `mil` and no (usable) MIL model the
    report's `apl_morphology` is not_available with the reason; the rest of the case
    reports."""
    domain_check: Literal["abstain", "warn", "off"] = "abstain"
    """The per-case domain check (`marrowscope.domain`; result `domain`): a case whose cells
    sit farther from the pinned typer's training cells than its recorded threshold gets
    P(AML), P(NPM1) and the genetic calls withheld (`abstain`, reason out_of_domain) or
    only flagged (`warn`); both add a differential warning and count it per tenant
    (`marrowscope_gateway_out_of_domain_cases_total`). `off`: not computed."""
    aml_threshold: float = Field(0.5, ge=0, le=1)
    explain_max_boxes: int = Field(1024, ge=1)
    """Cells per explain call; an image with more is explained in several calls. Keep it at
    or below the explain service's MAX_BOXES."""
    celltype_batch: int = Field(64, ge=1)
    cells_concurrency: int = Field(4, ge=1)
    """Model calls in flight at once for the crops of a case: celltype batches, and the
    per-image segmentation calls of a single-cell case (`"input": "cells"`)."""
    image_concurrency: int = Field(2, ge=1, le=64)
    """Images (or slide tiles) of one case analysed at once (decode, detect, type): the
    per-case bound that lets several segmentation replicas work on one case; each image
    holds its decoded pixels while it runs, so memory is this many images."""
    allow_local_lineage: bool = False
    """Accept a missing/mismatching ensemble lineage when the upstream pinned versions are
    local directories (`local-...`); never for registry versions."""

    max_images: int = Field(32, ge=1)
    max_cell_images: int = Field(2000, ge=1)
    """Images per single-cell case (`"input": "cells"`), instead of `max_images`: an
    analyser exports a few hundred crops per case."""
    max_cell_image_pixels: int = Field(1024 * 1024, gt=0)
    """Largest image of a single-cell case (width x height); above it: 422
    not_a_cell_image (a field sent as a cell)."""
    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0)
    """Per image file."""
    max_pixels: int = Field(40_000_000, gt=0)
    max_metadata_bytes: int = Field(16 * 1024, gt=0)
    max_request_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Whole request body (all images + metadata + multipart framing): a larger declared
    Content-Length gets 413 before anything is read, a larger stream 413 at the limit."""
    max_case_pixels: int = Field(120_000_000, gt=0)
    """Pixels of all images of one case together (headers are read before any decoding):
    bounds what one analysis costs in decoding and model time however small the files."""
    decode_slots: int = Field(1, ge=1)
    """Images decoded at once by this process during upload validation: concurrent
    submissions wait instead of each holding full-size decodes."""

    slide_roots: dict[str, str] = Field(default_factory=dict)
    """Slide stores by name (JSON): a local/NFS directory or an fsspec URL (`s3://b/slides`)."""
    slide_cache_dir: Path | None = None
    """Local copies of object-store slides; default `<data_dir>/slides`."""
    max_slide_bytes: int = Field(20 * 1024**3, gt=0)
    """Largest slide accepted (upload or store reference); above it: 413."""
    slide_cell_target: int = Field(500, ge=1, le=100_000)
    """Nucleated cells a slide's region selection aims for (a manual differential counts
    500); a request may ask for another target (`slide.cell_target`)."""
    slide_max_regions: int = Field(64, ge=1, le=1000)
    """Most regions cut from one slide (each becomes one image of the case)."""
    slide_region_um: float = Field(256.0, gt=10, le=2000)
    """Side of a candidate region in micrometres."""
    slide_max_scored_regions: int = Field(2048, ge=1, le=1_000_000)
    """Most regions scored on one slide, spread evenly over its grid: a real smear's grid of
    256 um regions holds ~5-15k, selection needs tens, so a larger grid is sampled."""
    slide_scoring_timeout_s: float = Field(300.0, gt=0)
    """Region scoring of one slide that takes longer fails with `slide_scoring_timeout`
    (a fixed failure rather than a selection from whatever was scored by then, so a case's
    regions never depend on how busy the machine was)."""
    slide_min_bytes_per_pixel: float = Field(1e-3, ge=0)
    """A slide file smaller than this many bytes per declared level-0 pixel is refused
    (422 `slide_compression_implausible`): real scans hold 0.02-0.5; 0 switches it off."""
    slide_max_shared_tiles: float = Field(0.5, gt=0, le=1)
    """A TIFF level where one stored tile serves more than this fraction of the tiles is
    refused (422 `slide_tiles_shared`, a slide bomb); 1 switches it off."""
    slide_workers: int = Field(1, ge=1, le=64)
    """Slides prepared at once per worker process (opening, region scoring, cutting: CPU
    work without model calls) in slots of their own: the `workers` slots never prepare a
    slide, so a long slide never holds every slot while image cases wait."""
    slide_upload_ttl_s: float = Field(86400.0, ge=60)
    """An uploaded slide is deleted this long after it was uploaded or last named by a
    submission, unless an analysis that has not cut it yet still needs it (blob sweep, and
    a tenant's own expired uploads at its next upload)."""
    slide_fetch_ttl_s: float = Field(86400.0, ge=3600)
    """A copy of an object-store slide in the slide cache is deleted this long after it was
    fetched or last used (at the next fetch, and by the blob sweep); at least an hour,
    longer than any slide job, so a copy being read is never removed."""
    slide_upload_quota_bytes: int = Field(200 * 1024**3, gt=0)
    """Bytes of uploaded slides one tenant may hold; an upload beyond it gets 413
    `upload_quota_exceeded`."""

    pdf_signing_p12: Path | None = None
    """PKCS#12 file with the lab's key and certificate: signed-out PDF reports then carry a
    PAdES B-B signature (`pdfsign`); preliminary ones never do. None: unsigned."""
    pdf_signing_password: SecretStr | None = None
    """Password of `PDF_SIGNING_P12` (a Kubernetes Secret, never a value in a file)."""
    pdf_signing_location: str | None = None
    """The signature's location field, e.g. the lab's name and city."""

    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(10, ge=1)
    webhook_backoff_s: float = Field(2.0, gt=0)
    webhook_backoff_max_s: float = Field(600.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    allow_private_webhooks: bool = False
    """Let webhooks reach any non-public address (loopback, private, link-local): tests and
    development only; production lists its LIS networks in `webhook_allow_cidrs`."""
    webhook_allow_cidrs: str = ""
    """Comma-separated networks webhooks may reach although not public, e.g. the LIS at
    `10.20.0.0/16`; checked on the resolved address at every send (`webhooks`)."""
    hl7_destinations: dict[str, Hl7Destination] = Field(default_factory=dict)
    """HL7 v2 results over MLLP, per tenant: a JSON object tenant -> {host, port, tls,
    ca_file, cert_file, key_file, receiving_application, receiving_facility, pdf
    (reference | embed | none), ack_timeout_s, max_error_attempts} (`mllp.Hl7Destination`;
    docs/HL7.md). A tenant listed here gets an ORU^R01 for every result, from the outbox
    (`hl7delivery`, retried with `HL7_BACKOFF_S`)."""
    hl7_backoff_s: float = Field(2.0, gt=0)
    """First wait before an ORU^R01 is sent again (no connection, no ACK in time, or AE),
    doubling per attempt up to `HL7_BACKOFF_MAX_S`. Apart from the webhooks' backoff: a
    LIS interface engine restarts on its own schedule. Transport failures are retried without
    limit; AE answers up to the destination's `max_error_attempts`, then parked."""
    hl7_backoff_max_s: float = Field(300.0, gt=0)

    embedded_worker: bool = True
    workers: int = Field(1, ge=1)
    """Concurrent analyses per worker process (slides are prepared in `slide_workers`)."""
    poll_interval_s: float = Field(0.5, gt=0)
    lease_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    """Claims of one analysis (worker crashes) before it fails instead of looping forever."""
    metrics_port: int = 0
    """Serve Prometheus metrics without a key on this separate port (0 = off), for the
    scraper: the API port's `/metrics` (and `/readyz`'s per-model detail) needs an API key
    with the `ops` scope. Standalone workers serve metrics only here."""
    ops_public: bool = False
    """Serve `/metrics` and `/readyz`'s per-model detail on the API port without a key:
    local stacks and tests only (they tell an outsider what is down and how busy it is)."""

    rate_limit_per_min: int = Field(120, ge=1)
    auth_failures_per_min: int = Field(10, ge=1)
    """Missing/invalid API keys tolerated per client address, and per presented key, and
    minute (burst as large); beyond it a /v1 request from that address without a valid key,
    or with that same key, gets 429 with Retry-After. A valid key is never refused for it."""
    trusted_proxies: str = ""
    """Proxies (comma list of IPs/CIDRs) whose X-Forwarded-For is taken as the client
    address, e.g. the ingress controller pods' network; from any other peer the header is
    ignored. Empty: the TCP peer is the client (no proxy can name another)."""
    body_idle_timeout_s: float = Field(60.0, gt=0)
    """A request body (an upload) that sends nothing for this long gets 408 body_timeout
    and its connection closed; a partial slide upload is removed."""
    public_base_url: str = ""
    """How the LIS reaches this API, e.g. `https://marrowscope.hospital.example`: the base of
    URLs inside reports (FHIR Media). Never taken from the request's Host header, which the
    client controls; empty: reports carry relative URLs (`/v1/analyses/...`)."""
    log_level: str = "INFO"

    requeue_window_s: float = Field(3600.0, gt=0)
    """An analysis whose model services are down (or fail transiently) waits in the queue,
    requeued with backoff, for up to this long after it was submitted or retried; then it
    fails with the reason."""
    requeue_backoff_s: float = Field(2.0, gt=0)
    requeue_backoff_max_s: float = Field(60.0, gt=0)
    ready_check_s: float = Field(2.0, gt=0)
    """Workers ask the model services for readiness at most this often and claim no
    analysis that needs one that is not ready."""

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip().rstrip("/")
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
                raise ValueError(
                    f"PUBLIC_BASE_URL must be http(s)://host[:port][/path], got {value!r}"
                )
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: str) -> str:
        from services.gateway.webhooks import parse_cidrs

        if value.strip() == "*":
            raise ValueError(
                "TRUSTED_PROXIES must list networks, not '*': trusting every peer lets any "
                "client choose its own address"
            )
        parse_cidrs(value)
        return value

    @field_validator("webhook_allow_cidrs")
    @classmethod
    def _networks(cls, value: str) -> str:
        from services.gateway.webhooks import parse_cidrs

        parse_cidrs(value)  # refuse a typo at start-up, not at the first webhook
        return value

    @field_validator("default_um_per_px")
    @classmethod
    def _plausible_pixel_size(cls, value: float | None) -> float | None:
        return check_um_per_px(value)

    @model_validator(mode="after")
    def _defaults(self) -> GatewaySettings:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("HEARTBEAT_S must be shorter than LEASE_S")
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"
        if self.slide_cache_dir is None:
            self.slide_cache_dir = self.data_dir / "slides"
        if self.image_root is None:
            self.image_root = self.data_dir / "images"
        return self

    def service_addr(self, service: str) -> str:
        if service not in SERVICES:
            raise KeyError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
        return getattr(self, f"{service}_addr")
