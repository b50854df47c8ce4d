"""Whole slides through the gateway (issue 12 §4): tiles/s with 1 and 2 segmentation replicas,
time from submission to tiles cut and to the result, peak RSS of the gateway on a large slide.

    python -m bench.slide_throughput --out bench/results        # demo models, ~10 min on 2 cores
    python -m bench.slide_throughput --quick --out /tmp/sb      # tiny models and slides (tests)

Writes `slide_throughput.json` and `slide_throughput.md` to `--out`.

Setup: untrained models at CPU-demo sizes (`bench.fixtures`), registered and promoted in a
local MLflow; one `LocalStack` runs every model service once, segmentation twice, and two
gateways with embedded workers over the same processes: `gateway` dials the first
segmentation replica, `gateway-2r` the static list of both (round_robin per call). Synthetic
slides (`training.data.synth_slide`) sit in a slide store the gateways read by reference.

- Throughput: one slide per `POST /v1/slides`, submitted to the two gateways in alternating
  order per repeat (a warm-up round first); tiles/s = tiles / (result - submission). The
  scaling ratio is the median of per-repeat ratios (2 replicas / 1). Segmentation calls per
  replica (from each replica's Prometheus counter) show that both replicas served.
- Time to the first region's result is not observable (the pipeline runs the case once all
  tiles are cut), so the time to tiles cut (`slide.phase == "cut"` in
  `GET /v1/analyses/{id}`) and to the final result are reported.
- Memory: RSS of `gateway` sampled with psutil every 50 ms while it analyses the throughput
  slide and then a large slide, as large as the generator writes in `--large-seconds`
  (aimed at 100k x 80k px, capped there).

Figures are for untrained models on synthetic slides: throughput evidence only.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from bench import fixtures, harness
from bench.harness import RssSampler

log = logging.getLogger("bench.slide_throughput")
MIB = 1024 * 1024
AIM_WH = (100_000, 80_000)
"""The slide size issue 12 asks the memory bound for."""
POLL_S = 0.1
CONFIGS: tuple[tuple[str, int], ...] = (("gateway", 1), ("gateway-2r", 2))
"""(gateway process, segmentation replicas it balances over)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; `large_wh` None = as large as `large_seconds` of generator time."""

    sizes: fixtures.Sizes
    slide_wh: tuple[int, int]
    block: int
    tile: int
    region_um: float
    cell_target: int | None
    repeats: int
    warmup: int
    large_seconds: float
    large_wh: tuple[int, int] | None
    timeout_s: float


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(
            sizes=fixtures.TINY,
            slide_wh=(2048, 1536),
            block=256,
            tile=256,
            region_um=128.0,
            cell_target=20,
            repeats=args.repeats or 1,
            warmup=0,
            large_seconds=0.0,
            large_wh=args.large_size or (3072, 2048),
            timeout_s=240.0,
        )
    return Plan(
        sizes=fixtures.DEMO,
        slide_wh=(6144, 4096),
        block=512,
        tile=512,
        region_um=256.0,
        cell_target=None,
        repeats=args.repeats or 2,
        warmup=1,
        large_seconds=args.large_seconds,
        large_wh=args.large_size,
        timeout_s=900.0,
    )


def levels_for(width: int, height: int) -> tuple[int, ...]:
    """Pyramid downsamples: 4 for ROI scoring (~2 um/px), the smallest level at most 4096 px
    (the thumbnail's source). No lower level than needed: one tile of a low level renders
    every cell under it (a level-64 tile costs ~25 level-0 tiles), so small slides spent most
    of their write time on a mostly padded level 64."""
    levels = [1, 4, 16]
    while max(width, height) / levels[-1] > 4096:
        levels.append(levels[-1] * 4)
    return tuple(levels)


def large_size(plan: Plan, seconds: float, seed: int) -> tuple[int, int]:
    """The largest AIM_WH-shaped slide (multiples of `plan.block`) the generator writes in
    about `seconds`: tiles of an AIM_WH slide are rendered and timed per level (level 0: the
    mean of 12), and the write time of a size is predicted as its tiles x time per level."""
    from training.data.synth_slide import SlideSpec, render_region, zone_map

    w0, h0 = (side // plan.block * plan.block for side in AIM_WH)
    spec = SlideSpec(w0, h0, block=plan.block, tile=plan.tile, seed=seed)
    zmap = zone_map(spec)
    rng = np.random.default_rng(seed)
    render_region(spec, zmap, w0 // 2, h0 // 2, plan.tile, plan.tile, 1)  # warm-up, untimed
    per_tile = {}
    for ds in levels_for(w0, h0):
        # level 0: tiles anywhere (glass is cheaper); lower levels: one tile in the band
        n, lo, hi = (12, 0.0, 1.0) if ds == 1 else (1, 0.1, 0.8)
        t = time.perf_counter()
        for _ in range(n):
            x = int(rng.uniform(lo, hi) * w0 / ds) // plan.tile * plan.tile * ds
            y = int(rng.uniform(lo, hi) * h0 / ds) // plan.tile * plan.tile * ds
            render_region(spec, zmap, x, y, plan.tile, plan.tile, ds)
        per_tile[ds] = (time.perf_counter() - t) / n

    def predict(w: int, h: int) -> float:
        return sum(
            math.ceil(w / ds / plan.tile) * math.ceil(h / ds / plan.tile) * per_tile[ds]
            for ds in levels_for(w, h)
        )

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(*_scaled(mid, plan.block)) <= seconds else (lo, mid)
    wh = _scaled(lo, plan.block)
    log.info(
        "large slide %s: predicted %.0f s to write (s per tile by level %s)",
        wh,
        predict(*wh),
        {k: round(v, 3) for k, v in per_tile.items()},
    )
    return wh


def _scaled(scale: float, block: int) -> tuple[int, int]:
    w, h = (max(4, int(side * scale) // block) * block for side in AIM_WH)
    return w, h


def write(path: Path, wh: tuple[int, int], plan: Plan, seed: int) -> dict:
    from training.data.synth_slide import SlideSpec, write_slide

    w, h = (side // plan.block * plan.block for side in wh)
    spec = SlideSpec(w, h, block=plan.block, tile=plan.tile, levels=levels_for(w, h), seed=seed)
    t = time.perf_counter()
    write_slide(path, spec)
    seconds = time.perf_counter() - t
    info = {
        "path": path.name,
        "width": w,
        "height": h,
        "megapixels": round(w * h / 1e6, 1),
        "um_per_px": spec.mpp,
        "file_mib": round(path.stat().st_size / MIB, 1),
        "write_s": round(seconds, 1),
    }
    log.info("wrote %s", info)
    return info


def segmentation_calls(stack) -> dict[str, float]:
    """ModelInfer calls so far per segmentation replica (its `marrowscope_requests_total`)."""
    calls = {}
    for name in stack.replica_names("segmentation"):
        text = httpx.get(
            f"http://127.0.0.1:{stack.procs[name].ports['metrics']}/metrics", timeout=10
        ).text
        calls[name] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("marrowscope_requests_total{")
        )
    return calls


def analyse(url: str, key: str, slide: str, plan: Plan, accession: str) -> dict:
    """Submit `slide` by reference, poll until finished; seconds from submission to tiles
    cut and to the result. Raises RuntimeError unless the analysis succeeded."""
    body: dict = {"accession_id": accession, "specimen_type": "bone_marrow_smear", "stain": "MGG"}
    body["slide"] = {"store": "bench", "path": slide}
    if plan.cell_target:
        body["slide"]["cell_target"] = plan.cell_target
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60.0) as client:
        t0 = time.perf_counter()
        r = client.post("/v1/slides", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/slides answered {r.status_code}: {r.text[:300]}")
        location = f"/v1/analyses/{r.json()['id']}"
        cut_s = None
        while time.perf_counter() - t0 < plan.timeout_s:
            doc = client.get(location).json()
            progress = doc.get("slide") or {}
            if cut_s is None and progress.get("phase") == "cut":
                cut_s = time.perf_counter() - t0
            if doc["status"] == "succeeded":
                done_s = time.perf_counter() - t0
                break
            if doc["status"] in ("failed", "abstained", "cancelled"):
                raise RuntimeError(f"slide analysis {doc['status']}: {doc.get('reason')}")
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"slide analysis not finished after {plan.timeout_s:.0f} s")
    tiles = doc["slide"]["regions_total"]
    return {
        "tiles": tiles,
        "cells_counted": doc["result"]["slide"]["cells_counted"],
        "seconds_to_tiles_cut": round(cut_s if cut_s is not None else done_s, 3),
        "seconds_to_result": round(done_s, 3),
        "tiles_per_s": round(tiles / done_s, 4),
    }


def throughput(stack, keys: dict[str, str], slide: str, plan: Plan) -> dict:
    rows: list[dict] = []
    calls = {name: dict.fromkeys(stack.replica_names("segmentation"), 0.0) for name, _ in CONFIGS}
    pid = stack.procs["gateway"].popen.pid
    small_peak = 0
    for rep in range(plan.warmup + plan.repeats):
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
        for name, replicas in order:
            before = segmentation_calls(stack)
            with RssSampler(pid) as rss:
                row = analyse(_url(stack, name), keys[name], slide, plan, f"BENCH-{name}-{rep}")
            if name == "gateway":
                small_peak = max(small_peak, rss.peak)
            after = segmentation_calls(stack)
            warm = rep < plan.warmup
            log.info("%s%s: %s", name, " (warm-up)" if warm else "", row)
            if warm:
                continue
            for k, v in after.items():
                calls[name][k] += v - before[k]
            rows.append({"replicas": replicas, "repeat": rep - plan.warmup, **row})
    summary = {
        str(replicas): {
            key: round(harness.median([r[key] for r in rows if r["replicas"] == replicas]), 4)
            for key in ("tiles", "tiles_per_s", "seconds_to_tiles_cut", "seconds_to_result")
        }
        for _, replicas in CONFIGS
    }
    ratios = [
        next(r for r in rows if r["repeat"] == k and r["replicas"] == 2)["tiles_per_s"]
        / next(r for r in rows if r["repeat"] == k and r["replicas"] == 1)["tiles_per_s"]
        for k in range(plan.repeats)
    ]
    return {
        "rows": rows,
        "summary": summary,
        "scaling_ratio": round(harness.median(ratios), 3),
        "scaling_ratios_per_repeat": [round(r, 3) for r in ratios],
        "segmentation_calls_per_replica": {
            str(replicas): {k: int(v) for k, v in calls[name].items()} for name, replicas in CONFIGS
        },
        "small_slide_peak_rss_mib": round(small_peak / MIB, 1),
    }


def _url(stack, name: str) -> str:
    from services.stack import gateway_url_of

    return gateway_url_of(stack.procs[name])


def memory(stack, key: str, slide: str, plan: Plan) -> dict:
    import psutil

    pid = stack.procs["gateway"].popen.pid
    before = psutil.Process(pid).memory_info().rss
    with RssSampler(pid) as rss:
        row = analyse(_url(stack, "gateway"), key, slide, plan, "BENCH-large")
    return {
        "rss_before_mib": round(before / MIB, 1),
        "large_slide_peak_rss_mib": round(rss.peak / MIB, 1),
        "samples": rss.samples,
        **row,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from services.stack import LocalStack

    plan = make_plan(args)
    t_start = time.perf_counter()
    slides = workdir / "slides"
    result: dict = {
        "machine": harness.machine(args.threads),
        "models": f"untrained ({plan.sizes.name} sizes)",
        "slides_are_synthetic": True,
        "plan": {k: v for k, v in asdict(plan).items() if k != "sizes"},
    }
    small = write(slides / "throughput.tiff", plan.slide_wh, plan, seed=1)
    wh = plan.large_wh or large_size(plan, plan.large_seconds, seed=2)
    large = write(slides / "large.tiff", wh, plan, seed=2)
    result["slides"] = {"throughput": small, "large": {**large, "aimed_wh": list(AIM_WH)}}

    tracking_uri, result["model_versions"] = fixtures.setup_registry(workdir, plan.sizes)
    env = fixtures.stack_env(
        args.threads,
        {
            "MS_GATEWAY_SLIDE_ROOTS": json.dumps({"bench": str(slides.resolve())}),
            "MS_GATEWAY_SLIDE_REGION_UM": str(plan.region_um),
        },
    )
    stack = LocalStack(
        workdir=workdir / "stack",
        tracking_uri=tracking_uri,
        env=env,
        with_gateway=False,
        replicas={"segmentation": 2},
    )
    try:
        stack.start(timeout_s=300)
        keys = {}
        for name, replicas in CONFIGS:
            genv = {"MS_GATEWAY_DATA_DIR": str(workdir / "stack" / name)}
            if replicas == 1:
                genv["MS_GATEWAY_SEGMENTATION_ADDR"] = stack.grpc_addr("segmentation")
            keys[name] = fixtures.create_api_key({**stack.gateway_env(), **genv})
            stack.start_gateway(300, name=name, env=genv)
        result["throughput"] = throughput(stack, keys, small["path"], plan)
        result["memory"] = memory(stack, keys["gateway"], large["path"], plan)
    finally:
        stack.stop()
    m = result["memory"]
    m["small_slide_peak_rss_mib"] = result["throughput"]["small_slide_peak_rss_mib"]
    m["large_to_small_rss_ratio"] = round(
        m["large_slide_peak_rss_mib"] / m["small_slide_peak_rss_mib"], 3
    )
    m["large_to_small_pixel_ratio"] = round(large["megapixels"] / small["megapixels"], 1)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return result


def markdown(result: dict) -> str:
    mach, t, m = result["machine"], result["throughput"], result["memory"]
    small, large = result["slides"]["throughput"], result["slides"]["large"]
    s1, s2 = t["summary"]["1"], t["summary"]["2"]
    calls = t["segmentation_calls_per_replica"]["2"]
    lines = [
        "## Slide throughput",
        "",
        f"Models {result['models']}, synthetic slides, on {mach['cpu_model']} "
        f"({mach['usable_cores']} usable cores, load {mach['load_average_at_start']} at start); "
        "throughput evidence only.",
        "",
        f"Throughput slide {small['width']} x {small['height']} px ({small['um_per_px']} um/px), "
        f"median of {len(t['rows']) // 2} repeat(s) per configuration:",
        "",
        "| segmentation replicas | tiles | tiles/s | s to tiles cut | s to result |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {s['tiles']:g} | {s['tiles_per_s']:.3f} | {s['seconds_to_tiles_cut']:.1f} | "
            f"{s['seconds_to_result']:.1f} |"
            for n, s in (("1", s1), ("2", s2))
        ),
        "",
        f"Scaling ratio 2/1 replicas: **{t['scaling_ratio']}** (median of the per-repeat "
        f"ratios {t['scaling_ratios_per_repeat']}); "
        f"segmentation calls per replica with 2: {calls}.",
        "",
        f"Gateway peak RSS (embedded worker): {m['small_slide_peak_rss_mib']:.0f} MiB on the "
        f"throughput slide ({small['megapixels']} Mpx), {m['large_slide_peak_rss_mib']:.0f} MiB "
        f"on a {large['width']} x {large['height']} px slide ({large['megapixels']} Mpx, "
        f"{large['file_mib']} MiB file, written in {large['write_s']} s; aimed at "
        f"{AIM_WH[0]} x {AIM_WH[1]}): x{m['large_to_small_rss_ratio']} RSS for "
        f"x{m['large_to_small_pixel_ratio']} pixels. The large slide: {m['tiles']} tiles, "
        f"{m['seconds_to_result']:.1f} s to result.",
        "",
    ]
    return "\n".join(lines)


def save(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "slide_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "slide_throughput.md").write_text(text)
    return text


def _wh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"need WIDTHxHEIGHT, got {text!r}") from exc
    if min(w, h) < 1:
        raise argparse.ArgumentTypeError(f"need positive sizes, got {text!r}")
    return w, h


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny models and slides, one repeat")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--repeats", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--large-seconds",
        type=float,
        default=180.0,
        help="generator time for the large slide (sized from the throughput slide's rate)",
    )
    p.add_argument("--large-size", type=_wh, default=None, help="WIDTHxHEIGHT, overrides it")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if (args.repeats is not None and args.repeats < 1) or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1")
    if args.large_seconds <= 0:
        raise SystemExit("--large-seconds must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for noisy in ("httpx", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="marrowscope-slidebench-") as tmp:
        result = run(args, args.workdir or Path(tmp))
    print(save(result, args.out))
    return result


if __name__ == "__main__":
    main()
