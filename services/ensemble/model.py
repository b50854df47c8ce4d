"""Ensemble handler: P(AML) (and, for each genetic head the model has, P(lesion | AML):
P(NPM1 mutated | AML), P(APL | AML)) from one case feature vector, plus the model's lineage.

Tensor contract (docs/CONTRACTS.md, docs/SERVICES.md):
- in  ``FEATURES`` FP32 [1, F], finite, in ``FEATURE_NAMES`` order; ``FEATURE_NAMES`` BYTES
  [F]: must equal the model config's ``feature_names`` (same names, same order), else
  INVALID_ARGUMENT naming what is missing or unexpected (`marrowscope.features`).
- out ``P_AML`` FP32 [1] in [0, 1]; then one FP32 [1] in [0, 1] per genetic target in the
  config's ``targets`` (`marrowscope.targets`): ``P_NPM1`` = P(NPM1 mutated | AML) for
  ``npm1``, ``P_APL`` = P(APL | AML) for ``apl``, from the same features. The outputs are
  per loaded version (ModelMetadata of a version lists exactly its outputs), so a hot
  reload to a model with or without a head changes them.
- response parameter (string) ``npm1_threshold`` / ``apl_threshold`` (the target's
  ``threshold_parameter``), only for a model with that head and a recorded decision
  threshold (config ``hyperparameters.<target>_score_threshold``, in [0, 1]; null or absent
  = none recorded); clients use their own threshold otherwise.
- response parameters (string) ``lineage_segmentation`` / ``lineage_celltype``: the upstream
  versions the ensemble was trained on (registry tags ``marrowscope.lineage.<kind>``; for a
  local directory the config's ``training.lineage``; "" when unknown). They are offered as
  ``response_parameters``; the runtime copies them into every response.
- response parameters (string) ``feature_length_unit`` (``um`` | ``px`` | ``unknown``) and
  ``feature_um_per_px_min`` / ``feature_um_per_px_max`` (training pixel sizes, "" unless
  um): the unit the model's morphometric features were learned in (config
  ``feature_units``; configs without it read as ``unknown``, logged at load). The gateway
  withholds P(AML) when a case's features are in another unit.

Not batchable: the names travel with every vector, and the model is a tiny MLP.

MIL model (`MilHandler`, OIP model ``mil``, served by the same process when
``MS_ENSEMBLE_MIL_MODEL_URI`` is set): P(APL | AML) and per-cell attention from a case's cell
embeddings (`marrowscope.models.mil`; a fold ensemble answers its members' mean logit,
temperature-scaled, and their mean attention).
- in  ``CELL_EMBEDDINGS`` FP32 [N, D]: every typed cell of the case (N >= 1), each the
  celltype service's ``EMBEDDINGS`` row for it; D must equal the config's
  ``embedding_dim`` (fixed in ModelMetadata), values finite, else INVALID_ARGUMENT.
- out ``P_APL`` FP32 [1] in [0, 1]: P(APL | AML); ``ATTENTION`` FP32 [N]: each cell's
  attention weight, in input order, summing to 1.
- response parameters (string) ``lineage_celltype_model`` / ``lineage_celltype``: the
  celltype model name and version whose embeddings it learned (config ``celltype``); the
  gateway reports no MIL P(APL) when that is not the celltype version it pinned.
Not batchable: one bag per case, bags differ in N.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from marrowscope.errors import InvalidInput, ModelNotReady
from marrowscope.inference import EnsemblePredictor, MilPredictor
from marrowscope.models import feature_units
from marrowscope.models.config import ensemble_targets
from marrowscope.stages import LINEAGE_UPSTREAMS
from marrowscope.targets import genetic_target, output_of
from services.common import PredictorHandler, bytes_tensor, decode_names
from services.ensemble.config import EnsembleSettings
from services.runtime.handler import Parameters, Tensors, TensorSpec
from services.runtime.settings import ServiceSettings

UPSTREAMS: tuple[str, ...] = LINEAGE_UPSTREAMS
LINEAGE_TAG_PREFIX = "marrowscope.lineage."


def lineage_of(tags: Mapping[str, str], config: Mapping) -> dict[str, str]:
    """``{upstream: version}`` for every ``UPSTREAMS`` entry ("" when not recorded).

    Registry tags win; a plain directory has no tags, so its config's ``training.lineage``
    (``{"segmentation": "3", ...}``) is used when present.
    """
    recorded = config.get("training", {}).get("lineage", {})
    if not isinstance(recorded, Mapping):
        recorded = {}
    return {u: str(tags.get(f"{LINEAGE_TAG_PREFIX}{u}", recorded.get(u, ""))) for u in UPSTREAMS}


def units_parameters(config: Mapping) -> dict[str, str]:
    """Response parameters naming the unit of the model's morphometric features."""
    units = feature_units(dict(config))
    lo, hi = units["um_per_px"] or ("", "")
    return {
        "feature_length_unit": units["length"],
        "feature_um_per_px_min": str(lo),
        "feature_um_per_px_max": str(hi),
    }


