"""OIDC login to the review app, end to end over real HTTP: a real gateway process, a real
OpenID provider on loopback (`oidc_issuer.py`: discovery, authorize, token with PKCE, JWKS,
RS256 ID tokens from a key made for the test), and a client that follows the redirects as a
browser does. Each check of the ID token and of the claims is shown to refuse what it should,
with a clear message and no session."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import GatewayProcess, files, meta, png, settings_env, wait_status
from tests.gateway.oidc_issuer import CLIENT_ID, CLIENT_SECRET, OidcIssuer

PASSWORD = "correct horse battery"
USER = {
    "sub": "u-1",
    "name": "Dr. C. Oidc",
    "preferred_username": "c.oidc",
    "tenant": "default",
    "roles": ["review"],
}


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcIssuer]:
    server = OidcIssuer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, issuer: OidcIssuer) -> Iterator[dict[str, Any]]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from services.gateway.auth import create_key
    from services.gateway.review.accounts import add_reviewer

    root = tmp_path_factory.mktemp("oidc")
    env = settings_env(
        root / "gw",
        MS_TEST_FAKE_CELLS="12",
        MS_GATEWAY_MIN_CELLS="5",
        MS_GATEWAY_REVIEW_COOKIE_SECURE="false",
        MS_GATEWAY_REVIEW_OIDC_ISSUER=issuer.url,
        MS_GATEWAY_REVIEW_OIDC_CLIENT_ID=CLIENT_ID,
        MS_GATEWAY_REVIEW_OIDC_CLIENT_SECRET=CLIENT_SECRET,
        MS_GATEWAY_REVIEW_OIDC_ADMIN_ROLE="marrow-admin",
        MS_GATEWAY_REVIEW_OIDC_NAME="Hospital SSO",
    )
    proc = GatewayProcess(env, free_port(), log=root / "gateway.log")
    try:
        proc.wait_healthy()
        db = Path(env["MS_GATEWAY_DATA_DIR"]) / "gateway.db"
        engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
        with Session(engine) as session, session.begin():
            add_reviewer(session, username="dr.meyer", password=PASSWORD)
            key = {"X-API-Key": create_key(session, name="lis", scopes=["submit", "read"])[0]}
        engine.dispose()
        with httpx.Client(base_url=proc.url, headers=key, timeout=60) as lis:
            r = lis.post(
                "/v1/analyses", files=files(png(160, 120, 1), metadata=meta(accession_id="O-1"))
            )
            assert r.status_code == 202, r.text
            assert wait_status(lis.get, r.json()["id"], key)["status"] == "succeeded"
        yield {"url": proc.url, "db": db}
    finally:
        proc.stop()


def rows(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql, args))


def oidc_login(
    client: httpx.Client, issuer: OidcIssuer, user: dict[str, Any], **tweak: Any
) -> httpx.Response:
    """Start at the gateway, consent at the provider, come back: the callback's answer."""
    issuer.next_user, issuer.tweak = user, tweak
    start = client.get("/review/oidc/start")
    assert start.status_code == 303, start.text
    assert start.headers["location"].startswith(f"{issuer.url}/authorize?")
    at_provider = client.get(start.headers["location"])
    assert at_provider.status_code == 302
    return client.get(at_provider.headers["location"])


def test_the_login_page_offers_single_sign_on_beside_the_password(gateway) -> None:
    page = httpx.get(f"{gateway['url']}/review/login").text
    assert 'href="/review/oidc/start"' in page and "Log in with Hospital SSO" in page
    assert 'name="password"' in page


def test_a_full_oidc_login_makes_a_reviewer_and_a_session(gateway, issuer) -> None:
    with httpx.Client(base_url=gateway["url"], timeout=60) as client:
        back = oidc_login(client, issuer, USER)
        assert back.status_code == 200, back.text
        assert 'http-equiv="refresh" content="0; url=/review/"' in back.text
        session_cookie = next(
            v for k, v in back.headers.multi_items() if k == "set-cookie" and "ms_review=" in v
        ).lower()
        assert "httponly" in session_cookie and "samesite=strict" in session_cookie
        assert "ms_oidc" not in client.cookies  # the flow's secrets are gone
        worklist = client.get("/review/")
        assert worklist.status_code == 200 and "Dr. C. Oidc (default)" in worklist.text
        assert "O-1" in worklist.text
    asked = issuer.authorize_requests[-1]
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert asked["nonce"] and asked["state"] and asked["scope"] == "openid profile email"
    assert asked["redirect_uri"] == f"{gateway['url']}/review/oidc/callback"
    assert "code_verifier" in issuer.token_requests[-1]
    subject = f"{issuer.url} u-1"
    [(rid, username, name, tenant, roles, hashed)] = rows(
        gateway["db"],
        "SELECT id, username, display_name, tenant, roles, password_hash FROM reviewers "
        "WHERE oidc_subject = ?",
        subject,
    )
    assert (username, name, tenant, roles, hashed) == (
        "c.oidc",
        "Dr. C. Oidc",
        "default",
        "review",
        None,
    )
    assert ("reviewer:c.oidc", "oidc") in rows(
        gateway["db"], "SELECT key_name, detail FROM audit_log WHERE action = 'review.login'"
    )
    # the next login follows the provider's claims and keeps the one record
    with httpx.Client(base_url=gateway["url"], timeout=60) as client:
        renamed = {**USER, "name": "Dr. C. Oidc-Renamed", "tenant": "site-b"}
        assert oidc_login(client, issuer, renamed).status_code == 200
        worklist = client.get("/review/").text
        assert "Dr. C. Oidc-Renamed (site-b)" in worklist and "O-1" not in worklist
    assert rows(
        gateway["db"], "SELECT id, tenant FROM reviewers WHERE oidc_subject = ?", subject
    ) == [(rid, "site-b")]


