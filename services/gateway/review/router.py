"""The review app's pages under `/review`: login, the worklist, a case with its cell gallery,
and the reviewer's actions (relabel cells, draw a missed cell, exclude and count again,
mark a field's boxes complete and clear that, sign out, reopen).

Server-rendered (Jinja2 templates beside this module, one small stylesheet and script in
`static/`, no build step). Authentication is a server-side session cookie
(`accounts.open_session`): HttpOnly, SameSite=Strict, Secure unless the deployment turns
it off for plain-HTTP development, expiring with the session. Every POST carries the
session's CSRF token; a POST with an `Origin` header from another origin is refused too.
No patient data goes into a URL: cases are addressed by the analysis id only, and the
accession is shown on the page, never put in a query string by the app.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import UnaryExpression, func, select
from sqlalchemy.orm import Session

from marrowscope.deepzoom import MAX_OVERLAP, MAX_TILE_SIZE, MIN_TILE_SIZE
from marrowscope.taxonomy import CELL_TYPES, COUNTED_CODES
from services.gateway import store
from services.gateway.container import Services
from services.gateway.db import Analysis, CaseReview, Reviewer
from services.gateway.errors import ApiError
from services.gateway.review import accounts, cases, media, oidc, zoom
from services.gateway.review.cells import (
    CellView,
    complete_from,
    differential_of,
    exclusions_from,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "ms_review"
PAGE_SIZE = 25
SORTS: dict[str, UnaryExpression[Any]] = {
    "newest": Analysis.created_at.desc(),
    "oldest": Analysis.created_at.asc(),
    "accession": Analysis.accession.asc(),
}
TYPE_COLOURS = {
    "BLA": "#d62728",
    "PMO": "#ff7f0e",
    "MYB": "#bcbd22",
    "MMZ": "#8c564b",
    "NGB": "#e377c2",
    "NGS": "#9467bd",
    "EOS": "#f7b6d2",
    "BAS": "#17becf",
    "MON": "#2ca02c",
    "LYT": "#1f77b4",
    "PLM": "#aec7e8",
    "EBO": "#98df8a",
    "RBC": "#c7c7c7",
    "KSC": "#7f7f7f",
    "PLT": "#dbdb8d",
    "ART": "#525252",
    "NIF": "#9edae5",
}
"""One colour per taxonomy code, shared by the gallery, the legend and the field overlays."""


class ReviewSettings(BaseSettings):
    """The review app's settings; each field reads `MS_GATEWAY_REVIEW_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="MS_GATEWAY_REVIEW_", extra="ignore")

    enabled: bool = True
    """Serve the review app at /review."""
    session_ttl_s: float = 8 * 3600.0
    """A login lasts this long (a working day), then the reviewer logs in again."""
    cookie_secure: bool = True
    """Send the session cookie over HTTPS only; false only for plain-HTTP development."""
    login_failures: int = 5
    """Failed logins allowed per username and, separately, per address within the window."""
    login_window_s: float = 300.0
    tile_size: int = Field(254, ge=MIN_TILE_SIZE, le=MAX_TILE_SIZE)
    """Deep-zoom tile side in pixels (slide cases), without the overlap."""
    tile_overlap: int = Field(1, ge=0, le=MAX_OVERLAP)
    tile_format: Literal["jpeg", "png"] = "jpeg"
    tile_quality: int = Field(85, ge=30, le=95)
    """JPEG quality of the tiles."""
    tile_max_age_s: int = Field(3600, ge=0)
    """How long a browser keeps a tile (privately) before revalidating it."""

    oidc_issuer: str = ""
    """An OpenID Connect issuer URL turns on "log in with single sign-on" beside local logins."""
    oidc_client_id: str = ""
    oidc_client_secret: SecretStr = SecretStr("")
    oidc_scopes: str = "openid profile email"
    oidc_tenant_claim: str = "tenant"
    """The ID token claim that holds the reviewer's tenant (a dotted path reaches nested ones)."""
    oidc_role_claim: str = "roles"
    """The claim that holds the person's roles (a list, or a space/comma separated string)."""
    oidc_review_role: str = "review"
    """The role (in `oidc_role_claim`) that lets a person review; without it they are refused."""
    oidc_admin_role: str = ""
    """The role that makes a reviewer an admin (every tenant's cases); empty: none does."""
    oidc_redirect_uri: str = ""
    """The callback URL registered at the provider; empty: this request's origin +
    /review/oidc/callback (set it behind a TLS-terminating proxy)."""
    oidc_name: str = "single sign-on"
    """How the login page names the provider ("Log in with ...")."""

    @model_validator(mode="after")
    def _oidc_complete(self) -> "ReviewSettings":
        if self.oidc_issuer and not (
            self.oidc_client_id and self.oidc_client_secret.get_secret_value()
        ):
            raise ValueError(
                "MS_GATEWAY_REVIEW_OIDC_ISSUER needs MS_GATEWAY_REVIEW_OIDC_CLIENT_ID and "
                "MS_GATEWAY_REVIEW_OIDC_CLIENT_SECRET"
            )
        return self

    def oidc(self) -> oidc.OidcConfig | None:
        if not self.oidc_issuer:
            return None
        return oidc.OidcConfig(
            issuer=self.oidc_issuer,
            client_id=self.oidc_client_id,
            client_secret=self.oidc_client_secret,
            scopes=self.oidc_scopes,
            tenant_claim=self.oidc_tenant_claim,
            role_claim=self.oidc_role_claim,
            review_role=self.oidc_review_role,
            admin_role=self.oidc_admin_role,
            redirect_uri=self.oidc_redirect_uri,
            name=self.oidc_name,
        )

    def tiles(self) -> zoom.TileSettings:
        return zoom.TileSettings(
            tile_size=self.tile_size,
            overlap=self.tile_overlap,
            format=self.tile_format,
            quality=self.tile_quality,
            max_age_s=self.tile_max_age_s,
        )


