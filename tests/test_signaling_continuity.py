"""Calls that survive their media node, end to end: real signaling processes (one or two),
the real policy service, RabbitMQ and Redis. Media nodes are registry entries (a node that
stops heartbeating is one whose entry expires); the media service's events are published
on the broker as a node would."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from shared.auth import verify_media_token
from shared.contracts import (
    CallMediaConnected,
    CallMediaPeer,
    EventType,
    MediaNodeDraining,
    PeerConnection,
    parse_event,
)
from shared.media_registry import MediaNode
from shared.settings import CommonSettings
from tests.support import signaling
from tests.support.signaling import Device, place_and_accept
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

NODE_A = MediaNode(node_id="media-a", url="http://127.0.0.1:9/a", capacity=50, load=0)
NODE_B = MediaNode(node_id="media-b", url="http://127.0.0.1:9/b", capacity=50, load=0)
NODE_C = MediaNode(node_id="media-c", url="http://127.0.0.1:9/c", capacity=50, load=0)


class World(signaling.World):
    async def call(
        self, caller: str, callee: str, *, media: str = "audio", instance: int = 0
    ) -> tuple[str, Device, Device]:
        """A call ``caller`` -> ``callee``, accepted (on whichever node the registry picks)
        and active: each party's device in the call."""
        await self.allow(caller, callee)
        a = await self.device(caller, f"{caller}-1", instance)
        b = await self.device(callee, f"{callee}-1", instance)
        call_id, accepted = await place_and_accept(self.http(instance), self.token, a, b, media)
        node_id = accepted.json()["node_id"]
        await self.publish(CallMediaConnected(call_id=call_id, node_id=node_id))
        await a.expect(type="call.state", call_id=call_id, state="active")
        await b.expect(type="call.state", call_id=call_id, state="active")
        return call_id, a, b

    async def get(self, call_id: str, user: str) -> dict[str, Any]:
        response = await self.http().get(f"/v1/calls/{call_id}", headers=self.h(user))
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture
def world(worlds: Callable[..., Any]) -> Callable[..., Any]:
    """``await world(2)``: signaling processes and the real policy, media node A registered
    (for ten minutes; ``node=None``: none); the test registers any other."""
    return functools.partial(worlds, cls=World, policy=True, node=NODE_A)


def media_pushes(device: Device, call_id: str) -> list[dict[str, Any]]:
    return device.matching(type="call.media", call_id=call_id)


def assert_grant_for(
    settings: CommonSettings, message: dict[str, Any], call_id: str, user: str, node: MediaNode
) -> None:
    assert message["node_id"] == node.node_id
    assert message["media_url"] == node.session_url(call_id)
    grant = verify_media_token(settings, message["media_token"])
    assert (grant.call_id, grant.user_id, grant.node_id) == (call_id, user, node.node_id)
    assert isinstance(message["ice_servers"], list)


async def ping_pong(device: Device) -> None:
    before = len(device.matching(type="pong"))
    await device.send({"type": "ping"})
    await eventually(lambda: len(device.matching(type="pong")) > before, timeout=10)


