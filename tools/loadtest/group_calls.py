"""``--scenario group``: group calls at ``--rate``, each ringing every device of every
invitee.

Each group of the population is a group conversation of its own (``lt<run>-g<index>``):
every member is premium, a member and has posted in it, so under policy's group rule
(docs/policy.md) a call by any member rings every other one (at most
``GROUP_CALL_MAX_PARTICIPANTS`` - 1: groups of up to 16 by default); the setup checks it
with the permission query's ``would_ring`` for every group. A call: a random member
starts it, every device of every invitee must ring (``group_ring_ms``: the POST sent →
that device's ``call.incoming``, one sample per device; a device that does not ring is
lost, so is an invitee none of whose devices rang), then the starter hangs up while it
rings: the call is cancelled and every invitee's device must be told. The group is free
again once that is done (a group has one live call; a member joined in one is busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

from tools.loadtest.http import HttpClient, Response
from tools.loadtest.metrics import Metric
from tools.loadtest.population import Fact, Group, Population, SetupError, premium
from tools.loadtest.scenarios import FINAL, Context, ScenarioFailed, counted, excerpt, request


def group_id(population: Population, group: Group) -> str:
    return f"lt{population.run_id}-g{group.index}"


def facts(population: Population) -> list[Fact]:
    """Every member premium, a member of the group, and one who posted in it."""
    made: list[Fact] = []
    for group in population.groups:
        path = f"/v1/platform/groups/{group_id(population, group)}"
        for user in group.users:
            made.append(premium(user))
            made.append(("PUT", f"{path}/members/{user.id}", None))
            made.append(("POST", f"{path}/messages", {"sender": user.id}))
    return made


async def check(population: Population, policy: HttpClient, *, within: float = 15.0) -> None:
    """In every group, a call by its first member would ring every other member."""
    deadline = asyncio.get_running_loop().time() + within
    for group in population.groups:
        starter, others = group.users[0], {u.id for u in group.users[1:]}
        path = f"/v1/permissions/groups/{group_id(population, group)}"
        while True:
            response = await policy.request("GET", path, token=starter.token)
            data = response.json() if response.status == 200 else None
            if isinstance(data, dict) and data.get("allowed") and set(data["would_ring"]) == others:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise SetupError(
                    f"a call in {path} would not ring all {len(others)} others (at most "
                    f"GROUP_CALL_MAX_PARTICIPANTS - 1 are rung): {response.status} "
                    f"{response.body[:300]!r}"
                )
            await asyncio.sleep(0.2)


async def run(ctx: Context, group: Group) -> None:
    """One group call on ``group``, its outcome recorded as ``group_call``; never raises."""
    with counted(ctx, "group_call", group):
        await _ring_everyone_then_cancel(ctx, group)


async def _ring_everyone_then_cancel(ctx: Context, group: Group) -> None:
    rec, signaling = ctx.recorder, ctx.signaling
    starter = ctx.rng.choice(group.users)
    invitees = [u for u in group.users if u is not starter]
    placed_at = time.monotonic()
    response = await request(
        signaling,
        "POST",
        "/v1/calls",
        token=starter.token,
        json_body={"group": group_id(ctx.population, group), "media": "audio"},
    )
    rec.observe(Metric.PLACE, (time.monotonic() - placed_at) * 1000)
    if response.status != 202:
        raise ScenarioFailed(f"place_{response.status}_{response.error_code}", excerpt(response))
    call_id = str(response.json()["call_id"])
    rec.call_placed()
    track = ctx.router.track(call_id)
    ended = False

    def left(since: float) -> float:
        return max(0.0, since + ctx.config.event_timeout_s - time.monotonic())

    def hang_up() -> Awaitable[Response]:
        path = f"/v1/calls/{call_id}/hangup"
        return request(signaling, "POST", path, token=starter.token, json_body={})

    try:
        for user in invitees:
            rang = 0
            for device in user.devices:
                got = await track.wait(
                    lambda r, d=device.device_id: r.device_id == d and r.type == "call.incoming",  # type: ignore[misc]
                    left(placed_at),
                )
                if got is None:
                    rec.lose("group_device_not_rung")
                    continue
                rang += 1
                rec.observe(Metric.GROUP_RING, (got.at - placed_at) * 1000)
            if not rang:
                rec.lose("group_invitee_never_rang")
        hangup = await hang_up()
        state = (hangup.json() or {}).get("state") if hangup.status == 200 else None
        if state != "cancelled":
            raise ScenarioFailed(f"hangup_{hangup.status}_{state}", excerpt(hangup))
        ended = True
        hung_up_at = time.monotonic()
        for device in (d for u in invitees for d in u.devices):
            stopped = await track.wait(
                lambda r, d=device.device_id: (  # type: ignore[misc]
                    r.device_id == d and r.type == "call.state" and r.state in FINAL
                ),
                left(hung_up_at),
            )
            if stopped is None:
                rec.lose("group_ring_not_stopped")
    finally:
        if not ended:  # best effort, so the group is free for its next call
            with contextlib.suppress(Exception):
                await hang_up()
        ctx.router.forget(call_id)
