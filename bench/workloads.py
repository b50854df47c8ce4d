"""The requests the benchmarks make, each in two forms doing the same work: a call of the
in-process predictors (`marrowscope.inference`) and a call over the wire (OIP gRPC with
`tritonclient.grpc`, or the gateway's REST API).

- segmentation: one PNG-encoded smear image; in process = decode + `Detector.predict` +
  `measure_cells` (what the service does per request).
- celltype: `CROPS` uint8[32, S, S, 3]; in process = `CellTyper.predict`.
- ensemble: one case feature vector; in process = `EnsemblePredictor.predict`.
- npm1: `IMAGE` uint8[1, H, W, 3] at the model's input size; in process = `Npm1Predictor.predict`.
- pipeline: one case (1 or 2 PNG images, alternating); in process = decode, `analyse_case`,
  ensemble, npm1 per image; served = POST /v1/analyses and poll GET until it finishes.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.stages import PIPELINE_MODELS

CELLTYPE_BATCH = 32
POLL_S = 0.05


@dataclass
class Inputs:
    """Inputs of every workload, made once per benchmark run."""

    pngs: list[bytes]
    crops: np.ndarray
    feature_names: list[str]
    features: np.ndarray
    npm1_image: np.ndarray

    def save(self, path: Path) -> Path:
        """One .npz (no pickles) that `Inputs.load` reads, e.g. in a locust process."""
        np.savez(
            path,
            crops=self.crops,
            features=self.features,
            npm1_image=self.npm1_image,
            feature_names=np.array(self.feature_names, dtype=str),
            **{f"png_{i}": np.frombuffer(b, np.uint8) for i, b in enumerate(self.pngs)},  # type: ignore[arg-type]
        )
        return path

    @classmethod
    def load(cls, path: Path | str) -> Inputs:
        with np.load(path, allow_pickle=False) as z:
            pngs = [
                z[f"png_{i}"].tobytes() for i in range(sum(k.startswith("png_") for k in z.files))
            ]
            return cls(
                pngs=pngs,
                crops=z["crops"],
                features=z["features"],
                feature_names=[str(n) for n in z["feature_names"]],
                npm1_image=z["npm1_image"],
            )


def make_inputs(
    images: Sequence[np.ndarray], crop: int, npm1_hw: tuple[int, int], seed: int = 0
) -> Inputs:
    from marrowscope.features import case_feature_names
    from marrowscope.imaging import crop_cells, encode_png, resize_for_model

    rng = np.random.default_rng(seed)
    h, w = images[0].shape[:2]
    x1, y1 = rng.uniform(0, w - 24, CELLTYPE_BATCH), rng.uniform(0, h - 24, CELLTYPE_BATCH)
    boxes = np.stack([x1, y1, x1 + 20, y1 + 20], axis=1).astype(np.float32)
    names = list(case_feature_names())
    return Inputs(
        pngs=[encode_png(im) for im in images],
        crops=crop_cells(images[0], boxes, crop, 0.1),
        feature_names=names,
        features=rng.random(len(names), dtype=np.float32),
        npm1_image=resize_for_model(images[0], npm1_hw)[None],
    )


@dataclass
class Predictors:
    detector: Any  # marrowscope.inference predictors (Detector, CellTyper, ...)
    celltyper: Any
    ensemble: Any
    npm1: Any

    @classmethod
    def load(cls, dirs: Mapping[str, Path]) -> Predictors:
        from marrowscope.inference import load_predictor

        return cls(*(load_predictor(str(dirs[k]), device="cpu") for k in PIPELINE_MODELS))


def inprocess_worker(model: str, p: Predictors, x: Inputs) -> Callable[[], Callable[[], object]]:
    """Factory of per-thread in-process workers for `model`."""
    from marrowscope.imaging import decode_image
    from marrowscope.morphometrics import measure_cells

    def segmentation() -> object:
        image = decode_image(x.pngs[0])
        det = p.detector.predict(image)
        return measure_cells(image, det.boxes, None, margin=0.15)

    calls = {
        "segmentation": segmentation,
        "celltype": lambda: p.celltyper.predict(x.crops),
        "ensemble": lambda: p.ensemble.predict(x.feature_names, x.features),
        "npm1": lambda: p.npm1.predict(x.npm1_image),
    }
    fn = calls[model]
    return lambda: fn


def _bytes_input(name: str, items: Sequence[bytes | str]):
    import tritonclient.grpc as tc

    arr = np.array([i.encode() if isinstance(i, str) else i for i in items], dtype=object)
    inp = tc.InferInput(name, [len(items)], "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def _tensor_input(name: str, array: np.ndarray, datatype: str):
    import tritonclient.grpc as tc

    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def oip_request(model: str, x: Inputs) -> list:
    """The OIP inputs of one request of `model` (built per call: serialisation is part of
    the client's cost)."""
    if model == "segmentation":
        return [_bytes_input("IMAGE", [x.pngs[0]])]
    if model == "celltype":
        return [_tensor_input("CROPS", x.crops, "UINT8")]
    if model == "ensemble":
        return [
            _tensor_input("FEATURES", x.features.reshape(1, -1), "FP32"),
            _bytes_input("FEATURE_NAMES", x.feature_names),
        ]
    if model == "npm1":
        return [_tensor_input("IMAGE", x.npm1_image, "UINT8")]
    raise ValueError(f"unknown model {model!r}")


def served_worker(model: str, addr: str, x: Inputs) -> Callable[[], Callable[[], object]]:
    """Factory of per-thread gRPC workers (one `tritonclient.grpc` client per thread)."""

    def make() -> Callable[[], object]:
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(addr)
        return lambda: client.infer(model, oip_request(model, x), client_timeout=600)

    return make


def inprocess_pipeline(
    p: Predictors, x: Inputs, images_per_case: Sequence[int] = (1, 2)
) -> Callable[[], Callable[[], object]]:
    """Factory of per-thread in-process pipeline workers (cases cycle through
    `images_per_case`)."""
    from marrowscope.imaging import decode_image
    from marrowscope.inference import analyse_case

    def make() -> Callable[[], object]:
        sizes = itertools.cycle(images_per_case)

        def case() -> float:
            images = [decode_image(b) for b in x.pngs[: next(sizes)]]
            analysis = analyse_case(images, p.detector, p.celltyper)
            p_aml = p.ensemble.predict(analysis.feature_names, analysis.features)
            return p_aml + p.npm1.predict_case(images)

        return case

    return make


class CaseFailed(RuntimeError):
    """An analysis ended in a state other than `succeeded`."""


def gateway_pipeline(
    url: str,
    api_key: str,
    x: Inputs,
    images_per_case: Sequence[int] = (1, 2),
    timeout_s: float = 600.0,
) -> Callable[[], Callable[[], object]]:
    """Factory of per-thread REST workers: submit a case and poll until it is finished."""

    def make() -> Callable[[], object]:
        import httpx

        client = httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60.0)
        sizes = itertools.cycle(images_per_case)
        counter = itertools.count()

        def case() -> dict:
            n = next(sizes)
            meta = {"accession_id": f"BENCH-{id(client):x}-{next(counter)}"}
            files = [("images", (f"{k}.png", x.pngs[k], "image/png")) for k in range(n)]
            r = client.post("/v1/analyses", files=files, data={"metadata": json.dumps(meta)})
            if r.status_code != 202:
                raise CaseFailed(f"submit answered {r.status_code}: {r.text[:300]}")
            location = r.json()["location"]
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                g = client.get(location)
                if g.status_code != 200:
                    raise CaseFailed(f"GET {location} answered {g.status_code}: {g.text[:300]}")
                body = g.json()
                if body["status"] == "succeeded":
                    return body
                if body["status"] in ("failed", "abstained", "cancelled"):
                    raise CaseFailed(f"analysis {body['status']}: {body.get('reason')}")
                time.sleep(POLL_S)
            raise CaseFailed(f"analysis not finished after {timeout_s} s")

        return case

    return make
