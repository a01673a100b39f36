"""A group video call between three real browsers, end-to-end encrypted with sender keys.

alice starts a video call in the group "trio" (alice, bob, erin; erin never posted there, so
she is not rung); bob answers the ring, erin joins from her inbox. Each decodes the two
others' video; the fingerprints agree on every screen; what went through the SFU is
ciphertext and no key was ever sent to a server in the clear; bob leaves, alice and erin go
on (a new key each that bob never got); the call ends with its last participant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import (
    DECODE_KEY_FRAME,
    SAFETY_CODE,
    Stack,
    Traffic,
    first_key_frame,
    get_call,
    open_as,
    posted,
    screenshot,
    seed_group,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

GROUP = "trio"

# What one page's worker saw, with the first video key frame as it came through the SFU
# ("wire") and decrypted ("plain"), and what a VP8 decoder (WebCodecs) makes of each.
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
        slots: report.slots,
        receive_key_ids: report.receive_key_ids,
        send_key_id: report.send_key_id,
        public_key: session.agreement.publicKey,
        sender_key: session.senderKeyBase64(),
        extractable: [session.agreement.keyPair.privateKey.extractable,
                      session.senderKey.key.extractable],
        wire: probe && bytes(probe.wire),
        plain: probe && bytes(probe.plain),
        wire_decodes: probe && await decode(probe.wire),
        plain_decodes: probe && await decode(probe.plain),
    };
}"""
)


def frames(page: Page) -> dict[str, int]:
    """framesDecoded of each other participant's video on ``page``, by user."""
    return dict(page.evaluate("window.dmcall.session.remoteVideoFrames()"))


def decoding(page: Page, users: set[str], more_than: dict[str, int] | None = None) -> bool:
    seen = frames(page)
    base = more_than or {}
    return set(seen) == users and all(seen[u] > base.get(u, 0) for u in users)


def signals(traffic: Traffic, direction: str) -> list[dict[str, Any]]:
    frames_ = traffic.ws_sent if direction == "sent" else traffic.ws_received
    parsed = [json.loads(f) for f in frames_ if f.startswith("{")]
    return [m for m in parsed if m.get("type") == "call.signal"]