def threshold_parameters(config: Mapping) -> dict[str, str]:
    """``{"<target>_threshold": "<t>"}`` for every genetic head of the model whose config
    records a decision threshold (``hyperparameters.<target>_score_threshold``)."""
    out: dict[str, str] = {}
    for code in ensemble_targets(dict(config))[1:]:
        target = genetic_target(code)
        value = config.get("hyperparameters", {}).get(target.threshold_key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ModelNotReady(
                f"ensemble config hyperparameters.{target.threshold_key} must be a "
                f"number in [0, 1], got {value!r}"
            )
        out[target.threshold_parameter] = str(float(value))
    return out


class EnsembleHandler(PredictorHandler):
    inputs = (
        TensorSpec("FEATURES", "FP32", (1, -1)),
        TensorSpec("FEATURE_NAMES", "BYTES", (-1,)),
    )
    outputs: tuple[TensorSpec, ...] = (TensorSpec("P_AML", "FP32", (1,)),)
    """AML-only default; ``__init__`` sets the loaded version's outputs (one per target)."""
    batchable = False
    predictor_cls = EnsemblePredictor

    def __init__(
        self,
        local_dir: str | Path,
        settings: EnsembleSettings,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(local_dir, settings)
        self.feature_names: tuple[str, ...] = tuple(self.config["feature_names"])
        self.targets: tuple[str, ...] = tuple(ensemble_targets(self.config))
        # per loaded version: ModelMetadata must show which heads (P_NPM1, P_APL) it answers
        self.outputs = tuple(TensorSpec(output_of(t), "FP32", (1,)) for t in self.targets)
        self.lineage = lineage_of(tags or {}, self.config)
        self.response_parameters: dict[str, str] = {
            **{f"lineage_{u}": v for u, v in self.lineage.items()},
            **units_parameters(self.config),
            **threshold_parameters(self.config),
        }

    def warmup(self) -> None:
        self.infer(
            {
                "FEATURES": np.zeros((1, len(self.feature_names)), np.float32),
                "FEATURE_NAMES": bytes_tensor(self.feature_names),
            },
            {},
        )

    def preprocess(self, inputs: Tensors, parameters: Parameters) -> tuple[list[str], np.ndarray]:
        names = decode_names(inputs["FEATURE_NAMES"], "FEATURE_NAMES")
        vector = inputs["FEATURES"]
        if vector.shape[1] != len(names):
            raise InvalidInput(
                f"FEATURES has {vector.shape[1]} values but FEATURE_NAMES {len(names)} names"
            )
        return names, vector

    def predict(self, batch: tuple[list[str], np.ndarray]) -> dict[str, np.ndarray]:
        names, vector = batch
        return self.predictor.predict_targets(names, vector)

    def postprocess(self, p: dict[str, np.ndarray], parameters: Parameters) -> Tensors:
        return {output_of(t): p[t].astype(np.float32, copy=False).reshape(1) for t in self.targets}


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
