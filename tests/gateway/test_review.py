"""The review app over real HTTP: a real gateway process (FakeModelClients for the models),
reviewer accounts made with the real CLI, logins, the worklist, a case's gallery and crops,
relabelling with CSRF and optimistic locking, sign-out and reopening, tenant isolation,
throttling and session expiry. Every refused change is checked to have changed nothing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from marrowscope.paths import PROJECT_ROOT
from services.gateway.review.accounts import LoginThrottle
from tests.conftest import free_port
from tests.gateway.conftest import create_key_cli, files, meta, png, settings_env, wait_status
from tests.gateway.mllp_server import MllpServer
from tests.gateway.pdfkeys import PASSWORD as PDF_KEY_PASSWORD
from tests.gateway.pdfkeys import make_p12, signature_status

PASSWORD = "correct horse battery"


def users_cli(env: dict[str, str], *argv: str, password: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "services.gateway", "users", *argv],
        env={**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)},
        cwd=PROJECT_ROOT,
        input=(password + "\n") if password is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def lis_mllp():
    with MllpServer() as server:
        yield server


@pytest.fixture(scope="module")
def app(tmp_path_factory, lis_mllp):
    from tests.gateway.conftest import GatewayProcess

    root = tmp_path_factory.mktemp("review")
    lab_cert = make_p12(root / "lab.p12")
    env = settings_env(
        root / "gw",
        MS_TEST_FAKE_CELLS="12",
        MS_GATEWAY_MIN_CELLS="5",
        MS_GATEWAY_REVIEW_COOKIE_SECURE="false",
        MS_GATEWAY_REVIEW_SESSION_TTL_S="600",
        MS_GATEWAY_HL7_DESTINATIONS=json.dumps(
            {"default": {"host": "127.0.0.1", "port": lis_mllp.port}}
        ),
        MS_GATEWAY_PDF_SIGNING_P12=str(root / "lab.p12"),
        MS_GATEWAY_PDF_SIGNING_PASSWORD=PDF_KEY_PASSWORD,
    )
    for name, tenant in (("dr.meyer", "default"), ("dr.other", "site-b")):
        out = users_cli(
            env,
            "add",
            "--username",
            name,
            "--name",
            name.title(),
            "--tenant",
            tenant,
            "--password-stdin",
            password=PASSWORD,
        )
        assert out.returncode == 0, out.stderr
    proc = GatewayProcess(env, free_port(), log=root / "gateway.log")
    try:
        proc.wait_healthy()
        key = {"X-API-Key": create_key_cli(env)}
        with httpx.Client(base_url=proc.url, timeout=60) as lis:
            r = lis.post(
                "/v1/analyses",
                files=files(png(160, 120, 1), png(160, 120, 2), metadata=meta(accession_id="R-1")),
                headers=key,
            )
            assert r.status_code == 202, r.text
            body = wait_status(lis.get, r.json()["id"], key)
            assert body["status"] == "succeeded", body
        body["lis_key"] = key
        body["lab_cert"] = lab_cert
        yield proc, env, body
    finally:
        proc.stop()


@contextlib.contextmanager
def login(url: str, username: str = "dr.meyer", password: str = PASSWORD) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/review/login", data={"username": username, "password": password})
        assert r.status_code == 303, r.text
        yield client


def csrf_and_revision(page: str) -> tuple[str, int]:
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    revision = re.search(r'name="revision" value="(\d+)"', page)
    assert csrf and revision, page[:500]
    return csrf.group(1), int(revision.group(1))


def reviewed_count(page: str, code: str) -> int:
    row = re.search(rf"</span>{code}</th>\s*<td>(\d+) [^<]*</td>\s*<td[^>]*>(\d+) ", page)
    return int(row.group(2)) if row else 0


def test_users_cli_refuses_weak_passwords_and_never_lists_hashes(app) -> None:
    _, env, _ = app
    weak = users_cli(env, "add", "--username", "dr.weak", "--password-stdin", password="short")
    assert weak.returncode == 2 and "12 characters" in weak.stderr
    taken = users_cli(env, "add", "--username", "dr.meyer", "--password-stdin", password=PASSWORD)
    assert taken.returncode == 2 and "exists already" in taken.stderr
    listed = users_cli(env, "list")
    assert listed.returncode == 0 and "dr.meyer" in listed.stdout and "dr.weak" not in listed.stdout
    assert "$argon2" not in listed.stdout


def test_login_sets_a_strict_http_only_session_cookie(app) -> None:
    proc, _, _ = app
    with httpx.Client(base_url=proc.url, timeout=60) as anon:
        assert anon.get("/review/").headers["location"] == "/review/login"
        wrong = anon.post("/review/login", data={"username": "dr.meyer", "password": "nope" * 4})
        assert wrong.status_code == 401 and "wrong username or password" in wrong.text
        ok = anon.post("/review/login", data={"username": "dr.meyer", "password": PASSWORD})
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/review" in cookie


def test_worklist_shows_the_tenant_s_cases_only(app) -> None:
    proc, _, body = app
    with login(proc.url) as me:
        page = me.get("/review/").text
        assert "R-1" in page and f"/review/cases/{body['id']}" in page
    with login(proc.url, "dr.other") as other:
        assert "R-1" not in other.get("/review/").text
        assert other.get(f"/review/cases/{body['id']}").status_code == 404


def test_case_view_groups_cells_and_serves_their_crops(app) -> None:
    proc, _, body = app
    with login(proc.url) as me:
        page = me.get(f"/review/cases/{body['id']}").text
        ids = re.findall(r'name="cell" value="([\d.]+)"', page)
        n_cells = sum(len(im["cells"]) for im in body["result"]["images"])
        assert len(ids) == n_cells > 0
        assert '<svg class="canvas" viewBox' in page and "data-tip=" in page  # boxes, hover
        crop = me.get(f"/review/cases/{body['id']}/cells/{ids[0]}.png")
        assert crop.status_code == 200
        assert Image.open(io.BytesIO(crop.content)).size[0] > 4
        assert me.get(f"/review/cases/{body['id']}/cells/99.99.png").status_code == 404


def test_relabel_needs_csrf_and_the_current_revision_and_is_audited(app) -> None:
    proc, env, body = app
    case = f"/review/cases/{body['id']}"
    with login(proc.url) as me:
        page = me.get(case).text
        csrf, revision = csrf_and_revision(page)
        cells = re.findall(r'name="cell" value="([\d.]+)"', page)[:2]
        before = reviewed_count(page, "EBO")
        form = {"revision": str(revision), "code": "EBO", "cell": cells}
        assert me.post(f"{case}/relabel", data=form).status_code == 403  # no CSRF token
        assert me.post(f"{case}/relabel", data={**form, "csrf": "forged"}).status_code == 403
        hostile = me.post(
            f"{case}/relabel", data={**form, "csrf": csrf}, headers={"Origin": "https://evil.test"}
        )
        assert hostile.status_code == 403
        assert reviewed_count(me.get(case).text, "EBO") == before, "a refused post changed labels"
        bad = me.post(f"{case}/relabel", data={**form, "csrf": csrf, "code": "XYZ"})
        assert bad.status_code == 400 and "unknown cell type" in bad.text
        missing = me.post(f"{case}/relabel", data={**form, "csrf": csrf, "cell": ["42.0"]})
        assert missing.status_code == 400 and "no cell 42.0" in missing.text
        done = me.post(f"{case}/relabel", data={**form, "csrf": csrf})
        assert done.status_code == 303
        page = me.get(case).text
        assert reviewed_count(page, "EBO") == before + len(cells) - _already(body, cells, "EBO")
        stale = me.post(f"{case}/relabel", data={**form, "csrf": csrf, "code": "LYT"})
        assert stale.status_code == 409 and "another reviewer" in stale.text
        assert csrf_and_revision(me.get(case).text)[1] == revision + 1
    audit = sqlite_rows(env, "select key_name, action, detail from audit_log")
    relabels = [r for r in audit if r[1] == "review.relabel"]
    assert relabels and relabels[-1][0] == "reviewer:dr.meyer"
    assert f"{cells[0]}: " in relabels[-1][2] and "-> EBO" in relabels[-1][2]


def reviewed_total(page: str) -> int:
    found = re.search(r"reviewed: (\d+) counted", page)
    assert found, page[:500]
    return int(found.group(1))


def test_drawn_cells_and_exclusions_change_the_reviewed_count_only(app) -> None:
    """Draw a missed cell, exclude a field and a region, count the field again: the reviewed
    differential follows, the model's stays; bad boxes, labels, images and stale revisions
    are refused with the reason and change nothing; every step is audited."""
    proc, env, body = app
    case = f"/review/cases/{body['id']}"
    model_counted = body["result"]["n_cells_counted"]
    with login(proc.url) as me:
        page = me.get(case).text
        csrf, revision = csrf_and_revision(page)
        start = reviewed_total(page)
        box = {"x1": "10", "y1": "10", "x2": "40", "y2": "42"}
        add = {"csrf": csrf, "revision": str(revision), "image": "0", "code": "BLA", **box}
        for bad, reason in (
            ({"x2": "161"}, "is not inside image 0 (160 x 120 px)"),
            ({"x1": "-1"}, "is not inside image 0"),
            ({"x2": "12"}, "smaller than 4 px"),
            ({"code": "XYZ"}, "unknown cell type"),
            ({"image": "7"}, "no image 7"),
        ):
            refused = me.post(f"{case}/add-cell", data={**add, **bad})
            assert refused.status_code == 400 and reason in refused.text, (bad, refused.text[-800:])
        assert csrf_and_revision(me.get(case).text)[1] == revision, "a refused box was stored"
        assert me.post(f"{case}/add-cell", data=add).status_code == 303
        page = me.get(case).text
        assert reviewed_total(page) == start + 1 and 'value="0.a1"' in page
        assert "drawn BLA" in page
        crop = me.get(f"{case}/cells/0.a1.png")
        assert crop.status_code == 200 and Image.open(io.BytesIO(crop.content)).size[0] > 4
        stale = me.post(f"{case}/add-cell", data=add)
        assert stale.status_code == 409 and "another reviewer" in stale.text

        _, revision = csrf_and_revision(page)
        field1 = [c for c in body["result"]["images"] if c["index"] == 1][0]
        n1 = sum(c.get("cell_type") is not None for c in field1["cells"])
        excl = {"csrf": csrf, "revision": str(revision), "image": "1"}
        partial = me.post(f"{case}/exclude", data={**excl, "x1": "0", "y1": "0"})
        assert partial.status_code == 400 and "all four coordinates" in partial.text
        assert me.post(f"{case}/exclude", data=excl).status_code == 303
        page = me.get(case).text
        assert reviewed_total(page) == start + 1 - n1
        assert f"model: {model_counted} counted" in page, "the model's figure moved"
        _, revision = csrf_and_revision(page)
        twice = me.post(f"{case}/exclude", data={**excl, "revision": str(revision)})
        assert twice.status_code == 400 and "excluded already" in twice.text
        # a region of field 0 around the drawn cell: it leaves the count too
        region = {**excl, "revision": str(revision), "image": "0", **box}
        assert me.post(f"{case}/exclude", data=region).status_code == 303
        page = me.get(case).text
        assert reviewed_total(page) <= start - n1
        _, revision = csrf_and_revision(page)
        ids = re.findall(r'name="exclusion" value="(x\d+)"', page)
        assert ids == ["x1", "x2"]
        for k, xid in enumerate(ids):
            back = {"csrf": csrf, "revision": str(revision + k), "exclusion": xid}
            assert me.post(f"{case}/include", data=back).status_code == 303
        unknown = me.post(
            f"{case}/include", data={"csrf": csrf, "revision": str(revision + 2), "exclusion": "x9"}
        )
        assert unknown.status_code == 400 and "no exclusion x9" in unknown.text
        assert reviewed_total(me.get(case).text) == start + 1
        # the drawn cell is relabelled like any other; ART takes it out of the count
        page = me.get(case).text
        csrf, revision = csrf_and_revision(page)
        form = {"csrf": csrf, "revision": str(revision), "code": "ART", "cell": ["0.a1"]}
        assert me.post(f"{case}/relabel", data=form).status_code == 303
        assert reviewed_total(me.get(case).text) == start
    actions = [
        (a, d)
        for _, a, d in sqlite_rows(env, "select key_name, action, detail from audit_log")
        if a in ("review.add_cell", "review.exclude", "review.include")
    ]
    assert actions[0][0] == "review.add_cell" and "0.a1: none -> BLA at image 0" in actions[0][1]
    n_all = len(field1["cells"])
    assert ("review.exclude", f"x1: counted -> excluded: image 1 ({n_all} cells)") in actions
    assert [a for a, _ in actions].count("review.include") == 2
    assert all("R-1" not in d for _, d in actions), "the accession in the audit detail"


def test_a_field_s_boxes_are_marked_complete_cleared_and_audited(app) -> None:
    """The boxes-complete mark of a field: CSRF, the current revision, the tenant, a field
    that is not excluded, the JSON report's review block; editing a cell keeps it, clearing
    it is its own audited action, and a signed-out case refuses both until reopened. A case
    of its own, so the other tests' sign-outs and amendments do not meet it."""
    proc, env, body = app
    key = body["lis_key"]
    with httpx.Client(base_url=proc.url, timeout=60) as lis:
        r = lis.post(
            "/v1/analyses",
            files=files(png(160, 120, 3), png(160, 120, 4), metadata=meta(accession_id="R-2")),
            headers=key,
        )
        assert r.status_code == 202, r.text
        aid = wait_status(lis.get, r.json()["id"], key)["id"]

        def complete_images() -> list[int]:
            report = lis.get(f"/v1/analyses/{aid}/report", headers=key).json()
            return report["review"]["complete_images"]

        case = f"/review/cases/{aid}"
        with login(proc.url) as me:
            page = me.get(case).text
            assert (
                page.count(f'action="{case}/mark-complete"') == 2 and "clear-complete" not in page
            )
            csrf, revision = csrf_and_revision(page)
            form = {"csrf": csrf, "revision": str(revision), "image": "0"}
            assert (
                me.post(f"{case}/mark-complete", data={**form, "csrf": "forged"}).status_code == 403
            )
            nowhere = me.post(f"{case}/mark-complete", data={**form, "image": "7"})
            assert nowhere.status_code == 400 and "no image 7" in nowhere.text
            with login(proc.url, "dr.other") as other:
                theirs = re.search(r'name="csrf" value="([^"]+)"', other.get("/review/").text)
                assert theirs is not None
                foreign = other.post(
                    f"{case}/mark-complete", data={**form, "csrf": theirs.group(1)}
                )
                assert foreign.status_code == 404
            assert complete_images() == [], "a refused mark was stored"
            assert me.post(f"{case}/mark-complete", data=form).status_code == 303
            page = me.get(case).text
            assert "boxes complete</strong> (by dr.meyer)" in page
            assert f'action="{case}/clear-complete"' in page
            assert complete_images() == [0]
            stale = me.post(f"{case}/mark-complete", data={**form, "image": "1"})
            assert stale.status_code == 409 and "another reviewer" in stale.text
            form["revision"] = str(revision + 1)
            twice = me.post(f"{case}/mark-complete", data=form)
            assert twice.status_code == 400 and "marked complete already" in twice.text
            # an excluded field cannot be marked; relabelling a cell keeps the mark
            excl = {"csrf": csrf, "revision": str(revision + 1), "image": "1"}
            assert me.post(f"{case}/exclude", data=excl).status_code == 303
            excluded = me.post(
                f"{case}/mark-complete", data={**excl, "revision": str(revision + 2)}
            )
            assert excluded.status_code == 400 and "is excluded" in excluded.text
            relabel = {"csrf": csrf, "revision": str(revision + 2), "code": "ART", "cell": ["0.0"]}
            assert me.post(f"{case}/relabel", data=relabel).status_code == 303
            assert complete_images() == [0]
            # clearing it: once, then there is nothing to clear
            form["revision"] = str(revision + 3)
            assert me.post(f"{case}/clear-complete", data=form).status_code == 303
            assert complete_images() == [] and "clear-complete" not in me.get(case).text
            form["revision"] = str(revision + 4)
            gone = me.post(f"{case}/clear-complete", data=form)
            assert gone.status_code == 400 and "not marked complete" in gone.text
            # a signed-out case: neither until it is reopened
            assert me.post(f"{case}/mark-complete", data=form).status_code == 303
            signed = {"csrf": csrf, "revision": str(revision + 5), "comment": ""}
            assert me.post(f"{case}/sign-out", data=signed).status_code == 303
            form["revision"] = str(revision + 6)
            assert "clear-complete" not in me.get(case).text, "a control on a signed-out case"
            frozen = me.post(f"{case}/clear-complete", data=form)
            assert frozen.status_code == 400 and "reopen" in frozen.text
            assert complete_images() == [0]
    actions = [
        (k, a, d)
        for k, a, d in sqlite_rows(env, "select key_name, action, detail from audit_log")
        if a in ("review.mark_complete", "review.clear_complete") and d.startswith("image ")
    ]
    assert [a for _, a, _ in actions][-3:] == [
        "review.mark_complete",
        "review.clear_complete",
        "review.mark_complete",
    ]
    assert actions[-3][0] == "reviewer:dr.meyer"
    assert actions[-3][2].startswith("image 0: boxes incomplete -> complete (")
    assert actions[-2][2] == "image 0: boxes complete -> incomplete"
    assert all("R-2" not in d for _, _, d in actions), "the accession in the audit detail"


