"""A case of real single-cell images (DeepAPL CellaVision crops, `../shared/data/deepapl`)
through the gateway's pipeline with `input` cells, over the real segmentation (BOXES_IN:
measured whole, no detection) and celltype services on loopback ports, models from a real
MLflow server: every crop gives exactly one typed cell, the differential sums to the crop
count, the served cell calls equal `marrowscope.case.analyse_cell_image` in process with the
same model directories, and the FHIR report validates.

The ensemble answers from the gateway's test fakes (test_case_parity does the same): what
is checked here is what reaches it. Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from marrowscope.taxonomy import ATTRIBUTE_CODES, COUNTED_CODES
from tests import fixtures_mlflow
from tests.e2e.test_case_parity import _ServedCells as ParityClients
from tests.services import conftest as service_fixtures

mlflow_server = fixtures_mlflow.mlflow_server
start_service = service_fixtures.start_service
serve_registered = service_fixtures.serve_registered

ALIAS = "test-cells-case"
UM_PER_PX = 0.2  # DeepAPL crops are halved CellaVision images (about 0.1 um/px at source)
STAGES = ("segmentation", "celltype")  # the real services; the rest from the fakes
N_CROPS = 20


class _ServedCells(ParityClients):
    """test_case_parity's clients (real segmentation and celltype, the fakes' recording
    ensemble) with the BOXES_IN of a single-cell case forwarded, and calls counted."""

    async def segment(self, image, *, version, timeout, um_per_px=None, boxes=None):
        self._enter("segmentation", version)
        return await self.oip.segment(
            image, version=version, timeout=timeout, um_per_px=um_per_px, boxes=boxes
        )

    async def classify(self, crops, *, version, timeout, embeddings=False):
        self._enter("celltype", version)
        return await super().classify(
            crops, version=version, timeout=timeout, embeddings=embeddings
        )


@pytest.fixture(scope="module")
def crops(shared_data):
    """(file bytes, source class) of N_CROPS readable DeepAPL cells from several patients."""
    from marrowscope.errors import InvalidInput
    from marrowscope.imaging import decode_image
    from training.data.deepapl import read_deepapl

    data = read_deepapl(shared_data / "deepapl", verify=False)
    by_patient: dict[str, list] = {}
    for r in data.labelled():
        by_patient.setdefault(r.patient_id, []).append(r)
    picked = []
    for pid in sorted(by_patient)[:5]:
        for r in by_patient[pid][:6]:
            blob = r.path.read_bytes()
            try:  # a few source JPEGs are truncated upstream: not single cells to send
                decode_image(blob)
            except InvalidInput:
                continue
            picked.append((blob, r.source_class))
    assert len(picked) >= N_CROPS
    return picked[:N_CROPS]


@pytest.fixture(scope="module")
def models(serve_registered, tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    seg = fixtures_mlflow.make_tiny_model_dir("segmentation", root / "seg")
    cel = fixtures_mlflow.make_tiny_model_dir(
        "celltype", root / "cel", outputs=[*COUNTED_CODES, *ATTRIBUTE_CODES]
    )
    services = {
        "segmentation": serve_registered("segmentation", seg, ALIAS),
        "celltype": serve_registered("celltype", cel, ALIAS),
    }
    return {"segmentation": seg, "celltype": cel}, services


def _served(services, files: list[bytes]):
    import hashlib

    from services.gateway.config import GatewaySettings
    from services.gateway.oip import OipModelClients
    from services.gateway.pipeline import CaseImage, Pipeline

    async def main():
        oip = OipModelClients({s: services[s].address for s in STAGES})
        clients = _ServedCells(oip)
        try:
            settings = GatewaySettings(min_cells=1, deadline_s=120, celltype_batch=8)
            images = [
                CaseImage(k, hashlib.sha256(data).hexdigest(), data, UM_PER_PX)
                for k, data in enumerate(files)
            ]
            outcome = await Pipeline(clients=clients, settings=settings).run(
                analysis_id="cells", images=images, input_kind="cells"
            )
        finally:
            await oip.close()
        return outcome, clients

    return asyncio.run(main())


def _in_process(model_dirs, files: list[bytes]):
    import torch

    from marrowscope import case
    from marrowscope.imaging import decode_image
    from marrowscope.inference import CellTyper, Detector, InProcessModels
    from marrowscope.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the services run (OMP_NUM_THREADS=1): same float reductions
    try:
        models = InProcessModels(
            Detector(load_model(model_dirs["segmentation"])),
            CellTyper(load_model(model_dirs["celltype"])),
        )
        images = [case.SmearImage(decode_image(data), UM_PER_PX) for data in files]
        per_image = [case.run_now(case.analyse_cell_image(models, im)) for im in images]
        return per_image, case.summarise(per_image)
    finally:
        torch.set_num_threads(threads)


def test_real_single_cell_case_served_equals_in_process(models, crops):
    from fhir.resources.R4B.bundle import Bundle

    from services.gateway.fhir import build_bundle

    model_dirs, services = models
    files = [data for data, _ in crops]
    outcome, clients = _served(services, files)
    per_image, local = _in_process(model_dirs, files)

    assert outcome.status == "succeeded", outcome.reason
    result = outcome.result
    assert result["n_images"] == N_CROPS == result["n_cells_detected"]
    assert clients.calls["segmentation"] == N_CROPS and clients.calls["celltype"] == 3
    assert "npm1" not in clients.calls and result["p_npm1"] is None
    for served, im in zip(result["images"], per_image, strict=True):
        (cell,) = served["cells"]  # exactly one typed cell, boxed whole
        assert cell["box"] == [0.0, 0.0, float(served["width"]), float(served["height"])]
        assert cell["cell_type"] is not None and cell["detector_label"] == "cell"
        (call,) = im.calls
        assert call is not None
        assert [float(v) for v in im.detections.boxes[0]] == cell["box"]
        assert (cell["cell_type"], cell["confidence"]) == (
            call.cell_type,
            call.probs[call.cell_type],
        )
    assert sum(d["count"] for d in result["differential"]) == N_CROPS == local.n_counted
    assert [
        (e["code"], e["count"], e["fraction"], e["ci_low"], e["ci_high"])
        for e in result["differential"]
    ] == [(code, *d) for code, d in local.differential.items()]
    ((vector, names),) = clients.sent
    assert names == list(local.feature_names)
    np.testing.assert_array_equal(vector, local.features)

    bundle = build_bundle(
        analysis={"id": "cells", "accession_id": "ACC-CELLS", "finished_at": None},
        result=outcome.report,
    )
    Bundle.model_validate(bundle)
