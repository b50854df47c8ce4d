"""Issue 22 §5: uploaded slides count against a per-tenant quota (413 `upload_quota_exceeded`,
nothing kept) and expire: a tenant's own expired uploads at its next upload, every tenant's
in the blob sweep (`python -m services.gateway.blobs sweep`), except an upload an analysis
still has to cut."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.gateway import blobs
from services.gateway.auth import create_key
from services.gateway.db import DEFAULT_TENANT
from services.gateway.slidestore import upload_dir
from tests.gateway.conftest import settings_env
from tests.slides.bombs import write_tiny_slide

TTL_S = 3600


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _slides(tmp_path: Path, n: int) -> list[bytes]:
    return [write_tiny_slide(tmp_path / f"s{k}.tiff", seed=k).read_bytes() for k in range(n)]


def _meta(upload: str) -> dict:
    return {
        "accession_id": "ACC-UP",
        "specimen_type": "bone_marrow_smear",
        "stain": "MGG",
        "slide": {"upload": upload},
    }


def test_uploads_beyond_the_tenant_quota_are_refused_and_expired_ones_free_it(
    gateway, tmp_path: Path
) -> None:
    one, two = _slides(tmp_path, 2)
    client, services, keys = gateway(
        slide_upload_quota_bytes=str(len(one) * 3 // 2),
        slide_upload_ttl_s=str(TTL_S),
        embedded_worker="false",
    )
    with services.sessions.begin() as session:
        other = {"X-API-Key": create_key(session, name="b", scopes=["submit"], tenant="b")[0]}
    with client:
        first = client.put("/v1/slide-uploads?name=a.tiff", content=one, headers=keys["lis"])
        assert first.status_code == 201, first.text
        r = client.put("/v1/slide-uploads?name=b.tiff", content=two, headers=keys["lis"])
        assert (r.status_code, r.json()["error"]) == (413, "upload_quota_exceeded"), r.text
        # counted per tenant: another tenant still has its whole quota
        assert client.put("/v1/slide-uploads?name=b.tiff", content=two, headers=other).is_success
        mine = upload_dir(services.settings.slide_cache_dir, DEFAULT_TENANT)
        assert [p.name for p in mine.iterdir()] == [first.json()["upload"]]  # nothing partial
        # the first upload expires: the next upload deletes it and fits
        _age(mine / first.json()["upload"], TTL_S + 10)
        r = client.put("/v1/slide-uploads?name=b.tiff", content=two, headers=keys["lis"])
        assert r.status_code == 201, r.text
        gone = client.post("/v1/slides", json=_meta(first.json()["upload"]), headers=keys["lis"])
        assert (gone.status_code, gone.json()["error"]) == (404, "upload_not_found"), gone.text


def test_the_blob_sweep_expires_unused_uploads_and_keeps_those_an_analysis_waits_for(
    gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = _slides(tmp_path, 2)
    client, services, keys = gateway(slide_upload_ttl_s=str(TTL_S), embedded_worker="false")
    with client:
        ids = [
            client.put("/v1/slide-uploads?name=x.tiff", content=data, headers=keys["lis"]).json()[
                "upload"
            ]
            for data in (one, two)
        ]
        r = client.post("/v1/slides", json=_meta(ids[0]), headers=keys["lis"])
        assert r.status_code == 202, r.text  # queued: no worker runs here
        waiting = r.json()["id"]
    files = {p.name: p for p in (services.settings.slide_cache_dir / "uploads").rglob("*.tiff")}
    for path in files.values():
        _age(path, TTL_S + 10)
    for k, v in settings_env(tmp_path / "gw", MS_GATEWAY_SLIDE_UPLOAD_TTL_S=str(TTL_S)).items():
        monkeypatch.setenv(k, v)

    def sweep() -> str:
        assert blobs.main(["sweep"]) == 0  # `python -m services.gateway.blobs sweep`
        out = capsys.readouterr()
        return out.out + out.err

    # an object-store copy nobody fetched for longer than MS_GATEWAY_SLIDE_FETCH_TTL_S (24 h)
    copy = services.settings.slide_cache_dir / "0123abcd.tiff"
    copy.write_bytes(b"copy")
    _age(copy, 86400 + 10)
    out = sweep()
    assert "1 expired slide uploads and 1 unused slide copies" in out, out
    assert files[ids[0]].is_file() and not files[ids[1]].exists() and not copy.exists()
    # once nothing waits for it any more, it goes too
    with client:
        assert client.delete(f"/v1/analyses/{waiting}", headers=keys["lis"]).is_success
    out = sweep()
    assert "1 expired slide uploads" in out and not files[ids[0]].exists(), out
