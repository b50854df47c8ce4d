"""Gateway memory under concurrent large submissions: RSS of the API process while 4 clients
each submit a case of large images at once, and after they finish.

    python -m bench.gateway_memory                       # writes bench/results/gateway_memory.*
    python -m bench.gateway_memory --side 2000 --out /tmp/gm   # smaller images

Two workloads, both 4 concurrent `POST /v1/analyses`:
- `large_files`: 4 noise PNGs per case of `--side`^2 pixels (~3 bytes/px, incompressible),
  what a scanner export looks like on the wire;
- `small_file_many_pixels`: 1 flat PNG of 6000x6000 per case (a few KB that decode to
  108 MB: the probe that had taken the gateway to 604 MB).
The gateway runs as its own process with no embedded worker, so what is measured is the
API path only (receiving, spooling, validating, storing), not the models. RSS is sampled
every 20 ms from /proc; `after` is read 2 s after the last response.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.fixtures import create_api_key
from bench.harness import RssSampler, machine

log = logging.getLogger("bench.gateway_memory")
MIB = 1024 * 1024


def _png(side: int, seed: int, noise: bool) -> bytes:
    from PIL import Image

    if noise:
        arr = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    else:
        arr = np.full((side, side, 3), 200, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, url: str, key: str, pid: int, cases: list[list[bytes]]) -> dict:
    def submit(k: int, images: list[bytes]) -> int:
        parts: list[tuple[str, tuple[str | None, bytes | str, str | None]]] = [
            ("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)
        ]
        metadata = json.dumps({"accession_id": f"BENCH-{name}-{k}"})
        parts.append(("metadata", (None, metadata, None)))
        r = httpx.post(f"{url}/v1/analyses", files=parts, headers={"X-API-Key": key}, timeout=600)
        return r.status_code

    before = _rss(pid)
    sampler = RssSampler(pid, every_s=0.02)
    sampler.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(cases)) as pool:
        codes = list(pool.map(submit, range(len(cases)), cases))
    seconds = time.monotonic() - t0
    time.sleep(2.0)
    sampler.stop.set()
    sampler.join()
    after = _rss(pid)
    return {
        "workload": name,
        "concurrent_requests": len(cases),
        "images_per_request": len(cases[0]),
        "request_mib": round(sum(len(d) for d in cases[0]) / MIB, 1),
        "status_codes": codes,
        "seconds": round(seconds, 2),
        "rss_before_mib": round(before / MIB),
        "rss_peak_mib": round(max(sampler.peak, after) / MIB),
        "rss_after_mib": round(after / MIB),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--side", type=int, default=3000, help="noise image side in px")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from marrowscope.paths import PROJECT_ROOT

    with tempfile.TemporaryDirectory(prefix="ms-gwmem-") as tmp:
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "MS_GATEWAY_DATA_DIR": str(Path(tmp) / "gw"),
            "MS_GATEWAY_EMBEDDED_WORKER": "false",
            "MS_GATEWAY_PORT": str(port),
            "MS_GATEWAY_RATE_LIMIT_PER_MIN": "100000",
            "MS_GATEWAY_LOG_LEVEL": "WARNING",
        }
        key = create_api_key(env)
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            log.info("generating images")
            large = [
                [_png(args.side, 10 * c + i, True) for i in range(args.images)]
                for c in range(args.concurrency)
            ]
            flat = [[_png(6000, c, False)] for c in range(args.concurrency)]
            rows = [
                measure("large_files", url, key, proc.pid, large),
                measure("small_file_many_pixels", url, key, proc.pid, flat),
            ]
        finally:
            proc.terminate()
            proc.wait(30)
    doc: dict[str, Any] = {"machine": machine(1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gateway_memory.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Gateway RSS under concurrent large submissions",
        "",
        f"`python -m bench.gateway_memory --side {args.side}` on {doc['machine']['cpu_model']}"
        " (API process only, no embedded worker; synthetic images).",
        "",
        "| workload | requests x images | MiB/request | status | s | RSS before | peak | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['concurrent_requests']} x {r['images_per_request']} | "
            f"{r['request_mib']} | {','.join(map(str, sorted(set(r['status_codes']))))} | "
            f"{r['seconds']} | {r['rss_before_mib']} MiB | {r['rss_peak_mib']} MiB | "
            f"{r['rss_after_mib']} MiB |"
        )
    (args.out / "gateway_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
