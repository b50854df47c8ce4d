"""Deep zoom over a slide case in the review app, over real HTTP: a real gateway process
(test model clients) analyses a synthetic slide from a slide store, and reviewers fetch the
DZI and its tiles. Tiles are checked pixel for pixel against the slide read with OpenSlide
(PNG tiles here; the browser test runs the default JPEG), and every refusal is checked:
out-of-range tiles, malformed names, another tenant, no session, a slide gone from its store."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from marrowscope.slides import open_slide
from tests.conftest import free_port
from tests.gateway.conftest import GatewayProcess, settings_env, wait_status
from tests.slides.conftest import SMALL
from training.data.synth_slide import write_slide

PASSWORD = "correct horse battery"
DZ = "{http://schemas.microsoft.com/deepzoom/2008}"


def _accounts(db: Path) -> dict[str, str]:
    """Reviewers of two tenants and a LIS key (made in-process: the CLI is tested elsewhere)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from services.gateway.auth import create_key
    from services.gateway.review.accounts import add_reviewer

    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
    try:
        with Session(engine) as session, session.begin():
            add_reviewer(session, username="dr.meyer", password=PASSWORD)
            add_reviewer(session, username="dr.other", password=PASSWORD, tenant="site-b")
            plain, _ = create_key(session, name="lis", scopes=["submit", "read"])
    finally:
        engine.dispose()
    return {"X-API-Key": plain}


@pytest.fixture(scope="module")
def slide_case(tmp_path_factory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("zoom")
    slides = root / "slides"
    slides.mkdir()
    write_slide(slides / "small.tiff", SMALL)
    env = settings_env(
        root / "gw",
        MS_TEST_FAKE_CELLS="12",
        MS_GATEWAY_MIN_CELLS="5",
        MS_GATEWAY_REVIEW_COOKIE_SECURE="false",
        MS_GATEWAY_REVIEW_TILE_FORMAT="png",
        MS_GATEWAY_REVIEW_TILE_MAX_AGE_S="600",
        MS_GATEWAY_SLIDE_ROOTS=json.dumps({"lab": str(slides)}),
        MS_GATEWAY_SLIDE_REGION_UM="128",
    )
    proc = GatewayProcess(env, free_port(), log=root / "gateway.log")
    try:
        proc.wait_healthy()
        key = _accounts(Path(env["MS_GATEWAY_DATA_DIR"]) / "gateway.db")
        with httpx.Client(base_url=proc.url, headers=key, timeout=60) as lis:
            r = lis.post(
                "/v1/slides",
                json={
                    "accession_id": "Z-1",
                    "specimen_type": "bone_marrow_smear",
                    "stain": "MGG",
                    "slide": {"store": "lab", "path": "small.tiff", "cell_target": 60},
                },
            )
            assert r.status_code == 202, r.text
            body = wait_status(lis.get, r.json()["id"], key, timeout=120)
        assert body["status"] in ("succeeded", "abstained"), body
        yield {
            "url": proc.url,
            "id": body["id"],
            "result": body["result"],
            "path": slides / "small.tiff",
        }
    finally:
        proc.stop()


@contextlib.contextmanager
def reviewer(url: str, username: str = "dr.meyer") -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/review/login", data={"username": username, "password": PASSWORD})
        assert r.status_code == 303, r.text
        yield client


def tile(client: httpx.Client, aid: str, level: int, col: int, row: int) -> httpx.Response:
    return client.get(f"/review/cases/{aid}/slide_files/{level}/{col}_{row}.png")


def test_the_dzi_describes_the_slide(slide_case) -> None:
    with reviewer(slide_case["url"]) as client:
        r = client.get(f"/review/cases/{slide_case['id']}/slide.dzi")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    image = ET.fromstring(r.text)
    size = image.find(f"{DZ}Size")
    assert size is not None
    assert (int(size.get("Width", 0)), int(size.get("Height", 0))) == (SMALL.width, SMALL.height)
    assert image.get("TileSize") == "254" and image.get("Overlap") == "1"
    assert image.get("Format") == "png"


@pytest.mark.parametrize(
    ("level", "col", "row", "slide_level", "size"),
    [
        (12, 1, 1, 0, (256, 256)),  # full resolution: an inner tile, overlap on every side
        (12, 12, 8, 0, (25, 17)),  # the bottom-right corner tile
        (10, 0, 0, 1, (255, 255)),  # downsample 4: the slide's level 1
        (8, 0, 0, 2, (192, 128)),  # downsample 16: the slide's level 2, one tile
    ],
)
def test_tiles_are_the_slide_s_pixels_at_that_level(
    slide_case, level, col, row, slide_level, size
) -> None:
    with reviewer(slide_case["url"]) as client:
        r = tile(client, slide_case["id"], level, col, row)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert (got.shape[1], got.shape[0]) == size
    d = 2 ** (12 - level)
    x1 = col * 254 - (1 if col else 0)
    y1 = row * 254 - (1 if row else 0)
    with open_slide(slide_case["path"]) as slide:
        want = slide.read_region((x1 * d, y1 * d), slide_level, size)
    np.testing.assert_array_equal(got, want)


def test_tiles_are_cached_privately_and_revalidated_after_the_session_check(slide_case) -> None:
    aid = slide_case["id"]
    with reviewer(slide_case["url"]) as client:
        first = tile(client, aid, 9, 0, 0)
        assert first.status_code == 200
        assert first.headers["cache-control"] == "private, max-age=600"
        assert "cookie" in first.headers["vary"].lower()
        etag = first.headers["etag"]
        again = client.get(
            f"/review/cases/{aid}/slide_files/9/0_0.png", headers={"If-None-Match": etag}
        )
        assert again.status_code == 304 and again.content == b""
        other = tile(client, aid, 9, 1, 0)
        assert other.headers["etag"] != etag
    with httpx.Client(base_url=slide_case["url"], timeout=60) as anon:
        stale = anon.get(
            f"/review/cases/{aid}/slide_files/9/0_0.png", headers={"If-None-Match": etag}
        )
    assert stale.status_code == 401  # no 304 without a session


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("13/0_0.png", 404, "tile_missing"),  # above the full-resolution level
        ("12/13_0.png", 404, "tile_missing"),  # 13 columns: 0..12
        ("12/0_9.png", 404, "tile_missing"),  # 9 rows: 0..8
        ("0/1_0.png", 404, "tile_missing"),  # level 0 is one 1x1 tile
        ("x/0_0.png", 400, "bad_tile"),
        ("-1/0_0.png", 400, "bad_tile"),
        ("12/0-0.png", 400, "bad_tile"),
        ("12/0_0.gif", 400, "bad_tile"),
        ("12/0_0.jpeg", 400, "bad_tile"),  # this gateway serves PNG tiles
        ("12/99999999_0.png", 400, "bad_tile"),
    ],
)
def test_bad_and_out_of_range_tiles_are_refused_clearly(slide_case, path, status, code) -> None:
    with reviewer(slide_case["url"]) as client:
        r = client.get(f"/review/cases/{slide_case['id']}/slide_files/{path}")
    assert r.status_code == status, r.text
    assert r.json()["error"] == code, r.text


