"""Settings of the npm1 service (env prefix ``MS_NPM1_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class Npm1Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MS_NPM1_")

    model_name: str = "npm1"
    grpc_port: int = 50054
    metrics_port: int = 9104
    model_uri: str | None = "models:/marrowscope-npm1@champion"
