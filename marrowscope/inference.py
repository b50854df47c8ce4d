"""In-process inference: the pure tensor code behind the model services, training and benchmarks.

Every predictor wraps a `marrowscope.models.LoadedModel` (from `load_model` or
`registry.resolve`) and takes numpy uint8 RGB input, as it arrives over the wire:

- `Detector.predict(image uint8[H, W, 3]) -> Detections` (boxes float32[N, 4] x1, y1, x2, y2
  pixels of the input image, scores float32[N], labels: class names of the config);
  `predict_batch(list of images) -> list[Detections]`.
- `CellTyper.predict(crops uint8[B, S, S, 3]) -> float32[B, K]`, columns `.names`
  (cell codes, then attribute codes); `.crop_size`, `.crop_pad_fraction`, `.crops(image,
  boxes)` cuts crops exactly as training did.
- `EnsemblePredictor.predict(names, vector float32[F]) -> float` P(AML); refuses a vector
  whose names differ from the model's (`InvalidInput`).
- `Npm1Predictor.predict(images uint8[B, H, W, 3] at .input_size) -> float32[B]`;
  `.prepare(image)` resizes any image to the input size; `predict_case(images)` = mean.
- `InProcessModels(detector, celltyper)`: the predictors as the model calls of
  `marrowscope.case`; `analyse_case(images, detector, celltyper, ...) -> CaseAnalysis`
  runs the case analysis the gateway runs over its services (`Detections`,
  `ImageAnalysis`, `CaseAnalysis` and `cell_calls` are `marrowscope.case`'s).

No grpc here; device (`cpu` default, `cuda`, `auto`) and autocast (`none|fp16|bf16`, CUDA
only) are constructor arguments.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope.case import (
    CaseAnalysis,
    CellTypes,
    Detections,
    ImageAnalysis,
    LengthUnit,
    MeasuredDetections,
    SmearImage,
    cell_calls,
)
from marrowscope.errors import InvalidInput
from marrowscope.imaging import CELL_CROP_PAD_FRACTION

if TYPE_CHECKING:
    import torch

    from marrowscope.models import LoadedModel

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "CaseAnalysis",
    "CellTyper",
    "Detections",
    "Detector",
    "EnsemblePredictor",
    "ImageAnalysis",
    "InProcessModels",
    "Npm1Predictor",
    "analyse_case",
    "autocast_context",
    "cell_calls",
    "load_predictor",
    "select_device",
]

log = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.5
"""Detector score threshold when its config records none (`hyperparameters.score_threshold`)."""


def select_device(setting: str = "cpu") -> torch.device:
    """torch.device for `auto|cpu|cuda`; `cuda` without a GPU raises instead of falling back."""
    import torch

    if setting not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device cuda requested but no CUDA device is available")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_context(
    device: torch.device, mode: str = "none"
) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` for `fp16|bf16` on CUDA; a no-op for `none` or on CPU."""
    import torch

    if mode not in ("none", "fp16", "bf16"):
        raise InvalidInput(f"autocast must be none, fp16 or bf16, got {mode!r}")
    if mode == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


def _check_image(image: Any, what: str = "image") -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or min(image.shape[:2]) < 1
    ):
        got = (
            f"{image.dtype}{list(image.shape)}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise InvalidInput(f"{what} must be uint8[H, W, 3] RGB, got {got}")
    return image


class _Predictor:
    kind = ""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str = "cpu",
        autocast: str = "none",
        version: str | None = None,
    ) -> None:
        if loaded.config["kind"] != self.kind:
            raise InvalidInput(
                f"{type(self).__name__} needs a {self.kind} model, got {loaded.config['kind']}"
            )
        self.device = select_device(device)
        self.autocast = autocast
        autocast_context(self.device, autocast)  # validates the mode now, not at first call
        self.config = loaded.config
        self.module = loaded.module.to(self.device).eval()
        self.digest = loaded.digest
        self.version = version or f"local-{loaded.digest[:12]}"

    def _amp(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.device, self.autocast)


