"""One case analysis, two ways of calling the models: the gateway's pipeline over the real
segmentation and celltype services (processes on loopback ports, models from a real MLflow
server) and `marrowscope.inference.analyse_case` with the same model directories in
process give identical cell calls, differential and case vector (`marrowscope.case`).

The ensemble and npm1 answers come from the gateway's test fakes: what matters here is the
case vector the ensemble is sent, which the fake records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io

import numpy as np
import pytest

from marrowscope.taxonomy import ATTRIBUTE_CODES, COUNTED_CODES
from services.gateway.clients import EnsembleOutput
from tests import fixtures_mlflow
from tests.gateway.fakes import FakeModelClients
from tests.services import conftest as service_fixtures

mlflow_server = fixtures_mlflow.mlflow_server
start_service = service_fixtures.start_service
serve_registered = service_fixtures.serve_registered

ALIAS = "test-case-parity"
UM_PER_PX = 0.27
STAGES = ("segmentation", "celltype")


def _smear(seed: int, size=(160, 120)) -> np.ndarray:
    from training.data.synth_cohort import SynthConfig, sample_cohort
    from training.data.synth_render import render_image

    config = SynthConfig(size=size, images_per_case=1)
    spec = sample_cohort(seed, 2, config)[0]
    image, _ = render_image(np.random.default_rng(seed), spec, config)
    return image


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _ServedCells(FakeModelClients):
    """Segmentation and celltype from the real services; the fakes' ensemble (recording the
    vector it is sent, reporting the served versions as its lineage) and npm1."""

    def __init__(self, oip) -> None:
        super().__init__()
        self.oip = oip
        self.sent: list[tuple[np.ndarray, list[str]]] = []
        self.pinned: dict[str, str] = {}

    async def metadata(self, service, *, timeout):
        if service not in STAGES:
            return await super().metadata(service, timeout=timeout)
        info = await self.oip.metadata(service, timeout=timeout)
        self.pinned[service] = info.version
        return info

    async def segment(self, image, *, version, timeout, um_per_px=None):
        return await self.oip.segment(image, version=version, timeout=timeout, um_per_px=um_per_px)

    async def classify(self, crops, *, version, timeout, embeddings=False):
        return await self.oip.classify(
            crops, version=version, timeout=timeout, embeddings=embeddings
        )

    async def ensemble(self, features, names, *, version, timeout) -> EnsembleOutput:
        self.sent.append((np.array(features), list(names)))
        out = await super().ensemble(features, names, version=version, timeout=timeout)
        return dataclasses.replace(out, lineage=dict(self.pinned))


@pytest.fixture(scope="module")
def models(serve_registered, tmp_path_factory):
    """Model directories of the served segmentation and celltype versions and their
    services. The typer answers counted codes only, so an untrained one still counts cells;
    the detector's RBC class exercises which detections are typed."""
    root = tmp_path_factory.mktemp("parity")
    seg = fixtures_mlflow.make_tiny_model_dir("segmentation", root / "seg")
    cel = fixtures_mlflow.make_tiny_model_dir(
        "celltype", root / "cel", outputs=[*COUNTED_CODES, *ATTRIBUTE_CODES]
    )
    services = {
        "segmentation": serve_registered("segmentation", seg, ALIAS, score_threshold=0.0),
        "celltype": serve_registered("celltype", cel, ALIAS),
    }
    return {"segmentation": seg, "celltype": cel}, services


def _served(services, images: list[np.ndarray]):
    from services.gateway.config import GatewaySettings
    from services.gateway.oip import OipModelClients
    from services.gateway.pipeline import CaseImage, Pipeline

    async def main():
        oip = OipModelClients({s: services[s].address for s in STAGES})
        clients = _ServedCells(oip)
        try:
            settings = GatewaySettings(min_cells=1, deadline_s=120)
            case_images = [
                CaseImage(k, hashlib.sha256(data).hexdigest(), data, UM_PER_PX)
                for k, data in enumerate(_png(im) for im in images)
            ]
            outcome = await Pipeline(clients=clients, settings=settings).run(
                analysis_id="parity", images=case_images
            )
        finally:
            await oip.close()
        return outcome, clients.sent

    return asyncio.run(main())


def _in_process(model_dirs, images: list[np.ndarray]):
    import torch

    from marrowscope.inference import CellTyper, Detector, analyse_case
    from marrowscope.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the services run (OMP_NUM_THREADS=1): same float reductions
    try:
        detector = Detector(load_model(model_dirs["segmentation"]))
        typer = CellTyper(load_model(model_dirs["celltype"]))
        return analyse_case(images, detector, typer, um_per_px=UM_PER_PX, score_threshold=0.0)
    finally:
        torch.set_num_threads(threads)


