"""Job store schema (SQLAlchemy 2 ORM) and engine construction.

Timestamps that workers compare (leases, retry times) are float epoch seconds so SQLite and
PostgreSQL compare them identically; the API turns them into UTC datetimes. The schema is
created and changed only by the Alembic migrations in `migrations/` (run at start-up).
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from marrowscope.stages import SERVED, Stage

STATUSES = ("queued", "running", "succeeded", "failed", "abstained", "cancelled")
FINAL_STATUSES = frozenset({"succeeded", "failed", "abstained", "cancelled"})
DEFAULT_TENANT = "default"
"""The tenant of keys created without `--tenant`: a single-site deployment never names one."""


def now() -> float:
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Analysis(Base):
    __tablename__ = "analyses"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    accession: Mapped[str] = mapped_column(String(128), index=True)
    specimen_type: Mapped[str] = mapped_column(String(64))
    stain: Mapped[str] = mapped_column(String(64))
    metadata_json: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    n_images: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    updated_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    queued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """When it was submitted or explicitly retried: the requeue window starts here."""
    not_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    """A requeued analysis is not claimed before this time (backoff after an outage)."""
    requeues: Mapped[int] = mapped_column(Integer, default=0)
    """Times a model-service outage sent it back to the queue (drives the backoff)."""
    needs_npm1: Mapped[bool] = mapped_column(Boolean, server_default=true())
    """Calls the npm1 service: every case but a single-cell one (`optional_needs`)."""
    needs_explain: Mapped[bool] = mapped_column(Boolean, server_default=false())
    """Calls the explain service: the case asked for explanations (`optional_needs`)."""

    @property
    def needs(self) -> frozenset[str]:
        """Every model service this analysis calls; while one of them is down no worker
        claims it (`store.claim_next`)."""
        return CORE_SERVICES | {s for s, column in NEEDS.items() if getattr(self, column.key)}


Index("ix_analyses_claim", Analysis.status, Analysis.lease_until)
NEEDS = {Stage.NPM1: Analysis.needs_npm1, Stage.EXPLAIN: Analysis.needs_explain}
"""The model services only some analyses call, each with the column that says whether an
analysis does: the claim query filters on it, `Analysis.needs` reads it."""
CORE_SERVICES = frozenset(SERVED) - NEEDS.keys()
"""The model services every analysis calls (segmentation, celltype, ensemble)."""


def optional_needs(metadata: dict) -> frozenset[str]:
    """The optional services a new analysis with `metadata` calls: npm1 reads whole fields,
    so a single-cell case (`"input": "cells"`) never calls it; explain only when the case
    asks for explanations (`options.explain`). Stored in the `NEEDS` columns at submission
    (migration 0004 backfilled older analyses the same way)."""
    needs = set()
    if metadata.get("input") != "cells":
        needs.add(Stage.NPM1)
    if metadata.get("options", {}).get("explain"):
        needs.add(Stage.EXPLAIN)
    return frozenset(needs)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("analysis_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    um_per_px: Mapped[float | None] = mapped_column(Float, nullable=True)


class Result(Base):
    __tablename__ = "results"

    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), primary_key=True)
    schema_version: Mapped[str] = mapped_column(String(16))
    result_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Outbox(Base):
    """Webhook notifications, written in the same transaction as the final status."""

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=now)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Hl7Outbox(Base):
    """HL7 v2 result messages to send over MLLP (`hl7outbox`), written in the same
    transaction as the result. One row per analysis and event (finished; later signed_out,
    amended), sent in `seq` order per analysis; `message` / `ack`: the last ones exchanged."""

    __tablename__ = "hl7_outbox"
    __table_args__ = (UniqueConstraint("analysis_id", "event", name="uq_hl7_outbox_event"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    """pending, delivered (AA), parked (AR, or AE too often: a person decides)"""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_answers: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=now)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    control_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    ack: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    salt: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, default=now, index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    key_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(32))
    resource: Mapped[str | None] = mapped_column(String(128), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class SlideJob(Base):
    """A whole-slide analysis (`POST /v1/slides`): where the slide is, and once the worker has
    cut it into tiles (the analysis's images), the selection report and the thumbnail."""

    __tablename__ = "slide_jobs"

    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), primary_key=True)
    source_json: Mapped[str] = mapped_column(Text)
    regions_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    regions_done: Mapped[int] = mapped_column(Integer, default=0)
    selection_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    thumbnail_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expanded_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Idempotency(Base):
    """Idempotency keys are unique per tenant, so a LIS that rotates its API key still replays
    its earlier submissions, and two tenants never see each other's keys."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(32))
    content_hash: Mapped[str] = mapped_column(String(64))
    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Reviewer(Base):
    """A person who reviews and signs out cases in the review app (`/review`): distinct from
    the LIS's API keys. Local accounts carry an argon2id hash; OIDC accounts none."""

    __tablename__ = "reviewers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    display_name: Mapped[str] = mapped_column(String(256))
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)
    roles: Mapped[str] = mapped_column(String(128), default="review")
    password_hash: Mapped[str | None] = mapped_column(Text, nullable=True)
    oidc_subject: Mapped[str | None] = mapped_column(String(512), unique=True, nullable=True)
    """`<issuer> <sub>` of an account made by an OIDC login (migration 0008); None: local."""
    created_at: Mapped[float] = mapped_column(Float, default=now)
    disabled_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ReviewSession(Base):
    """A server-side login session: the cookie holds a random token, the table its SHA-256,
    so a leaked database row cannot be replayed as a cookie."""

    __tablename__ = "review_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer_id: Mapped[str] = mapped_column(ForeignKey("reviewers.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class CaseReview(Base):
    """The reviewer's state of one analysis: corrected cell labels, sign-out and amendments.
    `revision` grows with every change; a change sent against an older revision is refused
    (optimistic locking: two reviewers never overwrite each other's edits)."""

    __tablename__ = "case_reviews"

    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="in_review")
    labels_json: Mapped[str] = mapped_column(Text, default="{}")
    added_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    """Cells the reviewer drew (`services.gateway.review.cells.AddedCell`), a JSON list."""
    excluded_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    """Images and regions the reviewer excluded (`review.cells.Exclusion`), a JSON list."""
    complete_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    """Fields whose boxes the reviewer declared complete (`review.cells.CompleteMark`), a
    JSON list: only those are detection targets (`training.data.corrections`)."""
    signed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    signed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    amendments: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


def make_engine(url: str) -> Engine:
    """Engine for `url`. SQLite: WAL, a busy timeout and `BEGIN IMMEDIATE` transactions, so
    writers serialise instead of failing with "database is locked" on lock upgrades."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            # Switching the journal mode takes a lock that busy_timeout does not cover, so
            # new connections failed with "database is locked" under concurrent writers.
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
