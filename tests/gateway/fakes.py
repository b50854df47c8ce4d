"""Test `ModelClients` returning plausible tensors, loaded by a real gateway through
`MS_GATEWAY_CLIENTS_FACTORY=tests.gateway.fakes:make_clients`.

Knobs (environment, read when the factory is called):
  MS_TEST_FAKE_CELLS      cells per image (default 40; every 8th is an RBC)
  MS_TEST_FAKE_SEG_DELAY_S  seconds each segmentation call sleeps (default 0)
  MS_TEST_FAKE_DOWN       comma list of services that always answer UNAVAILABLE
  MS_TEST_FAKE_DOWN_FILE  a file read at every call, one service a line: down (not ready and
                          UNAVAILABLE) while listed; `<service>:calls` answers UNAVAILABLE but
                          reports ready (it died between a readiness check and the call).
                          Tests start and end an outage of a running gateway with it.
  MS_TEST_FAKE_LINEAGE    match (default) | mismatch | none
  MS_TEST_FAKE_FEATURE_UNITS  unit the ensemble reports it learned: unknown (default, an old
                          config) | um | px
  MS_TEST_FAKE_ENSEMBLE_TARGETS  aml (default: no NPM1 head) | aml,npm1 (also P(NPM1 | AML))
  MS_TEST_FAKE_NPM1_THRESHOLD    threshold the two-target ensemble reports (default: none)
  MS_TEST_FAKE_MIL        none (default: the ensemble service serves no `mil` model, its
                          metadata is NOT_FOUND) | match (a MIL model built on the served
                          celltype version) | other_celltype (built on another version) |
                          other_dim (reads embeddings of another size)
Celltype answers EMBEDDINGS [B, EMB_D] (functions of the crop's pixels) when asked; the
fake MIL model attends by the first embedding value and reads P(APL) from the attended
cells, so both are functions of the cells.
Segmentation with boxes (the service's BOXES_IN) measures exactly those boxes, labelled
"cell" with score 1.0, as the real service does for single-cell cases.
Outputs are computed from the pixels (blast fraction from crop brightness, P(AML) from the
case's blast fraction), so they are functions of the input, not constants.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import numpy as np

from marrowscope.features import MORPH_SUMMARY_FEATURES
from marrowscope.imaging import decode_image
from marrowscope.targets import output_of
from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES, COUNTED_CODES
from services.gateway.clients import (
    Classification,
    EnsembleOutput,
    Explanation,
    FeatureUnits,
    MilOutput,
    ModelInfo,
    Segmentation,
    ServiceCallError,
    TensorSpec,
)

VERSIONS = {"segmentation": "3", "celltype": "5", "ensemble": "2", "npm1": "7", "explain": "1"}
MIL_VERSION = "4"
EMB_D = 4
CROP = 16
NPM1_HW = (48, 64)


class FakeModelClients:
    def __init__(
        self,
        *,
        cells: int = 40,
        seg_delay_s: float = 0.0,
        down: frozenset[str] = frozenset(),
        lineage: str = "match",
        feature_units: str = "unknown",
        targets: tuple[str, ...] = ("aml",),
        npm1_threshold: float | None = None,
        apl_threshold: float | None = None,
        mil: str = "none",
    ) -> None:
        self.cells = cells
        self.mil_mode = mil
        self.mil_bags: list[np.ndarray] = []
        """The CELL_EMBEDDINGS of every MIL call."""
        self.embedding_requests = 0
        """Celltype calls that asked for EMBEDDINGS."""
        self.targets = targets
        self.npm1_threshold = npm1_threshold
        self.apl_threshold = apl_threshold
        self.feature_units = feature_units
        self.seg_delay_s = seg_delay_s
        self.down = down
        self.lineage = lineage
        self.calls: dict[str, int] = {}
        self.seen_versions: dict[str, set[str]] = {}
        self.seen_um_per_px: list[float | None] = []
        self.measured_boxes: list[np.ndarray] = []
        self.segmenting = 0
        self.max_segmenting = 0
        """Segmentation calls in flight now / at most (per-case image concurrency)."""
        """The BOXES_IN of every measure-only segmentation call."""
        self.batch_sizes: list[int] = []
        """Crops per celltype call."""
        self.down_file: str | None = None

    def _down_now(self) -> tuple[frozenset[str], frozenset[str]]:
        """(services down entirely, services whose calls fail but that report ready)."""
        lines: list[str] = []
        if self.down_file:
            try:
                with open(self.down_file) as fh:
                    lines = [ln.strip() for ln in fh if ln.strip()]
            except FileNotFoundError:
                pass
        down = self.down | {ln for ln in lines if ":" not in ln}
        return frozenset(down), frozenset(ln.split(":")[0] for ln in lines if ":" in ln)

    def _enter(self, service: str, version: str | None = None) -> None:
        """Count inference calls (metadata calls pass version None and are not counted)."""
        if version is not None:
            self.calls[service] = self.calls.get(service, 0) + 1
            self.seen_versions.setdefault(service, set()).add(version)
        down, calls_down = self._down_now()
        if service in down or service in calls_down:
            raise ServiceCallError(service, "UNAVAILABLE", "connection refused (test)")

    async def metadata(self, service: str, *, timeout: float) -> ModelInfo:
        self._enter("ensemble" if service == "mil" else service)
        if service == "mil":
            if self.mil_mode == "none":
                raise ServiceCallError("mil", "NOT_FOUND", "model 'mil' is not served (test)")
            d = EMB_D + 1 if self.mil_mode == "other_dim" else EMB_D
            return ModelInfo(
                "mil",
                MIL_VERSION,
                {"CELL_EMBEDDINGS": TensorSpec("FP32", (-1, d))},
                {"P_APL": TensorSpec("FP32", (1,)), "ATTENTION": TensorSpec("FP32", (-1,))},
            )
        inputs = {
            "celltype": {"CROPS": TensorSpec("UINT8", (-1, CROP, CROP, 3))},
            "npm1": {"IMAGE": TensorSpec("UINT8", (1, *NPM1_HW, 3))},
            "explain": {"IMAGE": TensorSpec("UINT8", (1, -1, -1, 3))},
            "segmentation": {"IMAGE": TensorSpec("BYTES", (1,))},
            "ensemble": {"FEATURES": TensorSpec("FP32", (1, -1))},
        }[service]
        outputs = {
            "ensemble": {output_of(t): TensorSpec("FP32", (1,)) for t in self.targets},
            "celltype": {"EMBEDDINGS": TensorSpec("FP32", (-1, EMB_D))},
        }
        return ModelInfo(service, VERSIONS[service], inputs, outputs.get(service, {}))

    async def segment(
        self,
        image: bytes,
        *,
        version: str,
        timeout: float,
        um_per_px: float | None = None,
        boxes: np.ndarray | None = None,
    ) -> Segmentation:
        self._enter("segmentation", version)
        self.segmenting += 1
        self.max_segmenting = max(self.max_segmenting, self.segmenting)
        try:
            if self.seg_delay_s:
                await asyncio.sleep(min(self.seg_delay_s, timeout))
                if self.seg_delay_s > timeout:  # what a gRPC call does when its timeout passes
                    raise ServiceCallError("segmentation", "DEADLINE_EXCEEDED", "deadline passed")
            await asyncio.sleep(0)  # a real call yields: concurrent images overlap here
        finally:
            self.segmenting -= 1
        rgb = decode_image(image)
        h, w = rgb.shape[:2]
        rng = np.random.default_rng(int(hashlib.sha256(image).hexdigest()[:8], 16))
        if boxes is not None:  # BOXES_IN: exactly these boxes, measured, as the service does
            self.measured_boxes.append(np.asarray(boxes, np.float32))
            n = len(boxes)
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            labels = ["cell"] * n
            scores = np.ones(n, np.float32)
        else:
            n = self.cells
            side = max(4.0, min(h, w) / 8)
            x1 = rng.uniform(0, w - side, n)
            y1 = rng.uniform(0, h - side, n)
            boxes = np.stack([x1, y1, x1 + side, y1 + side], 1).astype(np.float32)
            labels = [
                "RBC" if i % 8 == 7 else COUNTED_CODES[i % len(COUNTED_CODES)] for i in range(n)
            ]
            scores = rng.uniform(0.5, 1, n).astype(np.float32)
        names = [*MORPH_SUMMARY_FEATURES, "segmentation_ok"]
        feats = rng.uniform(0.1, 1.0, (n, len(names))).astype(np.float32)
        feats[:, -1] = 1.0
        self.seen_um_per_px.append(um_per_px)
        return Segmentation(
            boxes,
            scores,
            labels,
            feats,
            names,
            version,
            "px" if um_per_px is None else "um",
        )

    async def classify(
        self, crops: np.ndarray, *, version: str, timeout: float, embeddings: bool = False
    ) -> Classification:
        self._enter("celltype", version)
        self.batch_sizes.append(len(crops))
        assert crops.dtype == np.uint8 and crops.shape[1:] == (CROP, CROP, 3), crops.shape
        names = [*CODES, *ATTRIBUTE_CODES]
        bright = crops.reshape(len(crops), -1).mean(1) / 255.0
        probs = np.full((len(crops), len(names)), 0.02, np.float32)
        # darker crops read as blasts, brighter ones as segmented neutrophils
        probs[:, CODES.index("BLA")] = 1.0 - bright
        probs[:, CODES.index("NGS")] = bright
        probs[:, len(CODES) :] = 0.3
        if not embeddings:
            return Classification(probs, names, version)
        self.embedding_requests += 1
        rgb = crops.reshape(len(crops), -1, 3).mean(1) / 255.0
        emb = np.concatenate([1.0 - bright[:, None], rgb], 1).astype(np.float32)
        return Classification(probs, names, version, emb)

    async def mil(self, embeddings: np.ndarray, *, version: str, timeout: float) -> MilOutput:
        self._enter("ensemble", version)
        assert embeddings.dtype == np.float32 and embeddings.shape[1] == EMB_D, embeddings.shape
        self.mil_bags.append(embeddings)
        z = 8.0 * embeddings[:, 0]
        a = np.exp(z - z.max())
        a = (a / a.sum()).astype(np.float32)
        p = float(1 / (1 + np.exp(-6.0 * (float(a @ embeddings[:, 0]) - 0.5))))
        lineage = VERSIONS["celltype"] if self.mil_mode != "other_celltype" else "1"
        return MilOutput(p, a, version, lineage, "marrowscope-celltype")

    async def ensemble(
        self, features: np.ndarray, names: list[str], *, version: str, timeout: float
    ) -> EnsembleOutput:
        self._enter("ensemble", version)
        frac_bla = float(features[names.index("frac_BLA")])
        lineage = {
            "match": {"segmentation": VERSIONS["segmentation"], "celltype": VERSIONS["celltype"]},
            "mismatch": {"segmentation": "1", "celltype": VERSIONS["celltype"]},
            "none": {},
        }[self.lineage]
        units = FeatureUnits(
            self.feature_units, *((0.25, 0.3) if self.feature_units == "um" else (None, None))
        )
        # P(NPM1 | AML), P(APL | AML) from other functions of the features than P(AML)
        p_targets = {
            t: float(1 / (1 + np.exp(-slope * (frac_bla - 0.35))))
            for t, slope in (("npm1", 8.0), ("apl", -6.0))
            if t in self.targets
        }
        thresholds = {
            t: th
            for t, th in (("npm1", self.npm1_threshold), ("apl", self.apl_threshold))
            if t in p_targets and th is not None
        }
        return EnsembleOutput(
            float(1 / (1 + np.exp(-10 * (frac_bla - 0.2)))),
            lineage,
            version,
            units,
            p_targets=p_targets,
            thresholds=thresholds,
        )

    async def npm1(self, image: np.ndarray, *, version: str, timeout: float) -> float:
        self._enter("npm1", version)
        assert image.shape == (*NPM1_HW, 3) and image.dtype == np.uint8
        return float(image[..., 0].mean() / 255.0)

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
        self._enter("explain", version)
        assert target_model == "npm1" and target_version == VERSIONS["npm1"]
        heat = 1.0 - image.mean(2).astype(np.float32) / 255.0
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        imp = (
            np.array(
                [heat[int(b[1]) : int(b[3]) + 1, int(b[0]) : int(b[2]) + 1].mean() for b in boxes],
                np.float32,
            )
            if len(boxes)
            else np.zeros(0, np.float32)
        )
        return Explanation(heat[::4, ::4], imp * (area > 0), version)

    async def ready(self, *, timeout: float) -> dict[str, bool]:
        down, _ = self._down_now()
        return {s: s not in down for s in VERSIONS}

    async def close(self) -> None:
        return None


def make_clients(settings) -> FakeModelClients:
    env = os.environ
    clients = FakeModelClients(
        cells=int(env.get("MS_TEST_FAKE_CELLS", "40")),
        seg_delay_s=float(env.get("MS_TEST_FAKE_SEG_DELAY_S", "0")),
        down=frozenset(s for s in env.get("MS_TEST_FAKE_DOWN", "").split(",") if s),
        lineage=env.get("MS_TEST_FAKE_LINEAGE", "match"),
        feature_units=env.get("MS_TEST_FAKE_FEATURE_UNITS", "unknown"),
        targets=tuple(env.get("MS_TEST_FAKE_ENSEMBLE_TARGETS", "aml").split(",")),
        npm1_threshold=(
            float(env["MS_TEST_FAKE_NPM1_THRESHOLD"])
            if env.get("MS_TEST_FAKE_NPM1_THRESHOLD")
            else None
        ),
        apl_threshold=(
            float(env["MS_TEST_FAKE_APL_THRESHOLD"])
            if env.get("MS_TEST_FAKE_APL_THRESHOLD")
            else None
        ),
        mil=env.get("MS_TEST_FAKE_MIL", "none"),
    )
    clients.down_file = env.get("MS_TEST_FAKE_DOWN_FILE") or None
    return clients