def test_served_and_in_process_case_analysis_agree(models):
    model_dirs, services = models
    images = [_smear(1), _smear(2)]
    outcome, sent = _served(services, images)
    local = _in_process(model_dirs, images)

    assert outcome.status == "succeeded", outcome.reason
    result = outcome.result
    assert local.n_detected == result["n_cells_detected"] > 0
    assert local.n_counted == result["n_cells_counted"] > 0
    labels = [lab for im in local.images for lab in im.detections.labels]
    assert "RBC" in labels and len(local.cells) < len(labels)  # red cells are not typed

    # cell calls: every detection's box, label, type and confidence
    for served_image, im in zip(result["images"], local.images, strict=True):
        served_cells = [
            (c["box"], c["detector_label"], c["score"], c["cell_type"], c["confidence"])
            for c in served_image["cells"]
        ]
        local_cells = [
            (
                [float(v) for v in im.detections.boxes[i]],
                im.detections.labels[i],
                float(im.detections.scores[i]),
                None if call is None else call.cell_type,
                None if call is None else call.probs[call.cell_type],
            )
            for i, call in enumerate(im.calls)
        ]
        assert served_cells == local_cells
        assert served_image["n_counted"] == im.n_counted

    # the differential and the case vector the ensemble was sent
    assert [
        (e["code"], e["count"], e["fraction"], e["ci_low"], e["ci_high"])
        for e in result["differential"]
    ] == [(code, *d) for code, d in local.differential.items()]
    ((vector, names),) = sent
    assert names == list(local.feature_names)
    np.testing.assert_array_equal(vector, local.features)
    assert result["attribute_fractions"] == local.attribute_fractions()
    assert result["morphometrics"] == {
        f: {"mean": m, "std": s} for f, (m, s) in local.morphometric_summary().items()
    }


def test_served_and_in_process_cell_embeddings_agree(models):
    """The celltype service's EMBEDDINGS (asked for by `ServedCellModels`) are the in-process
    typer's, row for row over the case's typed cells, and asking for them changes no call."""
    import torch

    from marrowscope import case
    from marrowscope.inference import CellTyper, Detector, InProcessModels
    from marrowscope.models import load_model
    from services.gateway.calls import ServedCellModels, ServiceCalls
    from services.gateway.config import GatewaySettings
    from services.gateway.oip import OipModelClients

    model_dirs, services = models
    images = [_smear(3), _smear(4)]
    smears = [case.SmearImage(im, UM_PER_PX, _png(im)) for im in images]

    async def served():
        oip = OipModelClients({s: services[s].address for s in STAGES})
        try:
            calls = ServiceCalls(oip, GatewaySettings(deadline_s=120))
            seg = await oip.metadata("segmentation", timeout=10)
            cel = await oip.metadata("celltype", timeout=10)
            cells = ServedCellModels(
                calls,
                segmentation_version=seg.version,
                celltype_version=cel.version,
                crop_size=cel.inputs["CROPS"].shape[1],
                batch=7,  # several celltype calls per image
            )
            return (
                await case.analyse_case(cells, smears, embeddings=True),
                await case.analyse_case(cells, smears),
                cel,
            )
        finally:
            await oip.close()

    with_emb, plain, cel_info = asyncio.run(served())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        typer = CellTyper(load_model(model_dirs["celltype"]))
        local = case.run_now(
            case.analyse_case(
                InProcessModels(
                    Detector(load_model(model_dirs["segmentation"])), typer, score_threshold=0.0
                ),
                smears,
                embeddings=True,
            )
        )
    finally:
        torch.set_num_threads(threads)
    served_emb, local_emb = with_emb.embeddings, local.embeddings
    assert served_emb is not None and local_emb is not None
    assert served_emb.shape == (len(with_emb.cells), typer.embedding_dim) == local_emb.shape
    assert cel_info.outputs["EMBEDDINGS"].shape == (-1, typer.embedding_dim)
    np.testing.assert_allclose(served_emb, local_emb, atol=1e-5)
    assert np.abs(served_emb).sum() > 0
    # the embeddings cost no change to the case: same calls, same vector
    assert plain.embeddings is None
    np.testing.assert_array_equal(with_emb.features, plain.features)
    np.testing.assert_array_equal(with_emb.features, local.features)
