"""`make real` (`python -m training.real`) at the CI budget on the real data, served the way
`make serve` serves it, with a single-cell case of one held-out DeepAPL patient sent through
the gateway's REST API.

Real throughout: the four real sets of ../shared/data, the training jobs as subprocesses,
a SQLite MLflow registry, the promotion gates, the five model services and the gateway as
processes (`services.stack.LocalStack` with the settings `training.real` wrote, as
`training.serve` starts them), HTTP. The case reports the real differential and P(APL | AML)
from the MIL model, P(AML) `not_available` with its reason (no control cases exist to learn
it), and names the stage that learned from synthetic data; what the services answered equals
the registered typer and MIL model run in this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from training.cli import UsageError

pytestmark = pytest.mark.slow

N_CROPS = 12
UM_PER_PX = 0.2  # DeepAPL crops: halved CellaVision images


@pytest.fixture(scope="module")
def real_set(shared_data, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The CI-budget real set, trained and promoted once for the module."""
    from training import real

    workdir = tmp_path_factory.mktemp("real")
    args = real.get_args_parser().parse_args(
        ["--workdir", str(workdir), "--data", str(shared_data), "--budget", "ci"]
    )
    try:
        versions = real.main(args)
    except UsageError as exc:  # a real set is missing: the fixture's skip rule applies
        pytest.skip(str(exc))
    return workdir, versions


@pytest.fixture(scope="module")
def held_out_cells(real_set, shared_data) -> tuple[str, list[bytes]]:
    """N_CROPS readable signed-out cells of one DeepAPL patient the typer never saw (its
    test split, from the job's predictions file)."""
    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import decode_image
    from training.data.deepapl import read_deepapl

    workdir, _ = real_set
    predictions = np.load(workdir / "runs" / "celltype" / "predictions.npz")
    test_patients = sorted(set(predictions["test_groups"]) - {""})
    data = read_deepapl(shared_data / "deepapl", verify=False)
    patient = test_patients[0]
    blobs = []
    for record in data.labelled():
        if record.patient_id != patient:
            continue
        blob = record.path.read_bytes()
        try:  # a few upstream JPEGs are truncated: not cells to send
            decode_image(blob)
        except InvalidInput:
            continue
        blobs.append(blob)
        if len(blobs) == N_CROPS:
            break
    assert len(blobs) == N_CROPS, (patient, len(blobs))
    return patient, blobs


def _analyse(workdir: Path, blobs: list[bytes], patient: str) -> tuple[dict, str]:
    """Start the stack as `training.serve` does, submit the case, wait; (analysis, FHIR)."""
    import httpx

    from services.stack import LocalStack
    from training.demo import ensure_key, gateway_accepts
    from training.serve import missing_models, stack_settings

    tracking_uri, env = stack_settings(workdir, None)
    assert missing_models(tracking_uri, "champion") == []
    env["MS_GATEWAY_MIN_CELLS"] = str(N_CROPS)  # a few crops, not a full sign-out
    stack = LocalStack(workdir=workdir / "stack", tracking_uri=tracking_uri, env=env)
    with stack, httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
        key = ensure_key(
            stack.gateway_env(),
            workdir / "lis.key",
            lambda k: gateway_accepts(http, k),
        )
        metadata = {
            "accession_id": f"REAL-{patient}",
            "specimen_type": "peripheral_blood",
            "stain": "Wright-Giemsa",
            "input": "cells",
            "options": {"um_per_px": UM_PER_PX},
        }
        headers = {"X-API-Key": key}
        response = http.post(
            "/v1/analyses",
            files=[("images", (f"{k}.jpg", b, "image/jpeg")) for k, b in enumerate(blobs)],
            data={"metadata": json.dumps(metadata)},
            headers=headers,
        )
        assert response.status_code == 202, response.text
        analysis_id = response.json()["id"]
        deadline = time.monotonic() + 300
        while True:
            body = http.get(f"/v1/analyses/{analysis_id}", headers=headers).json()
            if body["status"] in ("succeeded", "failed", "abstained", "cancelled"):
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.5)
        fhir = http.get(
            f"/v1/analyses/{analysis_id}/report", params={"format": "fhir"}, headers=headers
        )
    return body, fhir.text


def _in_process(workdir: Path, blobs: list[bytes]):
    """(probabilities, embeddings, names) of the registered typer and P(APL) of the
    registered MIL model on the same crops, in this process."""
    import torch

    from marrowscope import case
    from marrowscope.imaging import decode_image
    from marrowscope.inference import CellTyper, MilPredictor
    from marrowscope.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the services run (OMP_NUM_THREADS=1): same reductions
    try:
        typer = CellTyper(load_model(workdir / "runs" / "celltype" / "model"))
        crops = np.stack([case.single_cell_crop(decode_image(b), typer.crop_size) for b in blobs])
        probs, embeddings = typer.predict_with_embeddings(crops)
        mil = MilPredictor(load_model(workdir / "runs" / "mil" / "model"))
        p_apl, _ = mil.predict(embeddings)
    finally:
        torch.set_num_threads(threads)
    return probs, typer.names, p_apl


def test_real_single_cell_case_through_the_gateway(real_set, held_out_cells):
    workdir, versions = real_set
    patient, blobs = held_out_cells
    body, fhir = _analyse(workdir, blobs, patient)
    assert body["status"] == "succeeded", body
    res = body["result"]

    # the promoted set is what served the case, each model at its promoted version
    served = {k: v["version"] for k, v in res["model_versions"].items()}
    assert served == {k: versions[k] for k in ("segmentation", "celltype", "ensemble", "mil")}

    # no real control cases: P(AML) is not available, and says why
    assert res["p_aml"] is None and res["aml_positive"] is None
    assert res["aml"]["status"] == "not_available" and res["aml"]["reason"] == "no_aml_model"
    assert "control" in res["aml"]["detail"]
    assert res["npm1_morphology"]["status"] == "not_available" and res["p_npm1"] is None

    # P(APL | AML) from the MIL model over this typer's embeddings (in domain or withheld)
    apl = res["apl_morphology"]
    assert apl["model"] == "mil" and apl["model_version"] == versions["mil"]
    in_domain = res["domain"]["status"] == "in_domain"
    assert apl["status"] == ("predicted" if in_domain else "abstained"), (res["domain"], apl)

    # what each model learned from; the learned split also learned from synthetic cells
    assert res["trained_on"] == {
        "segmentation": "bccd",
        "nucseg": "wbc-seg+synthetic",
        "celltype": "deepapl+pbc",
        "ensemble": "untrained",
        "mil": "deepapl",
    }
    assert res["synthetic_stages"] == ["nucseg"]

    # served = in process: the typer's answer for every crop, the MIL model's P(APL)
    probs, names, p_apl = _in_process(workdir, blobs)
    cells = [im["cells"][0] for im in res["images"]]
    assert len(cells) == N_CROPS == res["n_cells_counted"]
    for cell, row in zip(cells, probs, strict=True):
        k = names.index(cell["cell_type"])
        assert cell["confidence"] == pytest.approx(float(row[k]), abs=1e-5)
    counted = {d["code"]: d["count"] for d in res["differential"] if d["count"]}
    types = [c["cell_type"] for c in cells]
    assert counted == {t: types.count(t) for t in set(types)}
    if in_domain:
        assert apl["p"] == pytest.approx(p_apl, abs=1e-4)

    # the FHIR conclusion words it the same way
    assert "P(AML) not available (no_aml_model" in fhir
    assert "Trained on synthetic data: nucseg (wbc-seg+synthetic)" in fhir
