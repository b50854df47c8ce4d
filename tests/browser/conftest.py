"""The review app in a real browser: Playwright's sync API driving the system's Chromium
(Debian's `chromium`, installed by `make sysdeps`; Playwright's own browser downloads are
never used), against a real gateway process on a loopback port (test model clients), with
a real webhook receiver.

Where no Chromium exists the tests skip with the reason; under CI=true that skip fails the
run (`tests/ci_skips.py`, marker `browser`). Screenshots go to `$MS_TEST_ARTEFACTS` when it
is set (CI uploads that folder), else to a pytest temporary folder; the path is printed.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import GatewayProcess, settings_env, wait_status

PASSWORD = "correct horse battery"

HERE = Path(__file__).parent
AXE = HERE / "vendor" / "axe-core" / "axe.min.js"
ACCESSIONS = {"fields": "B-FIELDS", "cells": "B-CELLS", "slide": "B-SLIDE"}
REVIEWERS = (("dr.meyer", "Dr. A. Meyer"), ("dr.second", "Dr. B. Second"))


def chromium_executable() -> str | None:
    """`MS_TEST_CHROMIUM`, else Debian's `chromium` (or Ubuntu's `chromium-browser`) on PATH."""
    return (
        os.environ.get("MS_TEST_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for one module's tests (each test opens its own context).

    Module, not session: while Playwright's sync API is active its event loop counts as
    running in the main thread, so every later `asyncio.run` in the session (the MLLP tests,
    pyHanko's signature validation, ...) failed with "cannot be called from a running event
    loop". Leaving the module stops Playwright and that loop."""
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium on PATH: `make sysdeps` (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make setup)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("MS_TEST_ARTEFACTS")
    out = Path(configured) if configured else tmp_path_factory.mktemp("browser-artefacts")
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test screenshots: {out}")
    return out


