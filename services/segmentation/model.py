"""Segmentation handler: detect cells on an encoded image and measure each one.

Tensor contract (docs/CONTRACTS.md, docs/SERVICES.md):
- in  ``IMAGE`` BYTES [1]: one encoded PNG/JPEG/TIFF (decoded with
  `marrowscope.imaging.decode_image` under the service's size/pixel limits);
  optional ``UM_PER_PX`` FP32 [1]: micrometres per pixel (areas in um^2, else px^2);
  optional ``BOXES_IN`` FP32 [N, 4] x1, y1, x2, y2 pixels inside the image: detection is
  skipped and exactly these boxes are measured, answered in the given order with SCORES 1.0
  and LABELS `marrowscope.case.SINGLE_CELL_LABEL` (a nucleated label: typed and counted).
  A single-cell image (a CellaVision-type crop) is sent with its whole-image box.
- out ``BOXES`` FP32 [N, 4] x1, y1, x2, y2 pixels of the decoded image; ``SCORES`` FP32 [N]
  in [0, 1], descending; ``LABELS`` BYTES [N] detector class names (taxonomy codes, e.g.
  ``BLA``, ``RBC``); ``FEATURES`` FP32 [N, F] `marrowscope.morphometrics.measure_cells` rows;
  ``FEATURE_NAMES`` BYTES [F] (`morphometrics.FEATURE_NAMES` order); ``LENGTH_UNIT`` BYTES
  [1] ``um`` (UM_PER_PX was given: lengths in um, areas in um^2) or ``px`` (px, px^2), so a
  consumer never has to guess the unit of FEATURES.
- response parameters ``morphometrics_split`` (``learned`` or ``classical``) and
  ``splitter_version`` (the nucseg registry version, or ``""`` for the classical split):
  which nucleus/cytoplasm split produced FEATURES, so the report can show it.

The learned split (`marrowscope.models.nucseg`) is a second model with its own registry
name and versions (setting ``SPLITTER_URI``). It is resolved and loaded with each detector
version; when none is configured or it cannot be resolved or loaded, the service serves
the classical split (`marrowscope.morphometrics`) and logs why: a missing splitter must
not take cell detection down.

Not batchable: N differs per image, so one request is one predict call.

BOXES_IN must be finite, shaped [N, 4] with x1 <= x2, y1 <= y2 and inside the image
(0 <= x <= W, 0 <= y <= H); anything else is INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from marrowscope.errors import InvalidInput
from marrowscope.inference import Detections, Detector
from services.common import PredictorHandler, bytes_tensor, positive_scale
from services.runtime.handler import Parameters, Tensors, TensorSpec
from services.segmentation.config import SegmentationSettings

log = logging.getLogger(__name__)
CLASSICAL, LEARNED = "classical", "learned"
SPLITTER_NAME = "marrowscope-nucseg"


@dataclass(frozen=True)
class _Request:
    image: np.ndarray  # uint8[H, W, 3]
    um_per_px: float | None
    boxes: np.ndarray | None = None  # float32[N, 4] to measure instead of detecting


class SegmentationHandler(PredictorHandler):
    inputs = (
        TensorSpec("IMAGE", "BYTES", (1,)),
        TensorSpec("UM_PER_PX", "FP32", (1,), optional=True),
        TensorSpec("BOXES_IN", "FP32", (-1, 4), optional=True),
    )
    outputs = (
        TensorSpec("BOXES", "FP32", (-1, 4)),
        TensorSpec("SCORES", "FP32", (-1,)),
        TensorSpec("LABELS", "BYTES", (-1,)),
        TensorSpec("FEATURES", "FP32", (-1, -1)),
        TensorSpec("FEATURE_NAMES", "BYTES", (-1,)),
        TensorSpec("LENGTH_UNIT", "BYTES", (1,)),
    )
    batchable = False
    predictor_cls = Detector
    settings: SegmentationSettings
    splitter: Any = None
    response_parameters = {
        "morphometrics_split": CLASSICAL,
        "splitter_version": "",
        "splitter_trained_on": "",
    }

    def load(self) -> None:
        from marrowscope.provenance import trained_on

        super().load()
        self.splitter = load_splitter(self.settings)
        self.response_parameters = {
            "morphometrics_split": CLASSICAL if self.splitter is None else LEARNED,
            "splitter_version": "" if self.splitter is None else self.splitter.version,
            # the learned split is a model of its own: reports name what it learned from
            "splitter_trained_on": ""
            if self.splitter is None
            else trained_on(self.splitter.config),
        }

    def stop(self) -> None:
        self.splitter = None
        super().stop()

    def warmup(self) -> None:
        from marrowscope.imaging import encode_png

        side = max(64, self.settings.min_image_side)
        image = np.full((side, side, 3), 235, np.uint8)
        image[side // 4 : side // 2, side // 4 : side // 2] = (120, 60, 160)
        self.infer({"IMAGE": bytes_tensor([encode_png(image)])}, {})

    def preprocess(self, inputs: Tensors, parameters: Parameters) -> _Request:
        from marrowscope.imaging import decode_image

        data = inputs["IMAGE"][0]
        if not isinstance(data, bytes):
            raise InvalidInput("IMAGE must hold the encoded image bytes")
        image = decode_image(data, limits=self.settings.image_limits())
        um = inputs.get("UM_PER_PX")
        boxes = inputs.get("BOXES_IN")
        return _Request(
            image,
            None if um is None else positive_scale(um[0], "UM_PER_PX"),
            None if boxes is None else boxes_inside(boxes, image.shape[:2]),
        )

    def predict(self, request: _Request) -> tuple[_Request, Detections]:
        if request.boxes is not None:
            from marrowscope.case import SINGLE_CELL_LABEL

            n = len(request.boxes)
            given = Detections(request.boxes, np.ones(n, np.float32), (SINGLE_CELL_LABEL,) * n)
            return request, given
        return request, self.predictor.predict(request.image, self.settings.score_threshold)

    def postprocess(self, outputs: tuple[_Request, Detections], parameters: Parameters) -> Tensors:
        from marrowscope.morphometrics import FEATURE_NAMES, measure_cells

        request, det = outputs
        features = measure_cells(
            request.image,
            det.boxes,
            request.um_per_px,
            margin=self.settings.morphometrics_margin,
            splitter=self.splitter,
            batched=self.settings.morphometrics_batched,
            device=self.predictor.device,
        )
        return {
            "BOXES": det.boxes.astype(np.float32).reshape(-1, 4),
            "SCORES": det.scores.astype(np.float32).reshape(-1),
            "LABELS": bytes_tensor(det.labels),
            "FEATURES": features.astype(np.float32).reshape(len(det), len(FEATURE_NAMES)),
            "FEATURE_NAMES": bytes_tensor(FEATURE_NAMES),
            "LENGTH_UNIT": bytes_tensor(["px" if request.um_per_px is None else "um"]),
        }


def boxes_inside(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`BOXES_IN` as float32[N, 4] after checking it: finite, x1 <= x2 and y1 <= y2, inside
    an image of `shape` (H, W). Raises InvalidInput otherwise."""
    b = np.asarray(boxes, np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InvalidInput(f"BOXES_IN must be shaped [N, 4], got {list(b.shape)}")
    if not np.isfinite(b).all():
        raise InvalidInput("BOXES_IN holds NaN or infinite coordinates")
    h, w = shape
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise InvalidInput("BOXES_IN needs x1 <= x2 and y1 <= y2 in every box")
    if (b < 0).any() or (b[:, [0, 2]] > w).any() or (b[:, [1, 3]] > h).any():
        raise InvalidInput(f"BOXES_IN must lie inside the {w}x{h} image")
    return b


def load_splitter(settings: SegmentationSettings) -> Any:
    """The learned split of ``settings.splitter_uri`` on the service's device, or None (the
    classical split) when none is configured or it cannot be resolved or loaded.

    Any failure falls back, deliberately: the splitter only refines morphometrics, and a
    registry hiccup or a bad splitter version must not stop cell detection. The reason is
    logged and every response names the split that ran.
    """
    uri = settings.splitter_uri
    if not uri:
        log.info("no splitter configured: classical nucleus/cytoplasm split")
        return None
    try:
        from marrowscope.models.nucseg import LearnedSplitter
        from marrowscope.registry import resolve

        resolved = resolve(uri, name=SPLITTER_NAME)
        splitter = LearnedSplitter.from_dir(
            resolved.local_dir, device=settings.device, version=resolved.version
        )
    except Exception as exc:  # fallback by design (docstring); the reason is logged
        log.warning(
            "splitter %s could not be loaded (%s: %s): classical nucleus/cytoplasm split",
            uri,
            type(exc).__name__,
            exc,
        )
        return None
    log.info("learned nucleus/cytoplasm split %s version %s", uri, splitter.version)
    return splitter
