"""Explain handler: occlusion sensitivity of an exact npm1 model version.

Tensor contract (docs/CONTRACTS.md, docs/SERVICES.md):
- in  ``IMAGE`` UINT8 [1, H, W, 3] RGB; ``BOXES`` FP32 [N, 4] cell boxes x1, y1, x2, y2 in
  pixels of IMAGE (N may be 0). When (H, W) is not the npm1 model's ``input_size`` the image
  is resized to it (`marrowscope.imaging.resize_for_model`) and the boxes scaled alike; the
  heatmap comes back at (H, W).
- parameters: ``target_model`` (only ``npm1``), ``target_version`` (registry version number;
  default: this service's own npm1 version; a ``local-...`` version only when it is the
  configured default model), ``mode`` (``cells`` default | ``grid``), ``window`` and
  ``stride`` (grid only, pixels of the npm1 input).
- out ``HEATMAP`` FP32 [H, W]: drop of P(NPM1) when that region (grid) or that cell (cells)
  is replaced by the slide background; ``CELL_IMPORTANCE`` FP32 [N]: per-cell drop (cells)
  or the mean of the grid map inside each box (grid; 0 for boxes outside the image).

An unknown ``target_version`` is ModelNotFound (NOT_FOUND). Up to ``TARGET_CACHE_SIZE``
other versions stay loaded (least recently used dropped first). Not batchable.

Work per request is bounded: at most ``MAX_BOXES`` boxes (and ``MAX_GRID_PASSES`` grid
copies), else INVALID_ARGUMENT. Before each occlusion batch the request checks its
cancellation (caller gone, deadline passed, shutdown) and stops; up to
``CONCURRENT_REQUESTS`` requests run at once and take the device in turns, one occlusion
batch each (``FairTurns``), so a one-cell request waits for one batch of a big one.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowscope.errors import InvalidInput, ModelNotFound, ModelNotReady
from marrowscope.inference import Npm1Predictor, autocast_context
from marrowscope.stages import Stage
from services.common import int_parameter, load_predictor, release_torch_memory, str_parameter
from services.explain.config import ExplainSettings
from services.runtime.handler import FairTurns, ModelHandler, Parameters, Tensors, TensorSpec

log = logging.getLogger(__name__)

TARGET_MODELS: tuple[str, ...] = (Stage.NPM1,)
MODES = ("cells", "grid")
NPM1_REGISTERED_NAME = Stage.NPM1.registered_name


@dataclass(frozen=True)
class _Job:
    predictor: Npm1Predictor
    image: np.ndarray  # uint8[h, w, 3] at the predictor's input size
    boxes: np.ndarray  # float32[N, 4] in pixels of `image`
    out_hw: tuple[int, int]  # (H, W) of the request's IMAGE
    mode: str
    window: int
    stride: int


class ExplainHandler(ModelHandler):
    inputs = (
        TensorSpec("IMAGE", "UINT8", (1, -1, -1, 3)),
        TensorSpec("BOXES", "FP32", (-1, 4)),
    )
    outputs = (
        TensorSpec("HEATMAP", "FP32", (-1, -1)),
        TensorSpec("CELL_IMPORTANCE", "FP32", (-1,)),
    )
    batchable = False
    platform = "pytorch"

    def __init__(self, local_dir: str | Path, settings: ExplainSettings) -> None:
        self.local_dir = Path(local_dir)
        self.settings = settings
        self.default: Npm1Predictor | None = None
        self._others: collections.OrderedDict[str, Npm1Predictor] = collections.OrderedDict()
        self.max_concurrency = settings.concurrent_requests
        self._turns = FairTurns()
        self._cache_lock = threading.Lock()  # requests run in several threads

    # -- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        self.default = load_predictor(
            Npm1Predictor, self.local_dir, self.settings, self.version or None
        )
        super().load()

    def warmup(self) -> None:
        h, w = self._loaded().input_size
        image = np.full((1, h, w, 3), 235, np.uint8)
        box = np.array([[w / 4, h / 4, w / 2, h / 2]], np.float32)
        self.infer({"IMAGE": image, "BOXES": box}, {})

    def stop(self) -> None:
        self.default = None
        self._others.clear()
        release_torch_memory()
        super().stop()

    # -- target versions -----------------------------------------------------------------
    def target(self, version: str) -> Npm1Predictor:
        """The npm1 predictor of ``version`` ("" = this service's own); ModelNotFound if
        the registry has no such version."""
        if not version or version == self.version:
            return self._loaded()
        with self._cache_lock:
            return self._other(version)

    def _loaded(self) -> Npm1Predictor:
        if self.default is None:  # infer() refuses requests before load(), so only a bug
            raise ModelNotReady(f"model {self.name} version {self.version} is not loaded")
        return self.default

    def _other(self, version: str) -> Npm1Predictor:
        if version in self._others:
            self._others.move_to_end(version)
            return self._others[version]
        if not version.isdigit():
            raise ModelNotFound(
                f"npm1 version {version!r} cannot be explained here: give a registry version "
                f"number; a local model is explained only when it is this service's default "
                f"model (version {self.version})"
            )
        predictor = self._load_registered(version)
        self._others[version] = predictor
        while len(self._others) > self.settings.target_cache_size:
            dropped, _ = self._others.popitem(last=False)
            log.info("dropped npm1 version %s from the explain cache", dropped)
            release_torch_memory()
        return predictor

    def _load_registered(self, version: str) -> Npm1Predictor:
        from marrowscope import registry

        try:
            resolved = registry.resolve(f"models:/{NPM1_REGISTERED_NAME}/{version}")
        except ModelNotFound as exc:
            raise ModelNotFound(f"cannot explain npm1 version {version}: {exc}") from None
        log.info("loading npm1 version %s for explanations", version)
        return load_predictor(Npm1Predictor, resolved.local_dir, self.settings, resolved.version)

    # -- inference -----------------------------------------------------------------------
    def preprocess(self, inputs: Tensors, parameters: Parameters) -> _Job:
        target_model = str_parameter(parameters, "target_model", Stage.NPM1, TARGET_MODELS)
        del target_model  # one explainable model today; the check keeps others out
        mode = str_parameter(parameters, "mode", "cells", MODES)
        image, boxes = inputs["IMAGE"][0], inputs["BOXES"]
        if len(boxes) > self.settings.max_boxes:  # before loading any other npm1 version
            raise InvalidInput(
                f"{len(boxes)} BOXES; the limit is {self.settings.max_boxes} per request "
                "(explain an image's cells in several requests)"
            )
        predictor = self.target(str_parameter(parameters, "target_version", ""))
        if not np.isfinite(boxes).all():
            raise InvalidInput("BOXES contain NaN or infinite coordinates")
        height, width = image.shape[:2]
        h, w = predictor.input_size
        if (height, width) != (h, w):
            image = predictor.prepare(image)
            boxes = boxes * np.array([w / width, h / height] * 2, np.float32)
        window = stride = 0
        if mode == "grid":
            default = self.settings.default_window or max(1, min(h, w) // 8)
            window = int_parameter(parameters, "window", default)
            stride = int_parameter(parameters, "stride", max(1, window // 2))
            if not stride <= window <= min(h, w):
                raise InvalidInput(
                    f"need stride <= window <= {min(h, w)} (the shorter side of "
                    f"the npm1 input {h}x{w}); got window={window}, "
                    f"stride={stride}"
                )
            passes = (math.ceil((h - window) / stride) + 1) * (math.ceil((w - window) / stride) + 1)
            if passes > self.settings.max_grid_passes:
                raise InvalidInput(
                    f"window={window}, stride={stride} need {passes} occluded "
                    f"copies; the limit is {self.settings.max_grid_passes}"
                )
        return _Job(
            predictor, image, boxes.astype(np.float32), (height, width), mode, window, stride
        )

    def predict(self, job: _Job) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from marrowscope.explain import occlusion_cells, occlusion_grid

        predictor = job.predictor
        module, device = predictor.module, predictor.device
        cancellation = self.cancellation  # this request's (per thread)

        def forward(batch: torch.Tensor) -> torch.Tensor:
            # one occlusion batch per turn: stop here when the caller is gone
            with self._turns.turn(cancellation), autocast_context(device, self.settings.autocast):
                cancellation.check()
                return module(batch).float().sigmoid().reshape(-1)

        x = (
            torch.from_numpy(np.ascontiguousarray(job.image))
            .to(device)
            .permute(2, 0, 1)[None]
            .float()
            .div_(255.0)
        )
        batch_size = self.settings.occlusion_batch_size
        with torch.no_grad():
            if job.mode == "cells":
                importance, heatmap = occlusion_cells(forward, x, job.boxes, batch_size=batch_size)
            else:
                heatmap = occlusion_grid(
                    forward, x, window=job.window, stride=job.stride, batch_size=batch_size
                )
                importance = _box_means(heatmap, job.boxes)
        return importance, _resize_map(heatmap, job.out_hw, job.mode)

    def postprocess(
        self, outputs: tuple[np.ndarray, np.ndarray], parameters: Parameters
    ) -> Tensors:
        importance, heatmap = outputs
        return {
            "HEATMAP": heatmap.astype(np.float32, copy=False),
            "CELL_IMPORTANCE": importance.astype(np.float32, copy=False).reshape(-1),
        }


def _box_means(heatmap: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of ``heatmap`` float[h, w] inside each box (x1, y1, x2, y2 px, clipped); 0 for
    boxes with no pixel inside the map."""
    h, w = heatmap.shape
    out = np.zeros(len(boxes), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(np.int64)):
        x1, x2 = np.clip([x1, x2], 0, w)
        y1, y2 = np.clip([y1, y2], 0, h)
        if x2 > x1 and y2 > y1:
            out[i] = heatmap[y1:y2, x1:x2].mean()
    return out


def _resize_map(heatmap: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    """float[h, w] -> float32[H, W]; nearest for the piecewise-constant cells map, bilinear
    for the grid map."""
    if heatmap.shape == hw:
        return heatmap.astype(np.float32, copy=False)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    if mode == "cells":
        t = F.interpolate(t, size=hw, mode="nearest")
    else:
        t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)
    return t[0, 0].numpy()