class Hooks:
    """A real HTTP server on 127.0.0.1 recording the webhooks it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in list(self.received)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- images a person recognises: cells drawn by the synthetic-smear renderer -------------------
def _compose(size: tuple[int, int], sprites: list[Any], rng: np.random.Generator) -> bytes:
    import io

    from PIL import Image

    from training.data.synth_cells import Stain

    w, h = size
    od = np.empty((h, w, 3), np.float32)
    od[:] = Stain(0.0, 1.0).od(np.array([236, 226, 230], np.float32)) * 0.4
    for sp in sprites:
        ys, xs = sp.alpha.shape
        x0, y0 = sp.x0, sp.y0
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1, sy1 = min(xs, w - x0), min(ys, h - y0)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        region = (slice(y0 + sy0, y0 + sy1), slice(x0 + sx0, x0 + sx1))
        a = sp.alpha[sy0:sy1, sx0:sx1]
        if sp.nucleus is None:  # red cells overlap additively
            od[region] += sp.od[sy0:sy1, sx0:sx1]
        else:
            od[region] = od[region] * (1 - 0.7 * a)[..., None] + sp.od[sy0:sy1, sx0:sx1]
    rgb = np.exp(-od) * 255.0 + rng.standard_normal(od.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def cell_png(code: str, seed: int, px: int = 96) -> bytes:
    """One nucleated cell of type `code`, centred, at 0.3 um/px (a single-cell image)."""
    from training.data.synth_cells import Stain, draw_cell

    rng = np.random.default_rng(seed)
    return _compose((px, px), [draw_cell(rng, code, px / 2, px / 2, 0.3, Stain(0, 1))], rng)


def field_png(seed: int, width: int = 480, height: int = 360) -> bytes:
    """A field of view: red cells and a few nucleated cells at 0.5 um/px."""
    from marrowscope.taxonomy import COUNTED_CODES
    from training.data.synth_cells import Stain, draw_cell, draw_rbc

    rng = np.random.default_rng(seed)
    stain = Stain(0, 1)
    sprites = [
        draw_rbc(rng, x, y, 0.5, stain)
        for x, y in zip(rng.uniform(0, width, 45), rng.uniform(0, height, 45), strict=True)
    ]
    for k in range(10):
        x, y = 40 + (k % 5) * 100 + rng.uniform(-8, 8), 80 + (k // 5) * 180 + rng.uniform(-8, 8)
        sprites.append(draw_cell(rng, COUNTED_CODES[(seed + k) % 12], x, y, 0.5, stain))
    return _compose((width, height), sprites, rng)


def _accounts(db: Path) -> str:
    """The reviewers (the CLI that makes them is tested in tests/gateway/test_review.py; here
    they are made in-process, seconds faster) and a LIS key with admin scope."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from services.gateway.auth import create_key
    from services.gateway.review.accounts import add_reviewer

    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
    try:
        with Session(engine) as session, session.begin():
            for username, name in REVIEWERS:
                add_reviewer(session, username=username, password=PASSWORD, display_name=name)
            plain, _ = create_key(session, name="lis", scopes=["submit", "read", "admin"])
    finally:
        engine.dispose()
    return plain


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    lis_key: dict[str, str]
    hooks: Hooks
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    """input kind (fields, cells, slide) -> the finished analysis as the API returns it."""

    def sqlite(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        import sqlite3

        db = Path(self.env["MS_GATEWAY_DATA_DIR"]) / "gateway.db"
        with sqlite3.connect(db) as conn:
            return list(conn.execute(sql, args))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Stack]:
    """A gateway with two reviewers of one tenant and three finished cases, one of each
    input kind: fields (explained, so with occlusion heatmaps), single cells, a slide."""
    from tests.slides.conftest import SMALL
    from training.data.synth_slide import write_slide

    root = tmp_path_factory.mktemp("browser")
    slides = root / "slides"
    slides.mkdir()
    write_slide(slides / "small.tiff", SMALL)
    hooks = Hooks()
    env = settings_env(
        root / "gw",
        MS_TEST_FAKE_CELLS="14",
        MS_GATEWAY_MIN_CELLS="5",
        MS_GATEWAY_REVIEW_COOKIE_SECURE="false",
        MS_GATEWAY_REVIEW_SESSION_TTL_S="900",
        MS_GATEWAY_ALLOW_PRIVATE_WEBHOOKS="true",
        MS_GATEWAY_SLIDE_ROOTS=json.dumps({"lab": str(slides)}),
        MS_GATEWAY_SLIDE_REGION_UM="128",
    )
    proc = GatewayProcess(env, free_port(), log=root / "gateway.log")
    try:
        proc.wait_healthy()  # the store is migrated now: accounts go straight into it
        assert proc.url is not None
        key = {"X-API-Key": _accounts(Path(env["MS_GATEWAY_DATA_DIR"]) / "gateway.db")}
        s = Stack(proc.url, env, key, hooks)
        with httpx.Client(base_url=proc.url, headers=key, timeout=60) as lis:

            def submit(images: list[bytes], **metadata: Any) -> str:
                doc = {
                    "specimen_type": "bone_marrow_aspirate",
                    "stain": "MGG",
                    "webhook_url": hooks.url,
                    **metadata,
                }
                parts: list[Any] = [
                    ("images", (f"im{k}.png", data, "image/png")) for k, data in enumerate(images)
                ]
                parts.append(("metadata", (None, json.dumps(doc))))
                r = lis.post("/v1/analyses", files=parts)
                assert r.status_code == 202, r.text
                return str(r.json()["id"])

            ids = {
                "fields": submit(
                    [field_png(1), field_png(2)], accession_id=ACCESSIONS["fields"], options={"explain": True}
                ),
                "cells": submit(
                    [cell_png(c, k) for k, c in enumerate(("BLA", "PMO", "LYT", "EBO", "MON", "BLA"))],
                    accession_id=ACCESSIONS["cells"],
                    input="cells",
                ),
            }  # fmt: skip
            r = lis.post(
                "/v1/slides",
                json={
                    "accession_id": ACCESSIONS["slide"],
                    "specimen_type": "bone_marrow_smear",
                    "stain": "MGG",
                    "slide": {"store": "lab", "path": "small.tiff", "cell_target": 60},
                },
            )
            assert r.status_code == 202, r.text
            ids["slide"] = r.json()["id"]
            for kind, aid in ids.items():
                body = wait_status(lis.get, aid, key, timeout=120)
                assert body["status"] in ("succeeded", "abstained"), body
                assert body["result"]["input"] == kind, body["result"]["input"]
                s.cases[kind] = body
        yield s
    finally:
        proc.stop()
        hooks.close()


def new_context(browser: Any, **options: Any) -> Any:
    """A browser context whose script errors are kept in `context.script_errors` (the
    tests assert there are none: a broken script leaves a page that looks fine)."""
    context = browser.new_context(viewport={"width": 1366, "height": 768}, **options)
    context.script_errors = []
    context.on("weberror", lambda e: context.script_errors.append(str(e.error)))
    return context


def login(context: Any, url: str, username: str = "dr.meyer") -> Any:
    """A page of `context`, logged in through the login form."""
    page = context.new_page()
    page.goto(f"{url}/review/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{url}/review/")
    return page
