"""A whole slide through the gateway: reference or upload -> regions -> tiles -> the pipeline
(test model clients) -> a report with the regions used and the thumbnail. Synthetic slides."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowscope.roi import RoiConfig
from services.gateway.auth import create_key
from services.gateway.pipeline import Cancelled
from services.gateway.slidejob import expand_slide
from tests.gateway.conftest import png, wait_status
from training.data.synth_slide import ZONE, load_truth

REGION_UM = 128.0  # the small slide's zone block: 256 px at 0.5 um/px


def _meta(**slide) -> dict:
    return {
        "accession_id": "ACC-SLIDE-1",
        "specimen_type": "bone_marrow_smear",
        "stain": "MGG",
        "slide": slide,
    }


@pytest.fixture
def slide_root(tmp_path: Path, small_slide: Path) -> Path:
    root = tmp_path / "store"
    (root / "2026").mkdir(parents=True)
    shutil.copy(small_slide, root / "2026" / "small.tiff")
    shutil.copy(small_slide.with_suffix(".json"), root / "2026" / "small.json")
    return root


@pytest.fixture
def slide_gateway(gateway, slide_root: Path):
    def start(**overrides):
        return gateway(
            slide_roots={"lab": str(slide_root)},
            slide_region_um=str(REGION_UM),
            **overrides,
        )

    return start


def test_slide_by_reference_becomes_a_case_with_its_regions(slide_gateway, small_slide) -> None:
    client, services, keys = slide_gateway()
    with client:
        r = client.post(
            "/v1/slides",
            json=_meta(store="lab", path="2026/small.tiff", cell_target=120),
            headers={**keys["lis"], "Idempotency-Key": "slide-1"},
        )
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        body = wait_status(client.get, aid, keys["lis"])
        assert body["status"] == "succeeded", body
        res, slide = body["result"], body["result"]["slide"]
        regions = slide["regions"]
        # every selected region became one image of the case, in selection order
        assert [im["index"] for im in body["images"]] == [g["index"] for g in regions]
        assert body["slide"] == {
            "phase": "cut",
            "regions_total": len(regions),
            "regions_done": len(regions),
        }
        assert res["n_images"] == len(regions) >= 1 and res["input"] == "slide"
        assert slide["stop_reason"] in ("target_reached", "slide_exhausted")
        if slide["stop_reason"] == "target_reached":
            assert slide["cells_estimated"] >= 120
        counted = {im["index"]: im["n_counted"] for im in res["images"]}
        assert [g["n_counted"] for g in regions] == [counted[g["index"]] for g in regions]
        assert slide["cells_counted"] == res["n_cells_counted"]
        # the regions lie in the monolayer of the synthetic slide's ground truth
        _, zmap, _ = load_truth(small_slide)
        inside = np.mean([zmap[g["row"], g["col"]] == ZONE["monolayer"] for g in regions])
        assert inside >= 0.95
        for g in regions:
            assert (g["width"], g["height"]) == (256, 256) and g["size_um"] == REGION_UM
        # tiles are the level-0 pixels of their region
        im0 = body["images"][0]
        assert (im0["width"], im0["height"]) == (256, 256)
        thumb = client.get(slide["thumbnail"], headers=keys["reader"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        t = Image.open(io.BytesIO(thumb.content))
        assert max(t.size) <= 1024 and t.size[0] / t.size[1] == pytest.approx(3072 / 2048, 0.02)
        overlay = client.get(regions[0]["overlay"], headers=keys["reader"])
        assert overlay.status_code == 200
        again = client.post(
            "/v1/slides",
            json=_meta(store="lab", path="2026/small.tiff", cell_target=120),
            headers={**keys["lis"], "Idempotency-Key": "slide-1"},
        )
        assert again.status_code == 200 and again.json()["id"] == aid
        fhir = client.get(f"/v1/analyses/{aid}/report?format=fhir", headers=keys["reader"])
        assert fhir.status_code == 200
        resources = [e["resource"] for e in fhir.json()["entry"]]
        urls = [m["content"]["url"] for m in resources if m["resourceType"] == "Media"]
        assert any(u.endswith(f"/v1/analyses/{aid}/slide.png") for u in urls)
        (obs,) = [
            o
            for o in resources
            if o["resourceType"] == "Observation"
            and o["code"]["coding"][0]["code"] == "slide-regions"
        ]
        assert obs["valueInteger"] == len(regions) == len(obs["component"])


def test_a_smaller_cell_target_uses_fewer_regions(slide_gateway) -> None:
    client, _, keys = slide_gateway()
    with client:
        used = {}
        for target in (20, 400):
            r = client.post(
                "/v1/slides",
                json=_meta(store="lab", path="2026/small.tiff", cell_target=target),
                headers=keys["lis"],
            )
            body = wait_status(client.get, r.json()["id"], keys["lis"])
            assert body["status"] == "succeeded", body
            used[target] = len(body["result"]["slide"]["regions"])
        assert used[20] < used[400]


def test_upload_then_analyse_and_tenant_scoping(slide_gateway, small_slide) -> None:
    client, services, keys = slide_gateway()
    with services.sessions.begin() as session:
        other = {
            "X-API-Key": create_key(session, name="b", scopes=["submit", "read"], tenant="b")[0]
        }
    data = small_slide.read_bytes()
    with client:
        up = client.put("/v1/slide-uploads?name=case.tiff", content=data, headers=keys["lis"])
        assert up.status_code == 201, up.text
        doc = up.json()
        assert doc["size_bytes"] == len(data) and doc["um_per_px"] == pytest.approx(0.5)
        again = client.put("/v1/slide-uploads?name=case.tiff", content=data, headers=keys["lis"])
        assert again.json()["upload"] == doc["upload"]  # named by content: one file
        # another tenant cannot name this tenant's upload
        r = client.post("/v1/slides", json=_meta(upload=doc["upload"]), headers=other)
        assert r.status_code == 404 and r.json()["error"] == "upload_not_found"
        r = client.post("/v1/slides", json=_meta(upload=doc["upload"]), headers=keys["lis"])
        assert r.status_code == 202, r.text
        body = wait_status(client.get, r.json()["id"], keys["lis"])
        assert body["status"] == "succeeded", body
        assert body["result"]["slide"]["source"] == {"upload": doc["upload"]}


def _count_analyses(client, headers) -> int:
    return client.get("/v1/analyses", headers=headers).json()["total"]


def test_bad_slides_get_a_clear_error_and_nothing_is_stored(slide_gateway, slide_root) -> None:
    client, services, keys = slide_gateway(max_slide_bytes="2000000")
    (slide_root / "not-a-slide.tiff").write_bytes(png())
    (slide_root / "big.tiff").write_bytes(b"\0" * 2_000_001)
    cases = [
        (_meta(store="lab", path="../etc/passwd"), 400, "bad_slide_path"),
        (_meta(store="lab", path="/etc/passwd"), 400, "bad_slide_path"),
        (_meta(store="nope", path="a.tiff"), 404, "unknown_slide_store"),
        (_meta(store="lab", path="2026/missing.tiff"), 404, "slide_not_found"),
        (_meta(store="lab", path="not-a-slide.tiff"), 422, "slide_unknown_format"),
        (_meta(store="lab", path="big.tiff"), 413, "slide_too_large"),
        (_meta(store="lab"), 422, "invalid_request"),
        (_meta(store="lab", path="2026/small.tiff", upload="0" * 64), 422, "invalid_request"),
        (_meta(upload="../../x"), 400, "bad_upload_id"),
    ]
    with client:
        for doc, code, error in cases:
            r = client.post("/v1/slides", json=doc, headers=keys["lis"])
            assert (r.status_code, r.json().get("error")) == (code, error), (doc, r.text)
        r = client.put("/v1/slide-uploads?name=x.tiff", content=png(), headers=keys["lis"])
        assert (r.status_code, r.json()["error"]) == (422, "slide_unknown_format")
        r = client.put("/v1/slide-uploads?name=x.png", content=png(), headers=keys["lis"])
        assert (r.status_code, r.json()["error"]) == (400, "bad_slide_name")
        r = client.put("/v1/slide-uploads", content=b"\0" * 2_000_001, headers=keys["lis"])
        assert r.status_code == 413, r.text
        r = client.put("/v1/slide-uploads", content=b"x", headers={})
        assert r.status_code == 401
        assert _count_analyses(client, keys["admin"]) == 0
    uploads = services.settings.slide_cache_dir / "uploads"
    leftovers = [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []
    assert leftovers == []  # refused uploads are not kept


def test_a_slide_without_a_smear_fails_with_the_reason(slide_gateway, slide_root) -> None:
    import tifffile

    glass = np.full((1024, 1536, 3), 236, np.uint8)
    tifffile.imwrite(
        slide_root / "glass.tiff",
        glass,
        tile=(256, 256),
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    client, _, keys = slide_gateway()
    with client:
        r = client.post(
            "/v1/slides", json=_meta(store="lab", path="glass.tiff"), headers=keys["lis"]
        )
        assert r.status_code == 202, r.text
        body = wait_status(client.get, r.json()["id"], keys["lis"])
    assert body["status"] == "failed" and body["reason"].startswith("slide_not_a_smear"), body
    assert body["images"] == []


def test_cutting_stops_between_tiles_when_cancelled(small_slide) -> None:
    put: list[int] = []

    async def checkpoint(done: int, total: int) -> None:
        assert total >= 3
        if done == 2:
            raise Cancelled("cancelled by request")

    async def run() -> None:
        await expand_slide(
            small_slide,
            config=RoiConfig(region_um=REGION_UM, cell_target=10_000),
            put_blob=lambda data: put.append(len(data)),
            checkpoint=checkpoint,
        )

    with pytest.raises(Cancelled):
        asyncio.run(run())
    assert len(put) == 2  # the third tile was never cut


def test_a_slide_without_pixel_size_needs_one(slide_gateway, slide_root) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(
        slide_root / "nompp.tiff",
        rng.integers(0, 255, (512, 512, 3), dtype=np.uint8),
        tile=(256, 256),
        photometric="rgb",
    )
    client, _, keys = slide_gateway()
    with client:
        r = client.post(
            "/v1/slides", json=_meta(store="lab", path="nompp.tiff"), headers=keys["lis"]
        )
    assert (r.status_code, r.json()["error"]) == (422, "slide_no_pixel_size"), r.text


@pytest.mark.slow
def test_kill_9_mid_slide_resumes_with_the_tiles_already_cut(
    tmp_path, slide_root, spawn, port_factory
) -> None:
    """A gateway killed while a slide analysis runs: the next one takes it over after the
    lease, keeps the tiles cut once (no duplicate images) and completes it."""
    import time

    import httpx
    from sqlalchemy import create_engine, text

    from tests.gateway.conftest import create_key_cli, settings_env

    env = settings_env(
        tmp_path / "gw",
        MS_TEST_FAKE_SEG_DELAY_S="30",
        MS_GATEWAY_SLIDE_ROOTS=json.dumps({"lab": str(slide_root)}),
        MS_GATEWAY_SLIDE_REGION_UM=str(REGION_UM),
    )
    key = {"X-API-Key": create_key_cli(env)}
    port = port_factory()
    gw = spawn(env, port, log=tmp_path / "gw1.log")
    gw.wait_healthy()
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.post("/v1/slides", json=_meta(store="lab", path="2026/small.tiff"), headers=key)
        assert r.status_code == 202, r.text
        url = r.headers["Location"]
        end = time.monotonic() + 120
        while True:  # the slide is cut and the pipeline is stuck in segmentation
            body = c.get(url, headers=key).json()
            if body["status"] == "running" and body["images"]:
                break
            assert time.monotonic() < end, body
            time.sleep(0.1)
    cut = [im["sha256"] for im in body["images"]]
    gw.kill()

    gw2 = spawn({**env, "MS_TEST_FAKE_SEG_DELAY_S": "0"}, port, log=tmp_path / "gw2.log")
    gw2.wait_healthy()
    with httpx.Client(base_url=gw2.url, timeout=10) as c:
        end = time.monotonic() + 120
        while (done := c.get(url, headers=key).json())["status"] in ("queued", "running"):
            assert time.monotonic() < end, done
            time.sleep(0.1)
    assert done["status"] == "succeeded", done
    assert [im["sha256"] for im in done["images"]] == cut
    assert len(done["result"]["slide"]["regions"]) == len(cut) == done["result"]["n_images"]
    eng = create_engine(f"sqlite:///{tmp_path / 'gw' / 'gateway.db'}")
    with eng.connect() as conn:
        attempts = conn.execute(text("SELECT attempts FROM analyses")).scalar_one()
        rows = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
    eng.dispose()
    assert attempts == 2 and rows == len(cut)
