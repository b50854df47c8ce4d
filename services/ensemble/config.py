"""Settings of the ensemble service (env prefix ``MS_ENSEMBLE_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class EnsembleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MS_ENSEMBLE_")

    model_name: str = "ensemble"
    grpc_port: int = 50053
    metrics_port: int = 9103
    model_uri: str | None = "models:/marrowscope-ensemble@champion"
