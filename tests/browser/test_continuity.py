"""Calls that survive, in real browsers: rejoin by itself, a media node going away, in-call state.

CONTRACT.md "Call continuity" and "In-call state"; docs/web-client.md "Calls that survive".
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import (
    SAFETY_CODE,
    Stack,
    api_get,
    get_call,
    history_item,
    open_as,
    open_history,
    posted,
    screenshot,
    video_frames_decoded,
    wait_until,
)
from tools.stack import ServiceProcess

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# What the call screen shows of the other party's video, from the page itself: the
# connection in use (its media node, how many rejoins), frames decoded on it, and whether
# the remote <video> element plays that connection's stream.
REMOTE_VIDEO = """async () => {
    const session = window.dmcall.session;
    if (!session || !session.pc) return null;
    let frames = 0;
    (await session.pc.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "video") frames += r.framesDecoded || 0;
    });
    const video = document.getElementById("remote-video");
    return {
        // the media node its SFU session is on (the session's URL, from the offer's Location)
        node: session.session ? new URL(session.session).origin : null,
        rejoins: session.rejoins || 0,
        frames,
        shown: !video.hidden && video.srcObject === session.remote && video.videoWidth > 0,
        played: video.getVideoPlaybackQuality().totalVideoFrames,
    };
}"""


def remote_video(page: Page) -> dict[str, Any] | None:
    value = page.evaluate(REMOTE_VIDEO)
    return value if isinstance(value, dict) else None


def shows_video_again(page: Page, *, rejoined: Callable[[dict[str, Any]], bool]) -> bool:
    """The page rejoined (``rejoined``) and its screen plays the other's video from the new
    connection: frames decoded on it, the element showing it, and its picture moving."""
    first = remote_video(page)
    if not first or not rejoined(first) or first["frames"] < 5 or not first["shown"]:
        return False
    page.wait_for_timeout(300)
    second = remote_video(page)
    return bool(
        second and second["frames"] > first["frames"] and second["played"] > first["played"]
    )


def start_call(stack: Stack, caller: Page, callee: Page, media: str = "video") -> str:
    """``caller`` calls ``callee`` (bob), who answers; returns the call id once media flows."""
    caller.get_by_test_id(f"call-{media}-bob").click()
    expect(callee.get_by_test_id("incoming-call")).to_be_visible(timeout=15_000)
    callee.get_by_test_id("accept").click()
    for page in (caller, callee):
        expect(page.get_by_test_id("safety-code")).to_have_text(SAFETY_CODE, timeout=30_000)
        wait_until(
            lambda page=page: page.evaluate(
                "!!(window.dmcall.session && window.dmcall.session.connectedAt)"
            ),
            what="media connected",
        )
    if media == "video":
        for page in (caller, callee):
            wait_until(lambda page=page: video_frames_decoded(page) > 0, what="video decoded")
    call_id = str(caller.evaluate("window.dmcall.session.callId"))
    # The SFU told signaling that media flows both ways: the call is active.
    wait_until(
        lambda: get_call(stack, caller, call_id)["state"] == "active", what="the call active"
    )
    return call_id


def call_node(stack: Stack, page: Page) -> ServiceProcess:
    """The media node the page's SFU session is on."""
    video = remote_video(page)
    assert video is not None
    return next(n for n in stack.media_nodes if n.url == video["node"])


def video_from_another_node(
    pages: dict[str, Page], node: ServiceProcess, since: float, within: float, what: str
) -> None:
    """Within ``within`` s of ``since`` (a bound, not a speed test) each page shows the
    other's video again, from a media node other than ``node``. How long each took is
    printed: a figure for the report (-s shows it), not an assertion."""
    for name, page in pages.items():
        wait_until(
            lambda page=page: shows_video_again(
                page, rejoined=lambda v: v["node"] not in (None, node.url)
            ),
            timeout=within - (time.monotonic() - since),
            what="the other's video from the other node",
        )
        print(f"{name}: the other's video {what} {time.monotonic() - since:.2f} s")