class Detector(_Predictor):
    """Faster R-CNN cell detector. `classes` = config classes (label i+1 -> classes[i])."""

    kind = "detector"

    def __init__(self, loaded: LoadedModel, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.classes: tuple[str, ...] = tuple(self.config["classes"])
        hp = self.config.get("hyperparameters", {})
        self.score_threshold = float(hp.get("score_threshold", DEFAULT_SCORE_THRESHOLD))

    def predict(self, image: np.ndarray, score_threshold: float | None = None) -> Detections:
        """Detections with score >= `score_threshold` (default: the config's) for one image."""
        return self.predict_batch([image], score_threshold)[0]

    def predict_batch(
        self, images: Sequence[np.ndarray], score_threshold: float | None = None
    ) -> list[Detections]:
        """One `Detections` per image; images may differ in size (each uint8[H, W, 3])."""
        import torch

        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInput(f"score_threshold must be in [0, 1], got {threshold}")
        tensors = [
            torch.from_numpy(np.ascontiguousarray(_check_image(im, f"images[{i}]")))
            .to(self.device)
            .permute(2, 0, 1)
            .float()
            .div_(255.0)
            for i, im in enumerate(images)
        ]
        if not tensors:
            return []
        with torch.inference_mode(), self._amp():
            outputs = self.module(tensors)
        result = []
        for out in outputs:
            scores = out["scores"].float().cpu().numpy()
            keep = scores >= threshold
            labels = out["labels"].cpu().numpy()[keep]
            if labels.size and (labels.min() < 1 or labels.max() > len(self.classes)):
                raise InvalidInput(f"detector produced label outside 1..{len(self.classes)}")
            result.append(
                Detections(
                    boxes=out["boxes"]
                    .float()
                    .cpu()
                    .numpy()[keep]
                    .astype(np.float32)
                    .reshape(-1, 4),
                    scores=scores[keep].astype(np.float32),
                    labels=tuple(self.classes[int(v) - 1] for v in labels),
                )
            )
        return result


class CellTyper(_Predictor):
    """Cell-type and attribute probabilities for square cell crops."""

    kind = "celltype"

    def __init__(self, loaded: LoadedModel, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.names: tuple[str, ...] = tuple(self.config["outputs"])
        self.crop_size: int = int(self.config["crop_size"])
        # how a single-cell image is cut for this typer (marrowscope.case.single_cell_crop)
        self.crop_mode: str = str(self.config.get("crop_mode", "image"))
        hp = self.config.get("hyperparameters", {})
        self.crop_pad_fraction = float(hp.get("crop_pad_fraction", CELL_CROP_PAD_FRACTION))

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """uint8[N, S, S, 3] crops of `boxes` (float[N, 4] x1, y1, x2, y2) as in training."""
        from marrowscope.imaging import crop_cells

        return crop_cells(_check_image(image), boxes, self.crop_size, self.crop_pad_fraction)

    @property
    def embedding_dim(self) -> int:
        """D of the penultimate embedding (the backbone's features, the head's input)."""
        module: Any = self.module
        return int(module.head.in_features)

    def predict(
        self, crops: np.ndarray, batch_size: int = 256, *, case_norm: bool = False
    ) -> np.ndarray:
        """crops uint8[B, S, S, 3] (S = `crop_size`) -> probabilities float32[B, K].

        `case_norm`: the crops are one case's cells, and the BatchNorm statistics are
        re-estimated on them for this call (`marrowscope.models.celltype.case_batchnorm`);
        the answer then depends on the whole set of crops, not on each crop alone. The
        module's statistics are restored afterwards; not for concurrent calls on one
        predictor."""
        probs, _ = self._forward(crops, batch_size, embeddings=False, case_norm=case_norm)
        return probs

    def predict_with_embeddings(
        self, crops: np.ndarray, batch_size: int = 256, *, case_norm: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities float32[B, K], penultimate embeddings float32[B, D]) from one
        forward pass; the probabilities are exactly `predict`'s. The embedding is the
        backbone's output before the head's dropout and linear layer: what a MIL model
        (`marrowscope.models.mil`) learns from."""
        probs, embeds = self._forward(crops, batch_size, embeddings=True, case_norm=case_norm)
        assert embeds is not None
        return probs, embeds

    def _batches(self, crops: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        """FloatTensor[b, 3, S, S] in [0, 1] on the device, `batch_size` crops at a time."""
        import torch

        for start in range(0, crops.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch_size]))
            yield x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)

    def _forward(
        self, crops: np.ndarray, batch_size: int, *, embeddings: bool, case_norm: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        crops = self._check_crops(crops)
        if case_norm and crops.shape[0]:
            from marrowscope.models.celltype import case_batchnorm

            with self._amp(), case_batchnorm(self.module, self._batches(crops, batch_size)):
                return self._forward(crops, batch_size, embeddings=embeddings)
        module: Any = self.module
        out = np.zeros((crops.shape[0], len(self.names)), dtype=np.float32)
        embeds = np.zeros((crops.shape[0], self.embedding_dim), np.float32) if embeddings else None
        start = 0
        for x in self._batches(crops, batch_size):
            with torch.inference_mode(), self._amp():
                h = module.embed(x)  # the model's forward, split at the embedding
                probs = module.probabilities(module.classify(h))
            out[start : start + len(x)] = probs.float().cpu().numpy()
            if embeds is not None:
                embeds[start : start + len(x)] = h.float().cpu().numpy()
            start += len(x)
        return out, embeds

    def _check_crops(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
            raise InvalidInput(
                f"crops must be uint8[B, S, S, 3], got {crops.dtype}{list(crops.shape)}"
            )
        if crops.shape[0] and crops.shape[1:3] != (self.crop_size, self.crop_size):
            raise InvalidInput(
                f"crops are {crops.shape[1]}x{crops.shape[2]}; the model takes "
                f"{self.crop_size}x{self.crop_size}"
            )
        return crops


class EnsemblePredictor(_Predictor):
    """P(AML) from the case feature vector (`marrowscope.features.case_features`)."""

    kind = "ensemble"

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.config["feature_names"])

    def predict_batch(self, names: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """vectors float[B, F] in `names` order (must equal `feature_names`) -> float32[B]."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise InvalidInput(f"feature vectors must be [B, F], got shape {list(vectors.shape)}")
        proba = self.module.predict_proba(vectors, list(names))  # type: ignore[operator]
        return proba.numpy().astype(np.float32)  # type: ignore[no-any-return]

    @property
    def targets(self) -> tuple[str, ...]:
        """Outputs in order: ("aml",) or ("aml", "npm1") (`marrowscope.models.ensemble`)."""
        return tuple(self.module.targets)  # type: ignore[arg-type]  # EnsembleNet.targets

    def predict_targets(self, names: Sequence[str], vectors: np.ndarray) -> dict[str, np.ndarray]:
        """vectors float[B, F] in `names` order -> {target: float32[B]} for every target."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise InvalidInput(f"feature vectors must be [B, F], got shape {list(vectors.shape)}")
        return {
            t: p.numpy().astype(np.float32)
            for t, p in self.module.predict_targets(vectors, list(names)).items()  # type: ignore[operator]
        }

    def predict(self, names: Sequence[str], vector: np.ndarray) -> float:
        """vector float[F] (or [1, F]) in `names` order -> P(AML)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        return float(self.predict_batch(names, vector)[0])


class Npm1Predictor(_Predictor):
    """P(NPM1 mutated) from whole images at the model's `input_size` (H, W)."""

    kind = "npm1"

    def __init__(self, loaded: LoadedModel, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        height, width = (int(v) for v in self.config["input_size"])
        self.input_size: tuple[int, int] = (height, width)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Any uint8[H, W, 3] image -> uint8[h, w, 3] at `input_size` (as in evaluation)."""
        from marrowscope.imaging import resize_for_model

        return resize_for_model(_check_image(image), self.input_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """images uint8[B, H, W, 3] with (H, W) == `input_size` -> float32[B]."""
        import torch

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise InvalidInput(
                f"images must be uint8[B, H, W, 3], got {images.dtype}{list(images.shape)}"
            )
        if tuple(images.shape[1:3]) != self.input_size:
            raise InvalidInput(
                f"images are {images.shape[1]}x{images.shape[2]} (H x W); the model "
                f"takes {self.input_size[0]}x{self.input_size[1]}"
            )
        if images.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images))
        with torch.inference_mode(), self._amp():
            x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            p = self.module(x).float().sigmoid()
        return p.cpu().numpy().astype(np.float32)  # type: ignore[no-any-return]

    def predict_case(self, images: Sequence[np.ndarray]) -> float:
        """P(NPM1) of a case: mean of per-image probabilities (images of any size)."""
        if not images:
            raise InvalidInput("a case needs at least one image")
        return float(np.mean([self.predict(self.prepare(im)[None])[0] for im in images]))


class MilPredictor(_Predictor):
    """P(APL | AML) and per-cell attention from a case's cell embeddings
    (`marrowscope.models.mil`; the config pins the celltype model they come from)."""

    kind = "mil"

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embedding_dim"])

    @property
    def celltype(self) -> dict[str, str]:
        """{"name", "version"}: the celltype model whose embeddings it learned."""
        return dict(self.config["celltype"])

    def predict(self, embeddings: np.ndarray) -> tuple[float, np.ndarray]:
        """embeddings float[N, D] (N >= 1) -> (P(APL | AML), attention float32[N], sum 1)."""
        module: Any = self.module
        return module.predict(embeddings)  # type: ignore[no-any-return]


_PREDICTORS: dict[str, type[_Predictor]] = {
    "detector": Detector,
    "celltype": CellTyper,
    "ensemble": EnsemblePredictor,
    "npm1": Npm1Predictor,
    "mil": MilPredictor,
}


def load_predictor(
    uri: str, *, device: str = "cpu", autocast: str = "none", tracking_uri: str | None = None
) -> _Predictor:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a model directory and wrap it
    in the predictor of its kind; `.version` is the registry version (or `local-<digest>`)."""
    from marrowscope import registry
    from marrowscope.models import load_model

    resolved = registry.resolve(uri, tracking_uri=tracking_uri)
    loaded = load_model(resolved.local_dir)
    cls = _PREDICTORS[loaded.config["kind"]]
    return cls(loaded, device=device, autocast=autocast, version=resolved.version)


class InProcessModels:
    """`marrowscope.case.CellModels` over in-process predictors: the detector with its
    morphometrics (classical nucleus/cytoplasm split, as the segmentation service serves
    without a splitter) and the cell typer with its own crop size and padding."""

    def __init__(
        self, detector: Detector, celltyper: CellTyper, *, score_threshold: float | None = None
    ) -> None:
        self.detector = detector
        self.celltyper = celltyper
        self.score_threshold = score_threshold

    @property
    def crop_size(self) -> int:
        return self.celltyper.crop_size

    @property
    def crop_pad_fraction(self) -> float:
        return self.celltyper.crop_pad_fraction

    async def detect(self, image: SmearImage) -> MeasuredDetections:
        from marrowscope.morphometrics import FEATURE_NAMES, measure_cells

        pixels = _check_image(image.pixels)
        det = self.detector.predict(pixels, self.score_threshold)
        # at the precision the segmentation service gets it (UM_PER_PX is FP32 on the wire),
        # so that training measures areas exactly as serving does
        um = None if image.um_per_px is None else float(np.float32(image.um_per_px))
        morph = measure_cells(pixels, det.boxes, um)
        unit: LengthUnit = "px" if um is None else "um"
        return MeasuredDetections(det, morph, FEATURE_NAMES, unit)

    async def measure(self, image: SmearImage, boxes: np.ndarray) -> MeasuredDetections:
        from marrowscope.case import SINGLE_CELL_LABEL
        from marrowscope.morphometrics import FEATURE_NAMES, measure_cells

        pixels = _check_image(image.pixels)
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        um = None if image.um_per_px is None else float(np.float32(image.um_per_px))
        det = Detections(b, np.ones(len(b), np.float32), (SINGLE_CELL_LABEL,) * len(b))
        unit: LengthUnit = "px" if um is None else "um"
        return MeasuredDetections(det, measure_cells(pixels, b, um), FEATURE_NAMES, unit)

    async def type_cells(self, crops: np.ndarray, *, embeddings: bool = False) -> CellTypes:
        if embeddings:
            probs, embeds = self.celltyper.predict_with_embeddings(crops)
            return CellTypes(probs, self.celltyper.names, embeds)
        return CellTypes(self.celltyper.predict(crops), self.celltyper.names)


def analyse_case(
    images: Sequence[np.ndarray],
    detector: Detector,
    celltyper: CellTyper,
    *,
    um_per_px: float | Sequence[float | None] | None = None,
    score_threshold: float | None = None,
    cells: bool = False,
) -> CaseAnalysis:
    """`marrowscope.case.analyse_case` with the in-process predictors: detection,
    morphometrics, cell typing, the case feature vector and the differential, by the code
    the gateway runs over its model services.

    images: uint8[H, W, 3] RGB each. um_per_px: one value, one per image, or None (areas in
    px^2). Detections labelled RBC or Platelets are measured but not typed. `cells`: each
    image is one cell (a single-cell export), measured and typed whole, no detection.
    """
    from marrowscope import case

    if not images:
        raise InvalidInput("a case needs at least one image")
    scales = list(um_per_px) if isinstance(um_per_px, Sequence) else [um_per_px] * len(images)
    if len(scales) != len(images):
        raise InvalidInput(f"{len(scales)} um_per_px values for {len(images)} images")
    models = InProcessModels(detector, celltyper, score_threshold=score_threshold)
    smears = [case.SmearImage(im, scale) for im, scale in zip(images, scales, strict=True)]
    return case.run_now(case.analyse_case(models, smears, cells=cells))
