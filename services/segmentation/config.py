"""Settings of the segmentation service (env prefix ``MS_SEGMENTATION_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from marrowscope.imaging import ImageLimits
from marrowscope.stages import Stage
from services.runtime.settings import ServiceSettings

_LIMITS = ImageLimits()


class SegmentationSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=Stage.SEGMENTATION.env_prefix)

    model_name: str = Stage.SEGMENTATION.value
    grpc_port: int = Stage.SEGMENTATION.grpc_port
    metrics_port: int = Stage.SEGMENTATION.metrics_port
    model_uri: str | None = f"models:/{Stage.SEGMENTATION.registered_name}@champion"
    max_image_bytes: int = Field(_LIMITS.max_bytes, ge=1, description="largest encoded IMAGE")
    max_image_pixels: int = Field(
        _LIMITS.max_pixels,
        ge=1,
        description="largest decoded IMAGE (width x height), checked "
        "from the header before decoding",
    )
    min_image_side: int = Field(_LIMITS.min_side, ge=1, description="smallest IMAGE side (px)")
    score_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="keep detections scoring at least this; None = the model config's value",
    )
    splitter_uri: str | None = Field(
        None,
        description="learned nucleus/cytoplasm split (a second, separately versioned model): "
        "models:/marrowscope-nucseg@champion, models:/marrowscope-nucseg/VERSION or a model "
        "directory; resolved when a detector version loads. None, or a splitter that fails "
        "to load, gives the classical split (logged; responses say which split ran)",
    )
    morphometrics_batched: bool = Field(
        False,
        description="compute the per-cell features of an image as one batch of tensors on the "
        "model's device (marrowscope.morphometrics_batch: the same masks, features within its "
        "documented tolerance); off: per cell with scikit-image. Off by default: on one CPU "
        "core the service measured 1.10x the cells/s with the classical split and 0.97x "
        "with the learned one (bench/segmentation_cells.py; the split dominates on a CPU)",
    )
    morphometrics_margin: float = Field(
        0.15,
        ge=0.0,
        description="context around each box for the nucleus/cytoplasm split, "
        "as a fraction of the box size",
    )

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            min_side=self.min_image_side,
        )
