"""Model configs: the JSON that travels with every weights file (see docs/CONTRACTS.md).

A config fully determines the architecture, so `build_model(config)` followed by loading
the safetensors weights reproduces the trained module without unpickling anything.

Common keys: `kind` (`detector|celltype|ensemble|npm1|nucseg|mil`), `arch`, `schema_version`,
`hyperparameters` (dict), `training` (dict: data hash, seeds, ...). Per-kind keys are listed
in `REQUIRED_KEYS`; `make_config` fills paper/CPU defaults for them.

Ensemble configs also record `feature_units`: the length unit the morphometric case
features were learned in (`{"length": "um", "um_per_px": [min, max]}` when the training
images had a pixel size, `{"length": "px", "um_per_px": null}` when not, `"unknown"` for
configs written before the field existed). Serving compares it with the unit of a case's
features (`feature_units`, `units_from_pixel_sizes`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from typing import Any

from marrowscope.errors import MarrowScopeError
from marrowscope.provenance import check_withheld
from marrowscope.targets import ensemble_target_codes
from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES, COUNTED_CODES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("detector", "celltype", "ensemble", "npm1", "nucseg", "mil")

ARCHS: dict[str, tuple[str, ...]] = {
    # Paper: Faster R-CNN with a ResNet50-FPN backbone; MobileNetV3 for CPU-sized configs.
    "detector": (
        "fasterrcnn_resnet50_fpn_v2",
        "fasterrcnn_resnet50_fpn",
        "fasterrcnn_mobilenet_v3_large_fpn",
    ),
    # Paper: Xception (timm names); resnet18 / tiny_cnn for CPU-sized configs.
    "celltype": ("xception41", "legacy_xception", "xception65", "resnet18", "cellnet", "tiny_cnn"),
    "ensemble": ("mlp",),
    # Paper: ResNet50 on the whole 2000x1500 image; resnet18 for CPU-sized configs.
    "npm1": ("resnet50", "resnet18"),
    # Learned nucleus/cytoplasm split over one cell crop (marrowscope.models.nucseg).
    "nucseg": ("unet",),
    # Gated-attention MIL over the celltype model's cell embeddings, or a calibrated logistic
    # regression on their mean (marrowscope.models.mil).
    "mil": ("gated_attention", "mean_logistic"),
}

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "detector": ("classes", "min_size", "max_size"),
    "celltype": ("outputs", "crop_size", "mean", "std", "cell_head"),
    "ensemble": ("feature_names", "hidden", "dropout"),
    "npm1": ("input_size", "mean", "std"),
    "nucseg": ("input_size", "base_channels", "depth", "mean", "std"),
    "mil": ("embedding_dim", "hidden", "attention", "dropout", "celltype"),
}

DETECTOR_FPN_LEVELS: dict[str, int] = {
    "fasterrcnn_resnet50_fpn_v2": 5,
    "fasterrcnn_resnet50_fpn": 5,
    "fasterrcnn_mobilenet_v3_large_fpn": 3,
}
"""Feature-map levels the RPN sees (length of a detector's `anchor_sizes`)."""

DETECTOR_INT_HYPERPARAMETERS: tuple[str, ...] = (
    "box_detections_per_img",
    "box_batch_size_per_image",
    "rpn_pre_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image",
)
"""Detector hyperparameters that must be positive integers when present."""

LENGTH_UNITS: tuple[str, ...] = ("um", "px", "unknown")
"""Length unit of an ensemble's morphometric features (areas in unit^2); "unknown" only for
configs that predate `feature_units`."""
UNKNOWN_UNITS: dict[str, Any] = {"length": "unknown", "um_per_px": None}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_DEFAULTS: dict[str, dict[str, Any]] = {
    # anchor_* null: torchvision defaults (see marrowscope.models.detector).
    "detector": {
        "classes": list(CODES),
        "min_size": 1920,
        "max_size": 2560,
        "anchor_sizes": None,
        "anchor_aspect_ratios": None,
    },
    "celltype": {
        "outputs": list(COUNTED_CODES) + list(ATTRIBUTE_CODES),
        "crop_size": 128,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        # "sigmoid": one independent head per cell type (as the paper's per-type
        # classifiers); "softmax": cell types are mutually exclusive (CE loss).
        "cell_head": "sigmoid",
        # per-image colour normalisation inside the model (marrowscope.models.celltype)
        "stain_norm": "none",
        # how a single-cell image is cut for it (marrowscope.case.CROP_MODES)
        "crop_mode": "image",
        # cell code -> logit added before the cell head: the chosen operating point
        "logit_bias": {},
    },
    # Training fills feature_units from its data (`units_from_pixel_sizes`).
    "ensemble": {
        "hidden": [32, 16],
        "dropout": 0.2,
        "targets": ["aml"],
        "feature_units": {"length": "unknown", "um_per_px": None},
    },
    "npm1": {"input_size": [1500, 2000], "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    # 96 px: a white cell crop (about 40-120 px on the scanners we know) keeps its
    # chromatin texture and trains in minutes on a CPU.
    "nucseg": {
        "input_size": [96, 96],
        "base_channels": 16,
        "depth": 3,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        # "classical": the net draws the cell, the classical purple-index Otsu finds the
        # nucleus inside it; "combined": per cell, the net's nucleus when the net is at
        # least nucleus_confidence_min sure of it, else the classical one (training picks
        # the source that scores best on held-out cells, also under scanner shifts)
        "nucleus_source": "learned",
        "nucleus_confidence_min": 0.0,
    },
    # embedding_dim and celltype (the lineage: whose embeddings) come from training.
    "mil": {"hidden": 64, "attention": 32, "dropout": 0.25, "target": "apl"},
}


NUCLEUS_SOURCES: tuple[str, ...] = ("learned", "classical", "combined")


class ModelConfigError(MarrowScopeError, ValueError):
    """A model config is missing keys or holds values no architecture accepts."""


def make_config(kind: str, arch: str, **fields: Any) -> dict[str, Any]:
    """A complete, validated config for `kind`/`arch` with defaults for unset fields.

    Example: `make_config("ensemble", "mlp", feature_names=names, hidden=[16])`.
    """
    if kind not in _DEFAULTS:
        raise ModelConfigError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    config: dict[str, Any] = {"kind": kind, "arch": arch, "schema_version": SCHEMA_VERSION}
    config.update(copy.deepcopy(_DEFAULTS[kind]))
    config.update({"hyperparameters": {}, "training": {}})
    config.update(copy.deepcopy(fields))
    validate_config(config)
    return config


def _fail(config: dict[str, Any], message: str) -> None:
    raise ModelConfigError(f"{config.get('kind', '?')}/{config.get('arch', '?')} config: {message}")


def _check_mean_std(config: dict[str, Any]) -> None:
    for key in ("mean", "std"):
        value = config[key]
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
        ):
            _fail(config, f"{key} must be a list of 3 finite numbers, got {value!r}")
    if any(v <= 0 for v in config["std"]):
        _fail(config, f"std must be positive, got {config['std']!r}")


def _positive_int(config: dict[str, Any], key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(config, f"{key} must be a positive integer, got {value!r}")


def validate_config(config: dict[str, Any]) -> None:
    """Raise `ModelConfigError` naming the first problem; return None when usable."""
    if not isinstance(config, dict):
        raise ModelConfigError(f"config must be a JSON object, got {type(config).__name__}")
    for key in ("kind", "arch", "schema_version"):
        if key not in config:
            _fail(config, f"missing key {key!r}")
    kind, arch = config["kind"], config["arch"]
    if kind not in ARCHS:
        _fail(config, f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if arch not in ARCHS[kind]:
        _fail(config, f"unknown arch {arch!r} for {kind}; known: {', '.join(ARCHS[kind])}")
    if config["schema_version"] != SCHEMA_VERSION:
        _fail(config, f"schema_version {config['schema_version']!r} is not {SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in config]
    if missing:
        _fail(config, f"missing key(s) {', '.join(map(repr, missing))}")
    for key in ("hyperparameters", "training"):
        if not isinstance(config.get(key, {}), dict):
            _fail(config, f"{key} must be an object")
    _VALIDATORS[kind](config)
    if "withheld" in config:
        withholdable = {"ensemble": ensemble_targets(config), "npm1": ["npm1"]}.get(kind, [])
        if (problem := check_withheld(config, withholdable)) is not None:
            _fail(config, problem)


def _validate_detector(config: dict[str, Any]) -> None:
    classes = config["classes"]
    if not isinstance(classes, list) or not classes:
        _fail(config, "classes must be a non-empty list of codes (background excluded)")
    if len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
        _fail(config, f"classes must be distinct non-empty strings, got {classes!r}")
    _positive_int(config, "min_size", config["min_size"])
    _positive_int(config, "max_size", config["max_size"])
    if config["max_size"] < config["min_size"]:
        _fail(config, "max_size must be >= min_size")
    _validate_anchors(config)
    hp = config.get("hyperparameters", {})
    for key in DETECTOR_INT_HYPERPARAMETERS:
        if key in hp:
            _positive_int(config, f"hyperparameters.{key}", hp[key])


def _validate_anchors(config: dict[str, Any]) -> None:
    """Optional `anchor_sizes` (per FPN level, px) and `anchor_aspect_ratios`; null = default."""
    sizes = config.get("anchor_sizes")
    if sizes is not None:
        levels = DETECTOR_FPN_LEVELS[config["arch"]]
        if not isinstance(sizes, list) or len(sizes) != levels:
            _fail(
                config,
                f"anchor_sizes must be a list of {levels} lists (one per FPN level), got {sizes!r}",
            )
        for level in sizes:
            if not isinstance(level, list) or not level or len({len(x) for x in sizes}) != 1:
                _fail(
                    config,
                    f"anchor_sizes levels must be non-empty lists of equal length, got {sizes!r}",
                )
            for size in level:
                _positive_int(config, "anchor_sizes[][]", size)
    ratios = config.get("anchor_aspect_ratios")
    if ratios is not None and (
        not isinstance(ratios, list)
        or not ratios
        or not all(
            isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r) and r > 0
            for r in ratios
        )
    ):
        _fail(
            config,
            f"anchor_aspect_ratios must be a non-empty list of positive numbers, got {ratios!r}",
        )


def _validate_celltype(config: dict[str, Any]) -> None:
    outputs = config["outputs"]
    if not isinstance(outputs, list) or not outputs or len(set(outputs)) != len(outputs):
        _fail(config, f"outputs must be a non-empty list of distinct codes, got {outputs!r}")
    unknown = [o for o in outputs if o not in CODES and o not in ATTRIBUTE_CODES]
    if unknown:
        _fail(config, f"outputs {unknown!r} are neither cell codes nor attribute codes")
    kinds = ["attr" if o in ATTRIBUTE_CODES else "cell" for o in outputs]
    if "cell" not in kinds:
        _fail(config, "outputs must contain at least one cell code")
    if "attr" in kinds and "cell" in kinds[kinds.index("attr") :]:
        _fail(config, "outputs must list cell codes first, then attribute codes")
    _positive_int(config, "crop_size", config["crop_size"])
    if config["crop_size"] < 16:
        _fail(config, f"crop_size must be >= 16 px, got {config['crop_size']}")
    if config["cell_head"] not in ("sigmoid", "softmax"):
        _fail(config, f"cell_head must be 'sigmoid' or 'softmax', got {config['cell_head']!r}")
    if config.get("stain_norm", "none") not in ("none", "background", "instance"):
        _fail(
            config, f"stain_norm must be none, background or instance, got {config['stain_norm']!r}"
        )
    from marrowscope.case import CROP_MODES

    if config.get("crop_mode", "image") not in CROP_MODES:
        _fail(config, f"crop_mode must be one of {CROP_MODES}, got {config['crop_mode']!r}")
    bias = config.get("logit_bias") or {}
    if not isinstance(bias, dict) or any(
        k not in outputs or k in ATTRIBUTE_CODES or not isinstance(v, int | float) or v != v
        for k, v in bias.items()
    ):
        _fail(config, f"logit_bias must map cell codes of outputs to numbers, got {bias!r}")
    _check_mean_std(config)


def _validate_ensemble(config: dict[str, Any]) -> None:
    names = config["feature_names"]
    if not isinstance(names, list) or not names or len(set(names)) != len(names):
        _fail(config, "feature_names must be a non-empty list of distinct names")
    hidden = config["hidden"]
    if not isinstance(hidden, list):
        _fail(config, f"hidden must be a list of layer widths, got {hidden!r}")
    for width in hidden:
        _positive_int(config, "hidden[]", width)
    dropout = config["dropout"]
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        _fail(config, f"dropout must be in [0, 1), got {dropout!r}")
    targets = config.get("targets", ["aml"])
    if (
        not isinstance(targets, list)
        or not targets
        or targets[0] != "aml"
        or len(set(targets)) != len(targets)
        or not set(targets) <= set(ensemble_target_codes())
    ):
        _fail(
            config,
            "targets must start with 'aml' and name distinct outputs of "
            f"{list(ensemble_target_codes())}, got {targets!r}",
        )
    if "feature_units" in config:
        _validate_feature_units(config)


def ensemble_targets(config: dict[str, Any]) -> list[str]:
    """Outputs of an ensemble config in column order; configs written before `targets`
    existed have the single AML output."""
    return list(config.get("targets", ["aml"]))


def _validate_feature_units(config: dict[str, Any]) -> None:
    units = config["feature_units"]
    if not isinstance(units, dict) or set(units) != {"length", "um_per_px"}:
        _fail(config, f"feature_units must be {{'length': ..., 'um_per_px': ...}}, got {units!r}")
    if units["length"] not in LENGTH_UNITS:
        _fail(
            config,
            f"feature_units.length must be one of {list(LENGTH_UNITS)}, got {units['length']!r}",
        )
    scale = units["um_per_px"]
    if units["length"] != "um":
        if scale is not None:
            _fail(
                config, f"feature_units.um_per_px must be null unless length is 'um', got {scale!r}"
            )
        return
    if (
        not isinstance(scale, list)
        or len(scale) != 2
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in scale
        )
        or scale[0] > scale[1]
    ):
        _fail(
            config,
            f"feature_units.um_per_px must be [min, max] positive pixel sizes, got {scale!r}",
        )


def units_from_pixel_sizes(um_per_px: Iterable[float | None]) -> dict[str, Any]:
    """`feature_units` of features measured on images with these pixel sizes (None: none).

    All given -> `{"length": "um", "um_per_px": [min, max]}`; none given -> `{"length": "px",
    "um_per_px": None}`. A mix (or no image at all) raises `ModelConfigError`: such features
    mix um and px and no model should learn from them.
    """
    sizes = list(um_per_px)
    known = [float(v) for v in sizes if v is not None]
    if not sizes:
        raise ModelConfigError("no images: the feature units are undefined")
    if not known:
        return {"length": "px", "um_per_px": None}
    if len(known) != len(sizes):
        raise ModelConfigError(
            f"{len(sizes) - len(known)} of {len(sizes)} images have no pixel size "
            "(um_per_px): their morphometrics would be in px, the others' in um"
        )
    if not all(math.isfinite(v) and v > 0 for v in known):
        raise ModelConfigError(
            f"pixel sizes must be finite and positive, got {sorted(set(known))[:5]}"
        )
    return {"length": "um", "um_per_px": [min(known), max(known)]}


def feature_units(config: dict[str, Any]) -> dict[str, Any]:
    """An ensemble config's `feature_units`; configs without it read as unknown (logged).

    Unknown units keep a model usable (nothing to compare against), so they are a warning,
    not an error: retrain to record them.
    """
    units = config.get("feature_units")
    if units is None:
        log.warning(
            "ensemble config has no feature_units (written before they were recorded): "
            "the unit of its morphometric features is unknown and cannot be checked; "
            "retrain to record it"
        )
        return dict(UNKNOWN_UNITS)
    if units["length"] == "unknown":
        log.warning(
            "ensemble config records feature_units 'unknown': the unit of its "
            "morphometric features cannot be checked"
        )
    return dict(units)


def _validate_npm1(config: dict[str, Any]) -> None:
    size = config["input_size"]
    if not isinstance(size, list) or len(size) != 2:
        _fail(config, f"input_size must be [H, W], got {size!r}")
    for v in size:
        _positive_int(config, "input_size[]", v)
    if min(size) < 32:
        _fail(config, f"input_size must be at least 32x32, got {size!r}")
    _check_mean_std(config)


def _validate_nucseg(config: dict[str, Any]) -> None:
    size = config["input_size"]
    if not isinstance(size, list) or len(size) != 2:
        _fail(config, f"input_size must be [H, W], got {size!r}")
    for v in size:
        _positive_int(config, "input_size[]", v)
    _positive_int(config, "base_channels", config["base_channels"])
    _positive_int(config, "depth", config["depth"])
    if config["depth"] > 5:
        _fail(config, f"depth must be at most 5, got {config['depth']}")
    if min(size) < 2 ** config["depth"]:
        _fail(config, f"input_size {size!r} is smaller than 2**depth ({2 ** config['depth']})")
    if config.get("nucleus_source", "learned") not in NUCLEUS_SOURCES:
        _fail(
            config,
            f"nucleus_source must be one of {NUCLEUS_SOURCES}, got {config['nucleus_source']!r}",
        )
    threshold = config.get("nucleus_confidence_min", 0.0)
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.01:
        _fail(config, f"nucleus_confidence_min must be a number in [0, 1.01], got {threshold!r}")
    _check_mean_std(config)


def _validate_mil(config: dict[str, Any]) -> None:
    for key in ("embedding_dim", "hidden", "attention"):
        _positive_int(config, key, config[key])
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        _fail(config, f"dropout must be in [0, 1), got {dropout!r}")
    members = config.get("members", 1)
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        _fail(config, f"members must be a positive integer, got {members!r}")
    if config["arch"] == "mean_logistic" and members != 1:
        # hidden / attention / dropout keep their defaults and are unused by this arch
        _fail(config, f"a mean_logistic model has one member, got {members!r}")
    calibration = config.get("calibration")
    if calibration is not None and not _is_calibration(calibration):
        _fail(
            config,
            "calibration must be {'temperature': T > 0, 'bias': b} (finite numbers), "
            f"got {calibration!r}",
        )
    if config.get("target", "apl") != "apl":
        _fail(config, f"target must be 'apl' (the one MIL target), got {config['target']!r}")
    lineage = config["celltype"]
    if (
        not isinstance(lineage, dict)
        or set(lineage) != {"name", "version"}
        or not all(isinstance(v, str) and v for v in lineage.values())
    ):
        _fail(
            config,
            "celltype must be {'name': ..., 'version': ...} (non-empty strings): the celltype "
            f"model whose embeddings the MIL model learned, got {lineage!r}",
        )


def _is_calibration(value: Any) -> bool:
    def number(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)

    return (
        isinstance(value, dict)
        and set(value) == {"temperature", "bias"}
        and number(value["temperature"])
        and value["temperature"] > 0
        and number(value["bias"])
    )


_VALIDATORS = {
    "detector": _validate_detector,
    "celltype": _validate_celltype,
    "ensemble": _validate_ensemble,
    "npm1": _validate_npm1,
    "nucseg": _validate_nucseg,
    "mil": _validate_mil,
}


def cell_outputs(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Split a celltype config's `outputs` into (cell codes, attribute codes)."""
    outputs = config["outputs"]
    cells = [o for o in outputs if o not in ATTRIBUTE_CODES]
    return cells, outputs[len(cells) :]