async def test_a_draining_nodes_calls_move_once_with_two_instances_and_both_racing_post_media(
    world: Callable[..., Any], settings: CommonSettings
) -> None:
    w: World = await world(instances=2)
    call_id, alice, bob = await w.call("alice", "bob")
    before = await w.get(call_id, "alice")
    await w.registry.heartbeat(NODE_B, ttl_s=600)
    await w.registry.heartbeat(NODE_C, ttl_s=600)

    # Node A gets SIGTERM: it heartbeats draining and asks for its calls to move, while
    # both parties ask each instance for a fresh grant at the same moment.
    await w.registry.heartbeat(replace(NODE_A, draining=True), ttl_s=600)
    drained = MediaNodeDraining(node_id=NODE_A.node_id, call_ids=[call_id])
    posts = [
        w.http(instance).post(f"/v1/calls/{call_id}/media", headers=w.h(user))
        for instance in (0, 1)
        for user in ("alice", "bob")
    ]
    _published, *answers = await asyncio.gather(w.publish(drained), *posts)
    grants = [r.json() for r in answers]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    # One move, to one node: the instances may each pick (B, the emptier, then C for the
    # one that picked second) but only the first commit stands, and every grant names it.
    [moved_to] = {g["node_id"] for g in grants}
    target = {NODE_B.node_id: NODE_B, NODE_C.node_id: NODE_C}[moved_to]

    for device, user in ((alice, "alice"), (bob, "bob")):
        pushed = await device.expect(type="call.media", call_id=call_id)
        assert pushed["reason"] == "node_draining"
        assert_grant_for(settings, pushed, call_id, user, target)
    await asyncio.sleep(2.5)  # the watchers of both instances have looked again meanwhile
    assert len(media_pushes(alice, call_id)) == 1, alice.received
    assert len(media_pushes(bob, call_id)) == 1, bob.received
    after = await w.get(call_id, "bob")
    assert (after["call_id"], after["state"], after["answered_at"]) == (
        call_id,
        "active",
        before["answered_at"],
    )
    assert w.tap.of(EventType.CALL_ENDED, call_id) == []


async def test_a_late_media_node_draining_for_a_node_back_under_its_id_moves_nothing(
    world: Callable[..., Any],
) -> None:
    w: World = await world()
    call_id, alice, bob = await w.call("alice", "bob")
    await w.registry.heartbeat(NODE_B, ttl_s=600)
    # node A drained and came back (a new process, the same id): the old event arrives late
    await w.publish(MediaNodeDraining(node_id=NODE_A.node_id, call_ids=[call_id]))
    await asyncio.sleep(2.0)
    assert media_pushes(alice, call_id) == [] and media_pushes(bob, call_id) == []
    assert (await w.get(call_id, "alice"))["state"] == "active"


async def test_a_node_that_stops_heartbeating_has_its_calls_moved_node_lost(
    world: Callable[..., Any], settings: CommonSettings
) -> None:
    w: World = await world(instances=2, node=None)
    await w.registry.heartbeat(NODE_A, ttl_s=2)  # its last heartbeat: it crashes now
    call_id, alice, bob = await w.call("alice", "bob")
    await w.registry.heartbeat(NODE_B, ttl_s=600)
    for device, user in ((alice, "alice"), (bob, "bob")):
        pushed = await device.expect(timeout=10, type="call.media", call_id=call_id)
        assert pushed["reason"] == "node_lost"
        assert_grant_for(settings, pushed, call_id, user, NODE_B)
    refreshed = await w.http(1).post(f"/v1/calls/{call_id}/media", headers=w.h("alice"))
    assert refreshed.status_code == 200 and refreshed.json()["node_id"] == NODE_B.node_id
    assert (await w.get(call_id, "alice"))["state"] == "active"
    await asyncio.sleep(1.5)
    assert len(media_pushes(alice, call_id)) == len(media_pushes(bob, call_id)) == 1


async def test_post_media_never_hands_out_a_gone_or_draining_node(
    world: Callable[..., Any], settings: CommonSettings
) -> None:
    # No watcher in the way: POST /media moves the call itself.
    w: World = await world(SIGNALING_NODE_WATCH_MS="60000")
    call_id, alice, bob = await w.call("alice", "bob")
    http = w.http()
    url = f"/v1/calls/{call_id}/media"
    first = await http.post(url, headers=w.h("alice"))
    assert first.status_code == 200 and first.json()["node_id"] == NODE_A.node_id

    await w.registry.heartbeat(NODE_B, ttl_s=600)
    await w.registry.deregister(NODE_A.node_id)  # gone
    gone = await http.post(url, headers=w.h("bob"))
    assert gone.status_code == 200, gone.text
    assert_grant_for(settings, gone.json(), call_id, "bob", NODE_B)
    assert (await alice.expect(type="call.media", call_id=call_id))["reason"] == "node_lost"

    await w.registry.heartbeat(NODE_C, ttl_s=600)
    await w.registry.heartbeat(replace(NODE_B, draining=True), ttl_s=600)
    draining = await http.post(url, headers=w.h("alice"))
    assert draining.status_code == 200, draining.text
    assert_grant_for(settings, draining.json(), call_id, "alice", NODE_C)
    await eventually(lambda: len(media_pushes(bob, call_id)) == 2)
    assert media_pushes(bob, call_id)[-1]["reason"] == "node_draining"

    await w.registry.deregister(NODE_C.node_id)  # and nowhere else to go
    nowhere = await http.post(url, headers=w.h("alice"))
    assert nowhere.status_code == 503, nowhere.text
    assert nowhere.headers["Retry-After"] == "1"
    assert nowhere.json()["error"]

    hung_up = await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h("bob"))
    assert hung_up.status_code == 200
    ended = await http.post(url, headers=w.h("alice"))
    assert ended.status_code == 409, ended.text