def _already(body: dict, cell_ids: list[str], code: str) -> int:
    n = 0
    for cid in cell_ids:
        i, j = (int(x) for x in cid.split("."))
        image = next(im for im in body["result"]["images"] if im["index"] == i)
        n += image["cells"][j].get("cell_type") == code
    return n


def sqlite_rows(env: dict[str, str], sql: str) -> list[tuple]:
    import sqlite3
    from pathlib import Path

    db = Path(env["MS_GATEWAY_DATA_DIR"]) / "gateway.db"
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql))


def test_sign_out_freezes_the_case_until_reopened_with_a_reason(app) -> None:
    proc, _, body = app
    case = f"/review/cases/{body['id']}"
    with login(proc.url) as me:
        csrf, revision = csrf_and_revision(me.get(case).text)
        signed = me.post(
            f"{case}/sign-out", data={"csrf": csrf, "revision": revision, "comment": "agree"}
        )
        assert signed.status_code == 303
        page = me.get(case).text
        assert "signed out" in page and "Dr.Meyer" in page and "agree" in page
        cells = re.findall(r'name="cell" value="([\d.]+)"', page)[:1]
        _, revision = csrf_and_revision(page)
        frozen = me.post(
            f"{case}/relabel",
            data={"csrf": csrf, "revision": revision, "code": "BLA", "cell": cells},
        )
        assert frozen.status_code == 400 and "reopen" in frozen.text
        no_reason = me.post(f"{case}/reopen", data={"csrf": csrf, "revision": revision})
        assert no_reason.status_code == 400 and "needs a reason" in no_reason.text
        reopened = me.post(
            f"{case}/reopen", data={"csrf": csrf, "revision": revision, "reason": "recount"}
        )
        assert reopened.status_code == 303
        assert "amendment 1" in me.get(case).text
        with login(proc.url) as other_tab:  # a second session of the same reviewer works too
            assert other_tab.get(case).status_code == 200


