"""Single-cell cases (`"input": "cells"`): each image is one cell, measured whole (the
segmentation service's BOXES_IN, no detection) and typed in batches across the images;
limits and bad input as for fields. Fake model clients (tests.gateway.fakes)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from services.gateway.db import Analysis, Idempotency, Image
from tests.gateway.conftest import files, meta, png, wait_status

CROP_HW = (44, 40)  # (h, w): a small single-cell crop, 11 x 12 um at 0.27 um/px
UM_PER_PX = 0.27


def _crops(n: int, seed: int = 1000) -> list[bytes]:
    return [png(CROP_HW[1], CROP_HW[0], seed=seed + k) for k in range(n)]


def _submit(client, keys, images: list[bytes], **doc):
    return client.post(
        "/v1/analyses",
        files=files(*images, metadata=meta(input="cells", **doc)),
        headers=keys["lis"],
    )


def test_600_crop_case_is_typed_in_batches_with_one_cell_per_image(gateway):
    client, services, keys = gateway(celltype_batch="64")
    crops = _crops(600)
    with client:
        r = _submit(client, keys, [*crops, crops[0], crops[1]], options={"um_per_px": UM_PER_PX})
        assert r.status_code == 202, r.text
        body = wait_status(client.get, r.json()["id"], keys["lis"], timeout=180)
        aid = r.json()["id"]
        fhir = client.get(
            f"/v1/analyses/{aid}/report", params={"format": "fhir"}, headers=keys["lis"]
        )
    assert body["status"] == "succeeded", body["reason"]
    res = body["result"]
    fake = services.clients
    # one measure-only segmentation call per distinct image, its whole-image box
    assert fake.calls["segmentation"] == 600
    assert all(b.tolist() == [[0.0, 0.0, CROP_HW[1], CROP_HW[0]]] for b in fake.measured_boxes)
    # the crops of all images go to celltype together: 10 calls of <= 64, not 600
    assert fake.calls["celltype"] == 10 and sum(fake.batch_sizes) == 600
    assert max(fake.batch_sizes) == 64
    assert "npm1" not in fake.calls and "npm1" not in res["model_versions"]
    assert res["duplicate_images_ignored"] == 2 and res["n_images"] == 600
    assert res["input"] == "cells"
    assert res["n_cells_detected"] == res["n_cells_counted"] == 600
    assert sum(d["count"] for d in res["differential"]) == 600
    for im in res["images"]:
        (cell,) = im["cells"]
        assert cell["box"] == [0.0, 0.0, float(im["width"]), float(im["height"])]
        assert cell["detector_label"] == "cell" and cell["score"] == 1.0
        assert cell["cell_type"] in ("BLA", "NGS") and im["n_counted"] == 1
        assert im["p_npm1"] is None
    # a crop is smaller than 20 um: the field-only checks do not withhold P(AML)
    assert res["aml"]["status"] == "predicted" and res["p_aml"] is not None
    assert res["p_npm1"] is None and res["npm1_positive"] is None
    assert fhir.status_code == 200
    from fhir.resources.R4B.bundle import Bundle

    bundle = Bundle.model_validate(fhir.json())
    (report,) = [
        e.resource for e in bundle.entry if e.resource.get_resource_type() == "DiagnosticReport"
    ]
    assert "not applicable (single-cell images)" in report.conclusion
    codes = {
        e.resource.code.coding[0].code
        for e in bundle.entry
        if e.resource.get_resource_type() == "Observation"
    }
    assert "p-aml" in codes and "p-npm1-mutated" not in codes


def test_fields_default_is_unchanged(gateway):
    client, services, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses", files=files(png(seed=3), metadata=meta()), headers=keys["lis"]
        )
        body = wait_status(client.get, r.json()["id"], keys["lis"])
    assert body["status"] == "succeeded"
    assert services.clients.measured_boxes == [] and services.clients.calls["npm1"] == 1
    assert body["result"]["images"][0]["n_detected"] == 40
    with services.sessions() as session:
        (a,) = session.scalars(select(Analysis)).all()
        assert "input" not in a.metadata_json  # the stored metadata of a fields case as before


@pytest.mark.parametrize(
    ("doc", "images", "overrides", "code", "error", "says"),
    [
        (
            {"input": "cells"},
            4,
            {"max_cell_images": "3"},
            413,
            "too_many_images",
            "MAX_CELL_IMAGES",
        ),
        ({}, 4, {"max_images": "3"}, 413, "too_many_images", "at most 3"),
        (
            {"input": "cells", "options": {"explain": True}},
            1,
            {},
            422,
            "invalid_metadata",
            "explain is not available with input cells",
        ),
        ({"input": "crops"}, 1, {}, 422, "invalid_metadata", "input"),
        ({"input": "cells"}, "field", {}, 422, "not_a_cell_image", "MAX_CELL_IMAGE_PIXELS"),
        ({"input": "cells"}, "bad", {}, 422, "invalid_image", "image 1"),
    ],
    ids=[
        "too-many-cells",
        "fields-keep-max-images",
        "explain",
        "unknown-input",
        "field-as-cell",
        "bad-crop",
    ],
)
def test_bad_cell_cases_are_refused_and_nothing_stored(
    gateway, doc, images, overrides, code, error, says
):
    client, services, keys = gateway(max_cell_image_pixels=str(200 * 200), **overrides)
    if images == "field":
        parts = [*_crops(2), png(320, 240, seed=7)]
    elif images == "bad":
        parts = [_crops(1)[0], b"\x89PNG\r\n\x1a\nbroken"]
    else:
        parts = _crops(images)
    with client:
        r = client.post(
            "/v1/analyses",
            files=files(*parts, metadata=meta(**doc)),
            headers={**keys["lis"], "Idempotency-Key": "k-cells"},
        )
    assert r.status_code == code, r.text
    assert r.json()["error"] == error and says in r.json()["detail"], r.json()
    with services.sessions() as session:
        for table in (Analysis, Image, Idempotency):
            assert session.scalar(select(func.count()).select_from(table)) == 0
    assert [p for p in services.settings.image_root.rglob("*") if p.is_file()] == []


def test_cells_case_below_the_cell_floor_abstains(gateway):
    client, _, keys = gateway()  # MIN_CELLS 20
    with client:
        body = wait_status(client.get, _submit(client, keys, _crops(5)).json()["id"], keys["lis"])
    assert body["status"] == "abstained"
    res = body["result"]
    assert res["aml"]["reason"] == "too_few_cells" and res["n_cells_counted"] == 5
    assert all(len(im["cells"]) == 1 for im in res["images"])


def test_a_slide_cannot_be_a_cells_case():
    from pydantic import ValidationError

    from services.gateway.schemas import SlideAnalysisCreate

    with pytest.raises(ValidationError, match="input must be fields"):
        SlideAnalysisCreate.model_validate(
            {"accession_id": "A", "input": "cells", "slide": {"upload": "u"}}
        )
