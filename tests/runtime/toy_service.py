"""A tiny numpy "scale" model served by the real runtime, for runtime tests.

Inputs (all optional, at least one): ``X`` FP32 [B, N], ``PIXELS`` UINT8 [B, H, W, 3],
``TEXT`` BYTES [B]. Outputs: ``Y`` = X * scale, ``INVERTED`` = 255 - PIXELS, ``UPPER`` =
TEXT upper-cased, ``SCALE`` FP32 [1] (not per request). ``scale`` is the version number,
so a response shows which version computed it. Request parameters: ``delay_ms`` (int, sleep
in predict; ``cooperative=True`` sleeps in 50 ms steps that check the request's
cancellation), ``fail`` (bool, raise a non-domain error), ``repeat`` (int, Y = X * scale
tiled along dimension 1, for replies larger than requests).

Run as a service: ``python -m tests.runtime.toy_service``; the wanted version is read from
the file named by ``TOY_VERSION_FILE`` (settings env prefix ``MS_TOY_``);
``TOY_LOAD_DELAY_S`` makes ``load()`` sleep that long (shutdown during a model load).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from pydantic_settings import SettingsConfigDict

from marrowscope.errors import InvalidInput
from services.runtime.handler import ModelHandler, Parameters, Tensors, TensorSpec
from services.runtime.repository import ResolvedVersion, Resolver
from services.runtime.settings import ServiceSettings


class ToySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MS_TOY_")
    model_name: str = "toy"


class ToyHandler(ModelHandler):
    inputs = (
        TensorSpec("X", "FP32", (-1, -1), optional=True),
        TensorSpec("PIXELS", "UINT8", (-1, -1, -1, 3), optional=True),
        TensorSpec("TEXT", "BYTES", (-1,), optional=True),
    )
    outputs = (
        TensorSpec("Y", "FP32", (-1, -1)),
        TensorSpec("INVERTED", "UINT8", (-1, -1, -1, 3)),
        TensorSpec("UPPER", "BYTES", (-1,)),
        TensorSpec("SCALE", "FP32", (1,), batch_axis=False),
    )
    batchable = True
    platform = "numpy"

    def __init__(self, scale: float, delay_s: float = 0.0) -> None:
        self.scale = np.float32(scale)
        self.delay_s = delay_s
        self.calls: list[int] = []  # rows per predict call, for tests

    def load(self) -> None:
        time.sleep(float(os.environ.get("TOY_LOAD_DELAY_S", "0")))
        super().load()

    def warmup(self) -> None:
        self.infer({"X": np.zeros((1, 2), np.float32)}, {})

    def preprocess(self, inputs: Tensors, parameters: Parameters):
        if not inputs:
            raise InvalidInput("send at least one of X, PIXELS, TEXT")
        if parameters.get("fail"):
            raise RuntimeError("toy failure with secret detail")
        delay_s = int(parameters.get("delay_ms", 0)) / 1000 or self.delay_s
        return (
            inputs,
            delay_s,
            bool(parameters.get("cooperative")),
            int(parameters.get("repeat", 1)),
        )

    def predict(self, batch):
        inputs, delay_s, cooperative, repeat = batch
        if cooperative:
            end = time.monotonic() + delay_s
            while time.monotonic() < end:
                self.cancellation.check()
                time.sleep(0.05)
        else:
            time.sleep(delay_s)
        self.calls.append(next(iter(inputs.values())).shape[0])
        out: Tensors = {"SCALE": np.array([self.scale], np.float32)}
        if "X" in inputs:
            out["Y"] = np.tile(inputs["X"] * self.scale, (1, repeat))
        if "PIXELS" in inputs:
            out["INVERTED"] = 255 - inputs["PIXELS"]
        if "TEXT" in inputs:
            upper = np.empty(inputs["TEXT"].shape, dtype=object)
            upper[:] = [t.upper() for t in inputs["TEXT"]]
            out["UPPER"] = upper
        return out


def resolver_for(wanted: dict[str, str], delay_s: float = 0.0) -> Resolver:
    """Resolver returning ``wanted["version"]`` (mutable by tests); scale = float(version)."""

    def resolve() -> ResolvedVersion:
        version = wanted["version"]
        return ResolvedVersion(version, lambda: ToyHandler(float(version), delay_s))

    return resolve


def file_resolver(path: Path) -> Resolver:
    def resolve() -> ResolvedVersion:
        version = path.read_text().strip()
        return ResolvedVersion(version, lambda: ToyHandler(float(version)))

    return resolve


def main() -> int:
    from services.runtime.server import run_service

    settings = ToySettings()
    resolver = file_resolver(Path(os.environ["TOY_VERSION_FILE"]))
    return run_service(lambda resolved: ToyHandler(1.0), settings, resolver=resolver)


if __name__ == "__main__":
    raise SystemExit(main())
