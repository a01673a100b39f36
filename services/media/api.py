"""HTTP routes of the media service: sessions (SDP offer in, answer out) and room stats.

A group call's session offers the participant's own pair plus recvonly slots and a
``room`` data channel (docs/media.md, "Group calls").

A session is made with the media token signaling gave on accept; leaving and reading a
room's stats take that media token too, or the party's own user token (media tokens are
short-lived), or the platform's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response, status

from services.media.rooms import Refusal, Rooms, SessionRefused
from services.media.settings import MediaSettings
from shared.auth import AuthError, TokenVerifier, token_from, verify_media_token
from shared.ids import ID_PATTERN
from shared.service import app_state

router = APIRouter(prefix="/v1/rooms", tags=["rooms"])

CallIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="The call id")]
SessionIdPath = Annotated[str, Path(pattern=r"^[a-f0-9]{32}$")]
SDP_TYPE = "application/sdp"


def _rooms(request: Request) -> Rooms:
    return app_state(request, "rooms", Rooms)


def _settings(request: Request) -> MediaSettings:
    return app_state(request, "settings", MediaSettings)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail={"message": message, "reason": Refusal.BAD_TOKEN.value},
        headers={"WWW-Authenticate": "Bearer"},
    )


def _caller(request: Request, call_id: str) -> str | None:
    """The user a media token (for this call) or a user token names; None: the platform."""
    token = token_from(request, allow_query=False)
    if not token:
        raise _unauthorized("missing bearer token")
    media_error: AuthError | None = None
    try:
        grant = verify_media_token(_settings(request), token)
    except AuthError as exc:
        media_error = exc
    else:
        if grant.call_id != call_id:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "the media token is for another call")
        return grant.user_id
    verifier = request.app.state.token_verifier
    assert isinstance(verifier, TokenVerifier)
    try:
        principal = verifier.verify(token)
    except AuthError as exc:
        raise _unauthorized(f"{media_error}; as a user token: {exc}") from exc
    return None if principal.is_platform else principal.user_id


@router.post(
    "/{call_id}/sessions",
    status_code=201,
    summary="Join the call's room with an SDP offer; the answer comes back",
    response_class=Response,
    responses={
        201: {"content": {SDP_TYPE: {}}, "description": "The SDP answer (ICE gathered)"},
        400: {
            "description": "`bad_offer`: not SDP, or the offer cannot be answered (no "
            "audio/video, no codec in common, no DTLS fingerprint the SFU can verify, no "
            "a=setup, no ICE credentials, a malformed candidate; in a group room: a slot "
            "that is not recvonly, more than GROUP_CALL_MAX_PARTICIPANTS - 2 slots; in a "
            "1:1 room: any slot)"
        },
        401: {"description": "Missing, invalid or expired media token"},
        403: {
            "description": "`wrong_call`: token for another call (or a 1:1 grant for a group "
            "room, or the reverse); `wrong_node`: for another node; `room_full`: a third "
            "party of a 1:1 call, or GROUP_CALL_MAX_PARTICIPANTS users already in a group "
            "room; `participant_left`: a grant issued before its user left the call "
            "(call_participant_left): join again for a fresh one"
        },
        409: {"description": "The call has ended"},
        415: {"description": "Not application/sdp"},
        503: {
            "description": "`node_full`: this node is full; `node_draining`: this node is "
            "shutting down (SIGTERM) and takes no session, not even a rejoin: ask "
            "`POST /v1/calls/{call_id}/media` for a grant on another node"
        },
    },
)
async def create_session(call_id: CallIdPath, request: Request) -> Response:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != SDP_TYPE:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"the body must be an SDP offer ({SDP_TYPE})"
        )
    token = token_from(request, allow_query=False)
    if not token:
        raise _unauthorized("missing bearer media token")
    try:
        grant = verify_media_token(_settings(request), token)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from exc
    body = await request.body()
    try:
        offer = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the SDP offer is not UTF-8") from exc
    rooms = _rooms(request)
    try:
        session = await rooms.open_session(grant, call_id, offer)
    except SessionRefused as exc:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        detail = {"message": str(exc), "reason": exc.reason.value}
        if exc.reason is Refusal.NODE_DRAINING:
            detail["error"] = exc.reason.value  # not "unavailable": retrying here is no use
        raise HTTPException(exc.status, detail=detail, headers=headers) from exc
    return Response(
        session.answer_sdp,
        status_code=201,
        media_type=SDP_TYPE,
        headers={"Location": f"/v1/rooms/{call_id}/sessions/{session.session_id}"},
    )


@router.delete(
    "/{call_id}/sessions/{session_id}",
    status_code=204,
    summary="Leave the room (the room closes when nobody is left)",
    response_class=Response,
)
async def delete_session(
    call_id: CallIdPath, session_id: SessionIdPath, request: Request
) -> Response:
    user = _caller(request, call_id)
    rooms = _rooms(request)
    room = rooms.find(call_id)
    participant = room.session(session_id) if room else None
    if participant is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")
    if user is not None and user != participant.user_id:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "not your session")
    await rooms.leave(call_id, session_id)
    return Response(status_code=204)


@router.get(
    "/{call_id}/stats",
    summary="Per participant: packets, bytes, loss, RTT, bitrate, audio level, slots; the "
    "room's active speaker",
)
async def room_stats(call_id: CallIdPath, request: Request) -> dict[str, Any]:
    user = _caller(request, call_id)
    room = _rooms(request).find(call_id)
    if room is None or (user is not None and user not in room.parties):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such room on this node")
    stats = await room.stats()
    p50, p99 = _rooms(request).delays.percentiles(0.5, 0.99)
    stats["node_forward_delay_ms"] = {
        "p50": None if p50 is None else round(p50 * 1000, 3),
        "p99": None if p99 is None else round(p99 * 1000, 3),
    }
    return stats
