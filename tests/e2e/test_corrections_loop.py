"""The review loop closed, with real parts throughout: a hematologist corrects cells in the
review app over real HTTP (login, CSRF, relabel, boxes-complete marks, sign-out) on a real
gateway process; the gateway's agreement gauges and the JSON report's `review` block show
it; the export CLI reads the gateway's store into a dataset (the marked fields as the
detector's, read as `training.segmentation --corrections` reads them); a CI-sized `training.celltype` run trains on it
beside a synthetic cohort and registers the version in a real MLflow server; the promotion
gate with `--corrections` compares it with the champion on the corrected cells neither
learned and promotes it; and the celltype service serves the new champion.

The champion is built to call every cell BLA (a logit bias), so on cells the reviewer
labelled LYT or NGS its accuracy is 0 and the comparison's outcome does not hang on what a
one-epoch typer learns from noise images; the refusal side is in
tests/training/test_corrections.py with typers of known answers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from marrowscope.paths import PROJECT_ROOT
from tests import fixtures_mlflow
from tests.conftest import free_port
from tests.gateway.conftest import (
    GatewayProcess,
    create_key_cli,
    files,
    meta,
    png,
    settings_env,
    wait_status,
)
from tests.gateway.test_review import PASSWORD, csrf_and_revision, login, users_cli
from tests.services.helpers import ServiceProcess, register

mlflow_server = fixtures_mlflow.mlflow_server
ACCESSIONS = ("L-1", "L-2", "L-3")
KEPT = "NGS"


def _model_code(result: dict, cell_id: str) -> str | None:
    i, j = (int(x) for x in cell_id.split("."))
    cell = next(im for im in result["images"] if im["index"] == i)["cells"][j]
    return cell.get("cell_type") or ("RBC" if cell["detector_label"] == "RBC" else None)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A gateway whose three cases a reviewer corrected (every cell LYT but those the typer
    called NGS, which the reviewer kept) and signed out."""
    root = tmp_path_factory.mktemp("loop")
    env = settings_env(
        root / "gw",
        MS_TEST_FAKE_CELLS="8",
        MS_GATEWAY_MIN_CELLS="5",
        MS_GATEWAY_REVIEW_COOKIE_SECURE="false",
    )
    out = users_cli(
        env, "add", "--username", "dr.loop", "--name", "Dr Loop", "--password-stdin",
        password=PASSWORD,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    proc = GatewayProcess(env, free_port(), log=root / "gateway.log")
    try:
        proc.wait_healthy()
        key = {"X-API-Key": create_key_cli(env)}
        results = {}
        with httpx.Client(base_url=proc.url, timeout=60) as lis:
            for k, accession in enumerate(ACCESSIONS):
                r = lis.post(
                    "/v1/analyses",
                    files=files(png(160, 120, 10 * k), metadata=meta(accession_id=accession)),
                    headers=key,
                )
                assert r.status_code == 202, r.text
                body = wait_status(lis.get, r.json()["id"], key)
                assert body["status"] == "succeeded", body
                results[body["id"]] = body["result"]
        first = next(iter(results))
        with login(proc.url, "dr.loop") as me:
            for aid in results:
                case = f"/review/cases/{aid}"
                page = me.get(case).text
                csrf, revision = csrf_and_revision(page)
                cells = [
                    c
                    for c in re.findall(r'name="cell" value="([\d.]+)"', page)
                    if _model_code(results[aid], c) != KEPT
                ]
                done = me.post(
                    f"{case}/relabel",
                    data={"csrf": csrf, "revision": revision, "code": "LYT", "cell": cells},
                )
                assert done.status_code == 303, done.text
                if aid != first:  # the first case's field stays crops-only for the detector
                    complete = me.post(
                        f"{case}/mark-complete",
                        data={"csrf": csrf, "revision": revision + 1, "image": "0"},
                    )
                    assert complete.status_code == 303, complete.text
                    revision += 1
                signed = me.post(
                    f"{case}/sign-out",
                    data={"csrf": csrf, "revision": revision + 1, "comment": "all lymphocytes"},
                )
                assert signed.status_code == 303, signed.text
        yield proc, env, key, results
    finally:
        proc.stop()


def test_corrections_flow_back_into_a_served_typer(
    reviewed, mlflow_server: str, tmp_path: Path
) -> None:
    from marrowscope.inference import CellTyper
    from marrowscope.models import load_model
    from marrowscope.registry import get_client, registered_name
    from services.gateway.result import AnalysisResult
    from training import celltype
    from training.data.synth import generate_dataset
    from training.data.synth_cohort import SynthConfig
    from training.promote import default_floors, promote

    proc, env, key, results = reviewed
    judged = [c for r in results.values() for im in r["images"] for c in im["cells"]]
    kept = sum(1 for c in judged if c.get("cell_type") == KEPT)
    assert 0 < kept < len(judged), "the fake typer's calls no longer include both kinds"

    # the gateway: the JSON report's review block and the agreement gauges
    aid = next(iter(results))
    report = httpx.get(f"{proc.url}/v1/analyses/{aid}/report", headers=key, timeout=60).json()
    assert report["schema_version"] == "1.9"
    AnalysisResult.model_validate(report)  # the served document is the typed result
    review = report["review"]
    assert review["state"] == "signed_out" and review["reviewer"] == "Dr Loop"
    assert review["comment"] == "all lymphocytes" and review["signed_at"]
    lyt = next(d for d in review["differential"] if d["code"] == "LYT")
    assert lyt["fraction"] < 1.0 and review["n_cells_counted"] == len(
        [c for im in results[aid]["images"] for c in im["cells"]]
    )
    metrics = httpx.get(f"{proc.url}/metrics", timeout=30).text
    ratio = re.search(
        r'marrowscope_gateway_review_agreement_ratio\{cell_type="all",celltype_version="5",'
        r'tenant="default"\} ([0-9.e+-]+)',
        metrics,
    )
    assert ratio, metrics[-2000:]
    assert float(ratio.group(1)) == pytest.approx(kept / len(judged))

    # the export, through the CLI and the gateway's own settings
    export = tmp_path / "export"
    run = subprocess.run(
        [sys.executable, "-m", "training.data.corrections", "export", "--since", "2000-01-01",
         "--out", str(export)],
        env={**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT), "MS_CORRECTIONS_SALT": "s"},
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in (export / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == len(judged) and {x["corrected_label"] for x in lines} == {"LYT", KEPT}
    assert sum(x["corrected"] for x in lines) == len(judged) - kept
    assert len(list((export / "crops" / "LYT").glob("*.png"))) == len(judged) - kept
    assert {x["accession"] for x in lines}.isdisjoint(ACCESSIONS), "accessions left unhashed"
    assert {x["reviewer"] for x in lines} == {"Dr Loop"}
    assert {x["celltype_version"] for x in lines} == {"5"}
    # the detector's part: the fields the reviewer marked boxes-complete, not the first case's
    coco = json.loads((export / "annotations.json").read_text())
    marked = [r for a, r in results.items() if a != aid]
    assert {im["case_id"] for im in coco["images"]} == set(results) - {aid}
    assert len(coco["annotations"]) == sum(len(im["cells"]) for r in marked for im in r["images"])
    assert {x["boxes_complete"] for x in lines if x["analysis_id"] == aid} == {False}
    assert report["review"]["complete_images"] == []
    from training import segmentation
    from training.cli import JobConfig, load_job_config

    seg_config = JobConfig.of("segmentation", load_job_config("segmentation", "cpu-tiny"))
    _, added = segmentation.with_corrections({}, export, seg_config, ("cell", "RBC"))
    assert sum(added["images"].values()) == len(marked)
    assert sum(added["boxes"].values()) == len(coco["annotations"])

    # a champion that calls every cell BLA, then a CI-sized retraining on the corrections
    bad = fixtures_mlflow.make_tiny_model_dir(
        "celltype", tmp_path / "champion", logit_bias={"BLA": 40.0}
    )
    old = register(mlflow_server, "celltype", bad, "champion")
    cohort = tmp_path / "cohort"
    generate_dataset(  # tests/training/conftest.py's tiny cohort: every split gets cases
        cohort,
        cases=14,
        seed=5,
        config=SynthConfig(size=(320, 240), images_per_case=2, aml_fraction=0.6, npm1_fraction=0.5),
    )
    out = tmp_path / "run"
    args = celltype.get_args_parser().parse_args(
        ["--data", str(cohort), "--output", str(out), "--config", "cpu-tiny",
         "--tracking-uri", mlflow_server, "--corrections", str(export), "--device", "cpu"]
    )  # fmt: skip
    metrics_run = celltype.main(args)
    assert metrics_run is not None and "corrections_accuracy" in metrics_run
    record = json.loads((out / "corrections.json").read_text())
    assert record["held_out_analyses"] and set(record["held_out_analyses"]).isdisjoint(
        record["trained_analyses"]
    )
    client = get_client(mlflow_server)
    name = registered_name("celltype")
    new = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    assert int(new) > int(old)

    # the gates, with the corrections comparison on; the floor is CI-sized (one epoch)
    floors = default_floors()
    floors["celltype"]["macro_f1"] = 0.0
    ok, decisions = promote(
        {"celltype": new},
        tracking_uri=mlflow_server,
        floors=floors,
        corrections=export,
        log_file=tmp_path / "promotions.jsonl",
        actor="test",
    )
    gate = next(d for d in decisions if d.gate == "corrections")
    assert ok, decisions
    assert gate.passed and f"champion v{old} 0 - " in gate.detail, gate.detail
    assert client.get_model_version_by_alias(name, "champion").version == new

    # the celltype service serves the promoted version, with the trained weights
    import tritonclient.grpc as tc

    service = ServiceProcess(
        "celltype", mlflow_server, tmp_path, model_uri=f"models:/{name}@champion"
    ).wait_serving()
    try:
        c = tc.InferenceServerClient(url=service.address)
        typer = CellTyper(load_model(out / "model"))
        crops = np.random.default_rng(0).integers(
            0, 256, (2, typer.crop_size, typer.crop_size, 3), dtype=np.uint8
        )
        inp = tc.InferInput("CROPS", list(crops.shape), "UINT8")
        inp.set_data_from_numpy(crops)
        r = c.infer("celltype", [inp])
        assert r.get_response().model_version == new
        np.testing.assert_allclose(r.as_numpy("PROBS"), typer.predict(crops), atol=1e-5)
        c.close()
    finally:
        assert service.stop() == 0, service.log_tail()
