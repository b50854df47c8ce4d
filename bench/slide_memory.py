"""Peak RSS while writing, reading and tiling large synthetic pyramidal slides: memory is
bounded by the tile and region size, never by the slide size.

    python -m bench.slide_memory     # 8192x6144 and 16384x12288 -> bench/results/slide_memory.*
    python -m bench.slide_memory --sizes 2048x1536,4096x3072 --out /tmp/sm   # small, ~1 min

For each size, in fresh child processes (so one measurement's peak is not another's):

- `write`: `training.data.synth_slide.write_slide` (levels 1/2/4/8/16, 256 px tiles);
- `read`: `marrowscope.slides.open_slide`, every level-0 tile of `--tile` px read once with
  `read_region` (what tiling a slide for the detector does), then `roi.score_slide` over the
  whole slide.

Each child reports its peak RSS (`VmHWM`) after its imports (`baseline`) and at the end
(`peak`); `growth = peak - baseline` is what the work cost. A whole level 0 decoded at once
would cost width x height x 4 bytes (RGBA): 192 MiB at 8192x6144, 768 MiB at 16384x12288.
Synthetic slides (not real smears).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.slide_memory")
MIB = 1024 * 1024
DEFAULT_SIZES = ((8192, 6144), (16384, 12288))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (`VmHWM`; not `ru_maxrss`, which a child
    started by fork + exec inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _import_readers() -> None:
    """Import what the work imports lazily, so that a child's baseline includes it."""
    import openslide  # noqa: F401
    import PIL.Image  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import skimage.filters  # noqa: F401
    import tifffile  # noqa: F401


def write_child(path: Path, width: int, height: int) -> dict[str, Any]:
    from training.data.synth_slide import SlideSpec, write_slide

    _import_readers()
    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    write_slide(path, SlideSpec(width=width, height=height))
    return {
        "baseline": baseline,
        "peak": peak_rss_bytes(),
        "seconds": time.perf_counter() - t0,
        "file_bytes": path.stat().st_size,
    }


def read_child(path: Path, tile: int) -> dict[str, Any]:
    from marrowscope.roi import score_slide
    from marrowscope.slides import open_slide

    _import_readers()
    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    tiles = 0
    with open_slide(path) as slide:
        width, height = slide.info.dimensions
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                slide.read_region((x, y), 0, (min(tile, width - x), min(tile, height - y)))
                tiles += 1
        tiled_s = time.perf_counter() - t0
        after_tiles = peak_rss_bytes()
        regions = score_slide(slide)
    return {
        "baseline": baseline,
        "after_tiles": after_tiles,
        "peak": peak_rss_bytes(),
        "tiles": tiles,
        "tiles_per_s": tiles / tiled_s if tiled_s > 0 else None,
        "regions_scored": len(regions),
        "seconds": time.perf_counter() - t0,
    }


def _child(args: list[str], timeout_s: float) -> dict[str, Any]:
    from marrowscope.paths import PROJECT_ROOT

    out = subprocess.run(
        [sys.executable, "-m", "bench.slide_memory", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(
    workdir: Path, sizes: tuple[tuple[int, int], ...], tile: int = 512, timeout_s: float = 1800
) -> dict[str, Any]:
    """Write and read one slide per (width, height) in child processes; figures in MiB."""
    rows = []
    for width, height in sizes:
        path = workdir / f"slide_{width}x{height}.tiff"
        w = _child(["--child-write", str(path), f"{width}x{height}"], timeout_s)
        r = _child(["--child-read", str(path), "--tile", str(tile)], timeout_s)
        rows.append(
            {
                "width": width,
                "height": height,
                "level0_rgba_mib": round(width * height * 4 / MIB, 1),
                "file_mib": round(w["file_bytes"] / MIB, 1),
                "write_peak_mib": round(w["peak"] / MIB, 1),
                "write_growth_mib": round((w["peak"] - w["baseline"]) / MIB, 1),
                "write_s": round(w["seconds"], 1),
                "read_peak_mib": round(r["peak"] / MIB, 1),
                "read_growth_mib": round((r["peak"] - r["baseline"]) / MIB, 1),
                "tiling_growth_mib": round((r["after_tiles"] - r["baseline"]) / MIB, 1),
                "tiles": r["tiles"],
                "tiles_per_s": round(r["tiles_per_s"], 1) if r["tiles_per_s"] else None,
                "regions_scored": r["regions_scored"],
                "read_s": round(r["seconds"], 1),
            }
        )
        log.info("slide %dx%d: %s", width, height, rows[-1])
        path.unlink()
    return {"tile": tile, "synthetic": True, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Slide memory (`python -m bench.slide_memory`, synthetic slides)",
        "",
        f"Peak RSS of fresh child processes; reading = every level-0 tile of {result['tile']} px "
        "once, then ROI scoring of the whole slide. Growth = peak - peak after imports.",
        "",
        "| slide | level 0 as RGBA MiB | file MiB | write peak / growth MiB | write s "
        "| read peak / growth MiB | tiling growth MiB | tiles | tiles/s | regions | read s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['width']}x{r['height']} | {r['level0_rgba_mib']} | {r['file_mib']} | "
            f"{r['write_peak_mib']} / {r['write_growth_mib']} | {r['write_s']} | "
            f"{r['read_peak_mib']} / {r['read_growth_mib']} | {r['tiling_growth_mib']} | "
            f"{r['tiles']} | {r['tiles_per_s']} | {r['regions_scored']} | {r['read_s']} |"
        )
    return "\n".join([*lines, ""])


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        size = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need WIDTHxHEIGHT, got {text!r}") from None
    if min(size) < 512 or size[0] % 512 or size[1] % 512:
        raise argparse.ArgumentTypeError(f"sides must be multiples of 512, got {text!r}")
    return size


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes",
        type=lambda t: tuple(_size(s) for s in t.split(",") if s.strip()),
        default=DEFAULT_SIZES,
        help="comma list of WIDTHxHEIGHT (default 8192x6144,16384x12288)",
    )
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--child-write", nargs=2, metavar=("PATH", "WxH"), help=argparse.SUPPRESS)
    p.add_argument("--child-read", metavar="PATH", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.child_write:
        w, h = _size(args.child_write[1])
        result = write_child(Path(args.child_write[0]), w, h)
        print(json.dumps(result))
        return result
    if args.child_read:
        result = read_child(Path(args.child_read), args.tile)
        print(json.dumps(result))
        return result
    if args.tile < 64:
        raise SystemExit("--tile must be >= 64")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from bench.harness import machine

    with tempfile.TemporaryDirectory(prefix="marrowscope-slidemem-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine(1), **measure(workdir, args.sizes, args.tile)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slide_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "slide_memory.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
