"""Settings of the explain service (env prefix ``MS_EXPLAIN_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from marrowscope.stages import Stage
from services.runtime.settings import ServiceSettings


class ExplainSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=Stage.EXPLAIN.env_prefix)

    model_name: str = Stage.EXPLAIN.value
    grpc_port: int = Stage.EXPLAIN.grpc_port
    metrics_port: int = Stage.EXPLAIN.metrics_port
    model_uri: str | None = Field(
        f"models:/{Stage.EXPLAIN.registered_name}@champion",
        description="the default npm1 model: explained when a request names no target_version",
    )
    target_cache_size: int = Field(
        3, ge=1, description="npm1 versions kept loaded (least recently used dropped first)"
    )
    occlusion_batch_size: int = Field(16, ge=1, description="occluded copies per forward pass")
    default_window: int = Field(
        0,
        ge=0,
        description="grid window (px of the npm1 input) when a request sends none; "
        "0 = 1/8 of the shorter input side",
    )
    max_grid_passes: int = Field(
        20000, ge=1, description="refuse grid requests needing more occluded copies than this"
    )
    max_boxes: int = Field(
        1024,
        ge=1,
        description="refuse requests with more BOXES than this (INVALID_ARGUMENT): cells "
        "mode costs one occluded forward pass per box",
    )
    concurrent_requests: int = Field(
        4,
        ge=1,
        description="requests served at once; they take turns on the device one "
        "occlusion batch at a time, so small requests do not wait for big ones",
    )
