"""HTTP routes of the notifications service: the inbox, the live stream, push targets
(webhooks and Web Push subscriptions) and the VAPID public key browsers subscribe with.

A user only ever reaches their own notifications and devices: every route takes the user
from the token, and a device or notification of someone else is answered 404, exactly as
one that does not exist.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.exceptions import RedisError

from services.notifications import webpush
from services.notifications.guard import UrlRefused, resolve_allowed
from services.notifications.live import LiveHub, StreamLease
from services.notifications.settings import NotificationsSettings
from services.notifications.store import (
    Device,
    DeviceKind,
    NotificationStore,
    StreamEntry,
    parse_stream_id,
)
from shared.auth import CurrentUser, StreamUser
from shared.clock import iso, wait_set
from shared.service import app_state

log = logging.getLogger(__name__)

router = APIRouter()

SSE_BATCH = 200
TOKEN_EXPIRED_EVENT = "token_expired"
"""The SSE event that ends a stream whose token expired."""
SSE_STREAMS = Gauge("dmcall_notifications_sse_streams", "Open notification streams")

NotificationId = Annotated[
    str, Path(max_length=64, description="A notification id, e.g. 1732172400000-0")
]
DeviceId = Annotated[str, Path(max_length=64, description="A device id from POST /v1/devices")]


# --------------------------------------------------------------------------- dependencies


async def store_of(request: Request) -> NotificationStore:
    return app_state(request, "notification_store", NotificationStore)


async def hub_of(request: Request) -> LiveHub:
    return app_state(request, "live_hub", LiveHub)


async def settings_of(request: Request) -> NotificationsSettings:
    return app_state(request, "settings", NotificationsSettings)


async def vapid_of(request: Request) -> webpush.VapidKeys | None:
    """The VAPID keys; None when Web Push is disabled."""
    if getattr(request.app.state, "vapid_keys", None) is None:
        return None
    return app_state(request, "vapid_keys", webpush.VapidKeys)


Store = Annotated[NotificationStore, Depends(store_of)]
Hub = Annotated[LiveHub, Depends(hub_of)]
Settings = Annotated[NotificationsSettings, Depends(settings_of)]
Vapid = Annotated[webpush.VapidKeys | None, Depends(vapid_of)]


# --------------------------------------------------------------------------- models


def _group_in_schema(schema: dict[str, Any]) -> None:
    # Documented, not declared: a declared field would add "group": null to every 1:1
    # notification, which must stay the object it was (extra="allow" passes it through).
    schema["properties"]["group"] = {
        "type": "string",
        "title": "Group",
        "description": "Group calls only (incoming_call, missed_call): the group "
        "conversation's id. Absent for a 1:1 call.",
    }


class NotificationOut(BaseModel):
    """A notification in the inbox (the live stream sends the same object, without ``read``)."""

    model_config = ConfigDict(
        extra="allow", populate_by_name=True, json_schema_extra=_group_in_schema
    )

    id: str = Field(description="Also the SSE event id; grows with time")
    kind: str = Field(description="incoming_call | missed_call")
    call_id: str
    from_: str = Field(alias="from", serialization_alias="from")
    media: str | None = Field(description="audio | video; null when unknown")
    created_at: str
    read: bool
    ring_deadline: str | None = Field(None, description="incoming_call only")


class UnreadCount(BaseModel):
    unread: int


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["webhook"]
    url: str = Field(min_length=1, max_length=2048, description="http(s) URL that receives pushes")


class PushSubscriptionKeys(BaseModel):
    p256dh: str = Field(
        max_length=200, description="base64url of the browser's P-256 public key (65 bytes)"
    )
    auth: str = Field(max_length=100, description="base64url of the auth secret (16 bytes)")

    @field_validator("p256dh")
    @classmethod
    def _p256dh(cls, value: str) -> str:
        webpush.decode_p256dh(value)
        return value

    @field_validator("auth")
    @classmethod
    def _auth(cls, value: str) -> str:
        webpush.decode_auth(value)
        return value


class PushSubscription(BaseModel):
    """What a browser's ``PushSubscription.toJSON()`` gives (other members are ignored)."""

    model_config = ConfigDict(populate_by_name=True)

    endpoint: str = Field(min_length=1, max_length=2048, description="The push service URL (https)")
    expiration_time: float | None = Field(
        None,
        alias="expirationTime",
        description="ms since the epoch when the subscription ends, or null",
    )
    keys: PushSubscriptionKeys

    @field_validator("expiration_time")
    @classmethod
    def _not_expired(cls, value: float | None) -> float | None:
        if value is not None and value <= time.time() * 1000:
            raise ValueError("the subscription has expired already")
        return value


class WebPushIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["webpush"]
    subscription: PushSubscription


DeviceIn = Annotated[WebhookIn | WebPushIn, Field(discriminator="kind")]


class DeviceOut(BaseModel):
    id: str
    kind: str = Field(description="webhook | webpush")
    url: str = Field(description="The webhook URL, or the Web Push endpoint")
    created_at: str
    status: str = Field(description="active | removed")
    removed_at: str | None = None
    removed_reason: str | None = Field(
        None, description="deleted | gone (the target said 410, or a push service 404)"
    )


