"""Push: webhook signing and the worker that delivers queued pushes to
every kind of target (webhooks, and Web Push subscriptions: webpush.py makes their request).

Where pushes wait (nothing is held only in memory, so a restart loses nothing):

- ``push:jobs`` (a Redis stream with consumer group ``push``): one job per (notification,
  device), written in the same transaction as the notification (store.py). Every instance
  reads it with XREADGROUP; a job is pending until its attempt is over.
- An attempt ends atomically (MULTI): the entry is acked and deleted, the attempt is logged
  for the device, and the job is either done, rescheduled in ``push:retry`` (a ZSET scored
  by due time) or parked in ``push:dlq``.
- A mover on every instance puts due retries back on ``push:jobs`` (one Lua script, so a
  retry moves once however many instances run it).
- A job taken by an instance that died stays pending; after ``push_claim_idle_ms`` another
  instance claims it (XAUTOCLAIM) and delivers it. Deliveries are therefore at least once:
  the ``X-Dmcall-Delivery`` header is the same on every attempt of one job, so a receiver
  can drop a repeat.

Fairness (scheduling.py): the jobs an instance has taken wait in a fair queue in front of
its ``push_concurrency`` slots, with caps per target and per user and users taking turns,
so one user's slow targets cannot hold up another user's ring. A job of a user who has
the most jobs waiting here already goes back to ``push:retry`` for a moment, without
counting an attempt. An ``incoming_call`` attempt has its own, shorter timeout. A target
that timed out ``push_breaker_timeouts`` times in a row is not tried for the cool-off (its
breaker, per instance, is open): each attempt skipped so is a failed attempt like a
timeout, retried no sooner than the cool-off ends and dead-lettered after the last one.

Outcomes: 2xx delivered; 410 Gone (and, from a Web Push service, 404: the subscription
expired or was unsubscribed) removes the device; a timeout, a connection error, 408,
429 or 5xx is retried with exponential backoff (``base * 2^(attempt-1)``, capped, with
jitter) up to ``push_max_attempts``, then dead-lettered; any other status (a receiver that
refuses the request) and an address that became private are dead-lettered at once, since
repeating cannot help. An ``incoming_call`` whose ring deadline has passed is dropped as
``expired`` instead of being tried again: a call screen for a call that stopped ringing is
worse than none.

The address guard (guard.py) is checked again before every attempt (DNS may change), and
the request goes to the address that was checked. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx
from prometheus_client import Counter
from py_vapid import VapidException

from services.notifications import webpush
from services.notifications.guard import UrlRefused, pinned, resolve_allowed
from services.notifications.notices import NoticeKind, Priority
from services.notifications.scheduling import Breakers, FairScheduler, Limits, Queued
from services.notifications.settings import NotificationsSettings
from services.notifications.store import (
    Device,
    DeviceKind,
    NotificationStore,
    PushJob,
)
from shared.clock import iso, utcnow
from shared.service import TaskSet

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dmcall-Signature"
DELIVERY_HEADER = "X-Dmcall-Delivery"
USER_AGENT = "dmcall-notifications/1.0"
BACKLOG_FACTOR = 4
"""Jobs held in memory per instance (and per user, per target): this many times the
concurrency (of the instance, the user, the target)."""
FETCH_MAX = 100
DEFER_MS = 1000
"""A job of a user with a full backlog here comes back after about this long."""

PUSHES = Counter(
    "dmcall_notifications_push_total",
    "Push attempts by target kind (webhook, webpush) and outcome",
    ["target", "outcome"],
)


# --------------------------------------------------------------------------- signing


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Dmcall-Signature`` value: ``t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, now: int, tolerance_s: int = 300) -> bool:
    """What a receiver does (docs/notifications.md has the same code to copy)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def backoff_ms(attempt: int, base_ms: int, cap_ms: int, rand: Callable[[], float]) -> int:
    """Delay after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), capped, with
    "equal jitter" (half fixed, half random) so retries of many pushes do not align."""
    ceiling = min(cap_ms, base_ms * (2 ** (attempt - 1)))
    return int(ceiling / 2 + rand() * ceiling / 2)


# --------------------------------------------------------------------------- the worker


