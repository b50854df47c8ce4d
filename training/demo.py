"""`make demo`: the whole MarrowScope pipeline on one machine, from nothing.

1. generates a small synthetic cohort (training/data/synth.py),
2. trains CPU-sized segmentation, celltype, ensemble and npm1 models, registers them in a
   local MLflow (SQLite + local artifacts under the work folder) and promotes them together
   through the promotion gates,
3. starts the five model services and the gateway as local processes,
4. submits held-out cases (AML NPM1-mutated, AML wild type, control) through the REST API the
   LIS uses, polls them, prints a summary per case and writes JSON/FHIR reports, overlays and
   heatmaps to the output folder, and prints the ORU^R01 the HL7 outbox would send for the
   first finished case, with its PDF report (training/demo_lis.py),
5. writes one synthetic whole slide (pyramidal TIFF) into a slide store the gateway reads and
   analyses it end to end (`POST /v1/slides`: ROI selection, tiles, the same pipeline), with
   its thumbnail of the regions used (`--no-slide` skips it),
6. stops every process it started.

A second run reuses the cohort and the promoted models when they are still the champions for
the same data, so it only serves and analyses; it also reuses its gateway API key (stored
next to the gateway's database) instead of creating another. All figures are on SYNTHETIC data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from marrowscope.paths import PROJECT_ROOT
from marrowscope.stages import LINEAGE_UPSTREAMS, PIPELINE_MODELS, Stage

JOBS: tuple[str, ...] = PIPELINE_MODELS
TERMINAL = {"succeeded", "failed", "abstained", "cancelled"}
DEMO_KEY_NAME = "demo-lis"
# The demo's test split holds ~6 AML cases: too few for an NPM1 floor to mean anything, so
# its NPM1 figures (both the ensemble's morphology output and the whole-image CNN) are shown
# but not gated; production floors are in training/promote.py.
DEMO_FLOORS = (
    f"{Stage.SEGMENTATION}.map50=0.3",
    f"{Stage.CELLTYPE}.macro_f1=0.3",
    f"{Stage.ENSEMBLE}.auroc=0.6",
    f"{Stage.ENSEMBLE}.npm1_auroc=0.0",
    f"{Stage.NPM1}.auroc=0.0",
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=PROJECT_ROOT / ".demo",
        help="data, MLflow store, models and service logs (reused by later runs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "demo-out",
        help="reports, overlays and heatmaps of the analysed cases",
    )
    p.add_argument("--cases", type=int, default=60, help="synthetic cases to generate")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--size", default="640x480", help="image size WxH")
    p.add_argument("--config", default="cpu-demo", help="training config (training/configs)")
    p.add_argument("--retrain", action="store_true", help="train again even if champions exist")
    p.add_argument("--no-explain", action="store_true", help="skip occlusion heatmaps")
    p.add_argument("--no-slide", action="store_true", help="skip the whole-slide case")
    p.add_argument(
        "--min-cells",
        type=int,
        default=10,
        help="gateway quality floor: fewer counted cells -> abstain (the gateway's "
        "production default is 50; a demo image holds ~10-20 nucleated cells)",
    )
    return p


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> None:
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, check=True)


def ensure_cohort(args: argparse.Namespace, env: dict[str, str]) -> Path:
    data = args.workdir / "data"
    stamp = data / "demo-args.json"
    wanted = {"cases": args.cases, "seed": args.seed, "size": args.size}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        say(f"reusing synthetic cohort {data}")
        return data
    run(
        [
            sys.executable,
            "-m",
            "training.data.synth",
            "--out",
            str(data),
            "--cases",
            str(args.cases),
            "--seed",
            str(args.seed),
            "--size",
            args.size,
            "--workers",
            "2",
            "--preview",
        ],
        env,
    )
    stamp.write_text(json.dumps(wanted))
    return data


def champions(tracking_uri: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    from marrowscope.registry import CHAMPION, get_client, registered_name

    client = get_client(tracking_uri)
    found = {}
    for kind in JOBS:
        try:
            found[kind] = str(
                client.get_model_version_by_alias(registered_name(kind), CHAMPION).version
            )
        except MlflowException:  # no champion yet for this kind: it will be trained
            continue
    return found


def latest_version(tracking_uri: str, kind: str) -> str:
    from marrowscope.registry import get_client, registered_name

    versions = get_client(tracking_uri).search_model_versions(f"name='{registered_name(kind)}'")
    return str(max(int(v.version) for v in versions))


def _trained(
    args: argparse.Namespace,
    kind: str,
    data: Path,
    tracking_uri: str,
    extra: list[str],
    env: dict[str, str],
) -> str:
    """Train and register one job, or reuse its version from an earlier (interrupted) run
    with the same data, config and upstream flags."""
    marker = args.workdir / "runs" / kind / "registered.json"
    wanted = {"data": str(data), "config": args.config, "extra": extra}
    if not args.retrain and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("inputs") == wanted:
            say(f"reusing {kind} version {done['version']} (trained by an earlier run)")
            return done["version"]
    run(
        [
            sys.executable,
            "-m",
            f"training.{kind}",
            "--data",
            str(data),
            "--config",
            args.config,
            "--tracking-uri",
            tracking_uri,
            "--output",
            str(marker.parent),
            *extra,
        ],
        env,
    )
    version = latest_version(tracking_uri, kind)
    marker.write_text(json.dumps({"inputs": wanted, "version": version}))
    return version


def ensure_models(
    args: argparse.Namespace, data: Path, env: dict[str, str], tracking_uri: str
) -> dict[str, str]:
    current = champions(tracking_uri)
    stamp = args.workdir / "models.json"
    if (
        not args.retrain
        and len(current) == len(JOBS)
        and stamp.is_file()
        and json.loads(stamp.read_text())
        == {"data": str(data), "config": args.config, "versions": current}
    ):
        say(f"reusing promoted models {current}")
        return current
    versions: dict[str, str] = {
        kind: _trained(args, kind, data, tracking_uri, [], env) for kind in LINEAGE_UPSTREAMS
    }
    # The ensemble learns from features made by exactly these upstream versions (lineage).
    versions[Stage.ENSEMBLE] = _trained(
        args,
        Stage.ENSEMBLE,
        data,
        tracking_uri,
        [
            flag
            for up in LINEAGE_UPSTREAMS
            for flag in (f"--{up}", f"models:/{up.registered_name}/{versions[up]}")
        ],
        env,
    )
    versions[Stage.NPM1] = _trained(args, Stage.NPM1, data, tracking_uri, [], env)
    # Demo models train for minutes on a small synthetic cohort, so the floors are lowered;
    # the gates still judge lineage, configuration and non-inferiority. Real promotions keep
    # the default floors (training/promote.py).
    run(
        [
            sys.executable,
            "-m",
            "training.promote",
            "--tracking-uri",
            tracking_uri,
            "--pipeline",
            *[f"{k}={v}" for k, v in versions.items()],
            *[flag for floor in DEMO_FLOORS for flag in ("--floor", floor)],
        ],
        env,
    )
    stamp.write_text(
        json.dumps({"data": str(data), "config": args.config, "versions": champions(tracking_uri)})
    )
    return versions


def pick_cases(data: Path) -> list:
    from training.data.manifest import read_manifest

    records = read_manifest(data / "cases.csv")
    test = [r for r in records if r.split == "test"] or records
    wanted = [
        ("AML, NPM1 mutated", lambda r: r.aml_label == 1 and r.npm1_status == "mutated"),
        ("AML, NPM1 wild type", lambda r: r.aml_label == 1 and r.npm1_status == "wild_type"),
        ("control", lambda r: r.aml_label == 0),
    ]
    chosen = []
    for label, predicate in wanted:
        match = next((r for r in test if predicate(r)), None) or next(
            (r for r in records if predicate(r)), None
        )
        if match is not None:
            chosen.append((label, match))
    return chosen


STACK_SETTINGS = "stack.json"
"""The demo's serving settings in its work directory: the MLflow store and the environment the
stack ran with, so `python -m training.serve` serves exactly what the demo analysed with."""


def write_stack_settings(workdir: Path, tracking_uri: str, env: dict[str, str]) -> None:
    payload = {"tracking_uri": tracking_uri, "env": env}
    (workdir / STACK_SETTINGS).write_text(json.dumps(payload, indent=2) + "\n")


def keys_cli(argv: list[str], env: dict[str, str]) -> str:
    """stdout of `python -m services.gateway.keys ARGV` against the gateway of `env`."""
    return subprocess.run(
        [sys.executable, "-m", "services.gateway.keys", *argv],
        env=env,
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def gateway_accepts(http, key: str) -> bool:
    """Whether the gateway behind `http` (an httpx.Client with its base_url) takes `key` for
    reading; 401/403 -> False, any other failure raises."""
    response = http.get("/v1/analyses", params={"limit": 1}, headers={"X-API-Key": key})
    if response.status_code in (401, 403):
        return False
    response.raise_for_status()
    return True


def ensure_key(env: dict[str, str], key_file: Path, accepted) -> str:
    """The demo LIS's key: the one stored in `key_file` while `accepted(key)` holds, else a
    new one, stored there (mode 0600).

    Replacing the key revokes every active `demo-lis` key first: their secrets are lost, so
    each run leaves exactly one active demo key instead of adding another.
    """
    if key_file.is_file():
        key = key_file.read_text().strip()
        if accepted(key):
            say(f"reusing the {DEMO_KEY_NAME} API key in {key_file}")
            return key
        say(f"the gateway rejects the key in {key_file}; replacing it")
    for line in keys_cli(["list"], env).splitlines():
        key_id, name, *_, state = line.split("\t")
        if name == DEMO_KEY_NAME and state == "active":
            keys_cli(["revoke", key_id], env)
    key = (
        keys_cli(["create", "--name", DEMO_KEY_NAME, "--scopes", "submit,read"], env)
        .strip()
        .splitlines()[-1]
    )
    _write_secret(key_file, key)
    return key


def _write_secret(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        fh.write(secret + "\n")


DEMO_REVIEWER = "demo.reviewer"


def ensure_reviewer(env: dict[str, str], secret_file: Path) -> str:
    """The demo reviewer's password for the review app: the one stored in `secret_file`
    (mode 0600, next to the gateway's database), else a new one; the account is created,
    or its password set to the stored one, so the printed login always works."""
    import secrets

    if secret_file.is_file():
        password = secret_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(12)
        _write_secret(secret_file, password)
    for argv in (
        ["add", "--username", DEMO_REVIEWER, "--name", "Demo Reviewer"],
        ["password", DEMO_REVIEWER],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "services.gateway", "users", *argv, "--password-stdin"],
            env=env,
            cwd=PROJECT_ROOT,
            input=password + "\n",
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return password
        if "exists already" not in done.stderr:
            raise RuntimeError(f"could not create the demo reviewer: {done.stderr.strip()}")
    raise RuntimeError("could not set the demo reviewer's password")


def review_login_line(gateway_url: str, password: str) -> str:
    return f"review app  {gateway_url}/review/   (login {DEMO_REVIEWER} / {password})"


def wait_and_keep(client, analysis_id: str, folder: Path, timeout_s: float = 600) -> dict:
    """Poll the analysis until it ends; write its status (`analysis.json`, with `_wall_s`)
    and, when it has a result, its JSON and FHIR reports to `folder`."""
    t0 = time.monotonic()
    while (body := client.get(f"/v1/analyses/{analysis_id}").raise_for_status().json())[
        "status"
    ] not in TERMINAL:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"analysis {analysis_id} still {body['status']} after {timeout_s} s")
        time.sleep(0.5)
    body["_wall_s"] = time.monotonic() - t0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.json").write_text(json.dumps(body, indent=2))
    if body["status"] in ("succeeded", "abstained"):
        for fmt in ("json", "fhir"):
            report = client.get(f"/v1/analyses/{analysis_id}/report", params={"format": fmt})
            if report.status_code == 200:
                (folder / f"report.{fmt}.json").write_text(report.text)
    return body


def analyse(client, data: Path, record, um_per_px: float | None, explain: bool, out: Path) -> dict:
    """Submit one case with the pixel size of its images and wait for the outcome.

    The pixel size matters: the ensemble learned morphometrics in um and um^2, and areas in
    px^2 would be a training/serving skew. A LIS sends what the scanner reports.
    """
    files = [
        ("images", (Path(p).name, (data / p).read_bytes(), "image/png")) for p in record.image_paths
    ]
    metadata = {
        "accession_id": f"DEMO-{record.case_id}",
        "specimen_type": "bone_marrow_smear",
        "stain": "MGG",
        "options": {"explain": explain, "um_per_px": um_per_px},
    }
    response = client.post(
        "/v1/analyses",
        files=files,
        data={"metadata": json.dumps(metadata)},
        headers={"Idempotency-Key": f"demo-{record.case_id}"},
    )
    response.raise_for_status()
    analysis_id = response.json()["id"]
    case_dir = out / record.case_id
    body = wait_and_keep(client, analysis_id, case_dir)
    if body["status"] in ("succeeded", "abstained"):
        for k in range(len(record.image_paths)):
            for kind in ("overlay", "heatmap"):
                png = client.get(f"/v1/analyses/{analysis_id}/images/{k}/{kind}.png")
                if png.status_code == 200:
                    (case_dir / f"image{k}_{kind}.png").write_bytes(png.content)
    return body


DEMO_CELL_CROPS = 80
"""Crops in the demo's single-cell case (an analyser's export of one case is a few hundred)."""


def cell_crops(data: Path, record, limit: int = DEMO_CELL_CROPS) -> list[bytes]:
    """PNG crops of the nucleated cells of `record`'s images, cut around the generator's
    ground-truth boxes the way an analyser exports single cells (square, centred, with the
    context `marrowscope.imaging.crop_cells` gives), at most `limit`."""
    from marrowscope.imaging import CELL_CROP_PAD_FRACTION, crop_cells, decode_image, encode_png
    from marrowscope.taxonomy import COUNTED_CODES, coco_categories

    coco = json.loads((data / "annotations.json").read_text())
    codes = {c["id"]: c["name"] for c in coco_categories()}
    by_file = {im["file_name"]: im["id"] for im in coco["images"]}
    crops: list[bytes] = []
    for path in record.image_paths:
        image_id = by_file.get(path)
        if image_id is None:
            continue
        boxes = [
            (x, y, x + w, y + h)
            for a in coco["annotations"]
            if a["image_id"] == image_id and codes.get(a["category_id"]) in COUNTED_CODES
            for x, y, w, h in [a["bbox"]]
        ]
        if not boxes:
            continue
        image = decode_image((data / path).read_bytes())
        for box in boxes:
            # at the field's own resolution (side = the padded square), so `um_per_px` holds
            side = math.ceil(
                max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * CELL_CROP_PAD_FRACTION)
            )
            (crop,) = crop_cells(image, np.asarray([box], np.float32), max(side, 8))
            crops.append(encode_png(crop))
            if len(crops) >= limit:
                return crops
    return crops


def analyse_cells(client, data: Path, record, um_per_px: float | None, out: Path) -> dict:
    """The same case as an analyser's single-cell export (`"input": "cells"`)."""
    crops = cell_crops(data, record)
    files = [("images", (f"cell{k:03d}.png", c, "image/png")) for k, c in enumerate(crops)]
    metadata = {
        "accession_id": f"DEMO-{record.case_id}-cells",
        "specimen_type": "bone_marrow_smear",
        "stain": "MGG",
        "input": "cells",
        "options": {"um_per_px": um_per_px},
    }
    response = client.post(
        "/v1/analyses",
        files=files,
        data={"metadata": json.dumps(metadata)},
        headers={"Idempotency-Key": f"demo-{record.case_id}-cells"},
    )
    response.raise_for_status()
    return wait_and_keep(client, response.json()["id"], out / f"{record.case_id}-cells")