class DeviceCreated(DeviceOut):
    secret: str | None = Field(
        description="webhook: HMAC-SHA256 key of X-Dmcall-Signature, shown only once; "
        "webpush: null (pushes are encrypted to the subscription's keys)"
    )


class VapidPublicKey(BaseModel):
    public_key: str = Field(
        description="The applicationServerKey for pushManager.subscribe(): base64url of the "
        "uncompressed P-256 public key (65 bytes)"
    )
    content_encoding: Literal["aes128gcm"] = Field(
        "aes128gcm", description="How payloads are encrypted (RFC 8291)"
    )


class DeliveryOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    delivery_id: str = Field(description="The same on every attempt of one push")
    notification_id: str
    kind: str | None
    attempt: int
    outcome: str = Field(description="delivered | retrying | dead_lettered | gone | expired")
    status: int | None = Field(description="The receiver's HTTP status, if it answered")
    error: str | None
    at: str
    duration_ms: float


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no such {what}")


# --------------------------------------------------------------------------- inbox


@router.get(
    "/v1/notifications",
    response_model=list[NotificationOut],
    response_model_by_alias=True,
    summary="My notifications, newest first",
    tags=["notifications"],
)
async def list_notifications(
    user: CurrentUser,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[
        str | None, Query(max_length=64, description="Page past this notification id")
    ] = None,
) -> list[dict[str, Any]]:
    return await store.inbox(user, limit=limit, before=before)


@router.get(
    "/v1/notifications/unread-count",
    response_model=UnreadCount,
    summary="How many of my notifications are unread",
    tags=["notifications"],
)
async def unread_count(user: CurrentUser, store: Store) -> UnreadCount:
    return UnreadCount(unread=await store.unread_count(user))


@router.post(
    "/v1/notifications/read-all",
    response_model=UnreadCount,
    summary="Mark all my notifications read",
    tags=["notifications"],
)
async def read_all(user: CurrentUser, store: Store) -> UnreadCount:
    await store.mark_all_read(user)
    return UnreadCount(unread=0)


@router.post(
    "/v1/notifications/{notification_id}/read",
    response_model=NotificationOut,
    response_model_by_alias=True,
    summary="Mark one of my notifications read",
    responses={404: {"description": "No such notification of mine"}},
    tags=["notifications"],
)
async def mark_read(
    notification_id: NotificationId, user: CurrentUser, store: Store
) -> dict[str, Any]:
    if parse_stream_id(notification_id) is None:
        raise _not_found("notification")
    notification = await store.mark_read(user, notification_id)
    if notification is None:
        raise _not_found("notification")
    return notification


# --------------------------------------------------------------------------- live stream


def _sse(entry: StreamEntry) -> str:
    return f"id: {entry.id}\ndata: {json.dumps(entry.as_event(), separators=(',', ':'))}\n\n"


def _token_expired(expires_at: float) -> str:
    data = {"kind": "token_expired", "expired_at": iso(datetime.fromtimestamp(expires_at, UTC))}
    return f"event: {TOKEN_EXPIRED_EVENT}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(
    "/v1/notifications/stream",
    summary="My notifications as Server-Sent Events",
    description="Live `incoming_call`, `missed_call` and `ring_stopped` objects, each with an "
    "`id:` line. Reconnect with `Last-Event-ID` (the header an EventSource sends, or "
    "`?last_event_id=`) to receive what was missed, once. Without it the stream starts "
    "with what happens next. The token may be passed as `?token=`. When the token expires "
    'the stream ends with `event: token_expired` (data `{"kind": "token_expired", '
    '"expired_at": <ISO time>}`): reconnect with a fresh token and `?last_event_id=` the '
    "last id seen. At most `NOTIFICATIONS_SSE_MAX_STREAMS_PER_USER` streams per user are open "
    "at once (over every instance); one more is refused with 429, reason `too_many_streams`.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        400: {"description": "Last-Event-ID is not an id this service gave"},
        429: {"description": "The user has the maximum of streams open (too_many_streams)"},
    },
    tags=["notifications"],
)
async def stream(
    request: Request,
    principal: StreamUser,
    store: Store,
    hub: Hub,
    settings: Settings,
    last_event_id: Annotated[str | None, Query(max_length=64)] = None,
) -> StreamingResponse:
    user = principal.user_id
    resume = request.headers.get("last-event-id") or last_event_id
    if resume is not None and parse_stream_id(resume) is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Last-Event-ID is not valid")
    expires_at = principal.expires_at  # the verifier requires exp: never None here
    if expires_at is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="the token has no expiry")
    lease = await hub.admit(user)
    if lease is None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail={
                "message": f"at most {settings.sse_max_streams_per_user} notification streams "
                "may be open per user; close one first",
                "reason": "too_many_streams",
            },
        )
    return StreamingResponse(
        _events(store, hub, settings, lease, resume, expires_at),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    store: NotificationStore,
    hub: LiveHub,
    settings: NotificationsSettings,
    lease: StreamLease,
    resume: str | None,
    expires_at: float,
) -> AsyncIterator[str]:
    user = lease.user
    # Registered before the first read, so nothing published after it waits for a keep-alive.
    wake = hub.register(user)
    SSE_STREAMS.inc()
    try:
        position = resume if resume is not None else await store.stream_tail(user)
        yield f"retry: {settings.sse_retry_ms}\n\n"
        if resume is not None and await store.stream_lost_after(user, resume):
            # Some of what was missed is no longer kept: the client should reload its inbox.
            yield 'event: resync\ndata: {"kind":"resync","reason":"history_trimmed"}\n\n'
        while True:
            wake.clear()
            entries = await store.stream_after(user, position, SSE_BATCH)
            for entry in entries:
                yield _sse(entry)
                position = entry.id
            if len(entries) == SSE_BATCH:
                continue
            if hub.closing:
                return
            left_s = expires_at - time.time()
            if left_s <= 0:
                # The session ends with its token: the client reconnects with a fresh one.
                yield _token_expired(expires_at)
                return
            if not await wait_set(wake, min(settings.sse_keepalive_s, left_s)):
                if expires_at > time.time():
                    yield ": keep-alive\n\n"
    finally:
        hub.unregister(user, wake)
        hub.leave(lease)
        SSE_STREAMS.dec()


