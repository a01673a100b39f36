"""HTTP routes of the signaling service: the calls API, the ring state, the ICE servers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.signaling.calls import (
    BadCursor,
    CallService,
    NoMediaNode,
    NotFound,
    PlacementInProgress,
    RateLimited,
)
from services.signaling.domain import IllegalTransition
from shared.auth import CurrentUser
from shared.contracts import MediaKind
from shared.ids import CallId, UserId
from shared.service import app_state

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

router = APIRouter(tags=["calls"])


async def call_service(request: Request) -> CallService:
    return app_state(request, "calls", CallService)


Calls = Annotated[CallService, Depends(call_service)]


class PlaceCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    callee: UserId
    media: MediaKind
    device_id: str | None = Field(None, pattern=DEVICE_ID_PATTERN)


class Accept(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)


class Decline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str | None = Field(None, pattern=DEVICE_ID_PATTERN)


def _not_found(call_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no call {call_id}")


def _conflict(exc: IllegalTransition) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        detail={"message": str(exc), "state": exc.state.value, "call_id": exc.call_id},
    )


@router.post(
    "/v1/calls",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Place a call; policy's verdict follows on the WebSocket",
    responses={
        409: {
            "description": "A request with the same Idempotency-Key is still placing the "
            "call; retry after Retry-After"
        },
        429: {"description": "Too many calls; see Retry-After (a replay never counts)"},
    },
)
async def place_call(
    body: PlaceCall,
    user: CurrentUser,
    calls: Calls,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN)
    ] = None,
) -> dict[str, Any]:
    try:
        call = await calls.place(
            user,
            body.callee,
            body.media,
            device_id=body.device_id,
            idempotency_key=idempotency_key,
        )
    except RateLimited as exc:
        retry_s = max(1, -(-exc.retry_after_ms // 1000))
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail={"message": "too many calls; try again later", "retry_after_s": retry_s},
            headers={"Retry-After": str(retry_s)},
        ) from None
    except PlacementInProgress:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail={"message": "a call with this Idempotency-Key is being placed; retry"},
            headers={"Retry-After": "1"},
        ) from None
    return call.public()


@router.get("/v1/calls", summary="The user's call history, newest first")
async def history(
    user: CurrentUser,
    calls: Calls,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    try:
        items, cursor = await calls.history(user, limit=limit, before=before)
    except BadCursor:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "before: not a cursor") from None
    return {"calls": items, "next_cursor": cursor}


@router.get("/v1/calls/{call_id}", summary="One call (its two parties only)")
async def get_call(call_id: CallId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    try:
        return (await calls.visible(user, call_id)).public()
    except NotFound:
        raise _not_found(call_id) from None


@router.post(
    "/v1/calls/{call_id}/accept",
    summary="Answer on one device; returns this party's media_url and media_token",
    responses={409: {"description": "Not ringing"}, 503: {"description": "No media node"}},
)
async def accept(call_id: CallId, body: Accept, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    try:
        offer = await calls.accept(user, call_id, body.device_id)
    except NotFound:
        raise _not_found(call_id) from None
    except IllegalTransition as exc:
        raise _conflict(exc) from None
    except NoMediaNode:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={"message": "no media node is available; the call is still ringing"},
            headers={"Retry-After": "1"},
        ) from None
    return offer.public()


@router.post(
    "/v1/calls/{call_id}/media",
    summary="A fresh media grant for an answered call, always on a live node (the call "
    "moves first if its node is gone or draining)",
    responses={
        409: {"description": "The call is not in progress (e.g. it ended)"},
        503: {"description": "Its node is gone and no other media node is available"},
    },
)
async def media(call_id: CallId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    try:
        return (await calls.media_for(user, call_id)).public()
    except NotFound:
        raise _not_found(call_id) from None
    except IllegalTransition as exc:
        raise _conflict(exc) from None
    except NoMediaNode:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={"message": "no media node is available for this call now; retry"},
            headers={"Retry-After": "1"},
        ) from None


@router.post("/v1/calls/{call_id}/decline", summary="Decline on any device: stops all")
async def decline(
    call_id: CallId, user: CurrentUser, calls: Calls, body: Decline | None = None
) -> dict[str, Any]:
    try:
        return (await calls.decline(user, call_id)).public()
    except NotFound:
        raise _not_found(call_id) from None
    except IllegalTransition as exc:
        raise _conflict(exc) from None


@router.post(
    "/v1/calls/{call_id}/hangup",
    summary="End the call; the caller's hangup before an answer is a cancel",
)
async def hangup(call_id: CallId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    try:
        return (await calls.hangup(user, call_id)).public()
    except NotFound:
        raise _not_found(call_id) from None
    except IllegalTransition as exc:
        raise _conflict(exc) from None


@router.get("/v1/ring-state", summary="The calls ringing for this user now")
async def ring_state(user: CurrentUser, calls: Calls) -> JSONResponse:
    return JSONResponse({"calls": await calls.ring_state(user)})


@router.get(
    "/v1/ice-servers",
    summary="ICE servers for this user's peer connections (TURN credentials minted now)",
    tags=["ice"],
)
async def ice_servers(user: CurrentUser, calls: Calls) -> JSONResponse:
    # Credentials: never kept by a cache between here and the browser.
    return JSONResponse(
        {"ice_servers": calls.ice_servers(user), "ttl_s": calls.settings.turn_ttl_s},
        headers={"Cache-Control": "no-store"},
    )
