"""GPU throughput at the paper's resolutions: fp32 vs bf16/fp16 autocast, channels_last,
torch.compile, and a whole slide's model work (slides per hour per GPU). Run through
`bench/gpu.sh` on a CUDA machine; writes gpu.json and gpu.md to $OUT (or bench/results/).
`--smoke` runs the same code paths at tiny sizes on CPU so CI can check the script without
a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from marrowscope.explain import occlusion_cells, occlusion_grid
from marrowscope.models import build_model, make_config

PAPER = {"segmentation": (1920, 2560), "npm1": (1500, 2000), "crop": 128}
SMOKE = {"segmentation": (96, 128), "npm1": (64, 96), "crop": 32}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (CI check)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip remaining optional measurements past this wall time",
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    return parser


class Bench:
    def __init__(self, device: torch.device, repeats: int, budget_s: float) -> None:
        self.device, self.repeats, self.budget_s = device, repeats, budget_s
        self.start = time.perf_counter()
        self.rows: list[dict] = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(
        self, name: str, mode: str, items: int, fn: Callable[[], object], warmup: int = 2, **extra
    ) -> dict | None:
        """Median seconds per call of `fn` over repeats; items = images (or cells) per call."""
        if self.over_budget():
            print(f"skip {name}/{mode}: over the time budget", flush=True)
            return None
        try:
            for _ in range(warmup):
                fn()
            self.sync()
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # record, keep going
            row = {"model": name, "mode": mode, "error": str(exc).splitlines()[0][:200], **extra}
            self.rows.append(row)
            print(json.dumps(row), flush=True)
            return row
        median = statistics.median(times)
        row = {
            "model": name,
            "mode": mode,
            "items_per_call": items,
            "median_s": round(median, 5),
            "items_per_s": round(items / median, 2),
            **extra,
        }
        if self.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precisions(device: torch.device) -> dict[str, torch.dtype | None]:
    """Reduced precision only where it is the point: on CUDA (CPU autocast is slow)."""
    return PRECISIONS if device.type == "cuda" else {"fp32": None}


def paper_detector(device: torch.device, h: int, w: int) -> torch.nn.Module:
    """The segmentation detector (Faster R-CNN ResNet50-FPN v2) for h x w input, untrained."""
    config = make_config(
        "detector", "fasterrcnn_resnet50_fpn_v2", classes=["cell", "RBC"], min_size=h, max_size=w
    )
    return build_model(config).to(device).eval()


def bench_segmentation(b: Bench, sizes: dict) -> None:
    h, w = sizes["segmentation"]
    model = paper_detector(b.device, h, w)
    image = torch.rand(3, h, w, device=b.device)
    for prec, dtype in precisions(b.device).items():

        def run(dtype=dtype):
            with torch.inference_mode(), autocast(b.device, dtype):
                model([image])

        b.measure("segmentation fasterrcnn_resnet50_fpn_v2", prec, 1, run, resolution=f"{w}x{h}")


def bench_npm1(b: Bench, sizes: dict, smoke: bool) -> torch.nn.Module:
    h, w = sizes["npm1"]
    model = build_model(make_config("npm1", "resnet50", input_size=[h, w])).to(b.device).eval()
    for batch in (1, 8):
        x = torch.rand(batch, 3, h, w, device=b.device)
        for prec, dtype in precisions(b.device).items():

            def run(dtype=dtype, x=x):
                with torch.inference_mode(), autocast(b.device, dtype):
                    model(x)

            b.measure("npm1 resnet50", prec, batch, run, resolution=f"{w}x{h}", batch=batch)
    x = torch.rand(8, 3, h, w, device=b.device).contiguous(memory_format=torch.channels_last)
    cl = model.to(memory_format=torch.channels_last)
    cl_dtype = torch.bfloat16 if b.device.type == "cuda" else None

    def run_cl():
        with torch.inference_mode(), autocast(b.device, cl_dtype):
            cl(x)

    b.measure(
        "npm1 resnet50",
        ("bf16" if cl_dtype else "fp32") + "+channels_last",
        8,
        run_cl,
        resolution=f"{w}x{h}",
        batch=8,
    )
    if not smoke and b.device.type == "cuda":
        compiled = torch.compile(cl)

        def run_compiled():
            with torch.inference_mode(), autocast(b.device, torch.bfloat16):
                compiled(x)

        b.measure(
            "npm1 resnet50",
            "bf16+channels_last+compile",
            8,
            run_compiled,
            warmup=3,
            resolution=f"{w}x{h}",
            batch=8,
        )
    # One training step (SGD, as the paper), to size paper-scale training.
    train = build_model(make_config("npm1", "resnet50", input_size=[h, w])).to(b.device).train()
    opt = torch.optim.SGD(train.parameters(), lr=1e-3, momentum=0.9)
    xb = torch.rand(8 if not smoke else 2, 3, h, w, device=b.device)
    yb = torch.randint(0, 2, (xb.shape[0],), device=b.device).float()

    def step():
        with autocast(b.device, torch.bfloat16 if b.device.type == "cuda" else None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(train(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    b.measure(
        "npm1 resnet50 train step",
        "bf16" if b.device.type == "cuda" else "fp32",
        xb.shape[0],
        step,
        resolution=f"{w}x{h}",
        batch=xb.shape[0],
    )
    return model.to(memory_format=torch.contiguous_format)


def bench_celltype(b: Bench, sizes: dict) -> None:
    s = sizes["crop"]
    model = build_model(make_config("celltype", "xception41", crop_size=s)).to(b.device).eval()
    batch = 256 if b.device.type == "cuda" else 4
    x = torch.rand(batch, 3, s, s, device=b.device)
    for prec, dtype in precisions(b.device).items():
        if prec == "fp16":
            continue

        def run(dtype=dtype):
            with torch.inference_mode(), autocast(b.device, dtype):
                model(x)

        b.measure("celltype xception41", prec, batch, run, resolution=f"{s}x{s}", batch=batch)


def bench_explain(b: Bench, sizes: dict, npm1: torch.nn.Module, smoke: bool) -> None:
    h, w = sizes["npm1"]
    x = torch.rand(1, 3, h, w, device=b.device)
    window, stride = (200, 100) if not smoke else (32, 16)
    rng = np.random.default_rng(0)
    n_cells = 150 if not smoke else 6
    side = 70 if not smoke else 12
    x1 = rng.uniform(0, w - side, n_cells)
    y1 = rng.uniform(0, h - side, n_cells)
    boxes = np.stack([x1, y1, x1 + side, y1 + side], 1).astype(np.float32)
    for prec, dtype in precisions(b.device).items():
        if prec == "fp16":
            continue

        def forward(batch, dtype=dtype):
            with autocast(b.device, dtype):
                return npm1(batch).float().sigmoid()

        def grid():
            with torch.inference_mode():
                occlusion_grid(forward, x, window=window, stride=stride, batch_size=32)

        def cells():
            occlusion_cells(forward, x, boxes, batch_size=32)

        passes = ((h - window) // stride + 1) * ((w - window) // stride + 1)
        b.measure(
            "explain grid",
            prec,
            1,
            grid,
            warmup=1,
            resolution=f"{w}x{h}",
            window=window,
            stride=stride,
            forward_passes=passes,
        )
        b.measure(
            "explain cells",
            prec,
            1,
            cells,
            warmup=1,
            resolution=f"{w}x{h}",
            cells=n_cells,
            forward_passes=n_cells + 1,
        )


SLIDE_CELL_TARGET = 500
"""Nucleated cells a slide's region selection aims for (the gateway's default)."""


def bench_slide(b: Bench, sizes: dict, smoke: bool) -> None:
    """One slide's model work at the paper's resolution: each tile (a 2560x1920 region with
    ~150 cells) is detected, split into nucleus/cytoplasm by the learned U-Net on the device
    with batched mask statistics (`measure_cells(batched=True)`), and its crops typed;
    slides/hour = 3600 / (tiles to reach SLIDE_CELL_TARGET cells x seconds per tile).
    Untrained weights (throughput only); ROI scoring and tile decoding are CPU work outside
    this figure."""
    from marrowscope.models.nucseg import LearnedSplitter, NucSegNet
    from marrowscope.morphometrics import measure_cells

    h, w = sizes["segmentation"]
    n_cells = 150 if not smoke else 6
    side = 70 if not smoke else 12
    detector = paper_detector(b.device, h, w)
    split_config = make_config("nucseg", "unet", input_size=[64, 64], base_channels=8, depth=3)
    splitter = LearnedSplitter(
        NucSegNet(split_config), split_config, device=b.device, batch_size=256
    )
    s = sizes["crop"]
    typer = build_model(make_config("celltype", "xception41", crop_size=s)).to(b.device).eval()
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    x1 = rng.uniform(0, w - side, n_cells)
    y1 = rng.uniform(0, h - side, n_cells)
    boxes = np.stack([x1, y1, x1 + side, y1 + side], 1).astype(np.float32)
    image = torch.from_numpy(tile).to(b.device).permute(2, 0, 1).float() / 255
    crops = torch.rand(n_cells, 3, s, s, device=b.device)
    tiles = -(-SLIDE_CELL_TARGET // n_cells)
    for prec, dtype in precisions(b.device).items():
        if prec == "fp16":
            continue

        def run(dtype=dtype):
            with torch.inference_mode(), autocast(b.device, dtype):
                detector([image])
            measure_cells(tile, boxes, 0.25, splitter=splitter, batched=True, device=b.device)
            with torch.inference_mode(), autocast(b.device, dtype):
                typer(crops)

        row = b.measure(
            "slide tile (detect + learned split + type)",
            prec,
            1,
            run,
            resolution=f"{w}x{h}",
            cells=n_cells,
            tiles_per_slide=tiles,
        )
        if row is not None and "median_s" in row:
            row["slides_per_hour"] = round(3600 / (tiles * row["median_s"]), 1)
            print(json.dumps({"slides_per_hour": row["slides_per_hour"], "mode": prec}), flush=True)


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Device: {meta['device']} · torch {meta['torch']}",
        "",
        "| model | mode | resolution | batch | items/s | median s/call | peak GiB | slides/h |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['mode']} | {r.get('resolution', '')} | "
                f"{r.get('batch', '')} | error: {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r.get('resolution', '')} | "
            f"{r.get('batch', r.get('cells', ''))} | {r['items_per_s']} | "
            f"{r['median_s']} | {r.get('peak_mem_gib', '')} | {r.get('slides_per_hour', '')} |"
        )
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 row means real fp32
    sizes = SMOKE if args.smoke else PAPER
    b = Bench(device, 1 if args.smoke else args.repeats, args.budget_s)
    meta = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
    }
    bench_npm1_model = bench_npm1(b, sizes, args.smoke)
    bench_explain(b, sizes, bench_npm1_model, args.smoke)
    bench_segmentation(b, sizes)
    bench_celltype(b, sizes)
    bench_slide(b, sizes, args.smoke)
    meta["wall_s"] = round(time.perf_counter() - b.start, 1)
    write(b.rows, meta, Path(args.out))
    return {"meta": meta, "rows": b.rows}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
