"""Request dependencies of the policy API: who is calling, and the service's clients.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread
pool, and the thread hand-offs (several per request) cost more than the permission query
itself. The token check is shared/auth.py's :class:`TokenVerifier`, with the same errors,
behind a small cache: the phone icon asks again and again with the same token, and a
verified token stays good until its ``exp``, which the cache honours.
"""

from __future__ import annotations

import time
from typing import Annotated

import jwt
from fastapi import Depends, HTTPException, Request, status

from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore
from shared.auth import LEEWAY_S, AuthError, Principal, TokenVerifier, token_from
from shared.bus import Bus
from shared.service import Runtime, app_state


class CachingVerifier:
    """Verifies a bearer token once, then remembers its principal until it expires."""

    def __init__(self, verifier: TokenVerifier, size: int) -> None:
        self._verifier = verifier
        self._size = size
        self._cache: dict[str, tuple[Principal, float]] = {}

    def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None:
            principal, expires = hit
            if time.time() < expires:
                return principal
            del self._cache[token]
        principal = self._verifier.verify(token)  # raises AuthError
        if self._size:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            if isinstance(exp, int | float):
                if len(self._cache) >= self._size:
                    # Drop the oldest entry (dicts keep insertion order).
                    del self._cache[next(iter(self._cache))]
                self._cache[token] = (principal, exp + LEEWAY_S)
        return principal


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"}
    )


async def principal(request: Request) -> Principal:
    token = token_from(request, allow_query=False)
    if not token:
        raise _unauthorized("missing bearer token")
    verifier = request.app.state.policy_verifier
    assert isinstance(verifier, CachingVerifier)
    try:
        return verifier.verify(token)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from exc


async def current_user(who: Annotated[Principal, Depends(principal)]) -> str:
    return who.user_id


async def platform_only(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.is_platform:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="platform scope required")
    return who


async def store_of(request: Request) -> PolicyStore:
    return app_state(request, "policy_store", PolicyStore)


async def settings_of(request: Request) -> PolicySettings:
    return app_state(request, "settings", PolicySettings)


async def bus_of(request: Request) -> Bus:
    return app_state(request, "runtime", Runtime).bus


CurrentUser = Annotated[str, Depends(current_user)]
PlatformPrincipal = Annotated[Principal, Depends(platform_only)]
Store = Annotated[PolicyStore, Depends(store_of)]
Settings = Annotated[PolicySettings, Depends(settings_of)]
EventBus = Annotated[Bus, Depends(bus_of)]
