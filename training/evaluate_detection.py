"""Detection mAP@0.5 and per-class AP@0.5 with pycocotools (not a hand-written mAP).

Metric names: `map50` (mean of per-class AP over classes with ground truth), `ap50_<class>`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from marrowscope.errors import InvalidInput

log = logging.getLogger(__name__)

MAX_DETS = 1000
"""Detections kept per image by the evaluation (synthetic 640x480 fields hold ~100 cells)."""


def detection_map(
    ground_truth: Sequence[tuple[np.ndarray, Sequence[str]]],
    predictions: Sequence[tuple[np.ndarray, np.ndarray, Sequence[str]]],
    classes: Sequence[str],
) -> dict[str, float]:
    """COCO-style AP at IoU 0.5 per class and its mean.

    ground_truth: per image (boxes float[N, 4] x1, y1, x2, y2 px, labels N names).
    predictions: per image, same order (boxes float[M, 4], scores float[M], labels M names).
    Classes without ground truth get no `ap50_<class>` and do not enter `map50`.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(predictions):
        raise InvalidInput(
            f"{len(ground_truth)} ground-truth images but {len(predictions)} predictions"
        )
    cat = {c: i + 1 for i, c in enumerate(classes)}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for img_id, ((gt_boxes, gt_labels), (boxes, scores, labels)) in enumerate(
        zip(ground_truth, predictions, strict=True), start=1
    ):
        images.append({"id": img_id, "width": 1, "height": 1})
        for box, lab in zip(np.asarray(gt_boxes).reshape(-1, 4), gt_labels, strict=True):
            if lab not in cat:
                raise InvalidInput(f"ground-truth label {lab!r} is not one of {list(classes)}")
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat[lab],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for box, score, lab in zip(np.asarray(boxes).reshape(-1, 4), scores, labels, strict=True):
            if lab not in cat:
                raise InvalidInput(f"predicted label {lab!r} is not one of {list(classes)}")
            x1, y1, x2, y2 = (float(v) for v in box)
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": cat[lab],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": c} for c, i in cat.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()
        if not dets:
            dt.dataset = {
                "images": images,
                "annotations": [],
                "categories": gt.dataset["categories"],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [MAX_DETS]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T=1, R=101, K, A=1, M=1]
    out: dict[str, float] = {}
    present = {a["category_id"] for a in anns}
    for c, k in cat.items():
        if k not in present:
            continue
        p = precision[0, :, k - 1, 0, 0]
        out[f"ap50_{c}"] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    if not out:
        raise InvalidInput("no ground-truth boxes: mAP is undefined")
    out["map50"] = float(np.mean(list(out.values())))
    return out