DEMO_SLIDE_CELLS = 150
"""Cell target of the demo slide: a few regions, so the demo stays within minutes."""


DEMO_SLIDE_BLOCK = 512
"""Zone block of the demo slide (level-0 px); the gateway's candidate regions are set to
this size so that a region lies in one zone."""


def write_demo_slide(slides_dir: Path, um_per_px: float) -> Path:
    """A small synthetic whole slide (zones: glass, thick area, monolayer, feathered edge, out
    of focus, debris) at the cohort's pixel size, written once per pixel size and reused."""
    from training.data.synth_slide import SlideSpec, write_slide

    # "fields": the monolayer's cells are drawn with the field generator's sprites, so the
    # demo detector (trained on synthetic fields) counts them; the name changed with it, so
    # an older demo folder's disc-drawn slide is not reused
    path = slides_dir / f"demo-slide-{um_per_px:g}um-field-cells.tiff"
    if not path.is_file():
        spec = SlideSpec(
            width=4096,
            height=3072,
            block=DEMO_SLIDE_BLOCK,
            levels=(1, 4, 16),
            mpp=um_per_px,
            seed=7,
            cells="fields",
        )
        write_slide(path, spec)
    return path


def demo_pixel_size(scales: dict[str, float | None]) -> float:
    """The cohort's median pixel size (0.5 um/px when the cohort records none)."""
    known = sorted(v for v in scales.values() if v) or [0.5]
    return known[len(known) // 2]


def analyse_slide(client, name: str, out: Path) -> dict:
    """Submit the demo slide by reference to the `demo` slide store; wait; keep the reports
    and the thumbnail."""
    metadata = {
        "accession_id": "DEMO-SLIDE-1",
        "specimen_type": "bone_marrow_smear",
        "stain": "MGG",
        "slide": {"store": "demo", "path": name, "cell_target": DEMO_SLIDE_CELLS},
    }
    response = client.post(
        "/v1/slides", json=metadata, headers={"Idempotency-Key": f"demo-slide-{name}"}
    )
    response.raise_for_status()
    slide_dir = out / "slide"
    body = wait_and_keep(client, response.json()["id"], slide_dir)
    if body["status"] in ("succeeded", "abstained"):
        analysis_id = body["id"]
        thumb = client.get(f"/v1/analyses/{analysis_id}/slide.png")
        if thumb.status_code == 200:
            (slide_dir / "thumbnail.png").write_bytes(thumb.content)
    return body


def slide_lines(body: dict) -> list[str]:
    lines = [f"== whole slide (synthetic) -> {body['status']} in {body['_wall_s']:.1f} s"]
    if body.get("reason"):
        lines.append(f"   reason: {body['reason']}")
    result = body.get("result") or {}
    slide = result.get("slide")
    if slide:
        p = result.get("p_aml")
        lines.append(
            f"   {len(slide['regions'])} of {slide['candidates']} regions selected "
            f"({slide['stop_reason']}, target {slide['cell_target']} cells): "
            f"{slide['cells_counted']} nucleated cells counted, ~{slide['cells_estimated']} "
            f"estimated at low power; P(AML) {'n/a' if p is None else f'{100 * p:.1f}%'}"
        )
        if not slide["cells_counted"]:
            lines.append(
                "   (no cells counted in the selected regions: the demo detector learned "
                "synthetic fields; see the regions in slide/thumbnail.png)"
            )
    return lines


def summary_lines(label: str, record, body: dict) -> list[str]:
    truth = (
        f"truth: AML={record.aml_label} NPM1={record.npm1_status} blasts={record.blast_pct:.1f}%"
        if record.blast_pct is not None
        else ""
    )
    lines = [
        f"== {record.case_id} ({label}; {truth}) -> {body['status']} in {body['_wall_s']:.1f} s"
    ]
    result = body.get("result") or {}
    if body.get("reason"):
        lines.append(f"   reason: {body['reason']}")
    if result:

        def pct(v):
            return "n/a" if v is None else f"{100 * v:.1f}%"

        lines.append(
            f"   P(AML) {pct(result.get('p_aml'))}   P(NPM1 mutated, whole image) "
            f"{pct(result.get('p_npm1'))}   blasts {result.get('blast_percent') or 0:.1f} "
            f"per 100 counted cells ({result.get('n_cells_counted')} counted)"
        )
        m = result.get("npm1_morphology") or {}
        lines.append(
            f"   P(NPM1 mutated | AML) by blast morphology {pct(m.get('p'))} "
            f"({m.get('status', 'n/a')}{': ' + m['reason'] if m.get('reason') else ''})"
        )
        diff = [d for d in result.get("differential", []) if d["count"]]
        lines.append(
            "   differential: "
            + ", ".join(
                f"{d['code']} {100 * d['fraction']:.0f}% [{100 * d['ci_low']:.0f}-{100 * d['ci_high']:.0f}]"
                for d in sorted(diff, key=lambda d: -d["count"])
            )
        )
        versions = result.get("model_versions", {})
        lines.append("   models: " + ", ".join(f"{k} v{v['version']}" for k, v in versions.items()))
        stages = result.get("stage_seconds", {})
        lines.append("   stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    return lines


def lis_lines(
    client, gateway_dir: Path, finished: tuple[str, str], out: Path, gateway_url: str
) -> list[str]:
    """The ORU^R01 and the PDF of one finished case (written next to its other reports),
    as summary lines."""
    from services.gateway.config import GatewaySettings
    from services.gateway.container import build_services
    from training.demo_lis import oru_and_pdf

    case_id, analysis_id = finished
    services = build_services(GatewaySettings(data_dir=gateway_dir))
    try:
        oru, pdf = oru_and_pdf(
            client,
            services.sessions,
            services.blobs,
            analysis_id=analysis_id,
            folder=out / case_id,
            base_url=gateway_url,
        )
    finally:
        services.engine.dispose()
    return [
        f"== the ORU^R01 the HL7 outbox would send a LIS for {case_id} (docs/HL7.md):",
        *oru.split("\r"),
        f"   its PDF report: {pdf}",
    ]


def main(args: argparse.Namespace) -> int:
    from services.stack import LocalStack

    started = time.monotonic()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{args.workdir / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(PROJECT_ROOT))
    data = ensure_cohort(args, env)
    versions = ensure_models(args, data, env, tracking_uri)
    say(f"champions: {versions} (trained and promoted in {time.monotonic() - started:.0f} s)")
    import httpx

    from training.ensemble import pixel_sizes

    scales = pixel_sizes(data)
    mpp = demo_pixel_size(scales)
    gateway_dir = args.workdir / "gateway"
    slides_dir = args.workdir / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    stack_env = {
        "MS_GATEWAY_MIN_CELLS": str(args.min_cells),
        "MS_GATEWAY_DATA_DIR": str(gateway_dir),
        "MS_GATEWAY_SLIDE_ROOTS": json.dumps({"demo": str(slides_dir)}),
        "MS_GATEWAY_SLIDE_REGION_UM": f"{DEMO_SLIDE_BLOCK * mpp:.1f}",
        # the demo serves plain HTTP on loopback: a Secure cookie would never come back
        "MS_GATEWAY_REVIEW_COOKIE_SECURE": "false",
    }
    # `make serve` starts the same stack later from these settings (training.serve).
    write_stack_settings(args.workdir, tracking_uri, stack_env)
    stack = LocalStack(workdir=args.workdir / "stack", tracking_uri=tracking_uri, env=stack_env)
    lines: list[str] = []
    failures = 0
    say("starting the five model services and the gateway")
    with stack:
        say(f"gateway ready at {stack.gateway_url}")
        with httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
            # Next to the gateway's database, so the two are deleted together.
            key = ensure_key(
                stack.gateway_env(),
                gateway_dir / f"{DEMO_KEY_NAME}.key",
                lambda k: gateway_accepts(http, k),
            )
        reviewer_password = ensure_reviewer(
            stack.gateway_env(), gateway_dir / f"{DEMO_REVIEWER}.password"
        )
        args.out.mkdir(parents=True, exist_ok=True)
        with httpx.Client(
            base_url=stack.gateway_url, headers={"X-API-Key": key}, timeout=60
        ) as client:
            finished = None
            for label, record in pick_cases(data):
                say(f"submitting {record.case_id} ({label}, {len(record.image_paths)} images)")
                body = analyse(
                    client,
                    data,
                    record,
                    scales[record.image_paths[0]],
                    not args.no_explain,
                    args.out,
                )
                failures += body["status"] == "failed"
                lines += summary_lines(label, record, body)
                if finished is None and body["status"] == "succeeded":
                    finished = (record.case_id, body["id"])
            if finished is not None:
                lines += lis_lines(client, gateway_dir, finished, args.out, stack.gateway_url)
            cells_case = next((r for label, r in pick_cases(data) if r.aml_label == 1), None)
            if cells_case is not None:
                say(f"submitting {cells_case.case_id} again as single-cell crops")
                body = analyse_cells(
                    client, data, cells_case, scales[cells_case.image_paths[0]], args.out
                )
                failures += body["status"] == "failed"
                lines += summary_lines("single-cell crops", cells_case, body)
            if not args.no_slide:
                slide = write_demo_slide(slides_dir, mpp)
                say(f"submitting a synthetic whole slide ({slide.name}, {mpp:g} um/px)")
                body = analyse_slide(client, slide.name, args.out)
                failures += body["status"] == "failed"
                lines += slide_lines(body)
    lines.append(f"(all figures on SYNTHETIC data; reports, overlays and heatmaps in {args.out})")
    lines.append(
        "the analysed cases wait for review: `make serve`, then "
        + review_login_line("http://127.0.0.1:8080", reviewer_password)
    )
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "summary.txt").write_text(text + "\n")
    say(f"done in {time.monotonic() - started:.0f} s; every process stopped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