def test_another_tenant_and_no_session_see_nothing(slide_case) -> None:
    aid = slide_case["id"]
    with reviewer(slide_case["url"], "dr.other") as other:
        for path in ("slide.dzi", "slide_files/12/0_0.png"):
            r = other.get(f"/review/cases/{aid}/{path}")
            assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
    with httpx.Client(base_url=slide_case["url"], timeout=60) as anon:
        for path in ("slide.dzi", "slide_files/12/0_0.png"):
            r = anon.get(f"/review/cases/{aid}/{path}")
            assert r.status_code == 401 and "/review/login" in r.text
        assert anon.get(f"/review/cases/{aid}").headers["location"] == "/review/login"


def test_the_case_page_carries_the_viewer_and_numbered_regions(slide_case) -> None:
    aid, regions = slide_case["id"], slide_case["result"]["slide"]["regions"]
    with reviewer(slide_case["url"]) as client:
        page = client.get(f"/review/cases/{aid}").text
    assert f'data-dzi="/review/cases/{aid}/slide.dzi"' in page
    assert "openseadragon.min.js" in page
    marks = re.findall(r'class="region-mark" href="#field-(\d+)" data-x="(\d+)"', page)
    assert [(int(i), int(x)) for i, x in marks] == [(r["index"], r["x"]) for r in regions]
    assert all(f'id="field-{r["index"]}"' in page for r in regions)
    assert "Z-1" not in f"/review/cases/{aid}/slide.dzi"  # addressed by id, never accession


def test_a_slide_gone_from_its_store_answers_404_and_the_page_still_opens(slide_case) -> None:
    path: Path = slide_case["path"]
    moved = path.with_name("moved.tiff")
    shutil.move(path, moved)
    try:
        with reviewer(slide_case["url"]) as client:
            r = tile(client, slide_case["id"], 12, 2, 2)
            assert r.status_code == 404 and r.json()["error"] == "slide_unavailable"
            assert "no slide" in r.json()["detail"]
            assert client.get(f"/review/cases/{slide_case['id']}").status_code == 200
    finally:
        shutil.move(moved, path)


def test_the_csp_allows_exactly_the_stylesheet_the_vendored_viewer_adds() -> None:
    import base64
    import hashlib

    from marrowscope.paths import PROJECT_ROOT
    from services.gateway.review.zoom import OSD_STYLE_HASH

    vendored = PROJECT_ROOT / "services/gateway/review/static/vendor/openseadragon"
    source = (vendored / "openseadragon.min.js").read_text()
    styles = re.findall(r'createElement\("style"\);[^;]*;\w+\.textContent="([^"]*)"', source)
    assert len(styles) == 1, "OpenSeadragon adds another stylesheet: allow it or avoid it"
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"sha256-{digest}" == OSD_STYLE_HASH
