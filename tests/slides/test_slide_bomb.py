"""Issue 22 §1, the slide bomb: a tiny TIFF declaring a huge image (every TileOffset pointing
at one tile) is refused at submission; one that gets past the checks (switched off here) is
scored with its progress known from the first region, in a slide slot that leaves the case
slots to other tenants, within a time budget, and a DELETE ends it `cancelled` at once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from marrowscope.roi import grid_sample
from tests.gateway.conftest import files, meta, png, settings_env, wait_status
from tests.slides.bombs import write_bomb

# switched off to play a bomb that gets past them; polled often, so no rate limit either
CHECKS_OFF = {
    "slide_min_bytes_per_pixel": "0",
    "slide_max_shared_tiles": "1",
    "rate_limit_per_min": "100000",
}


def _slide_meta(**slide) -> dict:
    return {
        "accession_id": "ACC-BOMB",
        "specimen_type": "bone_marrow_smear",
        "stain": "MGG",
        "slide": slide,
    }


@pytest.fixture
def bombs(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    write_bomb(root / "bomb.tiff", 20_000)  # 0.0005 byte per declared pixel
    write_bomb(root / "flat.tiff", 20_000, overview=False)  # one 400 Mpx level
    write_bomb(root / "shared.tiff", 4_096)  # 256 tiles, one stored
    return root


def test_slide_bombs_are_refused_at_submission_and_nothing_is_kept(gateway, bombs) -> None:
    client, services, keys = gateway(slide_roots={"lab": str(bombs)})
    cases = [
        ("bomb.tiff", "slide_compression_implausible"),
        ("flat.tiff", "slide_no_overview"),
        ("shared.tiff", "slide_tiles_shared"),
    ]
    with client:
        for name, error in cases:
            r = client.post(
                "/v1/slides", json=_slide_meta(store="lab", path=name), headers=keys["lis"]
            )
            assert (r.status_code, r.json()["error"]) == (422, error), r.text
            up = client.put(
                f"/v1/slide-uploads?name={name}",
                content=(bombs / name).read_bytes(),
                headers=keys["lis"],
            )
            assert (up.status_code, up.json()["error"]) == (422, error), up.text
        assert client.get("/v1/analyses", headers=keys["admin"]).json()["total"] == 0
    uploads = services.settings.slide_cache_dir / "uploads"
    assert [p for p in uploads.rglob("*") if p.is_file()] == []


def test_scoring_past_its_time_budget_fails_with_the_reason(gateway, bombs) -> None:
    client, _, keys = gateway(
        slide_roots={"lab": str(bombs)}, slide_scoring_timeout_s="0.3", **CHECKS_OFF
    )
    with client:
        r = client.post(
            "/v1/slides", json=_slide_meta(store="lab", path="bomb.tiff"), headers=keys["lis"]
        )
        assert r.status_code == 202, r.text
        body = wait_status(client.get, r.json()["id"], keys["lis"], timeout=60)
    assert body["status"] == "failed" and body["reason"].startswith("slide_scoring_timeout"), body
    assert body["slide"]["regions_total"] == 39 * 39 and body["images"] == []


def _tenant_key(data_dir: Path, tenant: str) -> dict[str, str]:
    """A submit+read key of `tenant` in the job store the gateway at `data_dir` will open."""
    from services.gateway.auth import create_key
    from services.gateway.db import make_engine, make_sessionmaker
    from services.gateway.migrations import upgrade_head

    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{data_dir / 'gateway.db'}")
    upgrade_head(engine)
    with make_sessionmaker(engine).begin() as session:
        key = create_key(session, name=tenant, scopes=["submit", "read"], tenant=tenant)[0]
    engine.dispose()
    return {"X-API-Key": key}


@pytest.mark.slow
def test_a_bomb_past_the_checks_shows_progress_leaves_other_tenants_a_slot_and_cancels(
    tmp_path: Path, bombs: Path, spawn, port_factory
) -> None:
    """The probe's scenario on a real gateway process (one case slot, one slide slot)."""
    write_bomb(bombs / "big.tiff", 30_000)  # 58 x 58 regions of 256 um: tens of seconds
    budget = 2048  # regions scored at most: 45 x 45 of the 58 x 58
    total = len(grid_sample(58, 58, budget))
    env = settings_env(
        tmp_path / "gw",
        MS_GATEWAY_SLIDE_ROOTS=json.dumps({"lab": str(bombs)}),
        MS_GATEWAY_SLIDE_MAX_SCORED_REGIONS=str(budget),
        **{f"MS_GATEWAY_{k.upper()}": v for k, v in CHECKS_OFF.items()},
    )
    a, b = (_tenant_key(tmp_path / "gw", tenant) for tenant in ("a", "b"))
    gw = spawn(env, port_factory(), log=tmp_path / "gw.log")
    gw.wait_healthy()
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.post("/v1/slides", json=_slide_meta(store="lab", path="big.tiff"), headers=a)
        assert r.status_code == 202, r.text
        bomb = r.json()["id"]
        end = time.monotonic() + 60
        while True:  # the total is known from the first region on
            slide = c.get(f"/v1/analyses/{bomb}", headers=a).json()["slide"]
            scoring = slide["phase"] == "scoring" and slide["regions_total"] == total
            if scoring and slide["regions_done"] > 0:
                break
            assert time.monotonic() < end, slide
            time.sleep(0.1)

        r = c.post("/v1/analyses", files=files(png(seed=1), metadata=meta()), headers=b)
        assert r.status_code == 202, r.text
        case = wait_status(c.get, r.json()["id"], b, timeout=60)
        assert case["status"] in ("succeeded", "abstained"), case
        busy = c.get(f"/v1/analyses/{bomb}", headers=a).json()
        assert busy["status"] == "running" and busy["slide"]["phase"] == "scoring", busy
        assert busy["slide"]["regions_done"] < busy["slide"]["regions_total"]

        assert c.delete(f"/v1/analyses/{bomb}", headers=a).status_code == 202
        done = wait_status(c.get, bomb, a, timeout=30)
        assert done["status"] == "cancelled", done
        assert done["slide"]["regions_done"] < total

        # stopping the gateway mid-scoring hands the slide back; OpenSlide must not see its
        # handle closed under a read (it aborts the process)
        r = c.post("/v1/slides", json=_slide_meta(store="lab", path="big.tiff"), headers=a)
        wait_status(c.get, r.json()["id"], a, want={"running"}, timeout=30)
    gw.stop()
    log = (tmp_path / "gw.log").read_text()
    assert "Application shutdown complete" in log and "Bail out" not in log, log[-2000:]
