"""The notifications store: inboxes, live streams, devices, and the push job queue, in Redis.

Every key is ``dmcall[:<namespace>]:notifications:<parts>``; the shapes are documented
beside the functions that build them (class :class:`Keys`). Redis is the store of record
(see docs/operations.md): the inbox, devices and queued pushes survive any instance.

Ids: a notification's id is the id Redis gave its entry in the user's live stream
(``<unix ms>-<seq>``, e.g. ``1732172400000-0``), so the same id names it in the inbox, as
the SSE ``id:`` line, and in pushes; ids grow with time per user, so ``Last-Event-ID``
is a position in the stream.

An event's writes run in one Lua script: for each of its notifications the stream
entry, the inbox, the unread flag, one push job per device and the live wake-up, made
together or not at all, and only if that (user, call, kind) was not made before (its
``once`` key), which makes the script safe to run again for the same event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from services.notifications.notices import Notice, NoticeKind, Priority
from services.notifications.settings import NotificationsSettings
from shared.clock import iso, utcnow
from shared.redis import KeySpace

PUSH_GROUP = "push"
OWNER = "notifications"


class DeviceKind(StrEnum):
    """What a push target is; the worker builds its request accordingly (push.py)."""

    WEBHOOK = "webhook"
    WEBPUSH = "webpush"


class Keys:
    """Every Redis key (and pub/sub channel) of the notifications service."""

    def __init__(self, settings: NotificationsSettings) -> None:
        self._k = KeySpace(settings, OWNER)

    def stream(self, user: str) -> str:
        # STREAM: the user's live feed, one entry per notification (including ring_stopped),
        # fields {"data": <notification JSON without id>}; entry id = notification id = SSE id.
        # MAXLEN ~ stream_max, EXPIRE stream_ttl_s after the last entry.
        return self._k("stream", user)

    def inbox(self, user: str) -> str:
        # LIST of notification ids (incoming_call, missed_call), newest first, <= inbox_max.
        return self._k("inbox", user)

    def notes(self, user: str) -> str:
        # HASH notification id -> notification JSON (without id and read); same ids as inbox.
        return self._k("notes", user)

    def unread(self, user: str) -> str:
        # SET of the user's unread notification ids (a subset of inbox).
        return self._k("unread", user)

    def once(self, user: str, call_id: str, kind: NoticeKind) -> str:
        # STRING "1", EX once_ttl_s: this (user, call, kind) notification has been made.
        return self._k("once", user, call_id, kind.value)

    def device(self, device_id: str) -> str:
        # HASH id, user, kind, url, secret, created_at [, p256dh, auth] [, removed_at,
        # removed_reason]. kind "webhook": url is the webhook, secret its HMAC key; kind
        # "webpush": url is the push endpoint, p256dh and auth the subscription's keys
        # (base64url), secret "". A removed device keeps its hash (and delivery log) for
        # stream_ttl_s, for support.
        return self._k("device", device_id)

    def devices(self, user: str) -> str:
        # SET of the user's active device ids (the push fan-out reads it).
        return self._k("devices", user)

    def webpush_endpoints(self, user: str) -> str:
        # HASH sha256(endpoint) hex -> device id: the user's Web Push subscriptions, so
        # registering one again finds its device. An entry whose device is no longer in
        # devices(user) is stale and is overwritten.
        return self._k("webpush", user)

    def vapid_key(self) -> str:
        # STRING PEM of the development VAPID private key, set once (NX) by the first
        # instance that needs it (only when VAPID_PRIVATE_KEY is not set). No expiry.
        return self._k("vapid", "key")

    def deliveries(self, device_id: str) -> str:
        # LIST of delivery-attempt JSON records, newest first, <= delivery_log_max.
        return self._k("deliveries", device_id)

    def push_jobs(self) -> str:
        # STREAM of push jobs {"job": <job JSON>}, consumer group "push"; an entry is deleted
        # when its attempt is over (delivered, rescheduled, dead-lettered or dropped).
        return self._k("push", "jobs")

    def push_retry(self) -> str:
        # ZSET job JSON (attempt already incremented) scored by due time in unix ms.
        return self._k("push", "retry")

    def push_dlq(self) -> str:
        # STREAM of dead-lettered jobs {"job", "error", "at"}, MAXLEN ~ dead_letter_max.
        return self._k("push", "dlq")

    def sse_streams(self, user: str) -> str:
        # ZSET of the user's open SSE streams on every instance: stream id -> lease expiry
        # (unix ms). The serving instance renews the lease while the stream is open and
        # removes it when it ends; an instance that dies leaves entries that lapse.
        # PEXPIRE the lease, so an idle user's key goes by itself.
        return self._k("sse", user)

    def live_channel(self, user: str) -> str:
        # pub/sub channel (not a key): a notification id, published when stream(user) grows.
        return self._k("live", user)


# KEYS: 1 push jobs, then 7 a notice: stream, inbox, notes, unread, devices, once, guard
# ARGV: 1 stream_max, 2 inbox_max, 3 once_ttl, 4 stream_ttl, then 6 a notice: data,
#       in_inbox, channel, user, use_guard, priority
# Makes one event's notices, in order, each unless it was made already. The guard is the
# once-key of the call's ring_stopped: an incoming_call for a call that already stopped
# ringing is not made.
_ADD_NOTICES = """
local function add(k, a)
  if ARGV[a + 4] == '1' and redis.call('EXISTS', KEYS[k + 6]) == 1 then return end
  if not redis.call('SET', KEYS[k + 5], '1', 'NX', 'EX', ARGV[3]) then return end
  local id = redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[a])
  redis.call('EXPIRE', KEYS[k], ARGV[4])
  if ARGV[a + 1] == '1' then
    redis.call('LPUSH', KEYS[k + 1], id)
    redis.call('HSET', KEYS[k + 2], id, ARGV[a])
    redis.call('SADD', KEYS[k + 3], id)
    local cap = tonumber(ARGV[2])
    while redis.call('LLEN', KEYS[k + 1]) > cap do
      local old = redis.call('RPOP', KEYS[k + 1])
      redis.call('HDEL', KEYS[k + 2], old)
      redis.call('SREM', KEYS[k + 3], old)
    end
  end
  for _, device in ipairs(redis.call('SMEMBERS', KEYS[k + 4])) do
    local job = cjson.encode({id = id .. '.' .. device, device = device, user = ARGV[a + 3],
                              nid = id, attempt = 1, priority = ARGV[a + 5],
                              notification = ARGV[a]})
    redis.call('XADD', KEYS[1], '*', 'job', job)
  end
  redis.call('PUBLISH', ARGV[a + 2], id)
