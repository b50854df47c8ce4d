"""The `ModelClients` protocol the pipeline calls and its data types.

The production implementation is `oip.OipModelClients` (tritonclient.grpc.aio, Open
Inference Protocol v2). `MS_GATEWAY_CLIENTS_FACTORY=module:function` replaces it
(`container.load_clients`, so this module imports no implementation of it): the function
receives the `GatewaySettings` and returns any object satisfying the protocol
(tests inject slow or failing clients into a real gateway process this way).

Errors: implementations raise `ServiceCallError(service, code, message)` with `code` a gRPC
status name (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INVALID_ARGUMENT`, ...). The pipeline
retries `UNAVAILABLE` and `DEADLINE_EXCEEDED` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


MIL_MODEL = "mil"
"""OIP model name of the MIL model (P(APL | AML) from cell embeddings), served by the
ensemble service (`services.ensemble.model`)."""


class ServiceCallError(Exception):
    """A model service call failed; `code` is the gRPC status name."""

    def __init__(self, service: str, code: str, message: str = "") -> None:
        super().__init__(f"{service}: {code}: {message}")
        self.service = service
        self.code = code
        self.message = message

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


@dataclass(frozen=True)
class TensorSpec:
    datatype: str
    shape: tuple[int, ...]
    """-1 marks a variable dimension."""


@dataclass(frozen=True)
class ModelInfo:
    """What ModelMetadata says: the version to pin and the tensor specs."""

    name: str
    version: str
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Segmentation:
    """Cells found on one image.

    boxes float32[N, 4] x1, y1, x2, y2 in pixels of the submitted image; scores float32[N];
    labels list[str] of N detector codes (taxonomy, incl. RBC); features float32[N, F]
    morphometrics named by feature_names (F); model_version as answered; length_unit the
    unit of the morphometrics as the service reported it (`um` | `px`; None when the
    service does not report it).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    features: np.ndarray
    feature_names: list[str]
    model_version: str
    length_unit: str | None = None


@dataclass(frozen=True)
class Classification:
    """probs float32[B, K] named by names (K: cell codes, then attribute codes);
    embeddings float32[B, D] (each crop's penultimate embedding) only when asked for, and
    with them the domain distances when the version has a domain reference."""

    probs: np.ndarray
    names: list[str]
    model_version: str
    embeddings: np.ndarray | None = None
    domain: np.ndarray | None = None
    """float32[B, 2]: each crop's domain distances (`marrowscope.domain`), answered with the
    embeddings by a version that carries a domain reference."""
    domain_threshold: float | None = None
    """The case-score threshold the version records (response parameter `domain_threshold`)."""


@dataclass(frozen=True)
class MilOutput:
    """The MIL model's answer for one case: P(APL | AML), attention float32[N] (one weight
    per cell embedding sent, in order), the celltype model and version whose embeddings it
    learned (its lineage response parameters; "" when not reported)."""

    p_apl: float
    attention: np.ndarray
    model_version: str
    lineage_celltype: str = ""
    lineage_celltype_model: str = ""


@dataclass(frozen=True)
class FeatureUnits:
    """The unit the ensemble's morphometric features were learned in (its config's
    `feature_units`): `length` um | px | unknown; training pixel sizes when um."""

    length: str = "unknown"
    um_per_px_min: float | None = None
    um_per_px_max: float | None = None


