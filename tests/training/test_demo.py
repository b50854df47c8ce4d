"""The demo's gateway API key: kept across runs, replaced (old ones revoked) when rejected.

Runs `ensure_key` against a real gateway database and the real keys CLI, with the in-process
gateway app answering the acceptance check; the demo itself is not run.
"""

from __future__ import annotations

import os
import stat

from marrowscope.paths import PROJECT_ROOT
from tests.gateway.conftest import gateway, make_settings  # noqa: F401
from training.demo import DEMO_KEY_NAME, ensure_key, gateway_accepts, keys_cli


def _active_demo_ids(env) -> list[str]:
    rows = [line.split("\t") for line in keys_cli(["list"], env).splitlines()]
    return [r[0] for r in rows if r[1] == DEMO_KEY_NAME and r[-1] == "active"]


def test_demo_key_is_reused_and_a_rejected_one_is_replaced(tmp_path):
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.auth import create_key, revoke_key
    from services.gateway.config import GatewaySettings

    data_dir = tmp_path / "gateway"
    env = {**os.environ, "MS_GATEWAY_DATA_DIR": str(data_dir), "PYTHONPATH": str(PROJECT_ROOT)}
    app = create_app(GatewaySettings(data_dir=data_dir))
    sessions = app.state.services.sessions
    http = TestClient(app)
    key_file = data_dir / "demo-lis.key"

    def accepted(key: str) -> bool:
        return gateway_accepts(http, key)

    with sessions.begin() as session:  # one left behind by a run before keys were kept
        stale = create_key(session, name=DEMO_KEY_NAME, scopes=["submit", "read"])[1].id

    first = ensure_key(env, key_file, accepted)
    assert accepted(first)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == first
    assert _active_demo_ids(env) == [first.split("_")[1]]  # the stale one was revoked
    assert stale != first.split("_")[1]

    assert ensure_key(env, key_file, accepted) == first  # second run: same key, none added
    assert _active_demo_ids(env) == [first.split("_")[1]]

    with sessions.begin() as session:  # e.g. an operator revoked it
        assert revoke_key(session, key_id=first.split("_")[1])
    second = ensure_key(env, key_file, accepted)
    assert second != first and accepted(second) and not accepted(first)
    assert key_file.read_text().strip() == second
    assert _active_demo_ids(env) == [second.split("_")[1]]


def test_demo_slide_is_written_and_analysed_end_to_end(tmp_path, gateway):  # noqa: F811
    """The demo's whole-slide step against a real gateway app (test model clients)."""
    from training.demo import analyse_slide, slide_lines, write_demo_slide

    slides = tmp_path / "slides"
    path = write_demo_slide(slides, 0.5)
    assert path.is_file() and write_demo_slide(slides, 0.5) == path  # written once
    client, _, keys = gateway(slide_roots={"demo": str(slides)})
    client.headers.update(keys["lis"])
    with client:
        body = analyse_slide(client, path.name, tmp_path / "out")
    assert body["status"] == "succeeded", body
    assert (tmp_path / "out" / "slide" / "thumbnail.png").stat().st_size > 0
    assert "regions selected" in "\n".join(slide_lines(body))


def test_demo_single_cell_case_is_cut_from_the_ground_truth_and_analysed(
    tiny_cohort,
    tmp_path,
    gateway,  # noqa: F811
):
    """The demo's single-cell case: one crop per ground-truth nucleated cell, at the field's
    resolution, through the gateway's `"input": "cells"` path."""
    from marrowscope.imaging import decode_image
    from training.data.manifest import read_manifest
    from training.demo import analyse_cells, cell_crops

    record = next(r for r in read_manifest(tiny_cohort / "cases.csv") if r.aml_label == 1)
    crops = cell_crops(tiny_cohort, record, limit=12)
    assert 1 <= len(crops) <= 12
    shapes = [decode_image(c).shape for c in crops]
    assert all(h == w and 8 <= h <= 200 for h, w, _ in shapes), shapes  # square, not resized
    client, _, keys = gateway()
    client.headers.update(keys["lis"])
    with client:
        body = analyse_cells(client, tiny_cohort, record, 0.27, tmp_path)
    assert body["status"] in ("succeeded", "abstained"), body
    result = body.get("result") or {}
    if body["status"] == "succeeded":
        assert result["input"] == "cells" and result["n_images"] == len(
            cell_crops(tiny_cohort, record)
        )