class Outcome(StrEnum):
    """How one push attempt ended: the delivery log's ``outcome`` and the metric's label."""

    DELIVERED = "delivered"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    GONE = "gone"
    """The target is gone for good (410; a push service's 404): the device is removed."""
    EXPIRED = "expired"
    """An ``incoming_call`` whose call stopped ringing: not sent."""
    DROPPED = "dropped"
    """Not tried: the device was removed (metric only, no device to log it for)."""
    DEFERRED = "deferred"
    """Not tried yet: back in the retry queue for a moment, not an attempt (metric only)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt went."""

    outcome: Outcome
    status: int | None = None
    error: str | None = None
    not_before_s: float | None = None
    """retrying: wait at least this long (a target's breaker is open)."""
    timed_out: bool = False
    """The target did not answer in time (what a breaker counts)."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one attempt sends, apart from where to and the common headers."""

    body: bytes
    headers: dict[str, str]


class PushWorker:
    """Delivers the push jobs of ``push:jobs``; every instance runs one."""

    def __init__(
        self,
        store: NotificationStore,
        settings: NotificationsSettings,
        client: httpx.AsyncClient,
        consumer: str,
        vapid: webpush.VapidKeys | None = None,
    ) -> None:
        """``vapid`` is None when Web Push is disabled: pushes to webpush targets are then
        dead-lettered."""
        self.store = store
        self.settings = settings
        self.client = client
        self.consumer = consumer
        self.vapid = vapid
        self.webpush_policy = webpush.DeliveryPolicy(
            default_ttl_s=settings.webpush_ttl_s,
            ring_stopped_ttl_s=settings.webpush_ring_stopped_ttl_s,
        )
        self.scheduler = FairScheduler(
            Limits(
                total=settings.push_concurrency,
                per_user=settings.push_per_user_concurrency,
                per_target=settings.push_per_target_concurrency,
                user_backlog=BACKLOG_FACTOR * settings.push_per_user_concurrency,
                target_backlog=BACKLOG_FACTOR * settings.push_per_target_concurrency,
                backlog=BACKLOG_FACTOR * settings.push_concurrency,
            )
        )
        self.breakers = Breakers(settings.push_breaker_timeouts, settings.push_breaker_cooloff_s)
        self._room = asyncio.Event()
        self._room.set()
        self._inflight = TaskSet()
        self._random = random.SystemRandom()

    async def close(self) -> None:
        await self._inflight.close()

    # ------------------------------------------------------------------ loops

    async def run_fetcher(self) -> None:
        await _until_ok(self.store.ensure_push_group, "create the push consumer group")
        while True:
            try:
                while self.scheduler.room == 0:  # wait for room before taking work
                    self._room.clear()
                    await self._room.wait()
                jobs = await self.store.take_jobs(
                    self.consumer, min(self.scheduler.room, FETCH_MAX), block_ms=2000
                )
                for entry_id, job in jobs:
                    await self._accept(entry_id, job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("taking push jobs failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self.store.ensure_push_group()
                continue
            self._start_ready()

    async def run_mover(self) -> None:
        while True:
            try:
                moved, next_due = await self.store.move_due_retries(_now_ms())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("moving due push retries failed (%s)", exc)
                await asyncio.sleep(0.5)
                continue
            if moved:
                continue
            wait_s = 0.5 if next_due is None else (next_due - _now_ms()) / 1000
            await asyncio.sleep(min(max(wait_s, 0.02), 0.5))

    async def run_reclaimer(self) -> None:
        idle = self.settings.push_claim_idle_ms
        while True:
            await asyncio.sleep(min(idle / 2000, 30.0))
            try:
                jobs = await self.store.reclaim_jobs(self.consumer, idle)
                for entry_id, job in jobs:
                    if self.scheduler.knows(entry_id):
                        continue  # ours, still waiting or running here
                    log.info("took over push job %s from a consumer that stopped", entry_id)
                    await self._accept(entry_id, job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reclaiming push jobs failed (%s)", exc)
                continue
            self._start_ready()

    async def _accept(self, entry_id: str, job: PushJob | None) -> None:
        """Takes a job into the scheduler, or, when its user or target has the most jobs
        waiting here already, puts it back in the retry queue for a moment (not counted
        as an attempt), so one user's flood leaves room for everyone else's pushes."""
        if job is not None and self.scheduler.is_full(job.user, job.device):
            delay = int(DEFER_MS * (0.5 + self._random.random()))
            await self.store.finish_job(entry_id, retry=(job, _now_ms() + delay))
            PUSHES.labels("unknown", Outcome.DEFERRED).inc()
            return
        self.scheduler.offer(
            Queued(
                entry_id=entry_id,
                user=job.user if job else "",
                target=job.device if job else "",
                urgent=job is not None and job.priority is Priority.HIGH,
                job=job,
            )
        )

    def _start_ready(self) -> None:
        while (item := self.scheduler.next()) is not None:
            self._inflight.spawn(self._run_one(item), name=f"push-{item.entry_id}")

    async def _run_one(self, item: Queued) -> None:
        entry_id, job = item.entry_id, item.job
        try:
            if job is None:
                log.error("push job %s cannot be decoded; dead-lettering it", entry_id)
                await self.store.finish_job(entry_id, dead_letter=("{}", "undecodable job"))
                return
            await self.deliver(entry_id, job)
        except asyncio.CancelledError:
            raise  # the job stays pending; an instance claims it after push_claim_idle_ms
        except Exception:
            log.exception("push job %s failed; it will be claimed again", entry_id)
        finally:
            self.scheduler.done(item)
            self._room.set()
            self._start_ready()

    # ------------------------------------------------------------------ one attempt

    async def deliver(self, entry_id: str, job: PushJob) -> Attempt:
        device = await self.store.device(job.device)
        if device is None or not device.active:
            await self.store.finish_job(entry_id)  # the target is gone: nothing to do
            PUSHES.labels(device.kind if device else "unknown", Outcome.DROPPED).inc()
            return Attempt(Outcome.DROPPED)
        notification = {"id": job.nid, **json.loads(job.notification)}
        started = time.perf_counter()
        attempt = await self._attempt(device, job, notification)
        record = {
            "delivery_id": job.id,
            "notification_id": job.nid,
            "kind": notification.get("kind"),
            "attempt": job.attempt,
            "outcome": attempt.outcome,
            "status": attempt.status,
            "error": attempt.error,
            "at": iso(utcnow()),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        retry = None
        dead = None
        if attempt.outcome is Outcome.RETRYING:
            delay = backoff_ms(
                job.attempt,
                self.settings.push_backoff_base_ms,
                self.settings.push_backoff_max_ms,
                self._random.random,
            )
            if attempt.not_before_s is not None:  # a breaker's cool-off: no sooner than that
                delay = max(delay, math.ceil(attempt.not_before_s * 1000))
            record["next_attempt_at"] = iso(datetime.fromtimestamp((_now_ms() + delay) / 1000, UTC))
            retry = (job.next_attempt(), _now_ms() + delay)
        elif attempt.outcome is Outcome.DEAD_LETTERED:
            dead = (job.to_json(), attempt.error or f"HTTP {attempt.status}")
        await self.store.finish_job(
            entry_id, record=record, device_id=device.id, retry=retry, dead_letter=dead
        )
        if attempt.outcome is Outcome.GONE:
            await self.store.remove_device(device, "gone")
            log.info("device %s answered %s: removed", device.id, attempt.status)
        PUSHES.labels(device.kind, attempt.outcome).inc()
        return attempt

    async def _attempt(self, device: Device, job: PushJob, notification: dict[str, Any]) -> Attempt:
        kind = notification.get("kind")
        if kind == NoticeKind.INCOMING_CALL and _deadline_passed(notification):
            return Attempt(Outcome.EXPIRED, error="the call stopped ringing before delivery")
        wait_s = self.breakers.allow(device.id, time.monotonic())
        if wait_s is not None:
            skipped = self._failed(
                job,
                None,
                f"circuit open: the target timed out {self.breakers.threshold} times in a "
                "row; not tried",
            )
            return dataclasses.replace(skipped, not_before_s=wait_s)
        try:
            attempt = await self._request(device, job, notification, kind)
        except BaseException:
            self.breakers.abandoned(device.id)
            raise
        if attempt.timed_out:
            if self.breakers.timed_out(device.id, time.monotonic()):
                log.warning(
                    "device %s timed out %d times in a row: not tried for %.0f s",
                    device.id,
                    self.breakers.threshold,
                    self.breakers.cooloff_s,
                )
        elif attempt.status is not None or attempt.outcome is Outcome.RETRYING:
            self.breakers.answered(device.id)
        else:
            self.breakers.abandoned(device.id)
        return attempt

    async def _request(
        self,
        device: Device,
        job: PushJob,
        notification: dict[str, Any],
        kind: Any,
    ) -> Attempt:
        try:
            address = await resolve_allowed(
                device.url, allow_private=self.settings.webhook_allow_private, kind=device.kind
            )
        except UrlRefused as exc:
            if exc.reason == "unresolvable_host":
                return self._failed(job, None, str(exc))
            return Attempt(Outcome.DEAD_LETTERED, error=str(exc))
        payload: dict[str, Any] = {
            "delivery_id": job.id,
            "device_id": device.id,
            "user": job.user,
            "priority": job.priority.value,
            "notification": notification,
        }
        if "ring_deadline" in notification:
            payload["ring_deadline"] = notification["ring_deadline"]
        body = json.dumps(payload, separators=(",", ":")).encode()
        if device.kind is DeviceKind.WEBPUSH:
            outgoing = await self._webpush_request(device, job, body, notification)
        else:
            outgoing = self._webhook_request(device, job, body, str(kind))
        if isinstance(outgoing, Attempt):
            return outgoing
        url, host_header, server_name = pinned(device.url, address)
        headers = {"User-Agent": USER_AGENT, "Host": host_header, **outgoing.headers}
        timeout_s = (
            self.settings.push_incoming_call_timeout_s
            if kind == NoticeKind.INCOMING_CALL
            else self.settings.push_timeout_s
        )
        try:
            response = await self.client.post(
                url,
                content=outgoing.body,
                headers=headers,
                timeout=timeout_s,
                extensions={"sni_hostname": server_name},
            )
        except httpx.TimeoutException:
            failed = self._failed(job, None, f"timed out after {timeout_s}s")
            return dataclasses.replace(failed, timed_out=True)
        except httpx.HTTPError as exc:
            return self._failed(job, None, f"{type(exc).__name__}: {exc}")
        status = response.status_code
        if 200 <= status < 300:
            return Attempt(Outcome.DELIVERED, status=status)
        # A push service answers 404 for an expired subscription and 410 for one the user
        # ended (RFC 8030 §7.3, RFC 8292 §4): either way it never comes back.
        if status == 410 or (status == 404 and device.kind is DeviceKind.WEBPUSH):
            return Attempt(Outcome.GONE, status=status)
        if status >= 500 or status in (408, 429):
            return self._failed(job, status, f"HTTP {status}")
        return Attempt(Outcome.DEAD_LETTERED, status=status, error=f"HTTP {status} (not retried)")

    def _webhook_request(self, device: Device, job: PushJob, body: bytes, kind: str) -> Outgoing:
        return Outgoing(
            body,
            {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(device.secret, body, int(time.time())),
                DELIVERY_HEADER: job.id,
                "X-Dmcall-Attempt": str(job.attempt),
                "X-Dmcall-Priority": job.priority.value,
                "X-Dmcall-Kind": kind,
            },
        )

    async def _webpush_request(
        self, device: Device, job: PushJob, body: bytes, notification: dict[str, Any]
    ) -> Outgoing | Attempt:
        """The same JSON a webhook gets, encrypted for the subscriber and VAPID-signed; no
        dmcall headers (the push service does not forward them, and need not see them)."""
        if self.vapid is None:
            return Attempt(Outcome.DEAD_LETTERED, error="Web Push is disabled in this deployment")
        if not device.p256dh or not device.auth:
            return Attempt(Outcome.DEAD_LETTERED, error="the subscription has no keys")
        try:
            signer = await self.vapid.signer()
        except Exception as exc:  # the shared development key lives in Redis
            return self._failed(job, None, f"VAPID key unavailable: {exc}")
        try:
            encrypted = webpush.encrypt(
                body, webpush.b64url_decode(device.p256dh), webpush.b64url_decode(device.auth)
            )
            authorization = signer.authorization(device.url)
        except (ValueError, VapidException) as exc:
            return Attempt(Outcome.DEAD_LETTERED, error=f"cannot make the push: {exc}")
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Encoding": webpush.CONTENT_ENCODING,
            "Authorization": authorization,
            **webpush.delivery_headers(notification, job.priority, self.webpush_policy),
        }
        return Outgoing(encrypted, headers)

    def _failed(self, job: PushJob, status: int | None, error: str) -> Attempt:
        if job.attempt >= self.settings.push_max_attempts:
            return Attempt(Outcome.DEAD_LETTERED, status=status, error=f"{error} (last attempt)")
        return Attempt(Outcome.RETRYING, status=status, error=error)


def _deadline_passed(notification: dict[str, Any]) -> bool:
    raw = notification.get("ring_deadline")
    if not isinstance(raw, str):
        return False
    try:
        deadline = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return False
    return deadline < datetime.now(UTC)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _until_ok(step: Callable[[], Any], what: str) -> None:
    delay = 0.2
    while True:
        try:
            await step()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not %s (%s); retrying", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