end
for n = 0, (#KEYS - 1) / 7 - 1 do add(2 + 7 * n, 5 + 6 * n) end
"""

# KEYS: 1 devices set, 2 new device hash
# ARGV: 1 max devices, 2 new device id, 3.. the new device's field/value pairs
# Counts and adds in one step, so concurrent registrations cannot pass the cap together.
# Returns 1 when made, 0 when the user has the maximum of devices.
_ADD_DEVICE = """
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[1], ARGV[2])
return 1
"""

# KEYS: 1 devices set, 2 webpush endpoints hash, 3 new device hash
# ARGV: 1 endpoint hash, 2 max devices, 3 new device id, 4.. the new device's field/value pairs
# Registers a Web Push subscription once per user: returns {id, 1} when made, {id, 0} when
# the user has it already, false when the user has the maximum of devices.
_ADD_WEBPUSH = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing and redis.call('SISMEMBER', KEYS[1], existing) == 1 then return {existing, 0} end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return false end
redis.call('HSET', KEYS[3], unpack(ARGV, 4))
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {ARGV[3], 1}
"""

# KEYS: 1 the user's sse streams zset. ARGV: 1 now ms, 2 cap, 3 lease expiry ms, 4 stream id,
#       5 lease ms. Drops lapsed leases, then admits the stream if the user is under the cap.
# Returns 1 when admitted, 0 at the cap.
_ADMIT_STREAM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: 1 retry zset, 2 jobs stream. ARGV: 1 now ms, 2 batch.
# Moves due retries back to the job stream; returns {moved, next due ms or -1}.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, job in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'job', job)
  redis.call('ZREM', KEYS[1], job)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {#due, -1} end
return {#due, tonumber(nxt[2])}
"""


def parse_stream_id(value: str) -> tuple[int, int] | None:
    """``"1732172400000-3"`` -> (1732172400000, 3); None when it is not a stream id."""
    ms, sep, seq = value.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(ms) > 20 or len(seq) > 20:
        return None
    return int(ms), int(seq)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class StreamEntry:
    id: str
    data: dict[str, Any]

    def as_event(self) -> dict[str, Any]:
        return {"id": self.id, **self.data}


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    user: str
    kind: DeviceKind
    url: str
    secret: str
    created_at: str
    removed_at: str | None = None
    removed_reason: str | None = None
    p256dh: str | None = None
    """webpush: the subscriber's public key (base64url), with ``auth`` its secret."""
    auth: str | None = None

    @property
    def active(self) -> bool:
        return self.removed_at is None

    def public(self) -> dict[str, Any]:
        """The device as its owner may see it later: never the secret."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "url": self.url,
            "created_at": self.created_at,
            "status": "active" if self.active else "removed",
            "removed_at": self.removed_at,
            "removed_reason": self.removed_reason,
        }


@dataclass(frozen=True, slots=True)
class PushJob:
    """One notification to push to one device; ``id`` is stable across its attempts."""

    id: str
    device: str
    user: str
    nid: str
    attempt: int
    priority: Priority
    """The notification's (:attr:`Notice.priority`), decided when it was made. A job queued
    by a version that did not record it is pushed at normal priority."""
    notification: str

    @classmethod
    def from_json(cls, raw: bytes | str) -> PushJob:
        data = json.loads(raw)
        return cls(
            id=str(data["id"]),
            device=str(data["device"]),
            user=str(data["user"]),
            nid=str(data["nid"]),
            attempt=int(data["attempt"]),
            priority=Priority(data.get("priority", Priority.NORMAL)),
            notification=str(data["notification"]),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "device": self.device,
                "user": self.user,
                "nid": self.nid,
                "attempt": self.attempt,
                "priority": self.priority.value,
                "notification": self.notification,
            },
            separators=(",", ":"),
        )

    def next_attempt(self) -> PushJob:
        return dataclasses.replace(self, attempt=self.attempt + 1)


class NotificationStore:
    def __init__(self, redis: Redis, settings: NotificationsSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings)

    # ------------------------------------------------------------------ writing (events)

    async def add_notices(self, notices: list[Notice]) -> None:
        """Makes one event's notifications in one script (see the module docstring)."""
        k, s = self.keys, self.settings
        keys = [k.push_jobs()]
        args: list[str | int] = [s.stream_max, s.inbox_max, s.once_ttl_s, s.stream_ttl_s]
        for notice in notices:
            user = notice.user
            keys += [
                k.stream(user),
                k.inbox(user),
                k.notes(user),
                k.unread(user),
                k.devices(user),
                k.once(user, notice.call_id, notice.kind),
                k.once(user, notice.call_id, NoticeKind.RING_STOPPED),
            ]
            args += [
                json.dumps(notice.fields, separators=(",", ":")),
                "1" if notice.kind.in_inbox else "0",
                k.live_channel(user),
                user,
                "1" if notice.kind is NoticeKind.INCOMING_CALL else "0",
                notice.priority.value,
            ]
        await self.redis.eval(_ADD_NOTICES, len(keys), *keys, *args)

    # ------------------------------------------------------------------ inbox

    async def inbox(
        self, user: str, *, limit: int, before: str | None = None
    ) -> list[dict[str, Any]]:
        """The user's notifications, newest first; ``before`` is an id to page past."""
        k = self.keys
        if before is None:
            ids = [_s(i) for i in await self.redis.lrange(k.inbox(user), 0, limit - 1)]
        else:
            position: Any = await self.redis.lpos(k.inbox(user), before)
            if position is None:
                return []
            ids = [
                _s(i)
                for i in await self.redis.lrange(
                    k.inbox(user), int(position) + 1, int(position) + limit
                )
            ]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(k.notes(user), ids)
            pipe.smismember(k.unread(user), ids)
            notes, unread = await pipe.execute()
        return [
            {"id": nid, **json.loads(raw), "read": not is_unread}
            for nid, raw, is_unread in zip(ids, notes, unread, strict=True)
            if raw is not None
        ]

    async def mark_read(self, user: str, nid: str) -> dict[str, Any] | None:
        """Marks one of the user's notifications read; None when the user has no such one."""
        k = self.keys
        raw = await self.redis.hget(k.notes(user), nid)
        if raw is None:
            return None
        await self.redis.srem(k.unread(user), nid)
        return {"id": nid, **json.loads(raw), "read": True}

    async def mark_all_read(self, user: str) -> None:
        await self.redis.delete(self.keys.unread(user))

    async def unread_count(self, user: str) -> int:
        return int(await self.redis.scard(self.keys.unread(user)))

    # ------------------------------------------------------------------ live stream

    async def stream_tail(self, user: str) -> str:
        """The id of the user's newest stream entry ("0-0" when there is none)."""
        entries: Any = await self.redis.xrevrange(self.keys.stream(user), count=1)
        return _s(entries[0][0]) if entries else "0-0"

    async def stream_after(self, user: str, after: str, count: int) -> list[StreamEntry]:
        entries: Any = await self.redis.xrange(self.keys.stream(user), min=f"({after}", count=count)
        return [StreamEntry(_s(eid), json.loads(fields[b"data"])) for eid, fields in entries]

    async def stream_lost_after(self, user: str, after: str) -> bool:
        """Whether entries newer than ``after`` may have been trimmed or expired.

        Trimming drops the oldest entries, so when ``after`` itself is no longer kept
        (older than the oldest entry, or the stream expired), what followed it may be gone
        too. When nothing in between was actually lost this says so needlessly: the client
        reloads its inbox, which is harmless.
        """
        position = parse_stream_id(after)
        if position is None or position == (0, 0):
            return False
        oldest: Any = await self.redis.xrange(self.keys.stream(user), count=1)
        if not oldest:
            return True
        first = parse_stream_id(_s(oldest[0][0]))
        return first is not None and first > position

    async def admit_stream(self, user: str, stream_id: str, lease_ms: int) -> bool:
        """Counts a new SSE stream of ``user`` unless they have the maximum open already."""
        now = _now_ms()
        admitted: Any = await self.redis.eval(
            _ADMIT_STREAM,
            1,
            self.keys.sse_streams(user),
            now,
            self.settings.sse_max_streams_per_user,
            now + lease_ms,
            stream_id,
            lease_ms,
        )
        return bool(int(admitted))

    async def renew_streams(self, streams: list[tuple[str, str]], lease_ms: int) -> None:
        """Extends the leases of open ``(user, stream id)`` streams (re-adding a lapsed one)."""
        expiry = _now_ms() + lease_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for user, stream_id in streams:
                pipe.zadd(self.keys.sse_streams(user), {stream_id: expiry})
                pipe.pexpire(self.keys.sse_streams(user), lease_ms)
            await pipe.execute()

    async def release_streams(self, streams: list[tuple[str, str]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for user, stream_id in streams:
                pipe.zrem(self.keys.sse_streams(user), stream_id)
            await pipe.execute()

    # ------------------------------------------------------------------ devices

    async def add_webhook(self, user: str, url: str) -> Device | None:
        """Registers a webhook; None when the user already has the maximum of devices."""
        k = self.keys
        device = Device(
            id=f"dev_{uuid.uuid4().hex}",
            user=user,
            kind=DeviceKind.WEBHOOK,
            url=url,
            secret=f"whsec_{secrets.token_urlsafe(32)}",
            created_at=iso(utcnow()),
        )
        fields = {
            "id": device.id,
            "user": user,
            "kind": DeviceKind.WEBHOOK.value,
            "url": url,
            "secret": device.secret,
            "created_at": device.created_at,
        }
        made: Any = await self.redis.eval(
            _ADD_DEVICE,
            2,
            k.devices(user),
            k.device(device.id),
            self.settings.max_devices_per_user,
            device.id,
            *(item for pair in fields.items() for item in pair),
        )
        return device if int(made) else None

    async def add_webpush(
        self, user: str, endpoint: str, p256dh: str, auth: str
    ) -> tuple[Device | None, bool]:
        """Registers a Web Push subscription: (device, True) when new, (the user's device
        of that endpoint, False) when registered already (its keys are refreshed), (None,
        False) when the user has the maximum of devices."""
        k = self.keys
        device_id = f"dev_{uuid.uuid4().hex}"
        fields = {
            "id": device_id,
            "user": user,
            "kind": DeviceKind.WEBPUSH.value,
            "url": endpoint,
            "secret": "",
            "created_at": iso(utcnow()),
            "p256dh": p256dh,
            "auth": auth,
        }
        reply: Any = await self.redis.eval(
            _ADD_WEBPUSH,
            3,
            k.devices(user),
            k.webpush_endpoints(user),
            k.device(device_id),
            _endpoint_field(endpoint),
            self.settings.max_devices_per_user,
            device_id,
            *(item for pair in fields.items() for item in pair),
        )
        if not reply:
            return None, False
        found, created = _s(reply[0]), bool(int(reply[1]))
        if not created:
            await self.redis.hset(k.device(found), mapping={"p256dh": p256dh, "auth": auth})
        return await self.device(found), created

    async def device(self, device_id: str) -> Device | None:
        raw = await self.redis.hgetall(self.keys.device(device_id))
        if not raw:
            return None
        fields = {_s(key): _s(value) for key, value in raw.items()}
        return Device(
            id=fields["id"],
            user=fields["user"],
            kind=DeviceKind(fields["kind"]),
            url=fields["url"],
            secret=fields["secret"],
            created_at=fields["created_at"],
            removed_at=fields.get("removed_at"),
            removed_reason=fields.get("removed_reason"),
            p256dh=fields.get("p256dh"),
            auth=fields.get("auth"),
        )

    async def devices(self, user: str) -> list[Device]:
        ids = sorted(_s(i) for i in await self.redis.smembers(self.keys.devices(user)))
        found = [await self.device(i) for i in ids]
        return [d for d in found if d is not None]

    async def remove_device(self, device: Device, reason: str) -> None:
        """Stops pushes to a device; its record and delivery log stay a while for support."""
        k = self.keys
        keep_s = self.settings.stream_ttl_s
        async with self.redis.pipeline(transaction=True) as tx:
            tx.srem(k.devices(device.user), device.id)
            tx.hset(
                k.device(device.id), mapping={"removed_at": iso(utcnow()), "removed_reason": reason}
            )
            tx.expire(k.device(device.id), keep_s)
            tx.expire(k.deliveries(device.id), keep_s)
            if device.kind is DeviceKind.WEBPUSH:
                tx.hdel(k.webpush_endpoints(device.user), _endpoint_field(device.url))
            await tx.execute()

    async def shared_vapid_key(self, generate: Callable[[], str]) -> str:
        """The development VAPID key every instance shares: the one in Redis, or, the first
        time, ``generate()``'s (set only if no other instance set one meanwhile)."""
        key = self.keys.vapid_key()
        found = await self.redis.get(key)
        if found is None:
            await self.redis.set(key, generate(), nx=True)
            found = await self.redis.get(key)
        if found is None:
            raise RuntimeError("the development VAPID key vanished from Redis as it was set")
        return _s(found)

    async def deliveries(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        raw = await self.redis.lrange(self.keys.deliveries(device_id), 0, limit - 1)
        return [json.loads(r) for r in raw]

    def queue_delivery_record(self, tx: Pipeline, device_id: str, record: dict[str, Any]) -> None:
        key = self.keys.deliveries(device_id)
        tx.lpush(key, json.dumps(record, separators=(",", ":")))
        tx.ltrim(key, 0, self.settings.delivery_log_max - 1)

    # ------------------------------------------------------------------ push queue

    async def ensure_push_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.push_jobs(), PUSH_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def take_jobs(
        self, consumer: str, count: int, block_ms: int
    ) -> list[tuple[str, PushJob | None]]:
        """New jobs for this consumer; a job that cannot be decoded comes back as None."""
        reply: Any = await self.redis.xreadgroup(
            PUSH_GROUP, consumer, {self.keys.push_jobs(): ">"}, count=count, block=block_ms
        )
        return [
            (_s(eid), _decode_job(fields)) for _stream, entries in reply for eid, fields in entries
        ]

    async def reclaim_jobs(
        self, consumer: str, min_idle_ms: int, count: int = 50
    ) -> list[tuple[str, PushJob | None]]:
        """Jobs another consumer took and did not finish within ``min_idle_ms`` (it died)."""
        reply: Any = await self.redis.xautoclaim(
            self.keys.push_jobs(), PUSH_GROUP, consumer, min_idle_ms, start_id="0-0", count=count
        )
        entries = reply[1]
        return [(_s(eid), _decode_job(fields)) for eid, fields in entries if fields]

    async def finish_job(
        self,
        entry_id: str,
        *,
        record: dict[str, Any] | None = None,
        device_id: str | None = None,
        retry: tuple[PushJob, int] | None = None,
        dead_letter: tuple[str, str] | None = None,
    ) -> None:
        """Ends one attempt atomically: ack the entry, log the attempt, and maybe reschedule
        (``retry=(job, due_ms)``) or park it (``dead_letter=(job_json, error)``)."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as tx:
            tx.xack(k.push_jobs(), PUSH_GROUP, entry_id)
            tx.xdel(k.push_jobs(), entry_id)
            if record is not None and device_id is not None:
                self.queue_delivery_record(tx, device_id, record)
            if retry is not None:
                job, due_ms = retry
                tx.zadd(k.push_retry(), {job.to_json(): due_ms})
            if dead_letter is not None:
                job_json, error = dead_letter
                tx.xadd(
                    k.push_dlq(),
                    {"job": job_json, "error": error, "at": iso(utcnow())},
                    maxlen=self.settings.dead_letter_max,
                    approximate=True,
                )
            await tx.execute()

    async def move_due_retries(self, now_ms: int, batch: int = 100) -> tuple[int, int | None]:
        """Moves due retries back to the job stream: (how many, next due ms or None)."""
        moved, next_due = await self.redis.eval(
            _MOVE_DUE, 2, self.keys.push_retry(), self.keys.push_jobs(), now_ms, batch
        )
        return int(moved), (None if int(next_due) < 0 else int(next_due))

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        entries: Any = await self.redis.xrange(self.keys.push_dlq(), count=count)
        return [
            {
                "entry_id": _s(eid),
                "job": json.loads(fields[b"job"]),
                "error": _s(fields[b"error"]),
                "at": _s(fields[b"at"]),
            }
            for eid, fields in entries
        ]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _endpoint_field(endpoint: str) -> str:
    return hashlib.sha256(endpoint.encode()).hexdigest()


def _decode_job(fields: dict[bytes, bytes]) -> PushJob | None:
    try:
        return PushJob.from_json(fields[b"job"])
    except (KeyError, ValueError, TypeError):
        return None
