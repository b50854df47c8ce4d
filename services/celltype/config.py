"""Settings of the celltype service (env prefix ``MS_CELLTYPE_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class CelltypeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MS_CELLTYPE_")

    model_name: str = "celltype"
    grpc_port: int = 50052
    metrics_port: int = 9102
    model_uri: str | None = "models:/marrowscope-celltype@champion"
    chunk_size: int = Field(256, ge=1, description="crops per forward pass (bounds GPU memory)")