async def test_a_moved_call_nobody_rejoins_ends_media_timeout_and_both_are_callable_again(
    world: Callable[..., Any],
) -> None:
    w: World = await world(instances=2, MEDIA_REJOIN_GRACE_S="1", RING_TIMEOUT_S="30")
    lost, alice, bob = await w.call("alice", "bob")
    rejoined, carol, dave = await w.call("carol", "dave")
    await w.registry.heartbeat(NODE_B, ttl_s=600)
    await w.registry.deregister(NODE_A.node_id)
    for device, call_id in ((alice, lost), (bob, lost), (carol, rejoined), (dave, rejoined)):
        await device.expect(timeout=10, type="call.media", call_id=call_id)
    # Carol and Dave's media flows on the new node; Alice and Bob's never does (the old
    # node's word does not count).
    await w.publish(CallMediaConnected(call_id=rejoined, node_id=NODE_B.node_id))
    await w.publish(CallMediaConnected(call_id=lost, node_id=NODE_A.node_id))

    for device in (alice, bob):
        ended = await device.expect(timeout=15, type="call.state", call_id=lost, state="ended")
        assert ended["end_reason"] == "media_timeout"
    await eventually(lambda: w.tap.of(EventType.CALL_ENDED, lost))
    await w.tap.settle(w.publish)
    ended_events = w.tap.of(EventType.CALL_ENDED, lost)
    assert len(ended_events) == 1, ended_events
    assert ended_events[0]["reason"] == "media_timeout"
    parse_event(ended_events[0])
    assert (await w.get(lost, "bob"))["end_reason"] == "media_timeout"
    assert (await w.get(rejoined, "carol"))["state"] == "active"
    assert carol.matching(type="call.state", call_id=rejoined, state="ended") == []
    # media flowing on the new node is news to both: whatever the old node last said of
    # the other (reconnecting), each is told their peer is connected
    for device, peer in ((carol, "dave"), (dave, "carol")):
        told = await device.expect(timeout=10, type="call.peer", call_id=rejoined, user=peer)
        assert told["connection"] == "connected"
    assert not alice.matching(type="call.peer", call_id=lost, connection="connected")

    # Neither is busy now: a new call to each rings.
    for caller, callee, ring in (("bob", "alice", alice), ("dave", "bob", bob)):
        await w.allow(caller, callee)
        placed = await w.http().post(
            "/v1/calls", json={"callee": callee, "media": "audio"}, headers=w.h(caller)
        )
        assert placed.status_code == 202
        await ring.expect(type="call.incoming", call_id=placed.json()["call_id"])


