"""The device WebSocket ``/v1/ws?token=&device_id=`` (protocol: docs/signaling.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from services.signaling.calls import BadSignal, CallService, NotFound, SignalRateLimited
from services.signaling.domain import AudioState, IllegalTransition, VideoState
from services.signaling.presence import CloseCode, Hub
from services.signaling.settings import SignalingSettings
from shared.auth import AuthError, TokenVerifier, authenticate_websocket
from shared.ids import is_id

log = logging.getLogger(__name__)

router = APIRouter()


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "error": code, "message": message, **extra}


class _BadFrame(ValueError):
    pass


@dataclass
class _Session:
    """One device socket: who it is, and until when its token lets it live."""

    user: str
    device_id: str
    expires_at: float | None
    """Unix seconds; moved on by an in-band ``auth.refresh``."""


class _Bucket:
    """A token bucket: ``rate`` messages a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@router.websocket("/v1/ws")
async def device_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        principal = authenticate_websocket(websocket)
    except AuthError as exc:
        await websocket.send_json(_error("unauthorized", str(exc)))
        await websocket.close(CloseCode.UNAUTHORIZED, "unauthorized")
        return
    device_id = websocket.query_params.get("device_id", "")
    if not is_id(device_id):
        await websocket.send_json(
            _error("bad_request", "device_id must be 1-64 of A-Z a-z 0-9 _ -")
        )
        await websocket.close(CloseCode.BAD_REQUEST, "bad device_id")
        return
    state = websocket.app.state
    hub: Hub = state.hub
    calls: CallService = state.calls
    settings: SignalingSettings = state.settings
    session = _Session(principal.user_id, device_id, principal.expires_at)
    user = session.user
    replaced = await hub.attach(user, device_id, websocket)
    if replaced is not None:
        try:
            await replaced.close(CloseCode.REPLACED, "replaced by a newer connection")
        except Exception:  # it may be gone already
            pass
    expiry = _ExpiryTimer(hub, websocket, session)
    bucket = _Bucket(settings.ws_messages_per_s, burst=settings.ws_messages_per_s * 2)
    try:
        for call in await calls.ring_state(user):
            if call["direction"] == "incoming":
                await hub.send(user, device_id, {"type": "call.incoming", **call}, only=websocket)
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            if not bucket.take():
                reply: dict[str, Any] | None = _error(
                    "rate_limited", f"over {settings.ws_messages_per_s} messages/s; dropped"
                )
            else:
                try:
                    reply = await _handle_frame(
                        frame, session, calls, settings, state.token_verifier
                    )
                except Exception:  # one frame's failure (Redis away, a bug) never ends the socket
                    log.exception("frame from %s/%s failed", user, device_id)
                    reply = _error("unavailable", "could not handle that frame now; try again")
            if reply is not None:
                await hub.send(user, device_id, reply, only=websocket)
    except WebSocketDisconnect:
        pass
    finally:
        await expiry.cancel()
        await hub.detach(user, device_id, websocket)


class _ExpiryTimer:
    """Ends the socket when its token does (the client reconnects with a fresh one).

    A timer handle, not a task sleeping per socket: an idle socket holds no coroutine
    for it. When it fires before the (refreshed) expiry, it sets itself again."""

    def __init__(self, hub: Hub, websocket: WebSocket, session: _Session) -> None:
        self._hub, self._websocket, self._session = hub, websocket, session
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._arm()

    def _arm(self) -> None:
        expires_at = self._session.expires_at
        if expires_at is None:
            return
        left = expires_at - time.time()
        if left > 0:
            self._handle = self._loop.call_later(left, self._arm)
        else:
            self._handle = None
            self._closing = self._loop.create_task(self._close())

    async def _close(self) -> None:
        session = self._session
        note = _error("token_expired", "the token expired; reconnect with a fresh one")
        await self._hub.send(session.user, session.device_id, note, only=self._websocket)
        with contextlib.suppress(Exception):  # the socket may be gone already
            await self._websocket.close(CloseCode.TOKEN_EXPIRED, "token expired")

    async def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._closing is not None:
            self._closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._closing


