"""Calls that survive, in real browsers: rejoin by itself, a media node going away, in-call state.

CONTRACT.md "Call continuity" and "In-call state"; docs/web-client.md "Calls that survive".
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import (
    SAFETY_CODE,
    Stack,
    history_item,
    open_as,
    open_history,
    screenshot,
    token_of,
    video_frames_decoded,
    wait_until,
)

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
        node: session.nodeId,
        rejoins: session.rejoins,
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
    expect(callee.get_by_test_id("incoming-call")).to_be_visible()
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
    return str(caller.evaluate("window.dmcall.session.callId"))


def get_call(stack: Stack, page: Page, call_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.url}/v1/calls/{call_id}",
        headers={"Authorization": f"Bearer {token_of(page)}"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def media_posts(stack: Stack, user: str, path: str) -> int:
    return sum(
        1 for method, url, _ in stack.traffic[user].requests if method == "POST" and path in url
    )


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
        assert media_posts(stack, user, f"/v1/calls/{call_id}/media") >= 1
        assert media_posts(stack, user, f"/v1/rooms/{call_id}/sessions") >= 2
    # The same call: active, answered when it was.
    call = get_call(stack, alice, call_id)
    assert call["state"] == "active" and call["answered_at"] == answered_at, call
    # Both still in the room, each on one (new) session.
    room = httpx.get(
        f"{stack.media.url}/v1/rooms/{call_id}/stats",
        headers={"Authorization": f"Bearer {token_of(alice)}"},
        timeout=5,
    ).json()
    assert sorted(p["user_id"] for p in room["participants"]) == ["alice", "bob"]

    alice.get_by_test_id("hangup").click()
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()
    open_history(bob)
    expect(history_item(bob, call_id)).to_have_attribute("data-state", "ended")
    expect(history_item(bob, call_id).get_by_test_id("history-outcome")).to_have_text(
        re.compile(r"^\d+:\d\d$")
    )
