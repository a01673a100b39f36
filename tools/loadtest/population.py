"""The simulated users: groups of users who may call each other, their devices, and the
platform facts that make their calls allowed (or, for strangers, denied).

A call keeps its whole group busy, so two calls never share a user unless the scenario
wants it (busy). Within a group everyone is premium, follows everyone else and has had a
DM from everyone else, so any member may call any other under the default settings. A
*stranger* has no facts at all: calling one is denied by policy (``no_prior_dm``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from tools.loadtest.devices import Device, Router
from tools.loadtest.http import HttpClient, HttpError
from tools.loadtest.metrics import Recorder
from tools.loadtest.tokens import TokenSource


@dataclass
class User:
    id: str
    token: str
    devices: list[Device] = field(default_factory=list)


@dataclass
class Group:
    index: int
    users: list[User]


class SetupError(RuntimeError):
    pass


@dataclass
class Population:
    run_id: str
    groups: list[Group]
    strangers: list[str]
    _free: deque[Group] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._free.extend(self.groups)

    @property
    def users(self) -> list[User]:
        return [u for g in self.groups for u in g.users]

    @property
    def devices(self) -> list[Device]:
        return [d for u in self.users for d in u.devices]

    def acquire(self) -> Group | None:
        return self._free.popleft() if self._free else None

    def release(self, group: Group) -> None:
        self._free.append(group)


def plan(
    *,
    groups: int,
    group_size: int,
    tokens: TokenSource,
    rng: random.Random,
    run_id: str | None = None,
) -> Population:
    """Name the users (or take them from the token file) and split them into groups."""
    run_id = run_id or uuid.uuid4().hex[:6]
    given = tokens.available_users()
    if given is not None:
        if len(given) < group_size:
            raise SetupError(f"the token file has {len(given)} users; need >= {group_size}")
        groups = min(groups, len(given) // group_size)
        ids = given[: groups * group_size]
    else:
        ids = [f"lt{run_id}-{g}-{i}" for g in range(groups) for i in range(group_size)]
    made = [
        Group(
            g, [User(uid, tokens.user(uid)) for uid in ids[g * group_size : (g + 1) * group_size]]
        )
        for g in range(groups)
    ]
    rng.shuffle(made)
    strangers = [f"lt{run_id}-stranger-{i}" for i in range(8)]
    return Population(run_id, made, strangers)


async def bounded(jobs: Iterable[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    queue: deque[Callable[[], Awaitable[None]]] = deque(jobs)

    async def worker() -> None:
        while queue:
            await queue.popleft()()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def connected_pairs(
    prefix: str,
    count: int,
    policy: HttpClient,
    tokens: TokenSource,
    router: Router,
    ws_bases: tuple[str, str],
    *,
    concurrency: int,
) -> Population:
    """``count`` caller/callee pairs (``{prefix}-{i}-a`` calls ``{prefix}-{i}-b``) with the
    facts that allow it, one device each, connected: the caller's to ``ws_bases[0]``, the
    callee's to ``ws_bases[1]`` (two signaling instances, or the same one twice)."""
    population = Population(
        prefix,
        [
            Group(i, [User(u, tokens.user(u)) for u in (f"{prefix}-{i}-a", f"{prefix}-{i}-b")])
            for i in range(count)
        ],
        [],
    )
    await set_up_facts(group_facts(population), policy, tokens, concurrency=concurrency)
    for group in population.groups:
        for user, ws_base in zip(group.users, ws_bases, strict=True):
            user.devices.append(Device(ws_base, user.id, f"{user.id}-d0", user.token, router))
    await bounded([d.connect for d in population.devices], 2 * concurrency)
    return population


Fact = tuple[str, str, dict[str, object] | None]
"""One platform API request (method, path, JSON body) that tells policy a fact."""


def premium(user: User) -> Fact:
    return ("PUT", f"/v1/platform/users/{user.id}", {"premium": True, "verified": False})


def group_facts(population: Population) -> list[Fact]:
    """Within each group: everyone premium, following and DMed by everyone else."""
    facts: list[Fact] = []
    for group in population.groups:
        for user in group.users:
            facts.append(premium(user))
        for caller in group.users:
            for callee in group.users:
                if caller is callee:
                    continue
                follow = f"/v1/platform/users/{callee.id}/following/{caller.id}"
                facts.append(("PUT", follow, None))
                facts.append(
                    ("POST", "/v1/platform/dms", {"sender": callee.id, "recipient": caller.id})
                )
    return facts


async def set_up_facts(
    facts: list[Fact], policy: HttpClient, tokens: TokenSource, *, concurrency: int
) -> int:
    """Tell policy the facts (through the platform API); returns how many were sent."""
    platform = tokens.platform_token()
    failures: list[str] = []

    def job(
        method: str, path: str, body: dict[str, object] | None
    ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for attempt in range(3):
                try:
                    response = await policy.request(method, path, token=platform, json_body=body)
                except HttpError as exc:
                    if attempt == 2:
                        failures.append(f"{method} {path}: {exc}")
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                if response.status < 300:
                    break
                if response.status < 500 and response.status != 429:
                    failures.append(f"{method} {path}: {response.status} {response.body[:200]!r}")
                    break
                await asyncio.sleep(0.2 * (attempt + 1))

        return run

    await bounded((job(*f) for f in facts), concurrency)
    if failures:
        raise SetupError(
            f"{len(failures)} platform facts were refused, e.g. {failures[0]} "
            "(is the token's scope 'platform', and the policy URL right?)"
        )
    return len(facts)


async def check_facts(population: Population, policy: HttpClient, *, within: float = 15.0) -> None:
    """One allowed pair and one stranger must read as the facts say, before load starts."""
    group = population.groups[0]
    caller, callee = group.users[0], group.users[1]
    deadline = asyncio.get_running_loop().time() + within
    last = ""
    while True:
        response = await policy.request("GET", f"/v1/permissions/{callee.id}", token=caller.token)
        data = response.json() if response.status == 200 else None
        if isinstance(data, dict) and data.get("allowed") is True:
            break
        last = f"{response.status} {response.body[:300]!r}"
        if asyncio.get_running_loop().time() > deadline:
            raise SetupError(f"{caller.id} may still not call {callee.id}: {last}")
        await asyncio.sleep(0.2)
    response = await policy.request(
        "GET", f"/v1/permissions/{population.strangers[0]}", token=caller.token
    )
    data = response.json() if response.status == 200 else None
    if not (isinstance(data, dict) and data.get("allowed") is False):
        raise SetupError(
            f"calling a stranger should be denied, policy says {response.status} "
            f"{response.body[:300]!r}"
        )


async def connect_devices(
    population: Population,
    ws_base: str,
    router: Router,
    recorder: Recorder,
    rng: random.Random,
    *,
    min_devices: int,
    max_devices: int,
    concurrency: int = 64,
) -> None:
    """Give every user one to three devices (uniformly) and open their WebSockets."""
    for user in population.users:
        for k in range(rng.randint(min_devices, max_devices)):
            user.devices.append(Device(ws_base, user.id, f"{user.id}-d{k}", user.token, router))

    def job(device: Device) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for attempt in range(3):
                try:
                    await device.connect()
                    break
                except Exception as exc:
                    if attempt == 2:
                        recorder.error("ws_connect", repr(exc))
                        raise SetupError(
                            f"device {device.device_id} cannot connect: {exc!r}"
                        ) from exc
                    await asyncio.sleep(0.5)

        return run

    await bounded((job(d) for d in population.devices), concurrency)
