"""The review app as a hematologist uses it, in Chromium: log in, open a case of each input
kind, hover, toggle the heatmap, reclassify cells, draw a missed cell, sign out; the report,
the webhook and the audit log follow. A second reviewer's stale edit, a forged CSRF token and
an expired session are refused with a message and change nothing; the gallery works from the
keyboard alone; every page fits 1366x768 and axe-core finds no serious violation."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from marrowscope.paths import PROJECT_ROOT
from services.gateway.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.browser.conftest import ACCESSIONS, AXE, Stack, login, new_context
from tests.gateway.conftest import SECRET

pytestmark = pytest.mark.browser


def case_url(stack: Stack, kind: str) -> str:
    return f"{stack.url}/review/cases/{stack.cases[kind]['id']}"


def audit(stack: Stack, kind: str) -> list[dict[str, Any]]:
    """The case's review entries in the audit log, oldest first (through the admin API)."""
    r = httpx.get(f"{stack.url}/v1/audit", params={"limit": 1000}, headers=stack.lis_key)
    assert r.status_code == 200, r.text
    resource = f"analysis:{stack.cases[kind]['id']}"
    return [e for e in reversed(r.json()) if e["resource"] == resource and e["action"] != "report"]


def wait_for(condition: Any, what: str, timeout: float = 60.0, *, page: Any = None) -> Any:
    """Poll `condition` until it is truthy. With `page`, the pauses are the page's own
    (`page.wait_for_timeout`): Playwright's sync API dispatches its events (a `response`
    listener, the page's URL after navigation) only while one of its calls runs, so a
    condition fed by events never changes across `time.sleep`. It passed while the tiles
    arrived during the call before; on a loaded machine they arrived after, and the wait
    timed out with the tiles loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if page is None:
            time.sleep(0.1)
        else:
            page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}")


def posted(page: Any, click: Any) -> int:
    """Click a submit control; the status of the form's POST."""
    with page.expect_response(lambda r: r.request.method == "POST") as response:
        click()
    page.wait_for_load_state()
    return int(response.value.status)


def test_every_page_fits_1366x768_and_passes_axe(browser, stack: Stack, artefacts: Path) -> None:
    # axe-core is injected from the vendored copy: the page's CSP rightly refuses foreign
    # scripts, so this context alone bypasses it
    context = new_context(browser, bypass_csp=True)
    try:
        page = context.new_page()
        page.goto(f"{stack.url}/review/login")
        check_page(page, "login", artefacts)
        page = login(context, stack.url)
        check_page(page, "worklist", artefacts)
        if os.environ.get("MS_REFRESH_SCREENSHOTS"):
            page.screenshot(path=str(PROJECT_ROOT / "docs/screenshots/review-worklist.png"))
        for kind in ("fields", "cells", "slide"):
            assert ACCESSIONS[kind] in page.content(), kind
        for kind in ("fields", "cells", "slide"):
            page.goto(case_url(stack, kind))
            check_page(page, f"case-{kind}", artefacts)
        # what only a case of each kind shows, loaded for real (not a broken image)
        page.goto(case_url(stack, "cells"))
        crops = page.locator("section.crops img")
        assert crops.count() == len(stack.cases["cells"]["result"]["images"])
        assert all(crops.nth(k).evaluate("im => im.complete && im.naturalWidth > 0")
                   for k in range(crops.count()))  # fmt: skip
        page.goto(case_url(stack, "slide"))
        thumb = page.locator("section.slide img.thumb")
        thumb.wait_for()
        wait_for(lambda: thumb.evaluate("im => im.complete && im.naturalWidth > 0"), "thumbnail")
        regions = stack.cases["slide"]["result"]["slide"]["regions"]
        assert page.locator("figure.field").count() == len(regions) >= 1
        assert context.script_errors == []
    finally:
        context.close()


def load_all_images(page: Any) -> None:
    """The gallery's crops load lazily; a full-page screenshot does not scroll, so load them."""
    page.evaluate(
        "document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')"
    )
    page.wait_for_load_state("networkidle")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")


def check_page(page: Any, name: str, artefacts: Path) -> None:
    load_all_images(page)
    wide = page.evaluate(
        """() => {
        const limit = document.documentElement.clientWidth;
        const over = Array.from(document.querySelectorAll('body *'))
          .filter(el => el.getBoundingClientRect().right > limit + 1)
          .map(el => el.tagName + '.' + el.className);
        return {scroll: document.documentElement.scrollWidth, limit, over: over.slice(0, 5)};
        }"""
    )
    page.screenshot(path=str(artefacts / f"{name}.png"), full_page=True)
    assert wide["scroll"] <= wide["limit"], f"{name} overflows horizontally: {wide}"
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate(
        """async () => (await axe.run(document)).violations
            .filter(v => v.impact === 'serious' || v.impact === 'critical')
            .map(v => ({id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))"""
    )
    assert violations == [], f"{name}: {violations}"


