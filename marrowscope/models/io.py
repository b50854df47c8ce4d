"""Build, save and load models as `model.safetensors` + `config.json`; never unpickle.

Loading a model from a registry must not execute code, so weights are safetensors only
and the architecture is rebuilt from the JSON config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marrowscope.errors import MarrowScopeError
from marrowscope.models.config import ModelConfigError, validate_config

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")


class ModelFormatError(MarrowScopeError, ValueError):
    """A model directory or weights file is missing, unsafe (pickle) or does not fit."""


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    """In eval mode, on the requested device."""
    config: dict[str, Any]
    digest: str
    """sha256 hex over config.json and model.safetensors (`model_digest`)."""
    directory: Path


def build_model(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised module for a validated config (no weights are downloaded).

    detector -> torchvision `FasterRCNN`; celltype -> `CellTypeClassifier`;
    ensemble -> `EnsembleNet`; npm1 -> `Npm1Classifier`; nucseg -> `NucSegNet`;
    mil -> `GatedAttentionMIL` (or `MilFoldEnsemble`: members and calibration).
    """
    validate_config(config)
    kind = config["kind"]
    if kind == "detector":
        from marrowscope.models.detector import build_detector

        return build_detector(config)  # type: ignore[no-any-return]  # torchvision is untyped
    if kind == "celltype":
        from marrowscope.models.celltype import CellTypeClassifier

        return CellTypeClassifier(config)
    if kind == "ensemble":
        from marrowscope.models.ensemble import EnsembleNet

        return EnsembleNet(config)
    if kind == "nucseg":
        from marrowscope.models.nucseg import NucSegNet

        return NucSegNet(config)
    if kind == "mil":
        from marrowscope.models.mil import build_mil

        return build_mil(config)
    from marrowscope.models.npm1 import Npm1Classifier

    return Npm1Classifier(config)


def _config_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def save_model(
    module: nn.Module, config: dict[str, Any], directory: str | os.PathLike[str]
) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (created); return it.

    The state dict must match `build_model(config)` exactly, so whatever is saved loads.
    Files are written to temporaries and renamed, so a reader never sees half a model.
    """
    from safetensors.torch import save_file

    validate_config(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    expected = build_model(config).state_dict()
    _check_keys(state, expected, source="module to save")
    tmp_weights = directory / f".{WEIGHTS_FILE}.tmp"
    tmp_config = directory / f".{CONFIG_FILE}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt", "kind": config["kind"]})
    tmp_config.write_bytes(_config_bytes(config))
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    os.replace(tmp_config, directory / CONFIG_FILE)
    log.info("saved %s/%s model to %s", config["kind"], config["arch"], directory)
    return directory


def _check_keys(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, source: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]
                )
            )
        raise ModelFormatError(f"{source} does not match its config: " + "; ".join(parts))


def model_digest(directory: str | os.PathLike[str]) -> str:
    """sha256 hex over `config.json` then `model.safetensors` (names included)."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = directory / name
        if not path.is_file():
            raise ModelFormatError(f"{directory} has no {name}")
        h.update(name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                h.update(chunk)
    return h.hexdigest()


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated `config.json` of a model directory (raises `ModelFormatError`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelFormatError(f"{directory} is not a model directory: no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
        validate_config(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None
    except ModelConfigError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    return config  # type: ignore[no-any-return]  # validate_config checked it is a dict


def _looks_like_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    # Protocol-2+ pickles start with 0x80; torch.save's default zip format with "PK".
    return head[:1] == b"\x80" or head[:2] == b"PK"


def load_model(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild the module from `config.json`, load `model.safetensors` strictly, eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFormatError(f"model directory {directory} does not exist")
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f"; found {pickles}: pickle files are refused, convert them to safetensors"
            if pickles
            else ""
        )
        raise ModelFormatError(f"{directory} has no {WEIGHTS_FILE}{hint}")
    if _looks_like_pickle(weights):
        raise ModelFormatError(
            f"{weights} is a pickle/torch.save file, not safetensors; refusing to unpickle"
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"{weights} is not a readable safetensors file: {exc}") from None
    module = build_model(config)
    _check_keys(state, module.state_dict(), source=str(weights))
    module.load_state_dict(state, strict=True)
    module.to(device).eval()
    return LoadedModel(
        module=module, config=config, digest=model_digest(directory), directory=directory
    )
