"""Pieces shared by the model services (segmentation, celltype, ensemble, npm1, explain).

`PredictorHandler` is a `ModelHandler` that owns one `marrowscope.inference` predictor read
from a model directory (safetensors + config.json, never a pickle) on the configured
device; the services subclass it and add their tensor contract (docs/SERVICES.md).
No grpc here.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from marrowscope import provenance
from marrowscope.errors import InvalidInput
from services.runtime.handler import ModelHandler, Parameters
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)


def bytes_tensor(items: Sequence[str | bytes]) -> np.ndarray:
    """OIP BYTES tensor of shape [len(items)]: object array of ``bytes`` (str -> UTF-8)."""
    out = np.empty(len(items), dtype=object)
    out[:] = [i.encode("utf-8") if isinstance(i, str) else bytes(i) for i in items]
    return out


def decode_names(array: np.ndarray, what: str) -> list[str]:
    """BYTES tensor -> list of str; InvalidInput for elements that are not UTF-8."""
    out = []
    for i, item in enumerate(np.asarray(array, dtype=object).reshape(-1)):
        try:
            out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise InvalidInput(f"{what}[{i}] is not UTF-8 text") from None
    return out


def int_parameter(parameters: Parameters, key: str, default: int, *, minimum: int = 1) -> int:
    """An integer request parameter (``int64_param``) >= ``minimum``; InvalidInput otherwise."""
    value = parameters.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"parameter {key} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidInput(f"parameter {key} must be >= {minimum}, got {value}")
    return value


def str_parameter(
    parameters: Parameters, key: str, default: str, choices: Sequence[str] | None = None
) -> str:
    """A string request parameter, optionally one of ``choices``; InvalidInput otherwise."""
    value = parameters.get(key, default)
    if not isinstance(value, str):
        raise InvalidInput(f"parameter {key} must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise InvalidInput(f"parameter {key} must be one of {list(choices)}, got {value!r}")
    return value


def positive_scale(value: float, what: str) -> float:
    """A finite, positive float (e.g. micrometres per pixel); InvalidInput otherwise."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"{what} must be a finite positive number, got {value}")
    return value


def release_torch_memory() -> None:
    """Return cached GPU memory after a model was dropped (no-op without CUDA)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_predictor(
    predictor_cls: type, local_dir: Path, settings: ServiceSettings, version: str | None = None
) -> Any:
    """``predictor_cls`` (a `marrowscope.inference` predictor) over the model in
    ``local_dir`` on ``settings.device`` with ``settings.autocast``."""
    from marrowscope.models import load_model

    loaded = load_model(local_dir)
    return predictor_cls(
        loaded, device=settings.device, autocast=settings.autocast, version=version
    )


def model_threads(settings: ServiceSettings) -> int:
    """How many model calls a predictor service runs at once (``settings.model_threads``;
    0 = auto). On a CPU, intra-op threads alone leave cores idle when they are fewer than the
    cores (OMP_NUM_THREADS=1 beside other services on one node): the rest go to concurrent
    calls. On CUDA one call at a time; dynamic batching fills the device."""
    if settings.model_threads:
        return settings.model_threads
    import torch

    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, usable_cores() // max(1, torch.get_num_threads()))


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit shows there, not in the affinity, which lists the node's cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity stands
    return cores


class PredictorHandler(ModelHandler):
    """A handler around one `marrowscope.inference` predictor (``predictor_cls``).

    ``__init__`` only reads the model's config (cheap: specs that depend on the model, such
    as the celltype crop size, are known before loading); ``load()`` reads the weights;
    ``stop()`` drops them.
    """

    predictor_cls: ClassVar[type]
    platform = "pytorch"

    def __init__(self, local_dir: str | Path, settings: ServiceSettings) -> None:
        from marrowscope.models.io import read_config

        self.local_dir = Path(local_dir)
        self.settings = settings
        self.config: dict[str, Any] = read_config(self.local_dir)
        self.provenance_parameters = provenance.response_parameters(self.config)
        self.predictor: Any = None
        self.max_concurrency = model_threads(settings)

    def load(self) -> None:
        # the predictor refuses a model of another kind (InvalidInput)
        self.predictor = load_predictor(
            self.predictor_cls, self.local_dir, self.settings, self.version or None
        )
        log.info("loaded %s version %s on %s", self.name, self.version, self.predictor.device)
        super().load()

    def stop(self) -> None:
        self.predictor = None
        release_torch_memory()
        super().stop()
