"""HTTP routes of the signaling service: the calls API, the ring state, the ICE servers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.signaling.calls import (
    BadCursor,
    CallFull,
    CallService,
    GroupCallInProgress,
    NoMediaNode,
    NotFound,
    PlacementInProgress,
    RateLimited,
)
from services.signaling.domain import IllegalTransition
from shared.auth import CurrentUser
from shared.contracts import MediaKind
from shared.ids import CallId, DeviceId, GroupId, UserId
from shared.service import app_state

IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

router = APIRouter(tags=["calls"])


async def call_service(request: Request) -> CallService:
    return app_state(request, "calls", CallService)


Calls = Annotated[CallService, Depends(call_service)]


class PlaceCall(BaseModel):
    """A 1:1 call names ``callee``; a group call names ``group`` (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")
    callee: UserId | None = None
    group: GroupId | None = Field(
        None, description="A group DM conversation: every member but you is invited"
    )
    media: MediaKind
    device_id: DeviceId | None = None

    @model_validator(mode="after")
    def _callee_or_group(self) -> PlaceCall:
        if (self.callee is None) == (self.group is None):
            raise ValueError("name exactly one of callee (a 1:1 call) or group (a group call)")
        return self


class Join(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: DeviceId | None = Field(
        None,
        description="Your device in the call (call.signal and call.media go to it); "
        "without it, all your devices",
    )


class Participant(BaseModel):
    user: UserId
    state: str = Field(
        description="invited | ringing | joined | left | declined | missed | not_rung"
    )
    joined_at: str | None = Field(None, description="When they first joined (ISO-8601 UTC)")
    left_at: str | None = Field(None, description="When they last left")


class CallObject(BaseModel):
    """The call object (``GET /v1/calls/{id}``, ``call.state``, history items)."""

    model_config = ConfigDict(extra="allow")
    call_id: CallId
    caller: UserId = Field(description="The 1:1 caller; a group call's starter")
    callee: UserId | None = Field(description="null in a group call")
    group: GroupId | None = Field(description="The group DM conversation; null for 1:1")
    media: MediaKind
    state: str
    end_reason: str | None
    reject_reason: str | None
    created_at: str | None
    ring_deadline: str | None
    answered_at: str | None
    ended_at: str | None
    answered_device: str | None
    duration_s: float
    replaced_by: str | None
    participants: list[Participant]


class MediaHandOff(BaseModel):
    """The answer of accept, join and media: this participant's media grant."""

    call_id: CallId
    state: str
    media_url: str
    media_token: str
    node_id: str
    ice_servers: list[dict[str, Any]]


class Accept(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: DeviceId


@contextmanager
def _call_errors(call_id: CallId, no_node: str = "no media node is available") -> Iterator[None]:
    """The HTTP answers to what the call service refuses about one call (``no_node``: the
    503's message, which says what became of the call)."""
    try:
        yield
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no call {call_id}") from None
    except IllegalTransition as exc:
        detail = {"message": str(exc), "state": exc.state.value, "call_id": exc.call_id}
        if exc.participant is not None:
            detail["participant_state"] = exc.participant.value
        raise HTTPException(status.HTTP_409_CONFLICT, detail=detail) from None
    except CallFull as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail={
                "error": "call_full",
                "message": str(exc),
                "call_id": exc.call_id,
                "max_participants": exc.limit,
            },
        ) from None
    except NoMediaNode:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={"message": no_node},
            headers={"Retry-After": "1"},
        ) from None


@router.post(
    "/v1/calls",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Place a call (1:1: callee; group: group); policy's verdict follows on the WebSocket",
    response_model=CallObject,
    responses={
        404: {"description": "group: not a group you are a member of"},
        409: {
            "description": "A request with the same Idempotency-Key is still placing the "
            "call; retry after Retry-After. Or `call_in_progress` (with `call_id`): the "
            "group has a live call already (join it)"
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
        if body.group is not None:
            call = await calls.place_group(
                user,
                body.group,
                body.media,
                device_id=body.device_id,
                idempotency_key=idempotency_key,
            )
        else:
            assert body.callee is not None
            call = await calls.place(
                user,
                body.callee,
                body.media,
                device_id=body.device_id,
                idempotency_key=idempotency_key,
            )
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no group {body.group}") from None
    except GroupCallInProgress as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail={
                "error": "call_in_progress",
                "message": "the group has a call going; join it",
                "call_id": exc.call_id,
            },
        ) from None
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


@router.get(
    "/v1/calls/{call_id}",
    summary="One call (its parties only: a group call's starter, rung invitees and anyone "
    "who joined)",
    response_model=CallObject,
)
async def get_call(call_id: CallId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    with _call_errors(call_id):
        return (await calls.visible(user, call_id)).public()


@router.post(
    "/v1/calls/{call_id}/accept",
    summary="Answer on one device; returns this party's media_url and media_token",
    response_model=MediaHandOff,
    responses={
        409: {
            "description": "Not ringing (for you): `state`, and `participant_state` in a "
            "group call; `call_full` when the group call holds "
            "GROUP_CALL_MAX_PARTICIPANTS already"
        },
        503: {"description": "No media node"},
    },
)
async def accept(call_id: CallId, body: Accept, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    with _call_errors(call_id, "no media node is available; the call is still ringing"):
        return (await calls.accept(user, call_id, body.device_id)).public()


@router.post(
    "/v1/calls/{call_id}/join",
    summary="Join a group call as a current member (not rung, declined, missed, left); "
    "returns your media grant",
    response_model=MediaHandOff,
    responses={
        404: {"description": "Not a current member of the call's group, or no such call"},
        409: {
            "description": "The call is over, you are joined already (`state`, "
            "`participant_state`), or `call_full` (GROUP_CALL_MAX_PARTICIPANTS joined)"
        },
        503: {"description": "No media node"},
    },
)
async def join(
    call_id: CallId, user: CurrentUser, calls: Calls, body: Join | None = None
) -> dict[str, Any]:
    with _call_errors(call_id, "no media node is available; try again"):
        return (await calls.join(user, call_id, body.device_id if body else None)).public()


@router.get(
    "/v1/groups/{group_id}/call",
    summary="The group's live call, for a current member",
    response_model=CallObject,
    responses={404: {"description": "No live call, or not a member of the group"}},
)
async def group_call(group_id: GroupId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    try:
        return (await calls.group_call(user, group_id)).public()
    except NotFound:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no live call in group {group_id}"
        ) from None


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
    with _call_errors(call_id, "no media node is available for this call now; retry"):
        return (await calls.media_for(user, call_id)).public()


@router.post(
    "/v1/calls/{call_id}/decline",
    summary="Decline on any device: stops all (a group call goes on without you)",
    response_model=CallObject,
)
async def decline(call_id: CallId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    with _call_errors(call_id):
        return (await calls.decline(user, call_id)).public()


@router.post(
    "/v1/calls/{call_id}/hangup",
    summary="End the call; the caller's hangup before an answer is a cancel. In a group "
    "call: leave it (it ends with its last participant)",
    response_model=CallObject,
)
async def hangup(call_id: CallId, user: CurrentUser, calls: Calls) -> dict[str, Any]:
    with _call_errors(call_id):
        return (await calls.hangup(user, call_id)).public()


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