async def _handle_frame(
    frame: Mapping[str, Any],
    session: _Session,
    calls: CallService,
    settings: SignalingSettings,
    verifier: TokenVerifier,
) -> dict[str, Any] | None:
    raw = frame.get("text")
    if raw is None:
        raw_bytes = frame.get("bytes") or b""
        try:
            raw = raw_bytes.decode()
        except UnicodeDecodeError:
            return _error("bad_request", "frames must be UTF-8 JSON")
    if len(raw) > settings.ws_max_message_bytes:
        return _error("bad_request", f"frame over {settings.ws_max_message_bytes} bytes")
    try:
        message = _parse(raw)
    except _BadFrame as exc:
        return _error("bad_request", str(exc))
    kind = message["type"]
    if kind == "ping":
        return {"type": "pong"}
    if kind == "auth.refresh":
        return _refresh(message, session, verifier)
    if kind == "call.media_state":
        return await _media_state(message, session, calls, settings)
    call_id = message.get("call_id")
    payload = message.get("payload")
    if not is_id(call_id):
        return _error("bad_request", "call.signal needs a call_id string")
    if not isinstance(payload, dict):
        return _error("bad_request", "call.signal needs a payload object", call_id=call_id)
    to = message.get("to")
    if to is not None and not is_id(to):
        return _error("bad_request", "call.signal's to must be a user id", call_id=call_id)
    relay = calls.relay_signal(session.user, session.device_id, call_id, payload, to=to)
    return await _relayed(relay, call_id, f"{settings.signals_per_call_per_s} call.signal/s")


async def _media_state(
    message: Mapping[str, Any],
    session: _Session,
    calls: CallService,
    settings: SignalingSettings,
) -> dict[str, Any] | None:
    """``call.media_state``: this party's microphone and camera, for the other party."""
    call_id = message.get("call_id")
    if not is_id(call_id):
        return _error("bad_request", "call.media_state needs a call_id string")
    raw_audio, raw_video = message.get("audio"), message.get("video")
    try:
        if not isinstance(raw_audio, str) or not isinstance(raw_video, str):
            raise ValueError("not strings")
        audio, video = AudioState(raw_audio), VideoState(raw_video)
    except ValueError:
        return _error(
            "bad_request",
            "call.media_state needs audio: on|muted and video: on|off",
            call_id=call_id,
        )
    relay = calls.relay_media_state(session.user, call_id, audio, video)
    return await _relayed(relay, call_id, f"{settings.signals_per_call_per_s} frames/s")


async def _relayed(relay: Awaitable[None], call_id: str, budget: str) -> dict[str, Any] | None:
    """Awaits a frame's relay to the call's other parties: None, or the error frame for
    why it was refused (``budget``: the rate a ``rate_limited`` error names)."""
    try:
        await relay
    except BadSignal as exc:
        return _error("bad_request", str(exc), call_id=call_id)
    except SignalRateLimited:
        return _error("rate_limited", f"over {budget} for this call; dropped", call_id=call_id)
    except NotFound:
        return _error("not_found", f"no call {call_id} of yours", call_id=call_id)
    except IllegalTransition as exc:
        extra = {"participant_state": exc.participant.value} if exc.participant is not None else {}
        return _error(
            "conflict",
            f"call {call_id} is {exc.state.value}",
            call_id=call_id,
            state=exc.state.value,
            **extra,
        )
    return None


def _refresh(
    message: Mapping[str, Any], session: _Session, verifier: TokenVerifier
) -> dict[str, Any]:
    """``auth.refresh``: a fresh token of the same user moves the socket's end on."""
    token = message.get("token")
    if not isinstance(token, str) or not token:
        return _error("bad_request", "auth.refresh needs a token string")
    try:
        principal = verifier.verify(token)
    except AuthError as exc:
        return _error("unauthorized", str(exc))
    if principal.user_id != session.user:
        return _error("forbidden", "that token is not this socket's user's")
    session.expires_at = principal.expires_at
    expires = (
        datetime.fromtimestamp(session.expires_at, UTC).isoformat()
        if session.expires_at is not None
        else None
    )
    return {"type": "auth.refreshed", "expires_at": expires}


MESSAGE_TYPES = ("call.signal", "call.media_state", "ping", "auth.refresh")


def _parse(raw: str) -> dict[str, Any]:
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _BadFrame(f"not JSON: {exc.msg}") from None
    except RecursionError:
        raise _BadFrame("not JSON this service takes: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's 4,300-digit limit
        raise _BadFrame(f"not JSON this service takes: {exc}") from None
    if not isinstance(message, dict):
        raise _BadFrame("a message must be a JSON object")
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        raise _BadFrame(f"unknown message type {kind!r}; expected one of {MESSAGE_TYPES}")
    return message
