"""The routes that serve the web client: files, /config.json, development sign-in."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.signaling import web
from services.signaling.settings import SignalingSettings
from shared.auth import TokenVerifier
from shared.settings import DEV_MEDIA_TOKEN_SECRET

PRODUCTION_SECRET = "a-production-secret-that-is-long-enough-for-hs256"


def client(**settings: object) -> TestClient:
    app = FastAPI()
    app.include_router(web.router)
    app.state.settings = SignalingSettings(**settings)  # type: ignore[arg-type]
    return TestClient(app)


def test_index_and_assets_are_served_with_a_content_security_policy() -> None:
    http = client()
    index = http.get("/")
    assert index.status_code == 200 and '<script type="module" src="/web/js/main.js">' in index.text
    assert "script-src 'self'" in index.headers["content-security-policy"]
    module = http.get("/web/js/main.js")
    assert module.status_code == 200
    assert module.headers["content-type"].startswith("text/javascript")
    assert http.get("/web/js/e2ee-worker.js").status_code == 200


def test_no_file_outside_the_client_and_no_unknown_kinds() -> None:
    http = client()
    assert http.get("/web/../web.py").status_code == 404
    assert http.get("/web/%2e%2e/settings.py").status_code == 404
    assert http.get("/web/js/nothing.js").status_code == 404
    missing = http.get("/web/index.txt")
    assert missing.status_code == 404


def test_config_tells_the_client_where_the_other_services_are() -> None:
    http = client(policy_url="http://policy.example:9002/", notifications_url="http://n:9003")
    body = http.get("/config.json").json()
    assert body["policy_url"] == "http://policy.example:9002"
    assert body["notifications_url"] == "http://n:9003"
    assert body["dev_sign_in"] is True and "alice" in body["demo_users"]


def test_dev_token_signs_in_a_demo_user_outside_production() -> None:
    http = client(environment="test")
    response = http.post("/v1/dev/token", json={"user": "alice"})
    assert response.status_code == 200
    principal = TokenVerifier(SignalingSettings(environment="test")).verify(
        response.json()["token"]
    )  # type: ignore[arg-type]
    assert principal.user_id == "alice" and not principal.is_platform
    assert http.post("/v1/dev/token", json={"user": "no spaces"}).status_code == 422
    assert http.post("/v1/dev/token", content=b"{not json").status_code == 422


def test_no_dev_token_and_no_demo_users_in_production() -> None:
    http = client(
        environment="production",
        auth_jwt_secret=PRODUCTION_SECRET,
        media_token_secret=DEV_MEDIA_TOKEN_SECRET + "-changed",
    )
    assert http.post("/v1/dev/token", json={"user": "alice"}).status_code == 404
    body = http.get("/config.json").json()
    assert body["dev_sign_in"] is False and body["demo_users"] == []
