"""Settings of the ensemble service (env prefix ``MS_ENSEMBLE_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from marrowscope.stages import Stage
from services.runtime.settings import ServiceSettings


class EnsembleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=Stage.ENSEMBLE.env_prefix)

    model_name: str = Stage.ENSEMBLE.value
    grpc_port: int = Stage.ENSEMBLE.grpc_port
    metrics_port: int = Stage.ENSEMBLE.metrics_port
    model_uri: str | None = f"models:/{Stage.ENSEMBLE.registered_name}@champion"
    mil_model_uri: str | None = Field(
        None,
        description="also serve the attention-MIL model (P(APL | AML) from cell embeddings) "
        "as the OIP model `mil`: models:/marrowscope-mil@champion, models:/marrowscope-mil/"
        "VERSION or a model directory; unset: no mil model (the gateway reports P(APL) from "
        "the ensemble's apl head)",
    )
