"""What a model version was trained on, and which of its outputs it withholds.

Both live in the model's config, so they travel with its weights into every copy, and the
registry repeats `trained_on` as the version tag `marrowscope.trained_on`:

- `training.trained_on`: the data sets the weights learned from, `+`-joined, each a real
  set of `../shared/data` (`bccd`, `deepapl`, `pbc`, `wbc-seg`) or `synthetic` (the
  generator of `training.data.synth`); `untrained` for a version whose outputs are all
  withheld (see below); absent on configs written before it was recorded (`unknown`).
  A report names every stage whose model learned from synthetic data
  (`AnalysisResult.synthetic_stages`), so no figure from one passes for a real-data figure.
- `withheld`: `{output: why}` for outputs the version must not be read for although it
  computes them, e.g. `{"aml": "no real control cases exist to train P(AML)"}`: the real
  data hold AML patients only, so the real model set's ensemble cannot learn P(AML) and its
  reports show P(AML) `not_available` with that reason. Keys are the ensemble's `targets`
  (`aml`, `npm1`, `apl`) or `npm1` for the whole-image npm1 model.

Model services answer both as response parameters of every inference (`trained_on`,
`withheld_<output>`), as they answer lineage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SYNTHETIC = "synthetic"
UNTRAINED = "untrained"
UNKNOWN = "unknown"
REAL_SETS: tuple[str, ...] = ("bccd", "deepapl", "pbc", "wbc-seg")
"""The real sets of `../shared/data` (its README: what each holds, its licence)."""

TRAINED_ON_PARAMETER = "trained_on"
WITHHELD_PREFIX = "withheld_"
TAG_TRAINED_ON = "marrowscope.trained_on"


def join_sources(sources: list[str] | tuple[str, ...]) -> str:
    """`trained_on` for a list of sources (sorted, real sets first, `synthetic` last);
    ValueError for a source that is neither a real set nor `synthetic`."""
    unknown = [s for s in sources if s not in (*REAL_SETS, SYNTHETIC)]
    if unknown or not sources:
        raise ValueError(
            f"training sources must be a non-empty subset of {[*REAL_SETS, SYNTHETIC]}, "
            f"got {list(sources)}"
        )
    real = sorted({s for s in sources if s != SYNTHETIC})
    return "+".join([*real, *([SYNTHETIC] if SYNTHETIC in sources else [])])


def trained_on(config: Mapping[str, Any]) -> str:
    """The config's `training.trained_on`, `unknown` when not recorded."""
    training = config.get("training") or {}
    value = training.get("trained_on") if isinstance(training, Mapping) else None
    return str(value) if value else UNKNOWN


def is_synthetic(value: str) -> bool:
    """Whether a `trained_on` value names synthetic data among its sources."""
    return SYNTHETIC in value.split("+")


def withheld(config: Mapping[str, Any]) -> dict[str, str]:
    """The config's `withheld` outputs (`{output: why}`; empty when none)."""
    return {str(k): str(v) for k, v in (config.get("withheld") or {}).items()}


def check_withheld(config: Mapping[str, Any], outputs: list[str]) -> str | None:
    """The problem with a config's `withheld` (None: fine): an object mapping some of
    `outputs` to a non-empty reason."""
    value = config.get("withheld")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return f"withheld must map outputs to reasons, got {value!r}"
    for key, why in value.items():
        if key not in outputs:
            return f"withheld names {key!r}, which is not one of the outputs {outputs}"
        if not isinstance(why, str) or not why.strip():
            return f"withheld[{key!r}] must be a non-empty reason"
    return None


def response_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The response parameters a model service answers with for this config."""
    return {
        TRAINED_ON_PARAMETER: trained_on(config),
        **{f"{WITHHELD_PREFIX}{k}": v for k, v in withheld(config).items()},
    }
