"""Model architectures and their safe on-disk form (safetensors + JSON config).

Public API (heavy imports happen on first use of a builder):
`make_config`, `validate_config`, `build_model`, `save_model`, `load_model`,
`model_digest`, `read_config`, `LoadedModel`, `ModelConfigError`, `ModelFormatError`,
`feature_units`, `units_from_pixel_sizes` (ensemble feature units).
"""

from marrowscope.models.config import (
    ARCHS,
    KINDS,
    ModelConfigError,
    cell_outputs,
    feature_units,
    make_config,
    units_from_pixel_sizes,
    validate_config,
)
from marrowscope.models.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    ModelFormatError,
    build_model,
    load_model,
    model_digest,
    read_config,
    save_model,
)

__all__ = [
    "ARCHS",
    "CONFIG_FILE",
    "KINDS",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelConfigError",
    "ModelFormatError",
    "build_model",
    "cell_outputs",
    "feature_units",
    "load_model",
    "make_config",
    "model_digest",
    "read_config",
    "save_model",
    "units_from_pixel_sizes",
    "validate_config",
]