def test_frozen_media_node_both_pages_rejoin_by_themselves(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    # The node freezes (SIGSTOP): nothing reaches either browser, not even RTCP. Its
    # timeouts are long enough that the call outlives the freeze on the server's side.
    stack = make_stack(
        media_env={
            "MEDIA_TIMEOUT_S": "60",
            "MEDIA_REGISTRY_TTL_S": "30",
            "MEDIA_REJOIN_GRACE_S": "60",
        },
        MEDIA_REJOIN_GRACE_S="60",
    )
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    call_id = start_call(stack, alice, bob)
    code = alice.get_by_test_id("safety-code").inner_text()
    answered_at = get_call(stack, alice, call_id)["answered_at"]
    assert stack.media is not None and stack.media.proc is not None
    pid = stack.media.proc.pid

    os.kill(pid, signal.SIGSTOP)
    try:
        # Both notice within a few seconds (nothing from the SFU for 2 s) and say so.
        for page in (alice, bob):
            expect(page.get_by_test_id("call-status")).to_have_text("Reconnecting…", timeout=10_000)
        screenshot(alice, "call-reconnecting")
        alice.wait_for_timeout(2000)
    finally:
        os.kill(pid, signal.SIGCONT)

    # Each rejoined by itself (a fresh grant from signaling, a new offer to the node), and
    # shows the other's video again from its new connection.
    for page in (alice, bob):
        wait_until(
            lambda page=page: shows_video_again(page, rejoined=lambda v: v["rejoins"] >= 1),
            timeout=30,
            what="video again after the freeze",
        )
        expect(page.get_by_test_id("call-status")).to_have_text("")
        expect(page.get_by_test_id("call-screen")).to_be_visible()
        expect(page.get_by_test_id("safety-code")).to_have_text(code)
    for user in ("alice", "bob"):
        assert len(posted(stack, [user], f"/v1/calls/{call_id}/media")) >= 1
        assert len(posted(stack, [user], f"/v1/rooms/{call_id}/sessions")) >= 2
    # The same call: active, answered when it was.
    call = get_call(stack, alice, call_id)
    assert call["state"] == "active" and call["answered_at"] == answered_at, call
    # Both still in the room, each on one (new) session.
    room = api_get(f"{stack.media.url}/v1/rooms/{call_id}/stats", alice)
    assert sorted(p["user_id"] for p in room["participants"]) == ["alice", "bob"]

    alice.get_by_test_id("hangup").click()
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()
    open_history(bob)
    expect(history_item(bob, call_id)).to_have_attribute("data-state", "ended")
    expect(history_item(bob, call_id).get_by_test_id("history-outcome")).to_have_text(
        re.compile(r"^\d+:\d\d$")
    )


def test_sigterm_of_the_calls_media_node_both_pages_show_video_again(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    # Two media nodes, as in a rolling deploy: the call's node gets SIGTERM, drains, and
    # both browsers move to the other node by themselves (call.media).
    stack = make_stack(media_nodes=2)
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    call_id = start_call(stack, alice, bob)
    code = alice.get_by_test_id("safety-code").inner_text()
    answered_at = get_call(stack, alice, call_id)["answered_at"]
    node = call_node(stack, alice)
    assert call_node(stack, bob) is node
    assert node.proc is not None

    node.proc.send_signal(signal.SIGTERM)
    # Within 5 s of the SIGTERM both show the other's video again, from the other node.
    video_from_another_node(
        {"alice": alice, "bob": bob}, node, time.monotonic(), 5, "from the other node"
    )
    for page in (alice, bob):
        expect(page.get_by_test_id("call-screen")).to_be_visible()
        expect(page.get_by_test_id("safety-code")).to_have_text(code)
        expect(page.get_by_test_id("toast")).to_be_hidden()
    screenshot(bob, "call-after-node-drain")
    call = get_call(stack, alice, call_id)
    assert call["state"] == "active" and call["answered_at"] == answered_at, call
    # The drained node exits by itself once both left it.
    node.proc.wait(timeout=40)

    bob.get_by_test_id("hangup").click()
    for page in (alice, bob):
        expect(page.get_by_test_id("call-screen")).to_be_hidden()
        expect(page.get_by_test_id("toast")).to_have_text("Call ended")


def test_sigkill_of_the_calls_media_node_both_pages_show_video_again(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    # A crash: no drain, no goodbye. The pages see nothing from the SFU for 2 s and rejoin;
    # signaling, once the node's heartbeat is gone (MEDIA_REGISTRY_TTL_S, 3 s), moves the
    # call (call.media, and POST /media answers with the live node).
    stack = make_stack(media_nodes=2)
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    call_id = start_call(stack, alice, bob)
    code = alice.get_by_test_id("safety-code").inner_text()
    node = call_node(stack, alice)

    node.kill()
    video_from_another_node(
        {"alice": alice, "bob": bob}, node, time.monotonic(), 15, "after SIGKILL"
    )
    for page in (alice, bob):
        expect(page.get_by_test_id("call-screen")).to_be_visible()
        expect(page.get_by_test_id("safety-code")).to_have_text(code)
        expect(page.get_by_test_id("call-status")).to_have_text("")
    assert get_call(stack, alice, call_id)["state"] == "active"
    alice.get_by_test_id("hangup").click()
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()


def test_camera_button_upgrades_an_audio_call_to_video(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack()
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    call_id = start_call(stack, alice, bob, media="audio")
    code = alice.get_by_test_id("safety-code").inner_text()
    for page in (alice, bob):
        expect(page.get_by_test_id("call-screen")).to_have_attribute("data-media", "audio")
        expect(page.get_by_test_id("camera")).to_have_attribute("title", "Camera on")

    # alice turns her camera on: the call is a video call now; bob sees her, and alice
    # sees that bob's camera is off.
    alice.get_by_test_id("camera").click()
    expect(alice.get_by_test_id("camera")).to_have_attribute("title", "Camera off")
    for page in (alice, bob):
        expect(page.get_by_test_id("call-screen")).to_have_attribute(
            "data-media", "video", timeout=10_000
        )
    wait_until(
        lambda: shows_video_again(bob, rejoined=lambda v: True), what="bob seeing alice's video"
    )
    expect(alice.get_by_test_id("peer-camera-off")).to_be_visible()
    assert get_call(stack, alice, call_id)["media"] == "video"

    # bob turns his on too: both see video.
    bob.get_by_test_id("camera").click()
    expect(alice.get_by_test_id("peer-camera-off")).to_be_hidden(timeout=10_000)
    wait_until(
        lambda: shows_video_again(alice, rejoined=lambda v: True), what="alice seeing bob's video"
    )
    for page in (alice, bob):
        expect(page.get_by_test_id("safety-code")).to_have_text(code)
    screenshot(alice, "call-upgraded-to-video")

    alice.get_by_test_id("hangup").click()
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()
    for page, direction in ((alice, "Outgoing"), (bob, "Incoming")):
        open_history(page)
        expect(history_item(page, call_id)).to_contain_text(f"{direction} video")


def test_mute_and_camera_off_show_on_the_other_side(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack()
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    start_call(stack, alice, bob)
    expect(bob.get_by_test_id("peer-muted")).to_be_hidden()

    alice.get_by_test_id("mute").click()
    expect(bob.get_by_test_id("peer-muted")).to_be_visible(timeout=10_000)
    alice.get_by_test_id("camera").click()
    expect(bob.get_by_test_id("peer-camera-off")).to_be_visible(timeout=10_000)
    screenshot(bob, "call-peer-muted-camera-off")
    # alice sees nothing of that about bob, who did neither.
    expect(alice.get_by_test_id("peer-muted")).to_be_hidden()
    expect(alice.get_by_test_id("peer-camera-off")).to_be_hidden()

    alice.get_by_test_id("mute").click()
    alice.get_by_test_id("camera").click()
    expect(bob.get_by_test_id("peer-muted")).to_be_hidden(timeout=10_000)
    expect(bob.get_by_test_id("peer-camera-off")).to_be_hidden(timeout=10_000)
    alice.get_by_test_id("hangup").click()
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()


def test_the_other_side_shows_a_party_reconnecting(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack()
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    start_call(stack, alice, bob)
    code = alice.get_by_test_id("safety-code").inner_text()

    # bob's connection dies and (held back here) he does not rejoin at once: the SFU sees
    # his media stop, and alice is told he is reconnecting.
    bob.evaluate(
        """() => {
            const session = window.dmcall.session;
            session.rejoin = () => {};
            session.pc.close();
        }"""
    )
    expect(alice.get_by_test_id("peer-status")).to_have_text("bob is reconnecting…", timeout=15_000)
    expect(alice.get_by_test_id("call-status")).to_have_text("")
    screenshot(alice, "call-peer-reconnecting")

    # He rejoins: the note goes, video again both ways, the same safety code.
    bob.evaluate(
        """() => {
            const session = window.dmcall.session;
            delete session.rejoin;
            session.rejoin("test");
        }"""
    )
    expect(alice.get_by_test_id("peer-status")).to_have_text("", timeout=15_000)
    for page in (alice, bob):
        wait_until(
            lambda page=page: shows_video_again(page, rejoined=lambda v: True),
            what="video again after bob rejoined",
        )
        expect(page.get_by_test_id("safety-code")).to_have_text(code)
    assert bob.evaluate("window.dmcall.session.rejoins") == 1
