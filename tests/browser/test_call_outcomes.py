"""How calls end before (or instead of) being answered, in real browsers: declined,
cancelled by the caller while ringing, glare (both call each other at once), and a block
from the call history."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import (
    SAFETY_CODE,
    Stack,
    another_tab,
    api_get,
    get_call,
    history_item,
    open_as,
    open_history,
    screenshot,
    token_of,
    video_frames_decoded,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

TIMER = re.compile(r"^\d+:\d\d$")
CURRENT_CALL = "window.dmcall.session && window.dmcall.session.callId"
LOCAL_TRACKS = """(() => {
    const local = window.dmcall.session && window.dmcall.session.local;
    return local && local.getTracks().map((t) => [t.kind, t.enabled]);
})()"""
AUDIO_DECRYPTED = "window.dmcall.session.e2eeStats().then((r) => (r ? r.stats.decrypted : 0))"


def call_history(stack: Stack, page: Page) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = api_get(f"{stack.url}/v1/calls", page, limit=50)["calls"]
    return calls


def stream_until_ring_stopped(
    stack: Stack, page: Page, after_id: str, call_id: str
) -> list[dict[str, Any]]:
    """The person's SSE notifications after ``after_id``, up to ``call_id``'s ring_stopped.

    Everything one call event makes is committed at once, so what came with the
    ring_stopped is all that event made.
    """
    seen: list[dict[str, Any]] = []
    with httpx.stream(
        "GET",
        f"{stack.notifications.url}/v1/notifications/stream",
        params={"last_event_id": after_id},
        headers={"Authorization": f"Bearer {token_of(page)}"},
        timeout=httpx.Timeout(10, read=30),
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            item = json.loads(line.removeprefix("data: "))
            seen.append(item)
            if item.get("kind") == "ring_stopped" and item.get("call_id") == call_id:
                return seen
    raise AssertionError(f"the stream ended before ring_stopped for {call_id}: {seen}")


def test_decline_tells_the_caller_and_both_histories(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(media=False)
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")

    alice.get_by_test_id("call-video-bob").click()
    expect(alice.get_by_test_id("call-screen")).to_be_visible()
    expect(alice.get_by_test_id("call-status")).to_have_text("Ringing…")
    call_id = alice.evaluate("window.dmcall.session.callId")
    incoming = bob.get_by_test_id("incoming-call")
    expect(incoming).to_be_visible()
    bob.get_by_test_id("decline").click()
    expect(incoming).to_be_hidden()

    # alice hears it was declined and is back in her inbox; nothing rings for bob.
    expect(alice.get_by_test_id("toast")).to_have_text("Declined")
    expect(alice.get_by_test_id("call-screen")).to_be_hidden()
    expect(alice.get_by_test_id("inbox")).to_be_visible()
    screenshot(alice, "call-declined")
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()
    assert alice.evaluate("window.dmcall.session") is None
    assert bob.evaluate("window.dmcall.ringing") == []

    for page, peer, direction in ((alice, "bob", "Outgoing"), (bob, "alice", "Incoming")):
        open_history(page)
        item = history_item(page, call_id)
        expect(item).to_have_attribute("data-state", "declined")
        expect(item).to_have_attribute("data-peer", peer)
        expect(item).to_contain_text(f"{direction} video")
        expect(item.get_by_test_id("history-outcome")).to_have_text("Declined")
    # A declined call is not a missed one.
    expect(history_item(bob, call_id)).not_to_have_class(re.compile(r"\bmissed\b"))
    expect(bob.get_by_test_id("missed-item")).to_have_count(0)


def test_caller_cancel_stops_every_tab_and_is_not_a_missed_call(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(media=False)
    alice = open_as(browser, stack, "alice")
    bob_phone = open_as(browser, stack, "bob")
    bob_laptop = another_tab(bob_phone, stack)

    alice.get_by_test_id("call-audio-bob").click()
    expect(alice.get_by_test_id("call-status")).to_have_text("Ringing…")
    call_id = alice.evaluate("window.dmcall.session.callId")
    for tab in (bob_phone, bob_laptop):
        expect(tab.get_by_test_id("incoming-call")).to_be_visible()
        expect(tab.get_by_test_id("incoming-from")).to_have_text("alice")

    # Notifications made bob's incoming_call (so the cancel below is a ringing call's).
    inbox = wait_until(
        lambda: [
            n
            for n in api_get(f"{stack.notifications.url}/v1/notifications", bob_phone)
            if n["call_id"] == call_id
        ],
        what="bob's incoming_call notification",
    )

    # alice gives up before bob answers.
    alice.get_by_test_id("hangup").click()
    expect(alice.get_by_test_id("call-screen")).to_be_hidden()
    expect(alice.get_by_test_id("toast")).to_have_text("Call ended")
    for tab in (bob_phone, bob_laptop):
        expect(tab.get_by_test_id("incoming-call")).to_be_hidden()
        expect(tab.get_by_test_id("call-screen")).to_be_hidden()
        assert tab.evaluate("window.dmcall.ringing") == []

    # Notifications stopped the ringing as `cancelled` and made no missed call of it
    # (docs/notifications.md: call_cancelled -> ring_stopped only).
    assert [n["kind"] for n in inbox] == ["incoming_call"]
    after = stream_until_ring_stopped(stack, bob_phone, inbox[0]["id"], call_id)
    about_call = [n for n in after if n.get("call_id") == call_id]
    assert [(n["kind"], n.get("reason")) for n in about_call] == [("ring_stopped", "cancelled")]
    kinds = [n["kind"] for n in api_get(f"{stack.notifications.url}/v1/notifications", bob_phone)]
    assert "missed_call" not in kinds
    expect(bob_phone.get_by_test_id("missed-badge")).to_be_hidden()

    # Both histories: cancelled, not missed.
    for page, direction in ((alice, "Outgoing"), (bob_phone, "Incoming")):
        open_history(page)
        item = history_item(page, call_id)
        expect(item).to_have_attribute("data-state", "cancelled")
        expect(item).to_contain_text(f"{direction} audio")
        expect(item.get_by_test_id("history-outcome")).to_have_text("Cancelled")
    expect(bob_phone.get_by_test_id("missed-item")).to_have_count(0)


@pytest.mark.parametrize(
    ("when", "alice_media", "bob_media"),
    [
        ("while_ringing", "video", "video"),
        ("at_once", "video", "video"),
        # alice's audio call survives bob's video call: nobody's camera is on.
        ("while_ringing", "audio", "video"),
        # alice's video call survives bob's audio call: his camera starts off.
        ("while_ringing", "video", "audio"),
    ],
)
def test_glare_both_calling_each_other_end_up_in_one_call(
    browser: Browser, make_stack: Callable[..., Stack], when: str, alice_media: str, bob_media: str
) -> None:
    stack = make_stack()
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    alice_calls_bob = alice.get_by_test_id(f"call-{alice_media}-bob")
    bob_calls_alice = bob.get_by_test_id(f"call-{bob_media}-alice")
    expect(alice_calls_bob).to_be_visible()
    expect(bob_calls_alice).to_be_visible()

    if when == "while_ringing":
        # alice's call rings bob; bob pressed call on alice in the same instant, before
        # his screen showed her call (so: the button under the incoming screen). The
        # server resolves glare when bob's call is authorized while alice's rings.
        alice_calls_bob.click()
        expect(bob.get_by_test_id("incoming-call")).to_be_visible()
        bob_calls_alice.dispatch_event("click")
    else:
        # Both press before either call rings: whichever policy authorizes second
        # finds the other ringing, and the lesser call id survives.
        alice_calls_bob.dispatch_event("click")
        bob_calls_alice.dispatch_event("click")

    # Both browsers end up on one call, each from the screen of the call it placed.
    def current() -> tuple[str, str] | None:
        ids = [page.evaluate(CURRENT_CALL) for page in (alice, bob)]
        return (ids[0], ids[1]) if ids[0] and ids[0] == ids[1] else None

    survivor_id = wait_until(current, what="both call screens on the same call")[0]
    placed = {
        name: page.evaluate("window.dmcall.session.call.call_id")
        for name, page in (("alice", alice), ("bob", bob))
    }
    # The server kept the lesser call id and cancelled the other, replaced by it.
    assert survivor_id == min(placed.values()) and placed["alice"] != placed["bob"]
    loser_by = "alice" if placed["bob"] == survivor_id else "bob"
    loser_page = alice if loser_by == "alice" else bob
    loser = get_call(stack, loser_page, placed[loser_by])
    assert (loser["state"], loser["end_reason"]) == ("cancelled", "cancelled"), loser
    assert loser["replaced_by"] == survivor_id
    survivor = get_call(stack, alice, survivor_id)
    assert survivor["state"] in ("accepted", "active"), survivor
    if when == "while_ringing":
        assert survivor_id == placed["alice"]  # the older call, the one that rang

    # Keys agreed (so each side has its camera and microphone for this call, and has seen
    # its accepted state): the same safety code on both screens.
    code = alice.get_by_test_id("safety-code")
    expect(code).to_have_text(SAFETY_CODE)
    expect(bob.get_by_test_id("safety-code")).to_have_text(code.inner_text())

    # With each other, in the roles of the surviving call, and nothing rings any more.
    for page, peer in ((alice, "bob"), (bob, "alice")):
        expect(page.get_by_test_id("call-screen")).to_be_visible()
        expect(page.get_by_test_id("incoming-call")).to_be_hidden()
        assert page.evaluate("window.dmcall.session.peer") == peer
        assert page.evaluate("window.dmcall.ringing") == []
    roles = {
        "alice": alice.evaluate("window.dmcall.session.role"),
        "bob": bob.evaluate("window.dmcall.session.role"),
    }
    assert roles == {survivor["caller"]: "caller", survivor["callee"]: "callee"}

    # The call is what the surviving call is, on both screens.
    media = survivor["media"]
    asked = {"alice": alice_media, "bob": bob_media}
    for name, page in (("alice", alice), ("bob", bob)):
        assert page.evaluate("window.dmcall.session.media") == media
        tracks = wait_until(
            lambda page=page: page.evaluate(LOCAL_TRACKS), what=f"{name}'s camera and microphone"
        )
        if media == "audio":
            # No camera opened in an audio call, even for whoever asked for video: the
            # camera button is there to turn it on (which would make it a video call).
            assert tracks == [["audio", True]], tracks
            expect(page.locator("#audio-only")).to_be_visible()
            expect(page.get_by_test_id("camera")).to_have_attribute("title", "Camera on")
            wait_until(
                lambda page=page: page.evaluate(AUDIO_DECRYPTED) > 10,
                what=f"{name} decrypting the other's audio",
            )
        else:
            # Whoever asked for an audio call joins the video call with the camera off.
            camera_on = asked[name] == "video"
            assert sorted(tracks) == [["audio", True], ["video", camera_on]], tracks
            expect(page.get_by_test_id("camera")).to_have_attribute(
                "title", "Camera off" if camera_on else "Camera on"
            )
            wait_until(
                lambda page=page: video_frames_decoded(page) > 0,
                what=f"{name} decoding the other's video",
            )
    expect(alice.get_by_test_id("call-timer")).to_have_text(TIMER)
    if (when, alice_media, bob_media) == ("while_ringing", "video", "video"):
        screenshot(bob, "glare-call")

    # One call in each history too: signaling does not list the one that was replaced.
    bob.get_by_test_id("hangup").click()
    for page in (alice, bob):
        expect(page.get_by_test_id("call-screen")).to_be_hidden()
        open_history(page)
        expect(history_item(page, survivor_id)).to_have_attribute("data-state", "ended")
        expect(page.get_by_test_id("history-item")).to_have_count(1)


def test_block_from_history_stops_their_calls(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(media=False)
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    alice.get_by_test_id("call-audio-bob").click()
    expect(alice.get_by_test_id("call-screen")).to_be_visible()
    call_id = alice.evaluate("window.dmcall.session.callId")
    expect(bob.get_by_test_id("incoming-call")).to_be_visible()
    bob.get_by_test_id("decline").click()
    expect(alice.get_by_test_id("call-screen")).to_be_hidden()

    open_history(bob)
    history_item(bob, call_id).get_by_test_id("history-block").click()
    expect(bob.get_by_test_id("toast")).to_have_text("Blocked alice: they can no longer call you")
    assert api_get(f"{stack.policy.url}/v1/blocks", bob) == {"blocked": ["alice"]}
    # alice's open inbox loses the icons and shows only the caller-safe hint.
    expect(alice.get_by_test_id("call-hint-bob")).to_have_text(
        "Not taking calls from you", timeout=15_000
    )
    expect(alice.get_by_test_id("call-video-bob")).to_have_count(0)
    permission = api_get(f"{stack.policy.url}/v1/permissions/bob", alice)
    assert permission["allowed"] is False
    assert permission["reason"] == "callee_unavailable"
