"""Real calls between real browsers, through signaling, policy, notifications and the SFU."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from tests.browser.conftest import (
    DECODE_KEY_FRAME,
    SAFETY_CODE,
    Stack,
    Traffic,
    another_tab,
    api_get,
    first_key_frame,
    open_as,
    posted,
    screenshot,
    video_frames_decoded,
    wait_until,
)
from tests.support.stun import StunServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# What the receiving browser got for the first video key frame: the bytes as they came
# through the SFU ("wire"), the same frame after decryption ("plain"), and what a VP8
# decoder (WebCodecs) makes of each.
E2EE_PROBE = (
    """async () => {
    const session = window.dmcall.session;
    const report = await session.e2eeStats();
    const decode = """
    + DECODE_KEY_FRAME
    + """;
    const probe = report.probe;
    const bytes = (b) => Array.from(new Uint8Array(b));
    return {
        stats: report.stats,
        public_key: session.agreement.publicKey,
        keys_extractable: [session.keys.sendKey.extractable, session.keys.receiveKey.extractable,
                           session.agreement.keyPair.privateKey.extractable],
        wire: probe && bytes(probe.wire),
        plain: probe && bytes(probe.plain),
        wire_decodes: probe && await decode(probe.wire),
        plain_decodes: probe && await decode(probe.plain),
    };
}"""
)


def key_messages(traffic: Traffic) -> list[dict[str, Any]]:
    sent = [json.loads(frame) for frame in traffic.ws_sent if frame.startswith("{")]
    return [m for m in sent if m.get("type") == "call.signal"]


def test_video_call_end_to_end_encrypted(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack()
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")

    alice.get_by_test_id("call-video-bob").click()
    expect(alice.get_by_test_id("call-screen")).to_be_visible()
    incoming = bob.get_by_test_id("incoming-call")
    expect(incoming).to_be_visible()
    expect(bob.get_by_test_id("incoming-from")).to_have_text("alice")
    screenshot(bob, "incoming-call")
    bob.get_by_test_id("accept").click()
    expect(incoming).to_be_hidden()
    expect(bob.get_by_test_id("call-screen")).to_be_visible()

    # Both decode the other's video.
    wait_until(lambda: video_frames_decoded(alice) > 0, what="alice decoding bob's video")
    wait_until(lambda: video_frames_decoded(bob) > 0, what="bob decoding alice's video")

    # The same safety code on both screens.
    code_alice = alice.get_by_test_id("safety-code").inner_text()
    code_bob = bob.get_by_test_id("safety-code").inner_text()
    assert SAFETY_CODE.match(code_alice), code_alice
    assert code_alice == code_bob

    # The SFU never had the keys.
    probes = {}
    for name, page in (("alice", alice), ("bob", bob)):
        # What came through the SFU is not VP8 a decoder can read: the picture is ciphertext
        # (only the 10-byte VP8 header the receiver's depacketizer needs is in the clear) ...
        probe = first_key_frame(page, E2EE_PROBE, name, overhead=16 + 12 + 1)  # tag, IV, length
        probes[name] = probe
        assert probe["wire_decodes"]["ok"] is False, probe["wire_decodes"]
        # ... while the same frame decrypted in the browser is a 640x480 picture.
        picture = probe["plain_decodes"]
        assert picture["ok"] is True and picture["width"] == 640, picture
        # The frame keys and the ECDH private key cannot leave the page at all.
        assert probe["keys_extractable"] == [False, False, False]

    # Only the two ECDH public keys were exchanged, and only in call.signal messages
    # relayed by signaling; nothing that went to the SFU (or any HTTP API) carried either.
    call_id = alice.evaluate("window.dmcall.session.callId")
    for name, other in (("alice", "bob"), ("bob", "alice")):
        signals = key_messages(stack.traffic[name])
        assert signals and all(m["call_id"] == call_id for m in signals)
        assert {m["payload"]["public_key"] for m in signals} == {probes[name]["public_key"]}
        received = [json.loads(f) for f in stack.traffic[other].ws_received if f.startswith("{")]
        relayed = [m for m in received if m.get("type") == "call.signal" and m["from"] == name]
        assert {m["payload"]["public_key"] for m in relayed} == {probes[name]["public_key"]}
        for _method, url, body in stack.traffic[name].requests:
            for key in (probes["alice"]["public_key"], probes["bob"]["public_key"]):
                assert key not in body and key not in url, url
    offers = posted(stack, ("alice", "bob"), f"/v1/rooms/{call_id}/sessions")
    assert len(offers) == 2 and all(body.startswith("v=0") for body in offers)

    # No TURN configured: no ICE servers, exactly as the client always had.
    for page in (alice, bob):
        assert page.evaluate("window.dmcall.session.pc.getConfiguration().iceServers") == []

    # The media went through the SFU (host candidates only, no peer-to-peer path).
    assert stack.media is not None
    room = api_get(f"{stack.media.url}/v1/rooms/{call_id}/stats", alice)
    forwarded = {p["user_id"]: p for p in room["participants"]}
    assert set(forwarded) == {"alice", "bob"}
    for party in forwarded.values():
        assert party["packets_in"] > 0 and party["packets_out"] > 0, party

    # Mute and camera off act on the tracks alice sends.
    alice.get_by_test_id("mute").click()
    alice.get_by_test_id("camera").click()
    expect(alice.get_by_test_id("mute")).to_have_attribute("title", "Unmute")
    expect(alice.get_by_test_id("camera")).to_have_attribute("title", "Camera on")
    assert alice.evaluate("window.dmcall.session.local.getTracks().map((t) => t.enabled)") == [
        False,
        False,
    ]
    alice.get_by_test_id("mute").click()
    alice.get_by_test_id("camera").click()
    expect(alice.get_by_test_id("mute")).to_have_attribute("title", "Mute")

    expect(alice.get_by_test_id("call-quality")).not_to_be_empty()
    expect(bob.get_by_test_id("call-timer")).to_have_text(re.compile(r"^\d+:\d\d$"))
    screenshot(alice, "call-screen")
    screenshot(bob, "call-screen-bob")

    # Hang up ends the call on both sides, and it is in both histories.
    alice.get_by_test_id("hangup").click()
    expect(alice.get_by_test_id("call-screen")).to_be_hidden()
    expect(bob.get_by_test_id("call-screen")).to_be_hidden()
    for page, peer, direction in ((alice, "bob", "Outgoing"), (bob, "alice", "Incoming")):
        page.get_by_role("tab", name=re.compile("Calls")).click()
        item = page.locator(f'[data-testid="history-item"][data-call-id="{call_id}"]')
        expect(item).to_have_attribute("data-state", "ended")
        expect(item).to_have_attribute("data-peer", peer)
        expect(item).to_contain_text(f"{direction} video")
        expect(item.get_by_test_id("history-outcome")).to_have_text(re.compile(r"^\d+:\d\d$"))
    screenshot(bob, "history")

    # bob reports alice from his history: she can no longer call him (her icon goes).
    bob.locator(f'[data-testid="history-item"][data-call-id="{call_id}"]').get_by_test_id(
        "history-report"
    ).click()
    bob.get_by_test_id("report-dialog").get_by_role("button", name="Harassment").click()
    expect(bob.get_by_test_id("toast")).to_contain_text("Reported alice")
    alice.get_by_role("tab", name="Messages").click()
    expect(alice.get_by_test_id("call-hint-bob")).to_have_text(
        "Not taking calls from you", timeout=15_000
    )


def test_two_tabs_ring_and_answer_on_one_stops_the_other(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack()
    alice = open_as(browser, stack, "alice")
    bob_phone = open_as(browser, stack, "bob")
    # bob's laptop encrypts with the older createEncodedStreams API, alice with
    # RTCRtpScriptTransform: the frame format is the same, so they still talk.
    bob_laptop = another_tab(bob_phone, stack, query="?e2ee=encoded-streams")
    assert bob_phone.evaluate("window.dmcall.deviceId") != bob_laptop.evaluate(
        "window.dmcall.deviceId"
    )

    alice.get_by_test_id("call-audio-bob").click()
    for tab in (bob_phone, bob_laptop):
        expect(tab.get_by_test_id("incoming-call")).to_be_visible()
        expect(tab.get_by_test_id("incoming-from")).to_have_text("alice")

    bob_laptop.get_by_test_id("accept").click()
    expect(bob_laptop.get_by_test_id("call-screen")).to_be_visible()
    expect(bob_phone.get_by_test_id("incoming-call")).to_be_hidden()
    expect(bob_phone.get_by_test_id("toast")).to_have_text("Answered on another device")
    expect(bob_phone.get_by_test_id("call-screen")).to_be_hidden()
    # The call goes on with the tab that answered: both show the same safety code.
    code = alice.get_by_test_id("safety-code")
    expect(code).to_have_text(SAFETY_CODE, timeout=30_000)
    expect(bob_laptop.get_by_test_id("safety-code")).to_have_text(code.inner_text())
    assert bob_laptop.evaluate("window.dmcall.session.transformApi") == "createEncodedStreams"
    assert alice.evaluate("window.dmcall.session.transformApi") == "RTCRtpScriptTransform"
    for page in (alice, bob_laptop):
        wait_until(
            lambda page=page: (
                page.evaluate("window.dmcall.session.e2eeStats().then((r) => r.stats.decrypted)")
                > 10
            ),
            what="audio frames decrypted",
        )

    expect(bob_laptop.get_by_test_id("call-timer")).to_have_text(re.compile(r"^\d+:\d\d$"))
    screenshot(bob_laptop, "audio-call")

    bob_laptop.get_by_test_id("hangup").click()
    expect(alice.get_by_test_id("call-screen")).to_be_hidden()


def test_the_browser_gathers_through_the_ice_servers_signaling_hands_out(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stun_server = StunServer().start()
    try:
        stack = make_stack(TURN_URLS=json.dumps([stun_server.url]))
        alice = open_as(browser, stack, "alice")
        bob = open_as(browser, stack, "bob")
        alice.get_by_test_id("call-audio-bob").click()
        expect(bob.get_by_test_id("incoming-call")).to_be_visible()
        bob.get_by_test_id("accept").click()
        for page in (alice, bob):
            wait_until(
                lambda page=page: page.evaluate(
                    "!!(window.dmcall.session && window.dmcall.session.connectedAt)"
                ),
                what="media connected",
            )
            servers = page.evaluate("window.dmcall.session.pc.getConfiguration().iceServers")
            assert [s["urls"] for s in servers] in ([[stun_server.url]], [stun_server.url])
        # Both browsers' peer connections asked the STUN server they were handed.
        assert len(set(stun_server.askers)) >= 2, stun_server.askers
        alice.get_by_test_id("hangup").click()
        expect(bob.get_by_test_id("call-screen")).to_be_hidden()
    finally:
        stun_server.stop()


def test_unanswered_call_shows_a_missed_call_live(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(media=False, RING_TIMEOUT_S="3")
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    expect(bob.get_by_test_id("missed-badge")).to_be_hidden()

    alice.get_by_test_id("call-video-bob").click()
    expect(bob.get_by_test_id("incoming-call")).to_be_visible()
    # Nobody answers: the server's ring timer fires.
    expect(bob.get_by_test_id("incoming-call")).to_be_hidden(timeout=20_000)
    expect(alice.get_by_test_id("call-screen")).to_be_hidden()
    expect(alice.get_by_test_id("toast")).to_have_text("No answer")

    # bob's page was not reloaded: the badge and the list come over SSE.
    expect(bob.get_by_test_id("missed-badge")).to_have_text("1", timeout=15_000)
    bob.get_by_role("tab", name=re.compile("Calls")).click()
    missed = bob.get_by_test_id("missed-item")
    expect(missed).to_have_count(1)
    expect(missed).to_contain_text("alice")
    expect(missed).to_contain_text("Missed video call")
    screenshot(bob, "missed-calls")
    # Opening the list marks them read.
    expect(bob.get_by_test_id("missed-badge")).to_be_hidden()