def _obr25(message: str) -> str:
    obr = next(seg for seg in message.split("\r") if seg.startswith("OBR|"))
    return obr.split("|")[25]


def _wait_messages(lis: MllpServer, n: int) -> list[str]:
    deadline = time.monotonic() + 120
    while len(lis.messages()) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(lis.messages()) >= n, lis.messages()
    return lis.messages()


def _signatures(pdf: bytes) -> list:
    from pyhanko.pdf_utils.reader import PdfFileReader

    return list(PdfFileReader(io.BytesIO(pdf)).embedded_signatures)


def amended_signature_expected(page: str) -> bool:
    """True once the case was signed out before (an earlier test): its report is signed."""
    return "signed out by" in page.lower()


def test_sign_out_reaches_the_reports_and_the_lis(app, lis_mllp) -> None:
    """Preliminary until signed out; then FHIR `final` with the reviewer as interpreter and
    verifier, the PDF says who signed, and the LIS gets an ORU^R01 with result status F;
    an amendment gives `amended` and C. Each message arrives after the one before."""
    from fhir.resources.R4B.bundle import Bundle

    proc, _, body = app
    aid, key = body["id"], body["lis_key"]
    case = f"/review/cases/{aid}"
    with httpx.Client(base_url=proc.url, headers=key, timeout=120) as lis_api:

        def fhir_report() -> dict:
            bundle = lis_api.get(f"/v1/analyses/{aid}/report", params={"format": "fhir"}).json()
            Bundle.model_validate(bundle)
            return next(
                e["resource"]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "DiagnosticReport"
            )

        with login(proc.url) as me:
            csrf, revision = csrf_and_revision(me.get(case).text)
            if "signed out by" in me.get(case).text.lower():  # an earlier test's sign-out
                me.post(f"{case}/reopen", data={"csrf": csrf, "revision": revision, "reason": "x"})
                csrf, revision = csrf_and_revision(me.get(case).text)
            assert fhir_report()["status"] == "preliminary"
            if not amended_signature_expected(me.get(case).text):
                preliminary = lis_api.get(f"/v1/analyses/{aid}/report", params={"format": "pdf"})
                assert not _signatures(preliminary.content), "a preliminary report is never signed"
            first = _wait_messages(lis_mllp, 1)
            assert _obr25(first[0]) == "P"
            amended_before = "amendment" in me.get(case).text
            signed = me.post(
                f"{case}/sign-out",
                data={"csrf": csrf, "revision": revision, "comment": "morphology agrees"},
            )
            assert signed.status_code == 303
        report = fhir_report()
        assert report["status"] == ("amended" if amended_before else "final")
        assert report["resultsInterpreter"][0]["display"] == "Dr.Meyer"
        assert "morphology agrees" in report["conclusion"]
        pdf = lis_api.get(f"/v1/analyses/{aid}/report", params={"format": "pdf"}).content
        assert pdf.startswith(b"%PDF")
        sig, status = signature_status(pdf, body["lab_cert"])  # the lab's PAdES signature
        assert status.intact and status.valid and status.trusted
        assert "Dr.Meyer" in str(sig.sig_object["/Reason"])
        if shutil.which("pdftotext"):  # poppler-utils (make sysdeps); PDF text checked if there
            text = subprocess.run(
                ["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True
            ).stdout.decode()
            assert "Dr.Meyer" in text and "morphology agrees" in text
        # at least once, in order: wait for the sign-out's message, whatever came before it
        # (an earlier test's sign-out, a resent message)
        expected = "C" if amended_before else "F"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
            _obr25(m) == expected for m in lis_mllp.messages()
        ):
            time.sleep(0.2)
        statuses = [_obr25(m) for m in lis_mllp.messages()]
        assert expected in statuses, statuses
        assert statuses[0] == "P", "the first message of a case must be preliminary"


