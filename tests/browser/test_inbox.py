"""The phone icon in the DM inbox follows policy: shown only when a call is possible."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Browser, expect

from tests.browser.conftest import Stack, open_as, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def test_phone_icon_only_for_people_alice_may_call(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(media=False)
    alice = open_as(browser, stack, "alice")

    expect(alice.get_by_test_id("call-video-bob")).to_be_visible()
    expect(alice.get_by_test_id("call-audio-bob")).to_be_visible()
    # carol never messaged alice: no icon, and the caller-safe reason instead.
    expect(alice.get_by_test_id("call-hint-carol")).to_have_text("They need to message you first")
    expect(alice.get_by_test_id("call-video-carol")).to_have_count(0)
    # dave has calls off; alice is told only that he is not taking calls from her.
    expect(alice.get_by_test_id("call-hint-dave")).to_have_text("Not taking calls from you")
    expect(alice.get_by_test_id("call-video-dave")).to_have_count(0)
    screenshot(alice, "inbox")

    frank = open_as(browser, stack, "frank")
    expect(frank.get_by_test_id("call-hint-bob")).to_have_text("Subscribe to call")
    expect(frank.get_by_test_id("call-audio-bob")).to_have_count(0)


def test_calls_off_in_settings_hides_the_icon(
    browser: Browser, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(media=False)
    alice = open_as(browser, stack, "alice")
    bob = open_as(browser, stack, "bob")
    expect(alice.get_by_test_id("call-video-bob")).to_be_visible()

    bob.get_by_role("tab", name="Settings").click()
    enabled = bob.get_by_test_id("calls-enabled")
    expect(enabled).to_be_checked()
    enabled.uncheck()
    expect(bob.get_by_test_id("settings-status")).to_have_text("Saved")
    screenshot(bob, "settings")

    # alice's open inbox notices without a reload.
    expect(alice.get_by_test_id("call-video-bob")).to_have_count(0, timeout=15_000)
    expect(alice.get_by_test_id("call-audio-bob")).to_have_count(0)
    expect(alice.get_by_test_id("call-hint-bob")).to_have_text("Not taking calls from you")

    # and back on: the icon returns.
    enabled.check()
    expect(bob.get_by_test_id("settings-status")).to_have_text("Saved")
    expect(alice.get_by_test_id("call-video-bob")).to_be_visible(timeout=15_000)