def _page_context(request: Request, **values: Any) -> dict[str, Any]:
    return {"request": request, "colours": TYPE_COLOURS, **values}


class _LoginRequired(Exception):
    """A form posted without a live session (it expired, or the reviewer logged out in
    another tab): the browser goes to the login page, told that nothing was saved."""


def build_router(services: Services, settings: ReviewSettings) -> APIRouter:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    throttle = accounts.LoginThrottle(settings.login_failures, settings.login_window_s)
    router = APIRouter(prefix="/review", include_in_schema=False)

    def current(request: Request) -> accounts.ActiveSession:
        with services.sessions() as session:
            active = accounts.resolve_session(session, request.cookies.get(COOKIE))
        if active is None:
            raise ApiError(401, "unauthenticated", "log in at /review/login")
        return active

    def acting(request: Request) -> accounts.ActiveSession:
        with services.sessions() as session:
            active = accounts.resolve_session(session, request.cookies.get(COOKIE))
        if active is None:
            raise _LoginRequired
        return active

    Acting = Annotated[accounts.ActiveSession, Depends(acting)]

    def page_session(request: Request) -> accounts.ActiveSession | None:
        with services.sessions() as session:
            return accounts.resolve_session(session, request.cookies.get(COOKIE))

    MaybeActive = Annotated[accounts.ActiveSession | None, Depends(page_session)]
    to_login = RedirectResponse("/review/login", status_code=303)

    def same_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise ApiError(403, "forbidden", "cross-origin form posts are refused")

    def checked(active: accounts.ActiveSession, request: Request, token: str | None) -> None:
        same_origin(request)
        if not accounts.csrf_ok(active.csrf_token, token):
            raise ApiError(403, "csrf_failed", "the form's CSRF token is missing or wrong")

    oidc_config = settings.oidc()
    sso = oidc_config.name if oidc_config else None

    def render(name: str, request: Request, status: int = 200, **values: Any) -> HTMLResponse:
        context = _page_context(request, sso=sso, **values)
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            f"default-src 'self'; style-src 'self' '{zoom.OSD_STYLE_HASH}'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'"
        )
        return response

    type_css = "\n".join(
        f".t-{code} {{ background: {colour}; }}\n.s-{code} {{ stroke: {colour}; }}"
        for code, colour in TYPE_COLOURS.items()
    )

    @router.get("/types.css")
    def types_css() -> Response:
        """The type colours as classes: the page's CSP allows no inline styles."""
        return Response(type_css, media_type="text/css")

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, expired: bool = False) -> Response:
        notice = "Your session ended: log in again. The change you sent was not saved."
        return render("login.html", request, notice=notice if expired else None)

    @router.post("/login", response_class=HTMLResponse)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=128)],
        password: Annotated[str, Form(max_length=1024)],
    ) -> Response:
        same_origin(request)
        address = request.client.host if request.client else "unknown"
        wait = throttle.wait_s(username=username, address=address)
        if wait > 0:
            response = render(
                "login.html",
                request,
                status=429,
                error=f"too many failed logins: try again in {int(wait) + 1} s",
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        with services.sessions() as session, session.begin():
            who = accounts.authenticate(session, username=username, password=password)
            if who is None:
                throttle.failed(username=username, address=address)
                log.info("review login failed")  # no username: it may be a mistyped password
                return render("login.html", request, status=401, error="wrong username or password")
            opened = signed_in(session, who, "password")
        return with_session(RedirectResponse("/review/", status_code=303), opened)

    def signed_in(
        session: Session, who: accounts.ReviewerIdentity, method: str
    ) -> accounts.LoginSession:
        """A session for `who`, audited as a login (in the caller's transaction)."""
        opened = accounts.open_session(session, reviewer_id=who.id, ttl_s=settings.session_ttl_s)
        store.audit(
            session,
            key_id=None,
            key_name=f"reviewer:{who.username}",
            tenant=who.tenant,
            action="review.login",
            detail=method,
        )
        return opened

    def with_session(response: Response, opened: accounts.LoginSession) -> Response:
        response.set_cookie(
            COOKIE,
            opened.token,
            max_age=int(settings.session_ttl_s),
            httponly=True,
            secure=settings.cookie_secure,
            samesite="strict",
            path="/review",
        )
        return response

    @router.post("/logout")
    def logout(
        request: Request, active: Acting, csrf: Annotated[str | None, Form()] = None
    ) -> Response:
        checked(active, request, csrf)
        with services.sessions() as session, session.begin():
            accounts.close_session(session, active.token_hash)
        response = RedirectResponse("/review/login", status_code=303)
        response.delete_cookie(COOKIE, path="/review")
        return response

    @router.get("/", response_class=HTMLResponse)
    def worklist(
        request: Request,
        active: MaybeActive,
        status: str = "",
        review: str = "",
        sort: str = "newest",
        page: int = 1,
    ) -> Response:
        if active is None:
            return to_login
        who = active.reviewer
        page = max(1, page)
        with services.sessions() as session:
            q = select(Analysis, CaseReview).outerjoin(
                CaseReview, CaseReview.analysis_id == Analysis.id
            )
            if who.visible_tenant is not None:
                q = q.where(Analysis.tenant == who.visible_tenant)
            if status:
                q = q.where(Analysis.status == status)
            if review == "signed_out":
                q = q.where(CaseReview.state == "signed_out")
            elif review == "open":
                q = q.where((CaseReview.state.is_(None)) | (CaseReview.state != "signed_out"))
            total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = session.execute(
                q.order_by(SORTS.get(sort, SORTS["newest"]), Analysis.id)
                .limit(PAGE_SIZE)
                .offset((page - 1) * PAGE_SIZE)
            ).all()
            items = [_row(session, a, r) for a, r in rows]
        return render(
            "worklist.html",
            request,
            who=who,
            csrf=active.csrf_token,
            items=items,
            total=total,
            page=page,
            pages=max(1, -(-total // PAGE_SIZE)),
            filters={"status": status, "review": review, "sort": sort},
        )

    def load_case(
        active: accounts.ActiveSession, analysis_id: str
    ) -> tuple[Analysis, dict[str, Any]]:
        with services.sessions() as session:
            a = store.get_analysis(
                session, analysis_id=analysis_id, tenant=active.reviewer.visible_tenant
            )
            if a is None:
                raise ApiError(404, "not_found", f"no analysis {analysis_id}")
            result = store.result_of(session, analysis_id=a.id)
        if result is None or a.status not in cases.REVIEWABLE_STATUSES:
            raise ApiError(409, "not_reviewable", f"analysis {a.id} is {a.status}: no result yet")
        return a, result

    def case_page(
        request: Request,
        active: accounts.ActiveSession,
        analysis_id: str,
        *,
        error: str = "",
        status: int = 200,
        sort: str = "confidence",
    ) -> HTMLResponse:
        a, result = load_case(active, analysis_id)
        with services.sessions() as session:
            review = cases.review_of(session, a.id)
            signer = session.get(Reviewer, review.signed_by) if review.signed_by else None
        cells = cases.case_cells(review, result)

        def key(c: CellView) -> float:
            if sort == "importance":
                return -(c.attention or c.importance or 0.0)
            return c.confidence if c.confidence is not None else 2.0

        groups: dict[str, list[CellView]] = {}
        for cell in sorted(cells, key=key):
            groups.setdefault(cell.code or "unclassified", []).append(cell)
        order = [c.code for c in CELL_TYPES] + ["unclassified"]
        by_image: dict[int, list[CellView]] = {}
        for cell in cells:
            by_image.setdefault(cell.image, []).append(cell)
        return render(
            "case.html",
            request,
            status=status,
            who=active.reviewer,
            csrf=active.csrf_token,
            analysis=a,
            result=result,
            review=review,
            signer=signer.display_name if signer else None,
            groups=[(code, groups[code]) for code in order if code in groups],
            counted_codes=COUNTED_CODES,
            cell_types=CELL_TYPES,
            model_diff=differential_of(cells, reviewed=False),
            reviewed_diff=differential_of(cells, reviewed=True),
            cells_by_image=by_image,
            exclusions=exclusions_from(review.excluded_json),
            complete={m.image: m for m in complete_from(review.complete_json)},
            n_corrected=len(cases.labels_of(review)),
            n_added=sum(c.added for c in cells),
            n_excluded=sum(c.excluded for c in cells),
            n_reviewed_counted=sum(c.counted for c in cells),
            has_heatmap=any(im.get("heatmap_sha256") for im in result.get("images", [])),
            error=error,
            sort=sort,
        )

    @router.get("/cases/{analysis_id}", response_class=HTMLResponse)
    def case_view(
        request: Request, active: MaybeActive, analysis_id: str, sort: str = "confidence"
    ) -> Response:
        if active is None:
            return to_login
        return case_page(request, active, analysis_id, sort=sort)

    def act(
        request: Request,
        active: accounts.ActiveSession,
        analysis_id: str,
        csrf: str | None,
        change: Callable[[Session, dict[str, Any]], object],
    ) -> Response:
        """Every review action: CSRF and origin checked, the case loaded (tenant-scoped),
        `change(session, result)` run in one transaction; a refused change re-renders the
        case with the reason (409 stale, 400 otherwise) and saves nothing."""
        try:
            checked(active, request, csrf)
        except ApiError as exc:
            return case_page(
                request,
                active,
                analysis_id,
                error=f"{exc.detail}: reload the page and try again; nothing was saved",
                status=exc.status_code,
            )
        _, result = load_case(active, analysis_id)
        try:
            with services.sessions() as session, session.begin():
                change(session, result)
        except cases.StaleRevision as exc:
            return case_page(request, active, analysis_id, error=str(exc), status=409)
        except cases.ReviewError as exc:
            return case_page(request, active, analysis_id, error=str(exc), status=400)
        return RedirectResponse(f"/review/cases/{analysis_id}", status_code=303)

    @router.post("/cases/{analysis_id}/relabel")
    def relabel(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        code: Annotated[str, Form(max_length=8)],
        cells_: Annotated[list[str], Form(alias="cell")] = [],  # noqa: B006 (FastAPI form)
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, result: cases.relabel(
                s,
                analysis_id=analysis_id,
                result=result,
                revision=revision,
                cell_ids=cells_,
                code=code,
                who=active.reviewer,
            ),
        )

    @router.post("/cases/{analysis_id}/sign-out")
    def sign_out(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        comment: Annotated[str, Form(max_length=cases.MAX_COMMENT)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, _result: cases.sign_out(
                s,
                analysis_id=analysis_id,
                revision=revision,
                comment=comment,
                who=active.reviewer,
                hl7_tenants=services.settings.hl7_destinations.keys(),
            ),
        )

    @router.post("/cases/{analysis_id}/reopen")
    def reopen(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        reason: Annotated[str, Form(max_length=cases.MAX_COMMENT)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, _result: cases.reopen(
                s, analysis_id=analysis_id, revision=revision, reason=reason, who=active.reviewer
            ),
        )

    @router.post("/cases/{analysis_id}/add-cell")
    def add_cell(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        image: Annotated[int, Form()],
        x1: Annotated[float, Form()],
        y1: Annotated[float, Form()],
        x2: Annotated[float, Form()],
        y2: Annotated[float, Form()],
        code: Annotated[str, Form(max_length=8)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, result: cases.add_cell(
                s,
                analysis_id=analysis_id,
                result=result,
                revision=revision,
                image=image,
                box=(x1, y1, x2, y2),
                code=code,
                who=active.reviewer,
            ),
        )

    @router.post("/cases/{analysis_id}/exclude")
    def exclude(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        image: Annotated[int, Form()],
        x1: Annotated[float | None, Form()] = None,
        y1: Annotated[float | None, Form()] = None,
        x2: Annotated[float | None, Form()] = None,
        y2: Annotated[float | None, Form()] = None,
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """The whole image without a box; a region of it with all four coordinates."""
        corners = (x1, y1, x2, y2)
        given = [v for v in corners if v is not None]
        box = None if not given else tuple(given)

        def change(s: Session, result: dict[str, Any]) -> object:
            if 0 < len(given) < 4:
                raise cases.ReviewError("a region needs all four coordinates x1, y1, x2, y2")
            return cases.exclude(
                s,
                analysis_id=analysis_id,
                result=result,
                revision=revision,
                image=image,
                box=box,
                who=active.reviewer,
            )

        return act(request, active, analysis_id, csrf, change)

    @router.post("/cases/{analysis_id}/include")
    def include(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        exclusion: Annotated[str, Form(max_length=16)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, result: cases.include(
                s,
                analysis_id=analysis_id,
                result=result,
                revision=revision,
                exclusion_id=exclusion,
                who=active.reviewer,
            ),
        )

    @router.post("/cases/{analysis_id}/mark-complete")
    def mark_complete(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        image: Annotated[int, Form()],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """The reviewer's word that every cell of the field is boxed (a detection target)."""
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, result: cases.mark_complete(
                s,
                analysis_id=analysis_id,
                result=result,
                revision=revision,
                image=image,
                who=active.reviewer,
            ),
        )

    @router.post("/cases/{analysis_id}/clear-complete")
    def clear_complete(
        request: Request,
        active: Acting,
        analysis_id: str,
        revision: Annotated[int, Form()],
        image: Annotated[int, Form()],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        return act(
            request,
            active,
            analysis_id,
            csrf,
            lambda s, result: cases.clear_complete(
                s,
                analysis_id=analysis_id,
                result=result,
                revision=revision,
                image=image,
                who=active.reviewer,
            ),
        )

    media.add_routes(router, services, current, load_case)
    if oidc_config is not None:
        oidc.add_routes(
            router,
            oidc.OidcClient(oidc_config),
            services=services,
            render=render,
            signed_in=signed_in,
            with_session=with_session,
            cookie_secure=settings.cookie_secure,
        )
    zoom.add_routes(router, services, current, load_case, settings.tiles())
    return router


def _row(session: Any, a: Analysis, review: CaseReview | None) -> dict[str, Any]:
    result = store.result_of(session, analysis_id=a.id) or {}
    meta = json.loads(a.metadata_json or "{}")
    flags = []
    if a.status == "abstained" and a.reason:
        flags.append(a.reason)
    aml = result.get("aml") or {}
    if aml.get("status") == "abstained":
        flags.append(f"P(AML) withheld: {aml.get('reason')}")
    elif aml.get("status") == "not_available":
        flags.append(f"P(AML) not available: {aml.get('reason')}")
    if result.get("synthetic_stages"):
        flags.append(f"synthetic-trained: {', '.join(result['synthetic_stages'])}")
    genetic = {}
    for target in ("npm1", "apl"):
        call = result.get(f"{target}_morphology") or {}
        if call:
            genetic[target.upper()] = (
                f"{call['p']:.2f}" if call.get("p") is not None else call.get("status", "")
            )
    return {
        "id": a.id,
        "accession": a.accession,
        "status": a.status,
        "input": meta.get("input") or result.get("input") or "fields",
        "p_aml": result.get("p_aml"),
        "genetic": genetic,
        "flags": flags,
        "review": review.state if review else "in_review",
        "amendments": review.amendments if review else 0,
        "created": a.created_at,
    }


def mount(app: Any, services: Services, settings: ReviewSettings | None = None) -> None:
    """Add the review app (its pages, and its static files at /review/static) to `app`."""
    settings = settings or ReviewSettings()
    if not settings.enabled:
        return
    app.mount("/review/static", StaticFiles(directory=str(HERE / "static")), name="review-static")

    async def login_again(_request: Request, _exc: Exception) -> Response:
        return RedirectResponse("/review/login?expired=1", status_code=303)

    app.add_exception_handler(_LoginRequired, login_again)
    app.include_router(build_router(services, settings))
