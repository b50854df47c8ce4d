"""A case the models cannot judge gets an abstention with a reason, never a probability:
repeated images, images too small for whole cells, implausible cell sizes, pixel sizes the
ensemble never saw, and metadata whose types or values are not what the API documents."""

from __future__ import annotations

import json

import pytest

from services.gateway.clients import FeatureUnits
from services.gateway.units import pixel_size_out_of_range
from tests.gateway.conftest import files, meta, png, wait_status

FIELD = (320, 240)  # 65 um high at 0.27 um/px; the fakes' cells are 30 px = 8 um


def _analyse(client, keys, images: list[bytes], **options) -> dict:
    r = client.post(
        "/v1/analyses", files=files(*images, metadata=meta(options=options)), headers=keys["lis"]
    )
    assert r.status_code == 202, r.text
    return wait_status(client.get, r.json()["id"], keys["lis"])


def test_one_image_sent_many_times_counts_once(gateway):
    client, services, keys = gateway()
    image = png(seed=21)
    with client:
        once = _analyse(client, keys, [image])["result"]
        many = _analyse(client, keys, [image] * 32)
        mixed = _analyse(client, keys, [image, png(seed=22), image])["result"]
    res = many["result"]
    assert many["status"] == "succeeded"
    assert res["duplicate_images_ignored"] == 31 and res["n_images"] == 1
    assert res["n_cells_counted"] == once["n_cells_counted"] == 35
    assert [im["index"] for im in res["images"]] == [0]
    assert res["p_aml"] == pytest.approx(once["p_aml"])
    assert once["duplicate_images_ignored"] == 0
    assert (mixed["duplicate_images_ignored"], mixed["n_images"]) == (1, 2)
    assert [im["index"] for im in mixed["images"]] == [0, 1]
    # the repeat was neither segmented nor sent to npm1 again
    assert services.clients.calls["segmentation"] == 1 + 1 + 2


