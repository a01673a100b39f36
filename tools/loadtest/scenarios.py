"""One simulated call per outcome: drive it through the public API, time what the devices
see, and file anything unexpected as an error of a named kind.

Every scenario leaves its users idle (a call that went wrong is hung up), so the group
can be reused; losses (a call that never rang, a notification that never came) are
counted apart from errors because they are the harness's headline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tools.loadtest.config import LoadConfig, Outcome
from tools.loadtest.devices import (
    CallTrack,
    Received,
    Router,
    answered_elsewhere_on,
    incoming_for,
)
from tools.loadtest.http import HttpClient, HttpError, Response
from tools.loadtest.metrics import Metric, Recorder
from tools.loadtest.population import Group, Population, User
from tools.loadtest.sse import NotificationFeed

# call.state values that end a call (the contract's final states).
FINAL = ("ended", "rejected", "declined", "cancelled", "missed", "busy")


@dataclass
class Context:
    config: LoadConfig
    signaling: HttpClient
    feed: NotificationFeed | None
    router: Router
    recorder: Recorder
    population: Population
    rng: random.Random


class ScenarioFailed(Exception):
    """The call did not go as planned; ``kind`` names how (it becomes the error's kind)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def parse_time(value: Any) -> float | None:
    """A server timestamp (ISO-8601 or epoch seconds/ms) as epoch seconds."""
    if isinstance(value, int | float):
        return float(value) / 1000 if value > 1e11 else float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


class Call:
    """One call placed by the harness."""

    def __init__(self, ctx: Context, caller: User, callee: User, media: str) -> None:
        self.ctx = ctx
        self.caller = caller
        self.callee = callee
        self.media = media
        self.call_id = ""
        self.placed_at = 0.0
        self.track: CallTrack | None = None
        self.finished = False

    async def place(self) -> None:
        ctx = self.ctx
        self.placed_at = time.monotonic()
        response = await request(
            ctx.signaling,
            "POST",
            "/v1/calls",
            token=self.caller.token,
            json_body={"callee": self.callee.id, "media": self.media},
        )
        ctx.recorder.observe(Metric.PLACE, (time.monotonic() - self.placed_at) * 1000)
        if response.status != 202:
            raise ScenarioFailed(
                f"place_{response.status}_{response.error_code}", excerpt(response)
            )
        data = response.json()
        if not isinstance(data, dict) or not isinstance(data.get("call_id"), str):
            raise ScenarioFailed("place_bad_body", excerpt(response))
        self.call_id = data["call_id"]
        self.track = ctx.router.track(self.call_id)
        ctx.recorder.call_placed()

    async def wait(self, predicate: Any, within: float | None = None) -> Received | None:
        assert self.track is not None
        return await self.track.wait(predicate, within or self.ctx.config.event_timeout_s)

    async def wait_ring(self) -> Received:
        """The callee's first ringing device (or the end that came instead)."""
        callee, caller = self.callee.id, self.caller.id
        got = await self.wait(
            lambda r: (
                (r.user == callee and r.type == "call.incoming")
                or (r.user == caller and r.type == "call.state" and r.state in FINAL)
            )
        )
        if got is None:
            self.ctx.recorder.lose("never_rang")
            raise ScenarioFailed("ring_timeout", f"call {self.call_id}")
        if got.type != "call.incoming":
            raise ScenarioFailed(
                f"ended_before_ring_{got.state}_{got.message.get('reason')}", str(got.message)
            )
        self.ctx.recorder.observe(Metric.RING, (got.at - self.placed_at) * 1000)
        return got

    async def check_every_device_rang(self) -> None:
        """Every device of the callee rings, not just the first (counted when one does not)."""
        for device in self.callee.devices:
            device_id = device.device_id
            got = await self.wait(
                lambda r, d=device_id: r.device_id == d and r.type == "call.incoming",  # type: ignore[misc]
                within=self.ctx.config.event_timeout_s,
            )
            if got is None:
                self.ctx.recorder.lose("device_not_rung")

    async def act(self, who: User, action: str, body: dict[str, Any] | None = None) -> Response:
        response = await request(
            self.ctx.signaling,
            "POST",
            f"/v1/calls/{self.call_id}/{action}",
            token=who.token,
            json_body=body if body is not None else {},
        )
        if response.status >= 300:
            kind = f"{action}_{response.status}_{response.error_code}"
            raise ScenarioFailed(kind, excerpt(response))
        return response

    async def expect_state(self, who: User, *states: str, within: float | None = None) -> Received:
        wanted = set(states)
        got = await self.wait(
            lambda r: (
                r.user == who.id
                and r.type == "call.state"
                and (r.state in wanted or r.state in FINAL)
            ),
            within,
        )
        if got is None:
            kind = f"no_state_{'_'.join(states)}"
            raise ScenarioFailed(kind, f"call {self.call_id} for {who.id}")
        if got.state not in wanted:
            raise ScenarioFailed(
                f"state_{got.state}_instead_of_{'_'.join(states)}", str(got.message)[:300]
            )
        return got

    async def abandon(self) -> None:
        """Best effort: end a call that went wrong so its users are idle again."""
        if not self.call_id:
            return
        if self.finished:
            self.ctx.router.forget(self.call_id)
            return
        for token in (self.caller.token, self.callee.token):
            if not token:
                continue
            with contextlib.suppress(Exception):
                await request(
                    self.ctx.signaling,
                    "POST",
                    f"/v1/calls/{self.call_id}/hangup",
                    token=token,
                    json_body={},
                )
        self.ctx.router.forget(self.call_id)

    async def ring_deadline(self, ring: Received) -> float:
        deadline = parse_time(ring.message.get("ring_deadline"))
        if deadline is not None:
            return deadline
        response = await request(
            self.ctx.signaling, "GET", f"/v1/calls/{self.call_id}", token=self.caller.token
        )
        data = response.json() if response.status == 200 else None
        deadline = parse_time(data.get("ring_deadline")) if isinstance(data, dict) else None
        if deadline is None:
            raise ScenarioFailed("no_ring_deadline", excerpt(response))
        return deadline


async def request(client: HttpClient, method: str, path: str, **kwargs: Any) -> Response:
    try:
        return await client.request(method, path, **kwargs)
    except HttpError as exc:
        raise ScenarioFailed(f"http_{exc.kind}", str(exc)) from exc


def excerpt(response: Response) -> str:
    return response.body[:300].decode(errors="replace")


def _media(ctx: Context) -> str:
    return "video" if ctx.rng.random() < 0.3 else "audio"


# --------------------------------------------------------------------------- outcomes


async def _answer(ctx: Context, call: Call) -> None:
    """Ring, accept on one device, and time the caller's accepted-with-media-token."""
    await call.wait_ring()
    await asyncio.sleep(ctx.config.answer_delay_s)
    device = ctx.rng.choice(call.callee.devices)
    started = time.monotonic()
    response = await call.act(call.callee, "accept", {"device_id": device.device_id})
    data = response.json()
    if not isinstance(data, dict) or not data.get("media_token"):
        ctx.recorder.error("accept_without_media_token", excerpt(response))
    got = await call.expect_state(call.caller, "accepted", "active")
    if not got.message.get("media_token"):
        raise ScenarioFailed("caller_accepted_without_media_token", str(got.message)[:300])
    ctx.recorder.observe(Metric.CONNECT, (got.at - started) * 1000)
    # Answered on one device: every other device of the callee must stop ringing.
    for other in call.callee.devices:
        if other is device:
            continue
        stopped = await call.wait(answered_elsewhere_on(other.device_id))
        if stopped is None:
            ctx.recorder.lose("ring_not_stopped_on_other_device")


async def _hang_up(ctx: Context, call: Call) -> None:
    await asyncio.sleep(ctx.config.hold_s)
    await call.act(call.caller, "hangup")
    await call.expect_state(call.callee, "ended")
    call.finished = True


async def answered(ctx: Context, call: Call) -> None:
    await call.place()
    await _answer(ctx, call)
    await call.check_every_device_rang()
    await _hang_up(ctx, call)


async def _ended_while_ringing(ctx: Context, call: Call, by_callee: bool, action: str) -> None:
    """Ring, then one side ends the call (``action``); the other side must hear it."""
    await call.place()
    await call.wait_ring()
    await asyncio.sleep(ctx.config.answer_delay_s)
    started = time.monotonic()
    actor, other = (call.callee, call.caller) if by_callee else (call.caller, call.callee)
    await call.act(actor, action)
    got = await call.expect_state(other, "declined" if by_callee else "cancelled")
    call.finished = True
    ctx.recorder.observe(Metric.END_STATE, (got.at - started) * 1000)


async def declined(ctx: Context, call: Call) -> None:
    await _ended_while_ringing(ctx, call, by_callee=True, action="decline")


async def cancelled(ctx: Context, call: Call) -> None:
    await _ended_while_ringing(ctx, call, by_callee=False, action="hangup")


async def missed(ctx: Context, call: Call) -> None:
    await call.place()
    ring = await call.wait_ring()
    deadline = await call.ring_deadline(ring)
    wait_s = max(0.0, deadline - time.time()) + ctx.config.event_timeout_s
    got = await call.expect_state(call.caller, "missed", within=wait_s)
    call.finished = True
    ctx.recorder.observe(Metric.MISSED_LATENESS, (got.wall - deadline) * 1000)


async def busy(ctx: Context, group: Group) -> tuple[Call, Call]:
    """A and B are in a call; X calls B and must hear busy."""
    a, b, x = group.users[0], group.users[1], group.users[2]
    first = Call(ctx, a, b, _media(ctx))
    second = Call(ctx, x, b, _media(ctx))
    try:
        await first.place()
        await _answer(ctx, first)
        await second.place()
        got = await second.expect_state(x, "busy")
        second.finished = True
        ctx.recorder.observe(Metric.BUSY, (got.at - second.placed_at) * 1000)
        if second.track is not None and second.track.first(incoming_for(b.id)) is not None:
            ctx.recorder.error("busy_callee_rang", second.call_id)
        await _hang_up(ctx, first)
    finally:
        await second.abandon()
        await first.abandon()
    return first, second


async def denied(ctx: Context, call: Call) -> None:
    await call.place()
    got = await call.expect_state(call.caller, "rejected")
    call.finished = True
    ctx.recorder.observe(Metric.REJECT, (got.at - call.placed_at) * 1000)
    # Strangers never sent the caller a DM: the caller-safe reason says exactly that.
    if got.message.get("reject_reason") != "no_prior_dm":
        ctx.recorder.error("denied_with_unexpected_reason", str(got.message)[:300])


TWO_PARTY = {
    Outcome.ANSWERED: answered,
    Outcome.DECLINED: declined,
    Outcome.CANCELLED: cancelled,
    Outcome.MISSED: missed,
}


async def check_notifications(ctx: Context, call: Call, outcome: Outcome) -> None:
    """What the callee's notification stream must show for this call (sampled users).

    Every call that rang must stop ringing there (``ring_stopped``); a missed call must also
    have rung there (``incoming_call``) and be reported missed (``missed_call``); the callee
    of a busy call gets ``missed_call``. For a call answered, declined or cancelled quickly,
    notifications leaves ``incoming_call`` out when the stop was handled first (by design):
    that is counted apart, not as a loss.
    """
    feed = ctx.feed
    if feed is None or not call.call_id or call.callee.id not in feed.users:
        return
    rec = ctx.recorder
    rec.notify_checked += 1
    if outcome is Outcome.BUSY:
        required = {"missed_call"}
    elif outcome is Outcome.MISSED:
        required = {"incoming_call", "ring_stopped", "missed_call"}
    else:
        required = {"ring_stopped"}
    missing = await feed.wait_for(
        call.callee.id, call.call_id, required, ctx.config.notify_timeout_s
    )
    for kind in sorted(missing):
        rec.lose(f"notification_never_came_{kind}")
    seen = feed.seen.get((call.callee.id, call.call_id), {})
    if "incoming_call" in seen:
        rec.observe(Metric.NOTIFY, (seen["incoming_call"] - call.placed_at) * 1000)
    elif outcome is not Outcome.BUSY and "incoming_call" not in required:
        rec.notify_incoming_skipped += 1


@contextlib.contextmanager
def counted(ctx: Context, name: str, group: Group) -> Iterator[None]:
    """One scenario on ``group``: its outcome recorded (``name``, or ``name_failed`` with
    the error by kind), never raising, and the group free again afterwards."""
    rec = ctx.recorder
    rec.scenarios_started += 1
    rec.in_flight += 1
    try:
        yield
        rec.outcome(name)
    except ScenarioFailed as exc:
        rec.error(exc.kind, exc.detail)
        rec.outcome(f"{name}_failed")
    except Exception as exc:  # a harness bug must not stop the run; it is counted
        rec.error(f"harness_{type(exc).__name__}", repr(exc))
        rec.outcome(f"{name}_failed")
    finally:
        ctx.population.release(group)
        rec.in_flight -= 1


async def run_one(ctx: Context, outcome: Outcome, group: Group) -> None:
    """Run one scenario on ``group`` and record its outcome; never raises."""
    notify: Call | None = None
    with counted(ctx, outcome.value, group):
        if outcome is Outcome.BUSY:
            _, notify = await busy(ctx, group)
        elif outcome is Outcome.DENIED:
            caller = ctx.rng.choice(group.users)
            stranger = User(ctx.rng.choice(ctx.population.strangers), "")
            call = Call(ctx, caller, stranger, _media(ctx))
            try:
                await denied(ctx, call)
            finally:
                await call.abandon()
        else:
            caller, callee = ctx.rng.sample(group.users, 2)
            call = Call(ctx, caller, callee, _media(ctx))
            try:
                await TWO_PARTY[outcome](ctx, call)
            finally:
                await call.abandon()
            notify = call
    if notify is not None:
        await check_notifications(ctx, notify, outcome)
