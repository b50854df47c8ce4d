"""Segmentation service end to end: cells/s per core with per-cell vs batched morphometrics.

    python -m bench.segmentation_cells            # writes bench/results/segmentation_cells.{json,md}
    python -m bench.segmentation_cells --quick --out /tmp/sc   # tiny sizes, one repeat

The service is bound by its per-cell morphometrics, not by the detector (issue 12 §4). This
runs the real service (`python -m services.segmentation` via `services.stack.LocalStack`,
OIP gRPC on loopback, one torch thread per process, so cells/s is per core) twice side by
side, `MS_SEGMENTATION_MORPHOMETRICS_BATCHED` false ("per_cell") and true ("batched"), and
measures the pair back to back (`bench.measure.paired`, concurrency 1), for each split:

- `classical`: no splitter (the classical split per crop on the CPU in both; batched
  computes the statistics as tensors);
- `learned`: an untrained nucseg U-Net at the served cpu-demo size (64 px, 8 channels,
  depth 3) as `MS_SEGMENTATION_SPLITTER_URI`, its head biased so that every crop is cell
  and the untrained logits split it into nucleus and cytoplasm: masks are meaningless,
  the work is the real one.

cells/s = requests/s x cells per response (the same image every request; the detector is
untrained with a fixed cap, `Sizes.detections`). Synthetic image, untrained models:
throughput only. In `make bench` (`bench.run`) the same measurement is one section.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import fixtures, harness, measure

log = logging.getLogger("bench.segmentation_cells")

# ~150 cells per image as in the issue; crops of the untrained detector are 45-250 px
PAPER_LIKE = replace(fixtures.DEMO, name="segcells", image=(1280, 960), detections=150)
SPLITS = ("classical", "learned")


def nucseg_dir(root: Path) -> Path:
    """An untrained nucseg model directory (module docstring: biased head)."""
    import torch

    from marrowscope.models import make_config, save_model
    from marrowscope.models.nucseg import NucSegNet

    config = make_config("nucseg", "unet", input_size=[64, 64], base_channels=8, depth=3)
    torch.manual_seed(0)
    module = NucSegNet(config)
    bias = module.head.bias
    assert bias is not None  # a Conv2d built with bias=True
    with torch.no_grad():
        bias.copy_(torch.tensor([-20.0, 0.0, 0.0]))
    return save_model(module, config, root / "nucseg")


def served_worker(addr: str, png: bytes) -> measure.Factory:
    """Factory of per-thread gRPC workers sending `png` (one `tritonclient.grpc` client per
    thread); a call returns the number of cells in the response."""

    def make() -> Callable[[], int]:
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(addr)

        def call() -> int:
            image = tc.InferInput("IMAGE", [1], "BYTES")
            image.set_data_from_numpy(np.array([png], dtype=object))
            r = client.infer("segmentation", [image], client_timeout=600)
            return int(r.as_numpy("BOXES").shape[0])

        return call

    return make


def measure_split(
    split: str,
    tracking_uri: str,
    workdir: Path,
    env: dict[str, str],
    png: bytes,
    *,
    repeats: int,
    target_s: float,
) -> dict:
    """One pair of segmentation services (per-cell, batched) for `split`, measured back to
    back: req/s, cells/s per side and the batched / per-cell ratio."""
    from services.stack import LocalStack

    extra = {"MS_SEGMENTATION_SPLITTER_URI": str(nucseg_dir(workdir))} if split == "learned" else {}
    stacks = {
        side: LocalStack(
            workdir=workdir / f"{split}-{side}",
            tracking_uri=tracking_uri,
            services=("segmentation",),
            with_gateway=False,
            env={
                **env,
                **extra,
                "MS_SEGMENTATION_MORPHOMETRICS_BATCHED": str(side == "batched").lower(),
            },
        )
        for side in ("batched", "per_cell")
    }
    try:
        for stack in stacks.values():
            stack.start(timeout_s=300)
        workers = {
            side: served_worker(s.grpc_addr("segmentation"), png) for side, s in stacks.items()
        }
        cells = workers["per_cell"]()()
        latency = max(harness.time_one(w(), n=1) for w in workers.values())
        row = measure.paired(
            workers["batched"],
            workers["per_cell"],
            concurrency=1,
            repeats=repeats,
            names=("batched", "per_cell"),
            per_thread=harness.per_thread_for(target_s, latency, 1),
        )
    finally:
        for stack in stacks.values():
            stack.stop()
    for side in ("batched", "per_cell"):
        row[side]["cells_per_s"] = row[side]["throughput_per_s"] * cells
    return {"split": split, "cells_per_image": cells, **row}


def run(
    workdir: Path,
    *,
    sizes: fixtures.Sizes,
    threads: int,
    repeats: int,
    target_s: float,
    splits: tuple[str, ...] = SPLITS,
) -> dict:
    """Both splits' pairs on one synthetic image of `sizes.image` (own registry under
    `workdir`); the result dict that `bench.run` stores as `segmentation_cells`."""
    from marrowscope.imaging import encode_png

    tracking_uri, _ = fixtures.setup_registry(workdir, sizes)
    env = fixtures.stack_env(threads)
    png = encode_png(fixtures.synth_images(1, sizes.image)[0])
    rows = [
        measure_split(split, tracking_uri, workdir, env, png, repeats=repeats, target_s=target_s)
        for split in splits
    ]
    return {
        "image_wh": list(sizes.image),
        "detector_cap": sizes.detections,
        "threads_per_process": threads,
        "synthetic_untrained": True,
        "rows": rows,
    }


def markdown(result: dict) -> list[str]:
    """Markdown lines of a `run` result (also a section of bench.md)."""
    w, h = result["image_wh"]
    lines = [
        "## Segmentation service: per-cell vs batched morphometrics (cells/s per core)",
        "",
        f"One synthetic {w}x{h} image per request, untrained detector capped at "
        f"{result['detector_cap']} cells, {result['threads_per_process']} torch thread per "
        "service, concurrency 1 (synthetic, untrained: throughput only).",
        "",
        "| split | cells/image | per-cell cells/s | batched cells/s | batched / per-cell "
        "| per-cell p50 ms | batched p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b, p = r["batched"], r["per_cell"]
        lines.append(
            f"| {r['split']} | {r['cells_per_image']} | {p['cells_per_s']:.3g} | "
            f"{b['cells_per_s']:.3g} | **{r['throughput_ratio']:.3g}** | "
            f"{p['p50_s'] * 1000:.0f} | {b['p50_s'] * 1000:.0f} | {b['errors'] + p['errors']} |"
        )
    return [*lines, ""]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny image and models, one repeat")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--target-s", type=float, default=None, help="default 6 (quick: 0.3)")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        raise SystemExit("threads and repeats must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="marrowscope-segcells-") as tmp:
        result = {
            "machine": harness.machine(args.threads),
            **run(
                args.workdir or Path(tmp),
                sizes=fixtures.TINY if args.quick else PAPER_LIKE,
                threads=args.threads,
                repeats=args.repeats or (1 if args.quick else 3),
                target_s=args.target_s or (0.3 if args.quick else 6.0),
            ),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segmentation_cells.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(markdown(result))
    (args.out / "segmentation_cells.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