def test_review_a_fields_case_and_sign_it_out(browser, stack: Stack, artefacts: Path) -> None:
    context = new_context(browser)
    case = stack.cases["fields"]
    try:
        page = login(context, stack.url)
        page.get_by_role("link", name=ACCESSIONS["fields"]).click()
        page.wait_for_url(case_url(stack, "fields"))
        field0 = page.locator("#field-0 svg.canvas")

        # type and confidence on hover
        field0.evaluate("el => el.scrollIntoView({block: 'start'})")
        box = page.locator("#field-0 rect.box").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        tip = page.locator("#tip")
        tip.wait_for(state="visible")
        assert re.match(r"^[A-Z]{3}( \d\.\d\d)?", tip.inner_text()), tip.inner_text()

        # the occlusion heatmap with its colour scale
        heat = page.locator("#field-0 image.heat")
        assert heat.get_attribute("visibility") == "hidden"
        assert not page.locator("#heatmap-scale").is_visible()
        page.get_by_label("Occlusion heatmap").check()
        assert heat.get_attribute("visibility") == "visible"
        assert page.locator("#heatmap-scale").is_visible()
        png = page.request.get(f"{case_url(stack, 'fields')}/images/0/heatmap.png")
        assert png.status == 200 and png.headers["content-type"] == "image/png"
        page.screenshot(path=str(artefacts / "fields-heatmap.png"), full_page=True)
        page.get_by_label("Occlusion heatmap").uncheck()

        # reclassify two cells as erythroblasts
        cells = page.locator('form.relabel input[name="cell"]')
        chosen = [cells.nth(0).get_attribute("value"), cells.nth(1).get_attribute("value")]
        cells.nth(0).check()
        cells.nth(1).check()
        page.locator("#code").select_option("EBO")
        assert posted(page, lambda: page.locator("#apply").click()) == 303
        assert page.locator(".cell.corrected").count() == 2

        # draw a missed cell on field 0 with the mouse
        field0.evaluate("el => el.scrollIntoView({block: 'start'})")
        frame = field0.bounding_box()
        width = float(field0.get_attribute("data-width"))
        scale = frame["width"] / width
        # around the second nucleated cell the field renderer drew (conftest.field_png)
        page.mouse.move(frame["x"] + 118 * scale, frame["y"] + 58 * scale)
        page.mouse.down()
        page.mouse.move(frame["x"] + 162 * scale, frame["y"] + 102 * scale, steps=5)
        page.mouse.up()
        draw = page.locator("#field-0 form.draw")
        corners = [
            float(draw.locator(f'input[name="{c}"]').input_value())
            for c in ("x1", "y1", "x2", "y2")
        ]
        assert corners == pytest.approx([118, 58, 162, 102], abs=2), corners
        draw.locator('select[name="code"]').select_option("MYB")
        assert (
            posted(page, lambda: draw.get_by_role("button", name="Add missed cell").click()) == 303
        )
        assert page.locator("#field-0 rect.box.drawn").count() == 1
        assert page.locator('input[name="cell"][value="0.a1"]').count() == 1
        assert "0 excluded" in page.locator(".summary").inner_text()

        # every cell of field 0 is boxed now: say so (the script asks first; "no" posts nothing)
        mark = page.locator("#field-0 form.complete-mark").get_by_role(
            "button", name="Mark boxes complete"
        )
        page.once("dialog", lambda dialog: dialog.dismiss())
        mark.click()
        assert page.locator("#field-0.complete").count() == 0
        page.once("dialog", lambda dialog: dialog.accept())
        assert posted(page, mark.click) == 303
        assert page.locator("#field-0.complete").count() == 1
        assert "boxes complete" in page.locator("#field-0 figcaption").inner_text()
        load_all_images(page)
        page.screenshot(path=str(artefacts / "fields-reviewed.png"), full_page=True)
        if os.environ.get("MS_REFRESH_SCREENSHOTS"):  # the docs' pictures (docs/REVIEW.md)
            docs = PROJECT_ROOT / "docs" / "screenshots"
            bottom = page.locator("section.fields").bounding_box()
            top = page.evaluate("window.scrollY")
            page.screenshot(
                path=str(docs / "review-case.png"),
                full_page=True,
                clip={
                    "x": 0,
                    "y": 0,
                    "width": 1366,
                    "height": top + bottom["y"] + bottom["height"],
                },
            )
            page.locator("#gallery").evaluate("el => el.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(docs / "review-gallery.png"))
        # sign out with a comment
        page.locator("#comment").fill("morphology agrees; one myelocyte added")
        assert posted(page, lambda: page.get_by_role("button", name="Sign out").click()) == 303
        assert "signed out" in page.locator("h1 .state").inner_text()
        assert page.locator('form.relabel input[name="cell"]:not([disabled])').count() == 0
        assert context.script_errors == []
    finally:
        context.close()

    # the report is final, with the reviewer as interpreter
    aid = case["id"]
    with httpx.Client(base_url=stack.url, headers=stack.lis_key, timeout=60) as lis:
        report = lis.get(f"/v1/analyses/{aid}/report")
        assert report.status_code == 200 and report.json()["analysis_id"] == aid
        bundle = lis.get(f"/v1/analyses/{aid}/report", params={"format": "fhir"}).json()
    (diagnostic,) = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    ]  # fmt: skip
    assert diagnostic["status"] == "final"
    assert diagnostic["resultsInterpreter"][0]["display"] == "Dr. A. Meyer"
    assert "one myelocyte added" in diagnostic["conclusion"]

    # the LIS's webhook, signed
    def signed_out() -> tuple[dict[str, str], bytes] | None:
        return next(
            ((h, b) for h, b in list(stack.hooks.received)
             if b'"analysis.signed_out"' in b and aid.encode() in b),
            None,
        )  # fmt: skip

    headers, body = wait_for(signed_out, "the sign-out webhook")
    assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])

    # the audit log: who changed what from what to what
    entries = audit(stack, "fields")
    assert all(e["key_name"] == "reviewer:dr.meyer" for e in entries if e["action"] != "submit")
    actions = [e["action"] for e in entries]
    assert actions[-4:] == [
        "review.relabel",
        "review.add_cell",
        "review.mark_complete",
        "review.sign_out",
    ], actions
    relabel = entries[-4]["detail"]
    assert all(f"{c}: " in relabel for c in chosen) and relabel.count("-> EBO") == 2
    assert "0.a1: none -> MYB at image 0" in entries[-3]["detail"]
    assert entries[-2]["detail"].startswith("image 0: boxes incomplete -> complete")
    assert not any(ACCESSIONS["fields"] in (e["detail"] or "") for e in entries)