async def test_call_media_state_reaches_the_other_party_and_bad_frames_get_errors(
    world: Callable[..., Any],
) -> None:
    w: World = await world()
    call_id, alice, bob = await w.call("alice", "bob", media="video")
    others, _carol, _dave = await w.call("carol", "dave")

    await alice.send(
        {"type": "call.media_state", "call_id": call_id, "audio": "muted", "video": "off"}
    )
    peer = await bob.expect(type="call.peer", call_id=call_id)
    assert peer == {
        "type": "call.peer",
        "call_id": call_id,
        "user": "alice",
        "audio": "muted",
        "video": "off",
    }
    assert alice.matching(type="call.peer") == []

    bad = [
        ({"call_id": call_id, "audio": "loud", "video": "off"}, "bad_request"),
        ({"call_id": call_id, "audio": "on"}, "bad_request"),
        ({"call_id": call_id, "audio": ["on"], "video": "on"}, "bad_request"),
        ({"audio": "on", "video": "on"}, "bad_request"),
        ({"call_id": others, "audio": "on", "video": "on"}, "not_found"),  # not hers
        ({"call_id": "0" * 32, "audio": "on", "video": "on"}, "not_found"),
    ]
    for frame, error in bad:
        count = len(alice.matching(type="error"))
        await alice.send({"type": "call.media_state", **frame})
        await eventually(lambda c=count: len(alice.matching(type="error")) > c)  # type: ignore[misc]
        assert alice.matching(type="error")[-1]["error"] == error, (frame, alice.received)
    await ping_pong(alice)

    hung_up = await w.http().post(f"/v1/calls/{call_id}/hangup", headers=w.h("bob"))
    assert hung_up.status_code == 200
    await alice.send({"type": "call.media_state", "call_id": call_id, "audio": "on", "video": "on"})
    conflict = await alice.expect(type="error", error="conflict")
    assert conflict["state"] == "ended"
    await ping_pong(alice)
    assert len(bob.matching(type="call.peer")) == 1


async def test_the_camera_on_in_an_audio_call_upgrades_it_to_video(
    world: Callable[..., Any],
) -> None:
    w: World = await world()
    call_id, alice, bob = await w.call("alice", "bob", media="audio")
    assert (await w.get(call_id, "bob"))["media"] == "audio"

    await bob.send({"type": "call.media_state", "call_id": call_id, "audio": "on", "video": "on"})
    peer = await alice.expect(type="call.peer", call_id=call_id)
    assert (peer["user"], peer["audio"], peer["video"]) == ("bob", "on", "on")
    got = await w.get(call_id, "alice")
    assert (got["media"], got["state"]) == ("video", "active")
    history = await w.http().get("/v1/calls", headers=w.h("bob"))
    assert [c["media"] for c in history.json()["calls"] if c["call_id"] == call_id] == ["video"]

    hung_up = await w.http().post(f"/v1/calls/{call_id}/hangup", headers=w.h("alice"))
    assert hung_up.json()["media"] == "video"
    ended = await bob.expect(type="call.state", call_id=call_id, state="ended")
    assert ended["media"] == "video"
    await eventually(lambda: w.tap.of(EventType.CALL_ENDED, call_id))
    assert w.tap.of(EventType.CALL_ENDED, call_id)[0]["media"] == "video"


async def test_call_media_peer_reaches_the_other_party_only_from_the_calls_node(
    world: Callable[..., Any],
) -> None:
    w: World = await world()
    call_id, alice, bob = await w.call("alice", "bob")

    stranger = CallMediaPeer(
        call_id=call_id,
        node_id=NODE_B.node_id,
        user="alice",
        connection=PeerConnection.RECONNECTING,
    )
    await w.publish(stranger)
    for connection in (PeerConnection.RECONNECTING, PeerConnection.CONNECTED):
        event = CallMediaPeer(
            call_id=call_id, node_id=NODE_A.node_id, user="alice", connection=connection
        )
        await w.publish(event)
        await bob.expect(
            type="call.peer", call_id=call_id, user="alice", connection=connection.value
        )
    # a later word from the call's node, once it has arrived the stranger's would have too
    await w.publish(
        CallMediaPeer(
            call_id=call_id,
            node_id=NODE_A.node_id,
            user="alice",
            connection=PeerConnection.RECONNECTING,
        )
    )
    await eventually(lambda: len(bob.matching(type="call.peer")) == 3)
    assert [m["connection"] for m in bob.matching(type="call.peer")] == [
        "reconnecting",
        "connected",
        "reconnecting",
    ]
    assert alice.matching(type="call.peer") == []
