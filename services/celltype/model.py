"""Celltype handler: cell-type and attribute probabilities for square cell crops.

Tensor contract (docs/CONTRACTS.md, docs/SERVICES.md):
- in  ``CROPS`` UINT8 [B, S, S, 3] RGB crops, S = the loaded model's ``crop_size`` (fixed in
  ModelMetadata, so clients read S from there); cut them like training did
  (`marrowscope.imaging.crop_cells` with ``CELL_CROP_PAD_FRACTION`` of context; a model
  trained with another padding is refused at load, since clients cannot see it).
- out ``PROBS`` FP32 [B, K] in [0, 1]; ``NAMES`` BYTES [K]: cell codes, then attribute codes
  (the model config's ``outputs``).
- out ``EMBEDDINGS`` FP32 [B, D], only for a request with the (bool) parameter
  ``embeddings`` true: each crop's penultimate embedding (the backbone's features, the head's
  input; D fixed per loaded version in ModelMetadata), what a MIL model learns from
  (`marrowscope.models.mil`). Computed in the same forward pass; requests without the
  parameter pay nothing and get no EMBEDDINGS (naming the output alone does not compute it).
- out ``DOMAIN`` FP32 [B, 2], with EMBEDDINGS when the loaded version carries a domain
  reference (``domain.json`` beside its weights, `marrowscope.domain`): each crop's
  embedding and appearance distance from the typer's training cells (1 = a typical
  training cell); the gateway's case score is the larger of their medians. Every response
  carries the string parameters ``domain_reference`` (``present`` | ``absent``) and, with a
  calibrated reference, ``domain_threshold``. A reference file that cannot be read keeps
  the version from loading (a broken file must not switch the check off unnoticed).

Batchable: concurrent requests are joined along B (dynamic batching by the runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from marrowscope.domain import DomainReference, DomainReferenceError
from marrowscope.errors import InvalidInput, ModelNotReady
from marrowscope.imaging import CELL_CROP_PAD_FRACTION
from marrowscope.inference import CellTyper
from services.celltype.config import CelltypeSettings
from services.common import PredictorHandler, bytes_tensor
from services.runtime.handler import Parameters, Tensors, TensorSpec

EMBEDDINGS_PARAMETER = "embeddings"
Answer = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
"""(probabilities, embeddings when asked, domain distances when asked and referenced)."""


class CelltypeHandler(PredictorHandler):
    batchable = True
    predictor_cls = CellTyper
    settings: CelltypeSettings

    def __init__(self, local_dir: str | Path, settings: CelltypeSettings) -> None:
        super().__init__(local_dir, settings)
        size = int(self.config["crop_size"])
        pad = float(
            self.config.get("hyperparameters", {}).get("crop_pad_fraction", CELL_CROP_PAD_FRACTION)
        )
        if abs(pad - CELL_CROP_PAD_FRACTION) > 1e-9:
            raise ModelNotReady(
                f"celltype model {local_dir} was trained on crops with padding {pad}, but "
                f"clients cut crops with {CELL_CROP_PAD_FRACTION} (marrowscope.imaging); "
                "retrain it with the serving padding"
            )
        if self.config.get("crop_mode", "image") != "image":
            # fields' crops are box crops, but a single-cell case resizes each image whole
            # (marrowscope.case.single_cell_crop): the gateway cannot learn another mode from
            # the OIP metadata, so serving such a typer would type crops it never learned
            raise ModelNotReady(
                f"celltype model {local_dir} learned {self.config['crop_mode']!r} crops of "
                "single-cell images, but the gateway cuts them whole ('image'); only "
                "crop_mode 'image' typers are served"
            )
        self.names: tuple[str, ...] = tuple(self.config["outputs"])
        # per loaded model: ModelMetadata must show this version's crop size
        self.inputs = (TensorSpec("CROPS", "UINT8", (-1, size, size, 3)),)  # type: ignore[misc]
        self.outputs = (  # type: ignore[misc]
            TensorSpec("PROBS", "FP32", (-1, len(self.names))),
            TensorSpec("NAMES", "BYTES", (len(self.names),), batch_axis=False),
            TensorSpec("EMBEDDINGS", "FP32", (-1, -1)),
            TensorSpec("DOMAIN", "FP32", (-1, 2)),
        )
        try:
            self.domain = DomainReference.load(self.local_dir)
        except DomainReferenceError as exc:
            raise ModelNotReady(f"celltype model {local_dir}: {exc}") from None
        self.response_parameters = domain_parameters(self.domain)

    def load(self) -> None:
        super().load()
        # D is the loaded backbone's: ModelMetadata shows it from here on
        probs, names, _, domain = self.outputs
        embeddings = TensorSpec("EMBEDDINGS", "FP32", (-1, self.predictor.embedding_dim))
        self.outputs = (probs, names, embeddings, domain)  # type: ignore[misc]
        if self.domain is not None and self.domain.embedding_dim != self.predictor.embedding_dim:
            raise ModelNotReady(
                f"celltype model {self.local_dir}: its domain reference reads "
                f"{self.domain.embedding_dim}-d embeddings, the model has "
                f"{self.predictor.embedding_dim}"
            )

    def warmup(self) -> None:
        size = self.inputs[0].shape[1]
        self.infer({"CROPS": np.full((2, size, size, 3), 200, np.uint8)}, {})

    def preprocess(self, inputs: Tensors, parameters: Parameters) -> tuple[np.ndarray, bool]:
        want = parameters.get(EMBEDDINGS_PARAMETER, False)
        if not isinstance(want, bool):
            raise InvalidInput(f"parameter {EMBEDDINGS_PARAMETER} must be a bool, got {want!r}")
        return inputs["CROPS"], want

    def predict(self, batch: tuple[np.ndarray, bool]) -> Answer:
        crops, want = batch
        size = self.settings.chunk_size
        if want:
            probs, embeds = self.predictor.predict_with_embeddings(crops, batch_size=size)
            domain = None if self.domain is None else self.domain.cell_scores(embeds, crops)
            return probs, embeds, domain
        return self.predictor.predict(crops, batch_size=size), None, None

    def postprocess(self, answer: Answer, parameters: Parameters) -> Tensors:
        probs, embeds, domain = answer
        out = {"PROBS": probs.astype(np.float32, copy=False), "NAMES": bytes_tensor(self.names)}
        if embeds is not None:
            out["EMBEDDINGS"] = embeds.astype(np.float32, copy=False)
        if domain is not None:
            out["DOMAIN"] = domain.astype(np.float32, copy=False)
        return out


def domain_parameters(reference: DomainReference | None) -> dict[str, str]:
    """The response parameters that tell the gateway whether and how to judge the domain."""
    if reference is None:
        return {"domain_reference": "absent"}
    out = {"domain_reference": "present"}
    if reference.threshold is not None:
        out["domain_threshold"] = repr(reference.threshold)
    return out
