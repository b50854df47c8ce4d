"""Settings of the npm1 service (env prefix ``MS_NPM1_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from marrowscope.stages import Stage
from services.runtime.settings import ServiceSettings


class Npm1Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=Stage.NPM1.env_prefix)

    model_name: str = Stage.NPM1.value
    grpc_port: int = Stage.NPM1.grpc_port
    metrics_port: int = Stage.NPM1.metrics_port
    model_uri: str | None = f"models:/{Stage.NPM1.registered_name}@champion"
