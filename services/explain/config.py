"""Settings of the explain service (env prefix ``MS_EXPLAIN_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class ExplainSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MS_EXPLAIN_")

    model_name: str = "explain"
    grpc_port: int = 50055
    metrics_port: int = 9105
    model_uri: str | None = Field(
        "models:/marrowscope-npm1@champion",
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
