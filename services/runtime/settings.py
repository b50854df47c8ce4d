"""Settings shared by every model service (docs/CONTRACTS.md, "Open Inference Protocol").

Each service subclasses ``ServiceSettings`` with its own env prefix and defaults::

    class Npm1Settings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="MS_NPM1_")
        model_name: str = "npm1"
        grpc_port: int = 50054
        metrics_port: int = 9104
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Runtime settings of one model service; env names are ``<prefix><FIELD>`` upper-case."""

    model_config = SettingsConfigDict(env_prefix="MS_SERVICE_", extra="ignore", frozen=True)

    model_name: str = Field("model", description="wire model name (segmentation, celltype, ...)")
    grpc_host: str = Field("[::]", description="gRPC bind address")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_host: str = Field("0.0.0.0", description="Prometheus HTTP bind address")
    metrics_port: int = Field(
        8002, ge=0, le=65535, description="Prometheus HTTP port; 0 picks a free one"
    )
    model_uri: str | None = Field(
        None, description="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory"
    )
    poll_interval_s: float = Field(30.0, ge=0, description="registry poll period; 0 = never")
    max_batch_size: int = Field(8, ge=1, description="most requests merged into one predict")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="longest wait to fill a batch")
    model_threads: int = Field(
        0,
        ge=0,
        description="model calls (requests, or batches of batchable models) run at once, each "
        "in its own thread; 0 = auto: on a CPU the usable cores divided by torch's intra-op "
        "threads (so a service started with OMP_NUM_THREADS=1 still uses every core it is "
        "given), on CUDA 1",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when present), cpu, or cuda (fails without a GPU)"
    )
    autocast: Literal["none", "fp16", "bf16"] = Field(
        "none", description="mixed precision on CUDA (none, fp16, bf16)"
    )
    grace_period_s: float = Field(
        10.0,
        ge=0,
        description="SIGTERM: the process exits within this many seconds; in-flight requests "
        "get all of it but a reserve (a quarter, at most 1 s), then are cancelled",
    )
    version_grace_s: float = Field(
        30.0, ge=0, description="how long a replaced version keeps answering when named"
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="max gRPC send/receive message size"
    )
    log_level: str = Field("INFO", description="JSON logs on stderr at this level")
