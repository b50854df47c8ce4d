"""NPM1 handler: P(NPM1 mutated) for whole images at the model's input size.

Tensor contract (docs/CONTRACTS.md, docs/SERVICES.md):
- in  ``IMAGE`` UINT8 [B, H, W, 3] RGB, (H, W) = the loaded model's ``input_size``, fixed in
  ModelMetadata (resize first, e.g. `marrowscope.imaging.resize_for_model`); the gateway
  sends B = 1.
- out ``P_NPM1`` FP32 [B] in [0, 1].

Batchable: concurrent requests are joined along B (dynamic batching by the runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from marrowscope.inference import Npm1Predictor
from services.common import PredictorHandler
from services.npm1.config import Npm1Settings
from services.runtime.handler import Parameters, Tensors, TensorSpec


class Npm1Handler(PredictorHandler):
    outputs = (TensorSpec("P_NPM1", "FP32", (-1,)),)
    batchable = True
    predictor_cls = Npm1Predictor

    def __init__(self, local_dir: str | Path, settings: Npm1Settings) -> None:
        super().__init__(local_dir, settings)
        height, width = (int(v) for v in self.config["input_size"])
        self.inputs = (TensorSpec("IMAGE", "UINT8", (-1, height, width, 3)),)  # type: ignore[misc]

    def warmup(self) -> None:
        _, height, width, _ = self.inputs[0].shape
        self.infer({"IMAGE": np.full((1, height, width, 3), 235, np.uint8)}, {})

    def predict(self, inputs: Tensors) -> np.ndarray:
        return self.predictor.predict(inputs["IMAGE"])

    def postprocess(self, p: np.ndarray, parameters: Parameters) -> Tensors:
        return {"P_NPM1": p.astype(np.float32, copy=False).reshape(-1)}
