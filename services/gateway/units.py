"""The unit of a case's morphometric features, and whether the ensemble may judge them.

Segmentation measures areas in um^2 when it gets a pixel size, else in px^2 (and says which
in its `LENGTH_UNIT` output). The ensemble standardises its inputs with statistics from its
training features, so a px^2 area fed to a model that learned um^2 becomes an extreme
z-score and P(AML) is meaningless (a control case came back at 100 %). The ensemble reports
the unit it learned (`FeatureUnits`); `aml_abstention` compares the two. A mismatch withholds
P(AML) and the ensemble's NPM1-by-morphology call (same features, `morphology`) only: cell
counts, the whole-image NPM1, overlays and heatmaps are reported as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from services.gateway.clients import FeatureUnits

log = logging.getLogger(__name__)

_unknown_warned: set[str] = set()


def resolve_pixel_size(requested: float | None, default: float | None) -> tuple[float | None, str]:
    """(um_per_px, source) for one image: the request's value, else the deployment default
    (`MS_GATEWAY_DEFAULT_UM_PER_PX`), else none."""
    if requested is not None:
        return requested, "request"
    if default is not None:
        return default, "deployment_default"
    return None, "none"


def case_unit(units: Iterable[str]) -> str:
    """`um` or `px` when every image's morphometrics share it, else `mixed`."""
    seen = set(units)
    return seen.pop() if len(seen) == 1 else "mixed"


def _training_scale(model: FeatureUnits) -> str:
    lo, hi = model.um_per_px_min, model.um_per_px_max
    if lo is None or hi is None:
        return ""
    return (
        f", training images at {lo:g} um/px"
        if lo == hi
        else f", training images at {lo:g}-{hi:g} um/px"
    )


def pixel_size_out_of_range(
    um_per_px: Iterable[float | None],
    model: FeatureUnits,
    *,
    tolerance: float,
    ensemble_version: str,
) -> dict | None:
    """`{"reason": "pixel_size_out_of_range", "detail"}` when an image's pixel size lies
    outside the ensemble's training pixel sizes widened by `tolerance` (a fraction: accepted
    is [min / (1 + tolerance), max * (1 + tolerance)]), else None. The ensemble standardises
    cell areas and lengths with its training statistics, so cells measured at another scale
    are sizes it never saw and its answer is an extrapolation (a control case read P(AML)
    0.999 at 1 um/px and 1.0 at 10 um/px after 2.6e-7 at its training 0.27). A model that
    does not record its training pixel sizes is not checked."""
    lo, hi = model.um_per_px_min, model.um_per_px_max
    if model.length != "um" or lo is None or hi is None:
        return None
    low, high = lo / (1 + tolerance), hi * (1 + tolerance)
    outside = sorted({um for um in um_per_px if um is not None and not low <= um <= high})
    if not outside:
        return None
    return {
        "reason": "pixel_size_out_of_range",
        "detail": f"pixel size {', '.join(f'{u:g}' for u in outside)} um/px is outside what the "
        f"ensemble (version {ensemble_version}) was trained on{_training_scale(model)}, "
        f"accepted {low:.3g}-{high:.3g} um/px (tolerance {tolerance:g}): cells at this "
        "scale have sizes the model never saw; check options.um_per_px or rescan at the "
        "training magnification",
    }


def aml_abstention(
    features_unit: str,
    model: FeatureUnits,
    *,
    ensemble_version: str,
    um_per_px: Sequence[float | None] = (),
    tolerance: float = 0.25,
) -> dict | None:
    """None when P(AML) may be reported; else `{"reason", "detail"}` of the abstention.

    reason (machine-readable): `pixel_size_required` (the model learned um, the case is in
    px), `pixel_size_unexpected` (the model learned px, the case is in um),
    `pixel_size_mixed` (the case's images differ), `pixel_size_out_of_range` (um as learned,
    but at a scale outside the training pixel sizes, `pixel_size_out_of_range`). A model of unknown unit (config written
    before `feature_units`) is trusted as before, with a warning once per version.
    """
    if features_unit == "mixed":
        return {
            "reason": "pixel_size_mixed",
            "detail": "some images of this case had a pixel size and others not, so their "
            "morphometric features mix um and px; send options.um_per_px for "
            "every image (or none)",
        }
    if model.length == "unknown":
        if ensemble_version not in _unknown_warned:
            _unknown_warned.add(ensemble_version)
            log.warning(
                "ensemble %s does not report the unit of its morphometric features; "
                "P(AML) is reported unchecked (retrain it to record feature_units)",
                ensemble_version,
            )
        return None
    if model.length == features_unit:
        return pixel_size_out_of_range(
            um_per_px, model, tolerance=tolerance, ensemble_version=ensemble_version
        )
    if model.length == "um":
        return {
            "reason": "pixel_size_required",
            "detail": f"the ensemble (version {ensemble_version}) learned its morphometric "
            f"features in um (areas in um^2{_training_scale(model)}); this case "
            "was measured in pixels because no pixel size was given: send "
            "options.um_per_px (or set MS_GATEWAY_DEFAULT_UM_PER_PX for a "
            "deployment with a fixed scanner)",
        }
    return {
        "reason": "pixel_size_unexpected",
        "detail": f"the ensemble (version {ensemble_version}) learned its morphometric "
        "features in pixels (its training images had no pixel size); this case "
        "was measured in um: submit it without options.um_per_px (and unset "
        "MS_GATEWAY_DEFAULT_UM_PER_PX)",
    }
