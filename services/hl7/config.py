"""Settings of the HL7 order listener: one pydantic-settings class, environment prefix
`MS_HL7_`. The job store, image store and image limits are the gateway's (`MS_GATEWAY_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Hl7ListenerSettings(BaseSettings):
    """Every knob of the listener; each field reads `MS_HL7_<FIELD>` from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="MS_HL7_", extra="ignore", use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    port: int = Field(2575, ge=0, le=65535)
    """The MLLP port (2575: HL7's registered port). Its orders belong to the tenant their
    sending facility (MSH-4) maps to in `FACILITY_TENANTS`, else to `TENANT`."""
    tenant: str = "default"
    """Tenant of an order on `PORT` whose MSH-4 is not in `FACILITY_TENANTS`; empty: such an
    order is rejected (AR, unknown sending facility)."""
    facility_tenants: dict[str, str] = Field(default_factory=dict)
    """JSON object: sending facility (MSH-4, its first component) -> tenant, on `PORT`."""
    tenant_ports: dict[str, int] = Field(default_factory=dict)
    """JSON object: tenant -> a port of its own; every order on it is that tenant's,
    whatever its MSH-4 says (a port per site, e.g. behind per-site network policy)."""
    input_root: Path | None = None
    """Where orders' inputs are: `DIR/<accession>/` holds the case's images (PNG, JPEG,
    TIFF; fields of view, or single-cell images for `marrowscope-cells`). Unset: image
    orders are answered AE."""
    slide_store: str = ""
    """A local slide store of the gateway (a name in `MS_GATEWAY_SLIDE_ROOTS`) where a
    `marrowscope-slide` order's slide is `<accession>.<svs|tif|tiff|ndpi|...>`; empty:
    slide orders are answered AE."""
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    """Largest message (between the MLLP start and end bytes); a larger one is answered AR
    and its connection closed."""
    read_timeout_s: float = Field(30.0, gt=0)
    """A message must arrive whole within this time of its start byte (slow-loris); else
    the connection is closed."""
    idle_timeout_s: float = Field(300.0, gt=0)
    """A connection that sends nothing between messages for this long is closed
    (half-open connections of a LIS that went away)."""
    max_connections: int = Field(64, ge=1)
    """Connections at once over all ports; one more is closed at once."""
    handler_threads: int = Field(4, ge=1, le=64)
    """Messages processed at once (reading inputs, decoding images, the job store)."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    """On SIGTERM: messages being processed get this long to be answered."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Prometheus metrics on this port (0 = off)."""
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _ports_distinct(self) -> Hl7ListenerSettings:
        ports = [self.port, *self.tenant_ports.values()]
        if self.port and len(set(ports)) != len(ports):
            raise ValueError("PORT and TENANT_PORTS must all differ")
        return self

    def listeners(self) -> dict[int, str | None]:
        """Port -> its fixed tenant (None: by sending facility)."""
        out: dict[int, str | None] = {self.port: None}
        out.update({port: tenant for tenant, port in self.tenant_ports.items()})
        return out

    def tenant_of(self, fixed: str | None, facility: str) -> str | None:
        """The tenant of an order: its port's, else its facility's, else `TENANT` (None when
        none applies)."""
        if fixed is not None:
            return fixed
        return self.facility_tenants.get(facility) or self.tenant or None