def test_a_second_reviewer_s_stale_edit_is_refused(browser, stack: Stack) -> None:
    first = new_context(browser)
    second = new_context(browser)
    try:
        a = login(first, stack.url)
        b = login(second, stack.url, "dr.second")
        for page in (a, b):
            page.goto(case_url(stack, "cells"))
        target = a.locator('form.relabel input[name="cell"]').first.get_attribute("value")
        a.locator(f'input[name="cell"][value="{target}"]').check()
        a.locator("#code").select_option("PLM")
        assert posted(a, lambda: a.locator("#apply").click()) == 303
        b.locator(f'input[name="cell"][value="{target}"]').check()
        b.locator("#code").select_option("LYT")
        assert posted(b, lambda: b.locator("#apply").click()) == 409
        assert "another reviewer" in b.get_by_role("alert").inner_text()
        b.goto(case_url(stack, "cells"))
        mine = b.locator(f'label.cell:has(input[value="{target}"]) .meta').inner_text()
        assert mine.endswith("PLM"), mine
        assert first.script_errors == [] and second.script_errors == []
    finally:
        first.close()
        second.close()
    details = [e["detail"] for e in audit(stack, "cells") if e["action"] == "review.relabel"]
    assert any("-> PLM" in d for d in details) and not any("-> LYT" in d for d in details)


def test_forged_csrf_and_an_expired_session_change_nothing(browser, stack: Stack) -> None:
    context = new_context(browser)
    try:
        page = login(context, stack.url)
        page.goto(case_url(stack, "slide"))
        page.evaluate("document.querySelector('form.relabel input[name=csrf]').value = 'forged'")
        page.locator('form.relabel input[name="cell"]').first.check()
        assert posted(page, lambda: page.locator("#apply").click()) == 403
        assert "CSRF token" in page.get_by_role("alert").inner_text()
        assert page.locator(".cell.corrected").count() == 0

        # the session ends server-side (the clock passed its expiry): the next action goes to
        # the login page, which says the change was not saved
        page.goto(case_url(stack, "slide"))
        page.locator('form.relabel input[name="cell"]').first.check()
        stack.sqlite("update review_sessions set expires_at = 0")
        page.locator("#apply").click()
        page.wait_for_url(re.compile(r"/review/login\?expired=1$"))
        assert "was not saved" in page.get_by_role("status").inner_text()
        assert context.script_errors == []
    finally:
        context.close()
    assert not [e for e in audit(stack, "slide") if e["action"].startswith("review.relabel")]


