"""Auth: tokens are refused when missing, expired, wrongly signed or of the wrong scope."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from shared.auth import (
    LEEWAY_S,
    AuthError,
    CurrentUser,
    MediaGrant,
    PlatformPrincipal,
    StreamUser,
    TokenVerifier,
    issue_media_token,
    issue_token,
    verify_media_token,
)
from shared.settings import DEV_JWT_SECRET, CommonSettings, Environment

SETTINGS = CommonSettings(environment=Environment.TEST)


def _app(settings: CommonSettings = SETTINGS) -> FastAPI:
    app = FastAPI()
    app.state.token_verifier = TokenVerifier(settings)

    @app.get("/me")
    async def me(user: CurrentUser) -> dict[str, str]:
        return {"user": user}

    @app.get("/platform")
    async def platform(principal: PlatformPrincipal) -> dict[str, str]:
        return {"as": principal.user_id}

    @app.get("/stream")
    async def stream(principal: StreamUser) -> dict[str, str]:
        return {"user": principal.user_id}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_valid_token_names_the_user(client: httpx.AsyncClient) -> None:
    r = await client.get("/me", headers=_bearer(issue_token(SETTINGS, "alice")))
    assert r.status_code == 200 and r.json() == {"user": "alice"}


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/me")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


async def test_expired_token_is_401(client: httpx.AsyncClient) -> None:
    now = int(time.time())
    token = jwt.encode({"sub": "alice", "exp": now - 3600}, DEV_JWT_SECRET, algorithm="HS256")
    r = await client.get("/me", headers=_bearer(token))
    assert r.status_code == 401 and "expired" in r.text


async def test_wrongly_signed_token_is_401(client: httpx.AsyncClient) -> None:
    token = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60}, "someone-else-s-secret", algorithm="HS256"
    )
    r = await client.get("/me", headers=_bearer(token))
    assert r.status_code == 401 and "signature" in r.text


async def test_alg_none_is_refused(client: httpx.AsyncClient) -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert (await client.get("/me", headers=_bearer(token))).status_code == 401


@pytest.mark.parametrize("sub", ["", "alice bob", "x" * 65, "ali/ce"])
async def test_bad_subject_is_401(client: httpx.AsyncClient, sub: str) -> None:
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, DEV_JWT_SECRET, "HS256")
    assert (await client.get("/me", headers=_bearer(token))).status_code == 401


async def test_token_without_exp_is_401(client: httpx.AsyncClient) -> None:
    token = jwt.encode({"sub": "alice"}, DEV_JWT_SECRET, algorithm="HS256")
    assert (await client.get("/me", headers=_bearer(token))).status_code == 401


async def test_user_token_on_platform_endpoint_is_403(client: httpx.AsyncClient) -> None:
    r = await client.get("/platform", headers=_bearer(issue_token(SETTINGS, "alice")))
    assert r.status_code == 403


async def test_platform_scope_is_accepted(client: httpx.AsyncClient) -> None:
    token = issue_token(SETTINGS, "graph-svc", scope="platform")
    r = await client.get("/platform", headers=_bearer(token))
    assert r.status_code == 200 and r.json() == {"as": "graph-svc"}


async def test_query_token_only_where_allowed(client: httpx.AsyncClient) -> None:
    token = issue_token(SETTINGS, "alice")
    assert (await client.get(f"/me?token={token}")).status_code == 401
    r = await client.get(f"/stream?token={token}")
    assert r.status_code == 200 and r.json() == {"user": "alice"}


async def test_rs256_public_key_verification() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = CommonSettings(environment=Environment.TEST, auth_jwt_public_key=public_pem)
    verifier = TokenVerifier(settings)
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    assert verifier.verify(good).user_id == "alice"
    # An HS256 token signed with the (public) key text must not pass: algorithm confusion.
    with pytest.raises(AuthError):
        verifier.verify(issue_token(SETTINGS, "alice"))


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(SETTINGS)
    decoded: list[str] = []
    decode = verifier._decode
    monkeypatch.setattr(verifier, "_decode", lambda t: decoded.append(t) or decode(t))
    token = issue_token(SETTINGS, "alice", ttl_s=60)
    first = verifier.verify(token)
    assert verifier.verify(token) is first and decoded == [token]
    expired = issue_token(SETTINGS, "bob", ttl_s=-3600)
    for _ in range(2):  # a refused token is never remembered
        with pytest.raises(AuthError, match="expired"):
            verifier.verify(expired)
    assert decoded == [token, expired, expired]
    # past its exp (and the leeway) the token is checked again, not answered from memory
    later = time.time() + 60 + LEEWAY_S + 1
    monkeypatch.setattr("shared.auth.time.time", lambda: later)
    verifier.verify(token)
    assert decoded == [token, expired, expired, token]


def test_media_tokens_name_call_user_and_node() -> None:
    grant = MediaGrant(call_id="c1", user_id="alice", node_id="media-1")
    assert verify_media_token(SETTINGS, issue_media_token(SETTINGS, grant)) == grant
    expired = issue_media_token(SETTINGS, grant, ttl_s=-60)
    with pytest.raises(AuthError, match="expired"):
        verify_media_token(SETTINGS, expired)
    # A user token is not a media token.
    with pytest.raises(AuthError):
        verify_media_token(SETTINGS, issue_token(SETTINGS, "alice"))


def test_default_secret_refused_in_production() -> None:
    with pytest.raises(ValueError, match="AUTH_JWT_SECRET"):
        CommonSettings(environment=Environment.PRODUCTION)
    ok = CommonSettings(
        environment=Environment.PRODUCTION,
        auth_jwt_secret="s" * 40,
        media_token_secret="m" * 40,
    )
    assert not ok.is_development
