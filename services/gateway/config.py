"""Gateway settings: one pydantic-settings class, environment prefix `MS_GATEWAY_`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES: tuple[str, ...] = ("segmentation", "celltype", "ensemble", "npm1", "explain")


class GatewaySettings(BaseSettings):
    """Every knob of the gateway; each field reads `MS_GATEWAY_<FIELD>` from the environment."""

    model_config = SettingsConfigDict(env_prefix="MS_GATEWAY_", extra="ignore")

    data_dir: Path = Path(".marrowscope/gateway")
    database_url: str = ""
    """SQLAlchemy URL; empty means `sqlite:///<data_dir>/gateway.db` (WAL mode)."""
    image_root: Path | None = None
    """Content-addressed image and artifact files; default `<data_dir>/images`."""
    host: str = "127.0.0.1"
    port: int = 8080

    segmentation_addr: str = "127.0.0.1:50051"
    celltype_addr: str = "127.0.0.1:50052"
    ensemble_addr: str = "127.0.0.1:50053"
    npm1_addr: str = "127.0.0.1:50054"
    explain_addr: str = "127.0.0.1:50055"
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

    default_um_per_px: float | None = Field(None, gt=0, le=10)
    """Pixel size (um) for images submitted without `options.um_per_px`, for deployments
    whose scanner is fixed; unset: such images are measured in px and, when the ensemble
    learned um, the report withholds P(AML) (`aml.reason` `pixel_size_required`)."""
    min_cells: int = Field(50, ge=1)
    """Fewer counted (non-RBC) cells over the case -> status `abstained`, no probability."""
    npm1_threshold: float = Field(0.5, ge=0, le=1)
    aml_threshold: float = Field(0.5, ge=0, le=1)
    celltype_batch: int = Field(64, ge=1)
    allow_local_lineage: bool = False
    """Accept a missing/mismatching ensemble lineage when the upstream pinned versions are
    local directories (`local-...`); never for registry versions."""

    max_images: int = Field(32, ge=1)
    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0)
    """Per image file."""
    max_pixels: int = Field(40_000_000, gt=0)
    max_metadata_bytes: int = Field(16 * 1024, gt=0)

    slide_roots: dict[str, str] = Field(default_factory=dict)
    """Slide stores by name (JSON): a local/NFS directory or an fsspec URL (`s3://b/slides`)."""
    slide_cache_dir: Path | None = None
    """Local copies of object-store slides; default `<data_dir>/slides`."""
    max_slide_bytes: int = Field(20 * 1024**3, gt=0)
    """Largest slide accepted (upload or store reference); above it: 413."""

    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(10, ge=1)
    webhook_backoff_s: float = Field(2.0, gt=0)
    webhook_backoff_max_s: float = Field(600.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    allow_private_webhooks: bool = True

    embedded_worker: bool = True
    workers: int = Field(1, ge=1)
    """Concurrent analyses per worker process."""
    poll_interval_s: float = Field(0.5, gt=0)
    lease_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    """Claims of one analysis (worker crashes) before it fails instead of looping forever."""
    metrics_port: int = 0
    """Standalone workers only: serve Prometheus metrics on this port (0 = off)."""

    rate_limit_per_min: int = Field(120, ge=1)
    log_level: str = "INFO"

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