def test_the_gallery_works_from_the_keyboard_alone(browser, stack: Stack) -> None:
    context = new_context(browser)
    try:
        page = login(context, stack.url)
        page.goto(case_url(stack, "cells"))
        focused = "() => { const e = document.activeElement; return [e.className, e.name || ''] }"
        for _ in range(12):  # Tab to the skip link, follow it into the gallery
            page.keyboard.press("Tab")
            if page.evaluate(focused)[0] == "skip":
                break
        page.keyboard.press("Enter")
        for _ in range(12):
            page.keyboard.press("Tab")
            if page.evaluate(focused)[1] == "cell":
                break
        assert page.evaluate(focused)[1] == "cell", "Tab never reached a gallery cell"
        first = page.evaluate("document.activeElement.value")
        page.keyboard.press("Space")
        page.keyboard.press("ArrowRight")
        second = page.evaluate("document.activeElement.value")
        page.keyboard.press("Space")
        assert first != second
        page.keyboard.press("l")
        assert page.evaluate("document.activeElement.id") == "code"
        page.keyboard.type("EBO")
        assert page.locator("#code").input_value() == "EBO"
        with page.expect_response(lambda r: r.request.method == "POST") as response:
            page.keyboard.press("Enter")
        assert response.value.status == 303
        page.wait_for_load_state()
        # A: the focused cell is an artefact
        page.locator('form.relabel input[name="cell"]').last.focus()
        last = page.evaluate("document.activeElement.value")
        with page.expect_response(lambda r: r.request.method == "POST") as response:
            page.keyboard.press("a")
        assert response.value.status == 303
        assert context.script_errors == []
    finally:
        context.close()
    details = [e["detail"] for e in audit(stack, "cells") if e["action"] == "review.relabel"]
    assert f"{first}: " in details[-2] and f"{second}: " in details[-2]
    assert details[-2].count("-> EBO") == 2
    assert details[-1].startswith(f"{last}: ") and details[-1].endswith("-> ART")


def test_the_slide_case_pans_and_zooms_over_the_slide(
    browser, stack: Stack, artefacts: Path
) -> None:
    """Deep zoom under the page's real CSP: the viewer draws tiles from the slide, the regions
    are numbered on it and lead to their cells, the buttons zoom; no script or CSP error."""
    import io

    import numpy as np
    from PIL import Image

    regions = stack.cases["slide"]["result"]["slide"]["regions"]
    context = new_context(browser)
    try:
        page = login(context, stack.url)
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        tiles: list[str] = []
        page.on(
            "response",
            lambda r: tiles.append(r.url) if "/slide_files/" in r.url and r.ok else None,
        )
        page.goto(case_url(stack, "slide"))
        page.wait_for_selector("#slide-viewer[data-ready=true]")
        assert page.locator("#slide-viewer canvas").count() >= 1
        wait_for(lambda: tiles, "the first tiles", page=page)
        marks = page.locator("#slide-viewer .region-mark.on-slide")
        assert marks.count() == len(regions)
        assert marks.first.inner_text().strip() == "1"
        page.wait_for_load_state("networkidle")
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#slide-viewer").screenshot())))
        assert shot[..., :3].std() > 10, "the viewer shows no slide"  # not a blank canvas
        page.screenshot(path=str(artefacts / "case-slide-zoom.png"))

        def deepest() -> int:
            return max(int(re.search(r"/slide_files/(\d+)/", u)[1]) for u in tiles)  # type: ignore[index]

        before = deepest()
        for _ in range(3):
            page.get_by_role("button", name="Zoom in").click()
        wait_for(lambda: deepest() > before, "tiles of a finer level after zooming in", page=page)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(artefacts / "case-slide-zoomed.png"))
        page.get_by_role("button", name="Whole slide").click()
        marks.first.click()
        wait_for(
            lambda: page.url.endswith(f"#field-{regions[0]['index']}"),
            "the region's cells",
            page=page,
        )
        assert context.script_errors == [] and console == [], (context.script_errors, console)
    finally:
        context.close()