def test_repeats_cannot_lift_a_case_over_the_cell_floor(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_CELLS", "16")  # 14 counted per image, floor 20
    client, _, keys = gateway()
    with client:
        body = _analyse(client, keys, [png(seed=23)] * 32)
    assert body["status"] == "abstained" and body["result"]["p_aml"] is None
    assert body["result"]["aml"]["reason"] == "too_few_cells"
    assert body["result"]["n_cells_counted"] == 14


def test_image_too_small_for_whole_cells_abstains(gateway):
    client, _, keys = gateway()
    with client:
        tiny = _analyse(client, keys, [png(32, 32, seed=24)])
        small_at_scale = _analyse(client, keys, [png(96, 72, seed=25)], um_per_px=0.15)
        metrics = client.get("/metrics").text
    for body in (tiny, small_at_scale):
        res = body["result"]
        assert body["status"] == "succeeded" and res["p_aml"] is None, body
        assert res["aml"]["status"] == "abstained" and res["aml"]["reason"] == "image_too_small"
        assert res["aml_positive"] is None and res["n_cells_counted"] > 0
    assert "32x32 px = 16 um" in tiny["result"]["aml"]["detail"]
    assert "96x72 px = 10.8 um" in small_at_scale["result"]["aml"]["detail"]
    assert 'marrowscope_gateway_aml_abstained_total{reason="image_too_small"} 2.0' in metrics


def test_cells_of_implausible_size_for_the_pixel_size_abstain(gateway):
    client, _, keys = gateway()  # an ensemble of unknown units: the range check cannot help
    with client:
        huge = _analyse(client, keys, [png(*FIELD, seed=26)], um_per_px=5.0)
        fine = _analyse(client, keys, [png(*FIELD, seed=26)], um_per_px=0.27)
    res = huge["result"]
    assert res["p_aml"] is None and res["aml"]["reason"] == "implausible_cell_size"
    assert "150 um across" in res["aml"]["detail"]
    assert res["npm1_morphology"] is None or res["npm1_morphology"]["status"] != "predicted"
    assert fine["result"]["aml"]["status"] == "predicted" and fine["reason"] is None


def test_pixel_size_outside_the_training_range_withholds_p_aml(gateway, monkeypatch):
    monkeypatch.setenv("MS_TEST_FAKE_FEATURE_UNITS", "um")  # trained at 0.25-0.3 um/px
    monkeypatch.setenv("MS_TEST_FAKE_ENSEMBLE_TARGETS", "aml,npm1")
    client, _, keys = gateway()
    with client:
        far = _analyse(client, keys, [png(*FIELD, seed=27)], um_per_px=1.0)
        edge = _analyse(client, keys, [png(*FIELD, seed=27)], um_per_px=0.36)
        fhir = client.get(
            f"/v1/analyses/{far['id']}/report", params={"format": "fhir"}, headers=keys["lis"]
        ).json()
    res = far["result"]
    assert far["status"] == "succeeded" and res["p_aml"] is None
    assert res["aml"]["reason"] == "pixel_size_out_of_range"
    assert "0.2-0.375 um/px" in res["aml"]["detail"]
    morph = res["npm1_morphology"]
    assert (morph["status"], morph["reason"], morph["p"]) == (
        "abstained",
        "pixel_size_out_of_range",
        None,
    )
    assert far["reason"].startswith("P(AML) withheld (pixel_size_out_of_range)")
    codes = {
        c["code"]
        for e in fhir["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "p-aml"
        for c in e["resource"]["dataAbsentReason"]["coding"]
    }
    assert "pixel_size_out_of_range" in codes
    # within the documented 25 % tolerance of 0.3
    assert edge["result"]["aml"]["status"] == "predicted" and edge["result"]["p_aml"] is not None


@pytest.mark.parametrize(
    ("um", "tolerance", "out"),
    [
        (0.27, 0.25, False),
        (0.2, 0.25, False),
        (0.19, 0.25, True),
        (0.376, 0.25, True),
        (0.31, 0.0, True),
        (1.0, 4.0, False),
    ],
)
def test_pixel_size_range_rule(um, tolerance, out):
    got = pixel_size_out_of_range(
        [0.27, um], FeatureUnits("um", 0.25, 0.3), tolerance=tolerance, ensemble_version="4"
    )
    assert (got is not None) == out
    # models that recorded no range, or learned px, are not checked
    assert (
        pixel_size_out_of_range([9.0], FeatureUnits("um"), tolerance=0, ensemble_version="4")
        is None
    )
    assert (
        pixel_size_out_of_range([9.0], FeatureUnits("px"), tolerance=0, ensemble_version="4")
        is None
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"um_per_px": True}, "options.um_per_px: Input should be a valid number"),
        ({"um_per_px": "0.27"}, "options.um_per_px: Input should be a valid number"),
        ({"explain": "yes"}, "options.explain: Input should be a valid boolean"),
        ({"explain": 1}, "options.explain: Input should be a valid boolean"),
        ({"um_per_px": 1e-300}, "not a plausible pixel size: it must lie between 0.05 and 5"),
        ({"um_per_px": 10}, "not a plausible pixel size: it must lie between 0.05 and 5"),
        ({"um_per_px": float("nan")}, "um_per_px must be a finite number"),
        ({"um_per_px": float("inf")}, "um_per_px must be a finite number"),
    ],
)
def test_metadata_types_are_strict_and_pixel_size_plausible(gateway, options, message):
    client, services, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses",
            files=files(png(), metadata=json.dumps({"accession_id": "A-1", "options": options})),
            headers=keys["lis"],
        )
        listed = client.get("/v1/analyses", headers=keys["lis"]).json()
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_metadata" and message in r.json()["detail"], r.json()
    assert "<= 10" not in r.json()["detail"]
    assert listed["total"] == 0


def test_strings_are_not_accepted_for_other_fields(gateway):
    client, _, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses",
            files=files(png(), metadata=json.dumps({"accession_id": 12345})),
            headers=keys["lis"],
        )
    assert r.status_code == 422 and "accession_id" in r.json()["detail"]


def test_deployment_default_pixel_size_is_range_checked(make_settings):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a plausible pixel size"):
        make_settings(default_um_per_px="1e-300")
    assert make_settings(default_um_per_px="0.27").default_um_per_px == 0.27
