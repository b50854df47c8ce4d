"""Models, inputs and a running stack for the benchmarks and the load tests.

Models are untrained (throughput does not depend on the weights) but have the real
architectures at CPU-demo sizes (`DEMO`) or test sizes (`TINY`); they are saved with
`marrowscope.models.save_model`, registered in an MLflow registry with ensemble lineage, and
promoted by moving the `champion` alias, so the services load them exactly as in production.

The untrained detector gives every box the same score; its classes leave out RBC so that
every detection goes on to the cell typer and each pipeline stage does real work.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.stages import LINEAGE_UPSTREAMS, PIPELINE_MODELS, Stage

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = PIPELINE_MODELS


@dataclass(frozen=True)
class Sizes:
    """Model and image sizes. `image` is (width, height) of the synthetic smear images;
    `npm1` is the npm1 input (height, width); `crop` the celltype crop side."""

    name: str
    image: tuple[int, int]
    crop: int
    npm1: tuple[int, int]
    detections: int
    """Detector cap per image (`box_detections_per_img`): cells per image in the pipeline."""


DEMO = Sizes("demo", image=(640, 480), crop=48, npm1=(192, 256), detections=40)
TINY = Sizes("tiny", image=(128, 96), crop=32, npm1=(64, 64), detections=8)


def model_configs(sizes: Sizes) -> dict[str, dict]:
    """Registry kind -> model config (`marrowscope.models.make_config`)."""
    from marrowscope.features import case_feature_names
    from marrowscope.models import make_config
    from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES

    w, h = sizes.image
    return {
        "segmentation": make_config(
            "detector",
            "fasterrcnn_mobilenet_v3_large_fpn",
            classes=["BLA", "LYT", "NGS"],
            min_size=min(w, h),
            max_size=max(w, h),
            hyperparameters={
                "score_threshold": 0.0,
                "box_score_thresh": 0.0,
                "box_detections_per_img": sizes.detections,
            },
        ),
        # every taxonomy code incl. RBC: `inference.analyse_case` (in-process) requires them
        "celltype": make_config(
            "celltype", "tiny_cnn", crop_size=sizes.crop, outputs=[*CODES, *ATTRIBUTE_CODES]
        ),
        "ensemble": make_config(
            "ensemble", "mlp", feature_names=list(case_feature_names()), hidden=[16], dropout=0.0
        ),
        "npm1": make_config("npm1", "resnet18", input_size=list(sizes.npm1)),
    }


def build_model_dirs(root: Path, sizes: Sizes, seed: int = 0) -> dict[str, Path]:
    """Save one untrained model per registry kind under `root/<kind>`; returns the dirs."""
    import torch

    from marrowscope.models import build_model, save_model
    from marrowscope.taxonomy import NON_COUNTED_CODES

    dirs = {}
    for kind, config in model_configs(sizes).items():
        torch.manual_seed(seed)
        module: Any = build_model(config)
        if kind == Stage.CELLTYPE:  # an untrained typer may call every cell RBC (or smudge, ...):
            with torch.no_grad():  # the gateway would then abstain (no counted cells)
                for code in NON_COUNTED_CODES:
                    module.head.bias[config["outputs"].index(code)] = -20.0
        dirs[kind] = save_model(module, config, root / kind)
    return dirs


def register_champions(tracking_uri: str, dirs: Mapping[str, Path]) -> dict[str, str]:
    """Register every model dir and point `champion` at it; the ensemble records the
    segmentation and celltype versions it was 'built on' (lineage). Returns kind -> version."""
    from marrowscope.registry import get_client, register_model_dir, registered_name

    client = get_client(tracking_uri)
    versions: dict[str, str] = {}
    for kind in KINDS:
        lineage: dict[str, str] = (
            {u: versions[u] for u in LINEAGE_UPSTREAMS} if kind == Stage.ENSEMBLE else {}
        )
        versions[kind] = register_model_dir(
            kind,
            dirs[kind],
            metrics={},
            params={},
            data_hash="bench-untrained",
            lineage=lineage,
            tracking_uri=tracking_uri,
        )
        client.set_registered_model_alias(registered_name(kind), "champion", versions[kind])
    log.info("registered champions %s", versions)
    return versions


def synth_images(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """`n` synthetic smear images uint8[H, W, 3] of (width, height) `size` (AML cases)."""
    from dataclasses import replace

    from training.data.synth_cohort import SynthConfig, case_rng, sample_case
    from training.data.synth_render import render_image

    cfg = replace(SynthConfig(), size=size)
    out = []
    for i in range(n):
        spec = sample_case(
            case_rng(seed, i), i, "aml", "mutated" if i % 3 == 0 else "wild_type", cfg
        )
        out.append(render_image(case_rng(seed, i, 1), spec, cfg)[0])
    return out


def stack_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for `LocalStack`: thread count, no registry polling during measurements,
    no rate limit, no minimum cell count (untrained detector)."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MS_GATEWAY_MIN_CELLS": "1",
        # the doorbell starts a submitted case at once; the poll only finds other processes'
        # work, so the default interval (a short one cost DB transactions under load) is kept
        "MS_GATEWAY_POLL_INTERVAL_S": "0.5",
        "MS_GATEWAY_RATE_LIMIT_PER_MIN": "10000000",
        "MS_GATEWAY_WORKERS": "4",
    }
    for name in ("SEGMENTATION", "CELLTYPE", "ENSEMBLE", "NPM1", "EXPLAIN"):
        env[f"MS_{name}_POLL_INTERVAL_S"] = "0"
        env[f"MS_{name}_DEVICE"] = "cpu"
    env.update(extra or {})
    return env


def create_api_key(gateway_env: Mapping[str, str], name: str = "bench") -> str:
    """A `submit,read` key made with the gateway's own CLI against its job store."""
    from marrowscope.paths import PROJECT_ROOT

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.gateway.keys",
            "create",
            "--name",
            name,
            "--scopes",
            "submit,read",
        ],
        env=dict(gateway_env),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"key creation failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[0]


def sqlite_tracking_uri(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def peak_rss_bytes(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError as exc:
        log.warning("cannot read peak RSS of %d: %s", pid, exc)
    return None


def setup_registry(workdir: Path, sizes: Sizes) -> tuple[str, dict[str, str]]:
    """Save, register and promote the models under `workdir`; returns (tracking URI,
    kind -> version). Sets `MARROWSCOPE_MODEL_CACHE` so services share one model cache."""
    os.environ.setdefault("MARROWSCOPE_MODEL_CACHE", str(workdir / "model-cache"))
    dirs = build_model_dirs(workdir / "models", sizes)
    uri = sqlite_tracking_uri(workdir / "mlflow")
    return uri, register_champions(uri, dirs)
