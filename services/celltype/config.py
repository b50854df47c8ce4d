"""Settings of the celltype service (env prefix ``MS_CELLTYPE_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from marrowscope.stages import Stage
from services.runtime.settings import ServiceSettings


class CelltypeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=Stage.CELLTYPE.env_prefix)

    model_name: str = Stage.CELLTYPE.value
    grpc_port: int = Stage.CELLTYPE.grpc_port
    metrics_port: int = Stage.CELLTYPE.metrics_port
    model_uri: str | None = f"models:/{Stage.CELLTYPE.registered_name}@champion"
    chunk_size: int = Field(256, ge=1, description="crops per forward pass (bounds GPU memory)")