@dataclass(frozen=True)
class EnsembleOutput:
    """P(AML), the upstream versions the ensemble was trained on (its lineage), the unit of
    its morphometric features and, for each genetic head the version has (`marrowscope.
    targets`: npm1, apl), P(lesion | AML) and the threshold the model records for it."""

    p_aml: float
    lineage: dict[str, str]
    """Response parameters `lineage_<upstream>` without the prefix, e.g. {"segmentation": "3"}."""
    model_version: str
    feature_units: FeatureUnits = field(default_factory=FeatureUnits)
    """Response parameters `feature_length_unit`, `feature_um_per_px_min|max`; unknown when
    the service does not send them (an older ensemble service)."""
    p_targets: dict[str, float] = field(default_factory=dict)
    """Genetic target code (`marrowscope.targets`) -> its output for every head the version
    answered: `P_NPM1` = P(NPM1 mutated | AML) as "npm1", `P_APL` = P(APL | AML) as "apl";
    a target without a head is absent."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Genetic target code -> the decision threshold the model records (response parameters
    `npm1_threshold`, `apl_threshold`); absent when it records none (the gateway's setting
    applies)."""

    def p(self, target: str) -> float | None:
        """P(lesion | AML) of a genetic target; None when the version has no such head."""
        return self.p_targets.get(target)

    def threshold(self, target: str) -> float | None:
        """The decision threshold the model records for `target`; None when none."""
        return self.thresholds.get(target)

    @property
    def p_npm1(self) -> float | None:
        """Output `P_NPM1` (None: no NPM1 head); the field's name before APL was added."""
        return self.p("npm1")

    @property
    def npm1_threshold(self) -> float | None:
        return self.threshold("npm1")


@dataclass(frozen=True)
class Explanation:
    """heatmap float32[h, w] over the explained image; cell_importance float32[N]."""

    heatmap: np.ndarray
    cell_importance: np.ndarray
    model_version: str


PROVENANCE_PARAMETERS = ("trained_on", "splitter_version", "splitter_trained_on")
"""Response parameters that hold for a model version as a whole (`marrowscope.provenance`;
the segmentation service's learned split), recorded per version by clients that can
(`model_facts`), beside every `withheld_<output>` parameter."""


def model_facts(clients: object, model: str, version: str) -> dict[str, str]:
    """What a model version said about itself in its responses (`PROVENANCE_PARAMETERS`,
    `withheld_*`), from clients that record it (`OipModelClients.facts`); {} from others
    (test fakes, a version not called yet)."""
    facts = getattr(clients, "facts", None)
    return dict(facts.get((model, version), {})) if isinstance(facts, dict) else {}


@runtime_checkable
class ModelClients(Protocol):
    """Calls to the five model services. `timeout` is the remaining deadline in seconds;
    `version` the pinned model version (sent as ModelInferRequest.model_version)."""

    async def metadata(self, service: str, *, timeout: float) -> ModelInfo: ...

    async def segment(
        self,
        image: bytes,
        *,
        version: str,
        timeout: float,
        um_per_px: float | None = None,
        boxes: np.ndarray | None = None,
    ) -> Segmentation:
        """image: the encoded file as uploaded (PNG/JPEG/TIFF). boxes: float32[N, 4] x1, y1,
        x2, y2 pixels to measure instead of detecting (the service's BOXES_IN)."""
        ...

    async def classify(
        self, crops: np.ndarray, *, version: str, timeout: float, embeddings: bool = False
    ) -> Classification:
        """crops: uint8[B, S, S, 3] RGB at the celltype model's crop size; with `embeddings`
        also the EMBEDDINGS output (request parameter `embeddings`)."""
        ...

    async def ensemble(
        self, features: np.ndarray, names: list[str], *, version: str, timeout: float
    ) -> EnsembleOutput:
        """features: float32[F] case vector named by names; `p_targets` holds the genetic
        heads (npm1, apl) the pinned version has."""
        ...

    async def npm1(self, image: np.ndarray, *, version: str, timeout: float) -> float:
        """image: uint8[H, W, 3] RGB already at the npm1 model's input size."""
        ...

    async def mil(self, embeddings: np.ndarray, *, version: str, timeout: float) -> MilOutput:
        """embeddings: float32[N, D], the case's typed cells' celltype embeddings (the OIP
        model `mil`, served by the ensemble service; `metadata("mil")` pins it)."""
        ...

    async def explain(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        *,
        version: str,
        target_model: str,
        target_version: str,
        timeout: float,
    ) -> Explanation:
        """image uint8[H, W, 3] (npm1 input size); boxes float32[N, 4] x1,y1,x2,y2 px in it;
        mode `cells`."""
        ...

    async def ready(self, *, timeout: float) -> dict[str, bool]:
        """Service name -> server ready and its model ready."""
        ...

    async def close(self) -> None: ...
