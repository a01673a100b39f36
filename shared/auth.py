"""Authentication: JWT verification, the platform scope, and FastAPI dependencies.

User tokens are HS256 with ``AUTH_JWT_SECRET`` (development) or RS256 with the public
key in ``AUTH_JWT_PUBLIC_KEY`` (production). ``sub`` is the user id; a token with
``scope: "platform"`` is the platform's own service identity. A WebSocket or an
EventSource, which cannot set headers, passes the token as ``?token=``.

Media tokens are separate: short-lived HS256 tokens that signaling issues on accept and
the media node checks, naming the call, the user and the node (``MEDIA_TOKEN_SECRET``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import jwt
from fastapi import Depends, HTTPException, Request, WebSocket, status

from shared.ids import is_id
from shared.settings import CommonSettings

PLATFORM_SCOPE = "platform"
LEEWAY_S = 10


class AuthError(Exception):
    """A token that must be refused; the message says why (never echoing the token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, or the platform's service identity."""

    user_id: str
    scopes: frozenset[str]
    expires_at: float | None = None
    """The token's ``exp`` (Unix seconds): a long-lived session (a WebSocket) ends then."""

    @property
    def is_platform(self) -> bool:
        return PLATFORM_SCOPE in self.scopes


class TokenVerifier:
    """Verifies bearer tokens, and remembers the principal of a verified one until its
    ``exp`` (the :data:`CACHE_SIZE` latest): clients ask again and again with the same
    token (the phone icon's permission query), and decoding a JWT costs more than that
    query's own work. A refused token is never remembered."""

    CACHE_SIZE = 10_000

    def __init__(self, settings: CommonSettings) -> None:
        self._settings = settings
        self._cache: dict[str, Principal] = {}
        if settings.auth_jwt_public_key:
            self._key: Any = settings.auth_jwt_public_key
            self._algorithms = ["RS256"]
        else:
            self._key = settings.auth_jwt_secret
            self._algorithms = ["HS256"]

    def verify(self, token: str) -> Principal:
        principal = self._cache.get(token)
        if principal is not None:
            assert principal.expires_at is not None
            if time.time() < principal.expires_at + LEEWAY_S:
                return principal
            del self._cache[token]
        principal = self._decode(token)
        if len(self._cache) >= self.CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest (dicts keep their order)
        self._cache[token] = principal
        return principal

    def _decode(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["sub", "exp"]},
                leeway=LEEWAY_S,
                issuer=self._settings.auth_jwt_issuer,
                audience=self._settings.auth_jwt_audience,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("token signature is invalid") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        sub = claims.get("sub")
        if not is_id(sub):
            raise AuthError("token subject is not a valid user id")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise AuthError("token scope must be a space-separated string")
        return Principal(
            user_id=sub, scopes=frozenset(scope.split()), expires_at=float(claims["exp"])
        )


def mint(
    secret: str,
    user_id: str,
    *,
    ttl_s: int,
    scope: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 user token: ``sub``, ``iat``, ``exp`` and the optional claims that are set."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if scope:
        claims["scope"] = scope
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def issue_token(
    settings: CommonSettings, user_id: str, *, scope: str | None = None, ttl_s: int = 86_400
) -> str:
    """A development token (HS256). Production tokens come from the platform."""
    if not is_id(user_id):
        raise ValueError(f"not a valid user id: {user_id!r}")
    return mint(
        settings.auth_jwt_secret,
        user_id,
        ttl_s=ttl_s,
        scope=scope,
        issuer=settings.auth_jwt_issuer,
        audience=settings.auth_jwt_audience,
    )


# --------------------------------------------------------------------------- media tokens

MEDIA_TOKEN_AUDIENCE = "dmcall-media"


@dataclass(frozen=True, slots=True)
class MediaGrant:
    call_id: str
    user_id: str
    node_id: str
    moved: bool = False
    """The call's media was moved here (its node drained or was lost): a room it opens
    waits for the other party as long as the rejoin grace, not a new call's timeout."""
    group: str | None = None
    """A group call's grant names the group (its room admits up to
    GROUP_CALL_MAX_PARTICIPANTS users); None: a 1:1 call's (two users)."""
    issued_at: float | None = field(default=None, compare=False)
    """The token's ``iat`` (Unix seconds, to the millisecond; not compared), set by
    :func:`verify_media_token`: a node refuses a participant's grant issued before that
    participant left the call (``call_participant_left``)."""


def issue_media_token(settings: CommonSettings, grant: MediaGrant, *, ttl_s: int = 120) -> str:
    issued = time.time()
    now = int(issued)
    claims = {
        "sub": grant.user_id,
        "call_id": grant.call_id,
        "node_id": grant.node_id,
        **({"moved": True} if grant.moved else {}),
        **({"group": grant.group} if grant.group is not None else {}),
        "aud": MEDIA_TOKEN_AUDIENCE,
        "iat": round(issued, 3),  # a NumericDate may be fractional (RFC 7519 section 2)
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, settings.media_token_secret, algorithm="HS256")


def verify_media_token(settings: CommonSettings, token: str) -> MediaGrant:
    try:
        claims = jwt.decode(
            token,
            settings.media_token_secret,
            algorithms=["HS256"],
            audience=MEDIA_TOKEN_AUDIENCE,
            options={"require": ["sub", "exp", "call_id", "node_id"]},
            leeway=LEEWAY_S,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("media token expired") from exc
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid media token: {exc}") from exc
    return MediaGrant(
        call_id=str(claims["call_id"]),
        user_id=str(claims["sub"]),
        node_id=str(claims["node_id"]),
        moved=claims.get("moved") is True,
        group=str(claims["group"]) if isinstance(claims.get("group"), str) else None,
        issued_at=float(claims["iat"]) if isinstance(claims.get("iat"), int | float) else None,
    )


# --------------------------------------------------------------------------- FastAPI


def _verifier(request: Request | WebSocket) -> TokenVerifier:
    verifier = getattr(request.app.state, "token_verifier", None)
    if verifier is None:  # pragma: no cover - wiring error, not a client error
        raise RuntimeError("app.state.token_verifier is not set")
    assert isinstance(verifier, TokenVerifier)
    return verifier


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": "Bearer"},
    )


def token_from(request: Request | WebSocket, *, allow_query: bool) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return value.strip()
    if allow_query:
        return request.query_params.get("token")
    return None


def _principal(request: Request, allow_query: bool) -> Principal:
    # Dependencies that call this are async: a plain ``def`` dependency costs every request
    # a hop to FastAPI's thread pool, and verifying an HS256 token takes microseconds.
    token = token_from(request, allow_query=allow_query)
    if not token:
        raise _unauthorized("missing bearer token")
    try:
        return _verifier(request).verify(token)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from exc


async def current_principal(request: Request) -> Principal:
    return _principal(request, allow_query=False)


async def current_principal_query_ok(request: Request) -> Principal:
    """For EventSource endpoints, which cannot send headers: ``?token=`` is accepted."""
    return _principal(request, allow_query=True)


async def current_user(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    return principal.user_id


async def platform_only(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_platform:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="platform scope required")
    return principal


def authenticate_websocket(websocket: WebSocket) -> Principal:
    """Verify a WebSocket's token (header or ``?token=``); raises AuthError."""
    token = token_from(websocket, allow_query=True)
    if not token:
        raise AuthError("missing token")
    return _verifier(websocket).verify(token)


CurrentUser = Annotated[str, Depends(current_user)]
StreamUser = Annotated[Principal, Depends(current_principal_query_ok)]
PlatformPrincipal = Annotated[Principal, Depends(platform_only)]
