"""`make bench`: served vs in-process throughput, dynamic batching, the whole pipeline,
memory, cold start, the synthetic generator, a Ray Serve peer and the segmentation
service's per-cell vs batched morphometrics; JSON + Markdown results.

    python -m bench.run                 # demo sizes, ~10-15 min on 2 cores
    python -m bench.run --quick --out /tmp/b   # tiny sizes, one repeat (tests)

Models are untrained, real architectures at CPU-demo sizes (`bench.fixtures.DEMO`),
registered in a local SQLite MLflow registry and promoted to `champion`; the services run
as real processes (`services.stack.LocalStack`). Every ratio is a median of per-repeat
ratios of pairs measured back to back in this run (`bench.measure`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import fixtures, harness, measure, segmentation_cells, workloads
from bench.report import write_markdown
from marrowscope.stages import PIPELINE_MODELS

log = logging.getLogger("bench")
MODELS: tuple[str, ...] = PIPELINE_MODELS


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny models and inputs, one repeat")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--concurrency", type=_ints, default=None, help="default 1,4,16 (quick: 1,4)")
    p.add_argument("--pipeline-concurrency", type=_ints, default=None, help="default 1,4")
    p.add_argument(
        "--target-s",
        type=float,
        default=None,
        help="aimed seconds of one serial repeat (default 3; quick 0.3)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in every process, in-process and served alike",
    )
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--cold-repeats", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument(
        "--cold-services",
        default=None,
        help="comma list of services whose cold start is measured (default all; quick: npm1)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the Ray Serve comparison")
    return p


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.concurrency = args.concurrency or ([1, 4] if q else [1, 4, 16])
    args.pipeline_concurrency = args.pipeline_concurrency or ([1, 2] if q else [1, 4])
    args.target_s = args.target_s or (0.3 if q else 3.0)
    args.cold_repeats = args.cold_repeats or (1 if q else 2)
    from services.stack import MODEL_SERVICES

    args.cold_services = (
        [c.strip() for c in args.cold_services.split(",") if c.strip()]
        if args.cold_services
        else (["npm1"] if q else list(MODEL_SERVICES))
    )
    if set(args.cold_services) - set(MODEL_SERVICES):
        raise SystemExit(f"--cold-services must be among {', '.join(MODEL_SERVICES)}")
    if min(args.repeats, args.threads, args.max_batch_size, args.cold_repeats) < 1:
        raise SystemExit("repeats, threads, max-batch-size and cold-repeats must be >= 1")
    return args


def generator_speed(quick: bool, repeats: int) -> dict:
    """Synthetic generator images/s per size (`training.data.synth.benchmark`), median."""
    from training.data.synth import benchmark

    sizes = ((128, 96),) if quick else ((640, 480), (2560, 1920))
    runs = [benchmark(sizes=sizes, n=2 if quick else 3) for _ in range(repeats)]
    return {key: round(harness.median([r[key] for r in runs]), 3) for key in runs[0]}


def per_model(stack, predictors, inputs, args) -> list[dict]:
    rows = []
    for model in MODELS:
        inproc = workloads.inprocess_worker(model, predictors, inputs)
        served = workloads.served_worker(model, stack.grpc_addr(model), inputs)
        for row in measure.sweep(
            served,
            inproc,
            concurrencies=args.concurrency,
            repeats=args.repeats,
            target_s=args.target_s,
            names=("served", "in_process"),
        ):
            rows.append({"model": model, **row})
    return rows


def batching(stack, nobatch_stack, inputs, args) -> dict:
    c = max(args.concurrency)
    on = workloads.served_worker("npm1", stack.grpc_addr("npm1"), inputs)
    off = workloads.served_worker("npm1", nobatch_stack.grpc_addr("npm1"), inputs)
    latency = harness.time_one(off(), n=1)
    row = measure.paired(
        on,
        off,
        concurrency=c,
        repeats=args.repeats,
        names=("batched", "unbatched"),
        per_thread=harness.per_thread_for(args.target_s, latency, c),
    )
    return {
        "model": "npm1",
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        **row,
    }


def pipeline(stack, api_key, predictors, inputs, args) -> list[dict]:
    served = workloads.gateway_pipeline(stack.gateway_url, api_key, inputs)
    inproc = workloads.inprocess_pipeline(predictors, inputs)
    return measure.sweep(
        served,
        inproc,
        concurrencies=args.pipeline_concurrency,
        repeats=args.repeats,
        target_s=2 * args.target_s,
        names=("gateway", "in_process"),
    )


def peer(stack, model_dir: Path, inputs, args, workdir: Path) -> dict:
    from services.stack import free_port

    proc = measure.PeerProcess(
        model_dir,
        free_port(),
        args.threads,
        args.max_batch_size,
        args.max_queue_delay_ms,
        workdir / "ray-peer.log",
    )
    try:
        proc.start()
        ours = workloads.served_worker("npm1", stack.grpc_addr("npm1"), inputs)
        ray = measure.ray_worker(proc.url, inputs.npm1_image.tobytes())
        latency = harness.time_one(ray(), n=1)
        rows = [
            measure.paired(
                ours,
                ray,
                concurrency=c,
                repeats=args.repeats,
                names=("ours", "ray_serve"),
                per_thread=harness.per_thread_for(args.target_s, latency, c),
            )
            for c in sorted({1, max(args.concurrency)})
        ]
    except (RuntimeError, OSError) as exc:
        log.error("Ray Serve peer failed: %s", exc)
        return {"peer": "ray_serve", "ran": False, "why": str(exc)[:2000]}
    finally:
        proc.stop()
    return {
        "peer": "ray_serve",
        "ran": True,
        "ingress": "HTTP POST, raw uint8 body (ours: OIP gRPC, raw uint8 tensor)",
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "rows": rows,
    }


def save(result: dict, out: Path) -> str:
    """Write bench.json and bench.md (after every section, so a killed run leaves what it
    measured); returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    result = _finite(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return write_markdown(result, out / "bench.md")


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from services.stack import LocalStack

    torch.set_num_threads(args.threads)
    sizes = fixtures.TINY if args.quick else fixtures.DEMO
    t_start = time.perf_counter()
    result: dict = {
        "machine": harness.machine(args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": {
            "name": sizes.name,
            "image_wh": sizes.image,
            "crop": sizes.crop,
            "npm1_hw": sizes.npm1,
            "cells_per_image": sizes.detections,
        },
    }
    log.info("machine %s", result["machine"])
    result["generator_images_per_s"] = generator_speed(args.quick, args.repeats)
    save(result, args.out)

    tracking_uri, versions = fixtures.setup_registry(workdir, sizes)
    result["model_versions"] = versions
    env = fixtures.stack_env(
        args.threads,
        {
            "MS_NPM1_MAX_BATCH_SIZE": str(args.max_batch_size),
            "MS_NPM1_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
            "MS_CELLTYPE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "MS_CELLTYPE_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
        },
    )
    result["cold_start"] = [
        measure.cold_start(name, tracking_uri, workdir, env, args.cold_repeats)
        for name in args.cold_services
    ]
    save(result, args.out)
    result["segmentation_cells"] = segmentation_cells.run(
        workdir / "segcells",
        sizes=sizes if args.quick else segmentation_cells.PAPER_LIKE,
        threads=args.threads,
        repeats=args.repeats,
        target_s=2 * args.target_s,
    )
    save(result, args.out)

    images = fixtures.synth_images(2, sizes.image)
    inputs = workloads.make_inputs(images, sizes.crop, sizes.npm1)
    predictors = workloads.Predictors.load({k: workdir / "models" / k for k in MODELS})
    stack = LocalStack(workdir=workdir / "stack", tracking_uri=tracking_uri, env=env)
    nobatch = LocalStack(
        workdir=workdir / "nobatch",
        tracking_uri=tracking_uri,
        services=("npm1",),
        with_gateway=False,
        env={**env, "MS_NPM1_MAX_BATCH_SIZE": "1"},
    )
    try:
        stack.start(timeout_s=300)
        api_key = fixtures.create_api_key(stack.gateway_env())
        result["per_model"] = per_model(stack, predictors, inputs, args)
        save(result, args.out)
        result["pipeline"] = pipeline(stack, api_key, predictors, inputs, args)
        save(result, args.out)
        nobatch.start(timeout_s=300)
        result["batching"] = batching(stack, nobatch, inputs, args)
        result["peak_rss_bytes"] = {
            name: fixtures.peak_rss_bytes(p.popen.pid) for name, p in stack.procs.items()
        }
        save(result, args.out)
        result["peer"] = (
            {"peer": "ray_serve", "ran": False, "why": "skipped (--no-peer)"}
            if args.no_peer
            else peer(stack, workdir / "models" / "npm1", inputs, args, workdir)
        )
    finally:
        nobatch.stop()
        stack.stop()
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return result


def _finite(obj):
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> dict:
    args = _defaults(get_args_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the stack's processes are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for noisy in ("httpx", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="marrowscope-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        result = _finite(run(args, workdir))
    print(save(result, args.out))
    return result


if __name__ == "__main__":
    main()