# --------------------------------------------------------------------------- devices


async def _own_device(store: NotificationStore, user: str, device_id: str) -> Device:
    device = await store.device(device_id)
    if device is None or device.user != user:
        raise _not_found("device")
    return device


@router.post(
    "/v1/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCreated,
    summary="Register a push target: a webhook, or a browser's Web Push subscription",
    responses={
        200: {"description": "webpush: this subscription was registered already (its device)"},
        409: {"description": "Too many devices"},
        422: {"description": "Bad URL or subscription, or an address that is not allowed"},
    },
    tags=["devices"],
)
async def register_device(
    body: DeviceIn,
    user: CurrentUser,
    store: Store,
    settings: Settings,
    vapid: Vapid,
    response: Response,
) -> DeviceCreated:
    if isinstance(body, WebPushIn):
        if vapid is None:
            raise _refused("webpush_disabled", "Web Push is not enabled in this deployment")
        endpoint, keys = body.subscription.endpoint, body.subscription.keys
        await _check_target(endpoint, DeviceKind.WEBPUSH, settings)
        device, created = await store.add_webpush(user, endpoint, keys.p256dh, keys.auth)
        if not created and device is not None:
            response.status_code = status.HTTP_200_OK
    else:
        await _check_target(body.url, DeviceKind.WEBHOOK, settings)
        device = await store.add_webhook(user, body.url)
    if device is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"at most {settings.max_devices_per_user} devices per user",
        )
    response.headers["Location"] = f"/v1/devices/{device.id}"
    return DeviceCreated(**device.public(), secret=device.secret or None)


def _refused(reason: str, message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, detail={"message": message, "reason": reason}
    )


async def _check_target(url: str, kind: DeviceKind, settings: NotificationsSettings) -> None:
    try:
        await resolve_allowed(url, allow_private=settings.webhook_allow_private, kind=kind)
    except UrlRefused as exc:
        raise _refused(exc.reason, str(exc)) from exc


@router.get(
    "/v1/webpush/vapid-public-key",
    response_model=VapidPublicKey,
    summary="The VAPID public key a browser subscribes with (applicationServerKey)",
    responses={
        404: {"description": "Web Push is not enabled in this deployment"},
        503: {"description": "Development: the shared key in Redis cannot be read now"},
    },
    tags=["devices"],
)
async def vapid_public_key(user: CurrentUser, vapid: Vapid) -> VapidPublicKey:
    if vapid is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail="Web Push is not enabled in this deployment"
        )
    try:
        signer = await vapid.signer()
    except RedisError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the VAPID key cannot be read now"
        ) from exc
    return VapidPublicKey(public_key=signer.public_key)


@router.get(
    "/v1/devices", response_model=list[DeviceOut], summary="My push targets", tags=["devices"]
)
async def list_devices(user: CurrentUser, store: Store) -> list[DeviceOut]:
    return [DeviceOut(**d.public()) for d in await store.devices(user)]


@router.get(
    "/v1/devices/{device_id}",
    response_model=DeviceOut,
    summary="One of my push targets (also a removed one, for a while)",
    tags=["devices"],
)
async def get_device(device_id: DeviceId, user: CurrentUser, store: Store) -> DeviceOut:
    return DeviceOut(**(await _own_device(store, user, device_id)).public())


@router.delete(
    "/v1/devices/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Stop pushing to a target",
    tags=["devices"],
)
async def delete_device(device_id: DeviceId, user: CurrentUser, store: Store) -> Response:
    device = await _own_device(store, user, device_id)
    if device.active:
        await store.remove_device(device, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/v1/devices/{device_id}/deliveries",
    response_model=list[DeliveryOut],
    summary="The last push attempts to a target, newest first",
    tags=["devices"],
)
async def deliveries(
    device_id: DeviceId,
    user: CurrentUser,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict[str, Any]]:
    await _own_device(store, user, device_id)
    return await store.deliveries(device_id, limit)