def test_group_video_call_three_browsers(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack()
    seed_group(stack, GROUP, ["alice", "bob", "erin"], posted=["alice", "bob"])
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    erin = open_as(browser, stack, "erin")
    pages = {"alice": alice, "bob": bob, "erin": erin}

    # alice's inbox: the group, and whom a call would ring (erin never posted there).
    expect(alice.get_by_test_id(f"would-ring-{GROUP}")).to_have_text(
        "Calling rings bob", timeout=15_000
    )
    alice.get_by_test_id(f"group-call-video-{GROUP}").click()
    expect(alice.get_by_test_id("group-call-screen")).to_be_visible()
    expect(alice.get_by_test_id("group-call-status")).to_have_text("Ringing…", timeout=15_000)

    # bob is rung and answers; erin is not rung.
    expect(bob.get_by_test_id("incoming-call")).to_be_visible(timeout=15_000)
    expect(bob.get_by_test_id("incoming-from")).to_have_text(f"alice · {GROUP}")
    bob.get_by_test_id("accept").click()
    expect(bob.get_by_test_id("group-call-screen")).to_be_visible()
    wait_until(lambda: decoding(alice, {"bob"}), what="alice decoding bob")
    wait_until(lambda: decoding(bob, {"alice"}), what="bob decoding alice")
    expect(erin.get_by_test_id("incoming-call")).to_be_hidden()
    call_id = str(alice.evaluate("window.dmcall.session.callId"))
    # alice's key before erin joined: erin must never get it.
    key_before_erin = alice.evaluate("window.dmcall.session.activeKeyId")

    # erin's inbox offers "Join"; she joins.
    expect(erin.get_by_test_id(f"group-live-{GROUP}")).to_be_visible(timeout=15_000)
    erin.get_by_test_id(f"join-{GROUP}").click()
    expect(erin.get_by_test_id("group-call-screen")).to_be_visible()

    # Each sees the two others' video decoded, each in the tile of the one whose key
    # decrypts it (not merely where the SFU said).
    for name, page in pages.items():
        others = set(pages) - {name}
        wait_until(lambda page=page, others=others: decoding(page, others), what=f"{name} decoding")
        for other in others:
            tile = page.get_by_test_id(f"tile-{other}")
            expect(tile).to_have_attribute("data-verified", "true")
            expect(page.get_by_test_id(f"tile-video-{other}")).to_be_visible()
            assert page.get_by_test_id(f"tile-video-{other}").evaluate("(v) => v.videoWidth") > 0
    assert alice.evaluate("window.dmcall.session.activeKeyId") != key_before_erin

    # Fingerprints: every screen shows the same digits for each participant, and each is
    # that participant's own.
    shown = {
        (viewer, user): page.get_by_test_id(f"fingerprint-{user}").inner_text()
        for viewer, page in pages.items()
        for user in pages
    }
    for user in pages:
        own = shown[(user, user)]
        assert SAFETY_CODE.match(own), own
        assert all(shown[(viewer, user)] == own for viewer in pages), shown
    assert len({shown[(u, u)] for u in pages}) == 3
    screenshot(erin, "group-call")

    # E2EE: what came through the SFU does not decode; decrypted it is the 640x480 picture.
    probes = {}
    for name, page in pages.items():
        # (tag, IV, key id, header length)
        probe = first_key_frame(page, E2EE_PROBE, name, overhead=16 + 12 + 4 + 1)
        probes[name] = probe
        plain = probe["plain"]
        # (the camera's 640x480, or less: the sender's encoder scales down when the CPU is busy)
        picture = probe["plain_decodes"]
        header_width = (plain[6] | plain[7] << 8) & 0x3FFF  # the VP8 key frame header's
        assert picture["ok"] is True and picture["width"] == header_width <= 640, picture
        noise = probe["wire_decodes"]
        assert noise["ok"] is False or noise["pixels"] != picture["pixels"], noise
        assert probe["extractable"] == [False, False]
        # Its worker decrypted the two others' frames, each with that sender's key.
        senders = {slot["user"] for slot in probe["slots"].values() if slot["frames"] > 0}
        assert senders == set(pages) - {name}, probe["slots"]
    # erin, who joined last, never received the key alice used before she came.
    assert key_before_erin not in probes["erin"]["receive_key_ids"]
    assert all(
        m["payload"].get("key_id") != key_before_erin
        and (m["payload"].get("sender_key") or {}).get("key_id") != key_before_erin
        for m in signals(stack.traffic["erin"], "received")
    )

    # Nothing a server got carried a key in the clear: public keys and the (wrapped) sender
    # keys went only as call.signal to one participant; no HTTP request (the SDP offers to
    # the SFU included) and no WebSocket frame carried a sender key's bytes.
    secrets = [p["sender_key"] for p in probes.values()]
    public_keys = [p["public_key"] for p in probes.values()]
    for name in pages:
        traffic = stack.traffic[name]
        sent = signals(traffic, "sent")
        assert sent and all(m["call_id"] == call_id and m.get("to") in pages for m in sent)
        assert {m["payload"]["public_key"] for m in sent if "public_key" in m["payload"]} == {
            probes[name]["public_key"]
        }
        for frame in traffic.ws_sent:
            assert not any(secret in frame for secret in secrets)
            if any(key in frame for key in public_keys):
                assert json.loads(frame)["type"] == "call.signal"
        for _method, url, body in traffic.requests:
            for secret in secrets + public_keys:
                assert secret not in body and secret not in url, url
    offers = posted(stack, pages, f"/v1/rooms/{call_id}/sessions")
    assert len(offers) == 3 and all(body.startswith("v=0") for body in offers)

    # bob leaves; alice and erin stay, lose his tile, and go on decoding each other with
    # new keys that never reached bob.
    before = {name: frames(pages[name]) for name in ("alice", "erin")}
    bob.get_by_test_id("group-leave").click()
    expect(bob.get_by_test_id("group-call-screen")).to_be_hidden()
    for name in ("alice", "erin"):
        page = pages[name]
        expect(page.get_by_test_id("tile-bob")).to_have_count(0, timeout=15_000)
        expect(page.get_by_test_id("group-call-screen")).to_be_visible()
        other = "erin" if name == "alice" else "alice"
        wait_until(
            lambda page=page, other=other, name=name: decoding(page, {other}, before[name]),
            what=f"{name} still decoding {other}",
        )
    bob_got = {
        (m["payload"].get("sender_key") or m["payload"]).get("key_id")
        for m in signals(stack.traffic["bob"], "received")
    }
    for name in ("alice", "erin"):
        key_now = wait_until(
            lambda name=name: (
                (k := pages[name].evaluate("window.dmcall.session.activeKeyId")) not in bob_got
                and k
            ),
            what=f"{name}'s key after bob left",
        )
        assert key_now not in bob_got
    room = get_call(stack, alice, call_id)
    assert room["group"] == GROUP
    states = {p["user"]: p["state"] for p in room["participants"]}
    assert states == {"alice": "joined", "bob": "left", "erin": "joined"}, states

    # The call ends with its last participant.
    alice.get_by_test_id("group-leave").click()
    expect(alice.get_by_test_id("group-call-screen")).to_be_hidden()
    expect(erin.get_by_test_id("group-call-screen")).to_be_visible()
    erin.get_by_test_id("group-leave").click()
    expect(erin.get_by_test_id("group-call-screen")).to_be_hidden()
    wait_until(lambda: get_call(stack, alice, call_id)["state"] == "ended", what="the call ended")
