"""The web client: static files at ``/``, its ``/config.json``, and development sign-in.

The client is plain HTML, CSS and JavaScript modules in ``services/signaling/web/`` (no
build step, nothing fetched from elsewhere at run time). It talks to signaling on the
origin it was loaded from, and to policy and notifications at the URLs ``/config.json``
gives (``SIGNALING_POLICY_URL``, ``SIGNALING_NOTIFICATIONS_URL``).

``POST /v1/dev/token`` mints a token for any user so a person can try the client; it
exists only outside production (a real deployment's apps carry the platform's token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel

from services.signaling.settings import SignalingSettings
from shared.auth import issue_token
from shared.ids import UserId
from shared.service import app_state

WEB_ROOT = Path(__file__).resolve().parent / "web"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

# Scripts, styles and workers come only from this origin; the APIs, the SSE stream and the
# media nodes are on other origins whose URLs the deployment decides.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; worker-src 'self'; style-src 'self'; "
        "img-src 'self' data:; media-src 'self' blob: mediastream:; "
        "connect-src 'self' http: https: ws: wss:; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(self), microphone=(self)",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["web client"])


def _settings(request: Request) -> SignalingSettings:
    return app_state(request, "settings", SignalingSettings)


def _file(path: Path) -> FileResponse:
    return FileResponse(
        path, media_type=_CONTENT_TYPES[path.suffix], headers=dict(_SECURITY_HEADERS)
    )


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _file(WEB_ROOT / "index.html")


@router.get("/web/{name:path}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    path = (WEB_ROOT / name).resolve()
    if not path.is_relative_to(WEB_ROOT) or path.suffix not in _CONTENT_TYPES or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no such file: {name}")
    return _file(path)


@router.get("/config.json", summary="Where the web client finds the other services")
async def config(request: Request) -> JSONResponse:
    settings = _settings(request)
    body: dict[str, Any] = {
        "policy_url": settings.policy_url.rstrip("/"),
        "notifications_url": settings.notifications_url.rstrip("/"),
        "environment": settings.environment.value,
        "dev_sign_in": settings.is_development,
        "demo_users": settings.demo_users if settings.is_development else [],
    }
    return JSONResponse(body, headers={"Cache-Control": "no-cache"})


class DevTokenRequest(BaseModel):
    user: UserId


class DevToken(BaseModel):
    user: str
    token: str
    expires_in: int


@router.post(
    "/v1/dev/token",
    summary="Development only: a token for any user (404 in production)",
    responses={404: {"description": "Not available in production"}},
)
async def dev_token(body: DevTokenRequest, request: Request) -> DevToken:
    settings = _settings(request)
    if not settings.is_development:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="not available in production")
    ttl = settings.dev_token_ttl_s
    return DevToken(
        user=body.user, token=issue_token(settings, body.user, ttl_s=ttl), expires_in=ttl
    )
