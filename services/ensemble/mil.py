"""MIL handler: P(APL | AML) and per-cell attention from a case's cell embeddings
(`marrowscope.models.mil`), served as the OIP model ``mil`` beside the ensemble.

Tensor contract (docs/CONTRACTS.md):
- in  ``CELL_EMBEDDINGS`` FP32 [N, D]: every typed cell of the case (N >= 1), each the
  celltype service's ``EMBEDDINGS`` row for it; D must equal the config's
  ``embedding_dim`` (fixed in ModelMetadata), values finite, else INVALID_ARGUMENT.
- out ``P_APL`` FP32 [1] in [0, 1]: P(APL | AML); ``ATTENTION`` FP32 [N]: each cell's
  attention weight, in input order, summing to 1.
- response parameters (string) ``lineage_celltype_model`` / ``lineage_celltype``: the
  celltype model name and version whose embeddings the model learned (config
  ``celltype``); the gateway refuses the answer when that is not the celltype version it
  pinned (the embeddings would mean something else).

Not batchable: one bag per case, bags differ in N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from marrowscope.inference import MilPredictor
from services.common import PredictorHandler
from services.runtime.handler import Parameters, Tensors, TensorSpec
from services.runtime.settings import ServiceSettings

MIL_MODEL_NAME = "mil"


class MilHandler(PredictorHandler):
    batchable = False
    predictor_cls = MilPredictor
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("P_APL", "FP32", (1,)),
        TensorSpec("ATTENTION", "FP32", (-1,)),
    )

    def __init__(self, local_dir: str | Path, settings: ServiceSettings) -> None:
        super().__init__(local_dir, settings)
        if self.config["kind"] != "mil":
            from marrowscope.errors import ModelNotReady

            raise ModelNotReady(f"{local_dir} holds a {self.config['kind']} model, not mil")
        self.embedding_dim = int(self.config["embedding_dim"])
        # per loaded version: ModelMetadata shows the D this version reads
        spec = TensorSpec("CELL_EMBEDDINGS", "FP32", (-1, self.embedding_dim))
        self.inputs = (spec,)  # type: ignore[misc]
        celltype = self.config["celltype"]
        self.response_parameters = {
            "lineage_celltype_model": str(celltype["name"]),
            "lineage_celltype": str(celltype["version"]),
        }

    def warmup(self) -> None:
        self.infer({"CELL_EMBEDDINGS": np.zeros((2, self.embedding_dim), np.float32)}, {})

    def predict(self, inputs: Tensors) -> tuple[float, np.ndarray]:
        return self.predictor.predict(inputs["CELL_EMBEDDINGS"])  # type: ignore[no-any-return]

    def postprocess(self, answer: tuple[float, np.ndarray], parameters: Parameters) -> Tensors:
        p, attention = answer
        return {
            "P_APL": np.array([p], np.float32),
            "ATTENTION": np.asarray(attention, np.float32).reshape(-1),
        }