def test_the_admin_role_sees_every_tenant(gateway, issuer) -> None:
    admin = {**USER, "sub": "u-admin", "preferred_username": "boss", "tenant": "site-b",
             "roles": ["marrow-admin"]}  # fmt: skip
    with httpx.Client(base_url=gateway["url"], timeout=60) as client:
        assert oidc_login(client, issuer, admin).status_code == 200
        assert "O-1" in client.get("/review/").text
    assert rows(gateway["db"], "SELECT roles FROM reviewers WHERE username = 'boss'") == [
        ("admin,review",)
    ]


def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize(
    ("user", "tweak", "status", "message"),
    [
        (USER, lambda: {"nonce": "not-this-login"}, 401, "nonce does not match"),
        (USER, lambda: {"exp": _now() - 3600, "iat": _now() - 4000}, 401, "has expired"),
        (USER, lambda: {"aud": "another-client"}, 401, "another client (audience)"),
        (USER, lambda: {"iss": "http://127.0.0.1:1"}, 401, "another issuer"),
        (
            {**USER, "roles": ["viewer"]},
            dict,
            403,
            "no &#39;review&#39; role in the claim &#39;roles&#39;",
        ),
        ({k: v for k, v in USER.items() if k != "roles"}, dict, 403, "no &#39;review&#39; role"),
        ({k: v for k, v in USER.items() if k != "tenant"}, dict, 403, "no tenant (claim"),
        ({**USER, "tenant": "Bad Tenant!"}, dict, 403, "tenant claim is not usable"),
    ],
)
def test_bad_tokens_and_claims_are_refused_with_a_reason_and_no_session(
    gateway,
    issuer,
    user: dict[str, Any],
    tweak: Callable[[], dict[str, Any]],
    status: int,
    message: str,
) -> None:
    sub = f"refused-{len(message)}-{status}"
    with httpx.Client(base_url=gateway["url"], timeout=60) as client:
        back = oidc_login(client, issuer, {**user, "sub": sub}, **tweak())
        assert back.status_code == status, back.text
        assert message in back.text
        assert "ms_review" not in client.cookies
        assert client.get("/review/").headers["location"] == "/review/login"
    assert (
        rows(gateway["db"], "SELECT id FROM reviewers WHERE oidc_subject LIKE ?", f"% {sub}") == []
    )


def test_a_token_signed_with_another_key_is_refused(gateway, issuer) -> None:
    issuer.foreign_key = True
    try:
        with httpx.Client(base_url=gateway["url"], timeout=60) as client:
            back = oidc_login(client, issuer, {**USER, "sub": "forged"})
            assert back.status_code == 401 and "Signature verification failed" in back.text
            assert "ms_review" not in client.cookies
    finally:
        issuer.foreign_key = False


def test_the_callback_needs_the_flow_that_started_here(gateway, issuer) -> None:
    url = gateway["url"]
    with httpx.Client(base_url=url, timeout=60) as client:
        issuer.next_user, issuer.tweak = USER, {}
        start = client.get("/review/oidc/start")
        at_provider = client.get(start.headers["location"])
        callback = at_provider.headers["location"]
        forged = callback.replace("state=", "state=x")
        r = client.get(forged)
        assert r.status_code == 400 and "state does not match" in r.text
        # the refusal ended the flow: the real callback is refused too, nothing is replayed
        r = client.get(callback)
        assert r.status_code == 400 and "not started here" in r.text
    with httpx.Client(base_url=url, timeout=60) as stranger:  # login CSRF: no flow cookie
        r = stranger.get("/review/oidc/callback", params={"code": "abc", "state": "def"})
        assert r.status_code == 400 and "ms_review" not in stranger.cookies
        r = stranger.get(
            "/review/oidc/callback", params={"error": "access_denied", "error_description": "no"}
        )
        assert r.status_code == 401 and "identity provider refused the login: no" in r.text


def test_an_oidc_user_never_takes_over_a_local_account(gateway, issuer) -> None:
    same_name = {**USER, "sub": "u-meyer", "preferred_username": "dr.meyer", "name": "Impostor"}
    with httpx.Client(base_url=gateway["url"], timeout=60) as client:
        assert oidc_login(client, issuer, same_name).status_code == 200
    [(username,)] = rows(
        gateway["db"],
        "SELECT username FROM reviewers WHERE oidc_subject = ?",
        f"{issuer.url} u-meyer",
    )
    assert username.startswith("oidc-")
    assert rows(
        gateway["db"], "SELECT display_name FROM reviewers WHERE username = 'dr.meyer'"
    ) == [("dr.meyer",)]
    with httpx.Client(base_url=gateway["url"], timeout=60) as client:
        r = client.post("/review/login", data={"username": "dr.meyer", "password": PASSWORD})
        assert r.status_code == 303


def test_settings_refuse_an_issuer_without_client_credentials() -> None:
    from pydantic import ValidationError

    from services.gateway.review.router import ReviewSettings

    with pytest.raises(ValidationError, match="OIDC_CLIENT_ID"):
        ReviewSettings(oidc_issuer="https://idp.example")
    assert ReviewSettings().oidc() is None
    config = ReviewSettings(
        oidc_issuer="https://idp.example", oidc_client_id="c", oidc_client_secret="hush-hush"
    ).oidc()
    assert config is not None and "hush-hush" not in repr(config)