def test_logout_ends_the_session_server_side(app) -> None:
    proc, _, _ = app
    with login(proc.url) as me:
        token = me.cookies.get("ms_review")
        csrf = re.search(r'name="csrf" value="([^"]+)"', me.get("/review/").text)
        assert csrf is not None
        assert me.post("/review/logout", data={"csrf": csrf.group(1)}).status_code == 303
    with httpx.Client(base_url=proc.url, cookies={"ms_review": token}, timeout=60) as replay:
        assert replay.get("/review/").status_code == 303, "a logged-out token still works"


def test_failed_logins_are_throttled_per_username_and_per_address() -> None:
    throttle = LoginThrottle(limit=3, window_s=60)
    for _ in range(3):
        throttle.failed(username="a", address="10.0.0.1")
    assert throttle.wait_s(username="a", address="10.0.0.9") > 0  # the account, anywhere
    assert throttle.wait_s(username="b", address="10.0.0.1") > 0  # the address, any account
    assert throttle.wait_s(username="b", address="10.0.0.9") == 0  # nobody else


def test_a_throttled_login_is_refused_even_with_the_right_password(tmp_path) -> None:
    from tests.gateway.conftest import GatewayProcess

    env = settings_env(
        tmp_path / "gw",
        MS_GATEWAY_REVIEW_COOKIE_SECURE="false",
        MS_GATEWAY_REVIEW_LOGIN_FAILURES="2",
        MS_GATEWAY_REVIEW_SESSION_TTL_S="1",
    )
    added = users_cli(env, "add", "--username", "dr.t", "--password-stdin", password=PASSWORD)
    assert added.returncode == 0, added.stderr
    proc = GatewayProcess(env, free_port())
    try:
        proc.wait_healthy()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            # the session lives 1 s: it ends on its own (checked server-side)
            me = c.post("/review/login", data={"username": "dr.t", "password": PASSWORD})
            assert me.status_code == 303
            deadline = time.monotonic() + 60
            while c.get("/review/").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.get("/review/").headers.get("location") == "/review/login"
            for _ in range(2):
                c.post("/review/login", data={"username": "dr.t", "password": "wrong" * 3})
            r = c.post("/review/login", data={"username": "dr.t", "password": PASSWORD})
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    finally:
        proc.stop()
