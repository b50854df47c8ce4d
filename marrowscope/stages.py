"""The model stages: the one source of their names, as `taxonomy` is for cell codes.

A stage is a trained model in the registry, a gRPC model service, or both:

| stage        | registered model            | service (gRPC / metrics port) |
|--------------|-----------------------------|-------------------------------|
| segmentation | marrowscope-segmentation    | 50051 / 9101                  |
| celltype     | marrowscope-celltype        | 50052 / 9102                  |
| ensemble     | marrowscope-ensemble        | 50053 / 9103                  |
| npm1         | marrowscope-npm1            | 50054 / 9104                  |
| explain      | (loads marrowscope-npm1)    | 50055 / 9105                  |
| nucseg       | marrowscope-nucseg          | none: inside segmentation     |
| mil          | marrowscope-mil             | none: inside ensemble (OIP model `mil`) |

The string values are what every wire format, environment name (`MS_<STAGE>_...`), MLflow
name and metric label already uses, so `Stage.NPM1 == "npm1"` and a `Stage` goes wherever
one of those strings did.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """One model stage; the order is the order a case runs through the services."""

    SEGMENTATION = "segmentation"
    CELLTYPE = "celltype"
    ENSEMBLE = "ensemble"
    NPM1 = "npm1"
    EXPLAIN = "explain"
    NUCSEG = "nucseg"
    """The learned nucleus/cytoplasm split, served inside the segmentation service."""
    MIL = "mil"
    """Attention MIL over the celltype embeddings (P(APL | AML)), served inside the ensemble
    service as its own OIP model `mil` when `MS_ENSEMBLE_MIL_MODEL_URI` is set."""

    def __repr__(self) -> str:
        # as the plain string: messages that quote a stage (`{kind!r}`, lists of kinds) read
        # exactly as they did when stages were strings
        return repr(self.value)

    @property
    def served(self) -> bool:
        """True when the stage runs as its own gRPC model service."""
        return self in _PORTS

    @property
    def registered(self) -> bool:
        """True when the stage is trained and kept in the registry under its own name."""
        return self in _MODEL_KIND

    @property
    def registry_stage(self) -> Stage:
        """The stage whose registered model this one loads: explain occludes the npm1 model,
        every other stage loads its own."""
        return Stage.NPM1 if self is Stage.EXPLAIN else self

    @property
    def registered_name(self) -> str:
        """MLflow registered model name, e.g. `marrowscope-npm1` (explain: npm1's)."""
        return f"marrowscope-{self.registry_stage.value}"

    @property
    def model_kind(self) -> str:
        """The model-config `kind` its registered model holds (`marrowscope.models.config`):
        `detector` for segmentation, the stage's own name otherwise."""
        return _MODEL_KIND[self.registry_stage]

    @property
    def followers(self) -> tuple[Stage, ...]:
        """Services that preload this stage's model and so move when it is promoted."""
        return tuple(s for s in SERVED if s is not self and s.registry_stage is self)

    @property
    def env_prefix(self) -> str:
        """Prefix of the stage service's settings, e.g. `MS_NPM1_`."""
        return f"MS_{self.value.upper()}_"

    @property
    def grpc_port(self) -> int:
        """Default gRPC port of the stage's service (KeyError: the stage is not served)."""
        return _PORTS[self][0]

    @property
    def metrics_port(self) -> int:
        """Default Prometheus port of the stage's service (KeyError: not served)."""
        return _PORTS[self][1]


_PORTS: dict[Stage, tuple[int, int]] = {
    Stage.SEGMENTATION: (50051, 9101),
    Stage.CELLTYPE: (50052, 9102),
    Stage.ENSEMBLE: (50053, 9103),
    Stage.NPM1: (50054, 9104),
    Stage.EXPLAIN: (50055, 9105),
}
_MODEL_KIND: dict[Stage, str] = {
    Stage.SEGMENTATION: "detector",
    Stage.CELLTYPE: "celltype",
    Stage.ENSEMBLE: "ensemble",
    Stage.NPM1: "npm1",
    Stage.NUCSEG: "nucseg",
    Stage.MIL: "mil",
}

SERVED: tuple[Stage, ...] = tuple(s for s in Stage if s.served)
"""The model services, in pipeline order: segmentation, celltype, ensemble, npm1, explain."""
REGISTERED: tuple[Stage, ...] = tuple(s for s in Stage if s.registered)
"""The registry's model kinds: segmentation, celltype, ensemble, npm1, nucseg, mil."""
PIPELINE_MODELS: tuple[Stage, ...] = tuple(s for s in SERVED if s.registered)
"""The models a case is run through, each trained, registered and served on its own:
segmentation, celltype, ensemble, npm1 (what the demo trains and a rollout pins)."""
LINEAGE_UPSTREAMS: tuple[Stage, ...] = (Stage.SEGMENTATION, Stage.CELLTYPE)
"""The stages an ensemble's case features come from: their versions are its lineage."""
