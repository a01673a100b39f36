"""The device WebSocket ``/v1/ws?token=&device_id=`` (protocol: docs/signaling.md)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from services.signaling.calls import CallService, NotFound
from services.signaling.domain import IllegalTransition
from services.signaling.presence import Hub
from services.signaling.settings import SignalingSettings
from shared.auth import AuthError, authenticate_websocket
from shared.ids import is_user_id

log = logging.getLogger(__name__)

router = APIRouter()

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_REPLACED = 4409
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "error": code, "message": message, **extra}


class _BadFrame(ValueError):
    pass


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
        await websocket.close(CLOSE_UNAUTHORIZED, "unauthorized")
        return
    device_id = websocket.query_params.get("device_id", "")
    if not _DEVICE_RE.fullmatch(device_id):
        await websocket.send_json(
            _error("bad_request", "device_id must be 1-64 of A-Z a-z 0-9 _ -")
        )
        await websocket.close(CLOSE_BAD_REQUEST, "bad device_id")
        return
    state = websocket.app.state
    hub: Hub = state.hub
    calls: CallService = state.calls
    settings: SignalingSettings = state.settings
    user = principal.user_id
    replaced = await hub.attach(user, device_id, websocket)
    if replaced is not None:
        try:
            await replaced.close(CLOSE_REPLACED, "replaced by a newer connection")
        except Exception:  # it may be gone already
            pass
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
                reply = await _handle_frame(frame, user, device_id, calls, settings)
            if reply is not None:
                await hub.send(user, device_id, reply, only=websocket)
    except WebSocketDisconnect:
        pass
    finally:
        await hub.detach(user, device_id, websocket)


async def _handle_frame(
    frame: Mapping[str, Any],
    user: str,
    device_id: str,
    calls: CallService,
    settings: SignalingSettings,
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
    call_id = message.get("call_id")
    payload = message.get("payload")
    if not isinstance(call_id, str) or not is_user_id(call_id):
        return _error("bad_request", "call.signal needs a call_id string")
    if not isinstance(payload, dict):
        return _error("bad_request", "call.signal needs a payload object", call_id=call_id)
    try:
        await calls.relay_signal(user, device_id, call_id, payload)
    except NotFound:
        return _error("not_found", f"no call {call_id} of yours", call_id=call_id)
    except IllegalTransition as exc:
        return _error(
            "conflict",
            f"call {call_id} is {exc.state.value}",
            call_id=call_id,
            state=exc.state.value,
        )
    return None


def _parse(raw: str) -> dict[str, Any]:
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _BadFrame(f"not JSON: {exc.msg}") from None
    if not isinstance(message, dict):
        raise _BadFrame("a message must be a JSON object")
    kind = message.get("type")
    if kind not in ("ping", "call.signal"):
        raise _BadFrame(f"unknown message type {kind!r}; expected 'call.signal' or 'ping'")
    return message
