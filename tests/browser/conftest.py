"""Browser end-to-end tests: real Chromium (Debian's), real service processes.

One Chromium per test module (fresh user data dir, fake camera and microphone); each test
starts its own services in its own namespace and opens one browser context per user.
Screenshots land in ``artifacts/screenshots/``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    WebSocket,
    expect,
    sync_playwright,
)

import tools.stack
from shared.auth import issue_token
from shared.settings import CommonSettings
from tools import seed
from tools.stack import ROOT, ServiceProcess

CHROMIUM = os.environ.get("DMCALL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
SAFETY_CODE = re.compile(r"^\d{4} \d{4} \d{4}$")
# A page function: what a VP8 decoder (WebCodecs) makes of one key frame's bytes: an error,
# or a picture (its size, and a digest of its pixels: a decoder may well turn noise into
# some picture, just not into this one).
DECODE_KEY_FRAME = """(buffer) => new Promise((resolve) => {
    const decoder = new VideoDecoder({
        output: async (frame) => {
            const pixels = new Uint8Array(frame.allocationSize());
            await frame.copyTo(pixels);
            const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", pixels));
            resolve({ok: true, width: frame.codedWidth, pixels: Array.from(digest).join(",")});
            frame.close();
        },
        error: (e) => resolve({ok: false, error: String(e)}),
    });
    decoder.configure({codec: "vp8"});
    decoder.decode(new EncodedVideoChunk({type: "key", timestamp: 0, data: buffer}));
    decoder.flush().catch((e) => resolve({ok: false, error: String(e)}));
})"""

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope: Playwright's sync API runs an event loop of its own while it is open,
    # and pytest-asyncio's tests in other modules need the thread without it.
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"Chromium is needed at {CHROMIUM} (Debian package `chromium`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@dataclass
class Stack:
    """The four services of one test, seeded with the demo users."""

    signaling: ServiceProcess
    policy: ServiceProcess
    notifications: ServiceProcess
    media: ServiceProcess | None
    media_nodes: list[ServiceProcess] = field(default_factory=list)
    """Every media node (``media`` is the first), by node id ``media-1``, ``media-2``..."""
    contexts: list[BrowserContext] = field(default_factory=list)
    traffic: dict[str, Traffic] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.signaling.url


@dataclass
class Traffic:
    """Everything one person's pages sent: WebSocket frames and HTTP request bodies."""

    ws_sent: list[str] = field(default_factory=list)
    ws_received: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, url, body

    def attach(self, page: Page) -> None:
        def on_websocket(ws: WebSocket) -> None:
            ws.on("framesent", lambda payload: self.ws_sent.append(_text(payload)))
            ws.on("framereceived", lambda payload: self.ws_received.append(_text(payload)))

        page.on("websocket", on_websocket)
        page.on(
            "request",
            lambda request: self.requests.append(
                (request.method, request.url, request.post_data or "")
            ),
        )


def _text(payload: str | bytes) -> str:
    return payload if isinstance(payload, str) else payload.decode("latin-1")


@pytest.fixture
def make_stack(service_stack: tools.stack.Stack) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def build(
        *,
        media: bool = True,
        media_nodes: int = 1,
        media_env: dict[str, str] | None = None,
        **signaling_env: str,
    ) -> Stack:
        services = service_stack.start_all(
            media_nodes=media_nodes if media else 0, media_env=media_env, **signaling_env
        )
        policy, nodes = services.of("policy")[0], services.of("media")
        seed.seed(policy.url)
        stack = Stack(
            services.of("signaling")[0],
            policy,
            services.of("notifications")[0],
            nodes[0] if nodes else None,
            nodes,
        )
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        for context in stack.contexts:
            context.close()


def open_as(browser: Browser, stack: Stack, user: str, query: str = "") -> Page:
    """A new browser context (a person's browser) signed in as ``user``."""
    context = browser.new_context(viewport={"width": 900, "height": 700})
    stack.contexts.append(context)
    page = context.new_page()
    stack.traffic.setdefault(user, Traffic()).attach(page)
    page.goto(f"{stack.url}/{query}")
    page.get_by_test_id(f"signin-{user}").click()
    expect(page.get_by_test_id("inbox")).to_be_visible()
    return page


def another_tab(page: Page, stack: Stack, query: str = "") -> Page:
    """A second tab of the same person (same sign-in, its own device)."""
    tab = page.context.new_page()
    stack.traffic.setdefault(page.evaluate("window.dmcall.me"), Traffic()).attach(tab)
    tab.goto(f"{stack.url}/{query}")
    expect(tab.get_by_test_id("inbox")).to_be_visible()
    return tab


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def token_of(page: Page) -> str:
    """The bearer token the page signed in with."""
    return str(page.evaluate("localStorage.getItem('dmcall.token')"))


def api_get(url: str, page: Page, **params: Any) -> Any:
    """GET a JSON API as the person signed in on ``page``."""
    response = httpx.get(
        url, params=params, headers={"Authorization": f"Bearer {token_of(page)}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def get_call(stack: Stack, page: Page, call_id: str) -> dict[str, Any]:
    """``GET /v1/calls/{call_id}`` on signaling, as the person signed in on ``page``."""
    call: dict[str, Any] = api_get(f"{stack.url}/v1/calls/{call_id}", page)
    return call


def posted(stack: Stack, users: Iterable[str], path: str) -> list[str]:
    """The bodies of the POST requests ``users``' pages sent to a URL with ``path`` in it."""
    return [
        body
        for user in users
        for method, url, body in stack.traffic[user].requests
        if method == "POST" and path in url
    ]


def first_key_frame(page: Page, probe: str, name: str, *, overhead: int) -> dict[str, Any]:
    """What ``probe`` (a page function) reports once the page's worker has decrypted a video
    key frame, checked to have gone over the wire encrypted: the clear VP8 header (10 bytes)
    the same, ``overhead`` bytes more (tag, IV, ...), the rest not the picture's bytes."""
    report: dict[str, Any] = wait_until(
        lambda: (p := page.evaluate(probe))["wire"] and p, what=f"{name}'s first key frame"
    )
    stats = report["stats"]
    assert stats["encrypted"] > 0 and stats["decrypted"] > 0, stats
    assert stats["decryptFailed"] == 0, stats
    wire, plain = report["wire"], report["plain"]
    assert wire[:10] == plain[:10]
    assert len(wire) == len(plain) + overhead
    assert wire[10 : len(plain)] != plain[10:]
    return report


def history_item(page: Page, call_id: str) -> Locator:
    """The row of ``call_id`` in the page's call history (the Calls tab must be open)."""
    return page.locator(f'[data-testid="history-item"][data-call-id="{call_id}"]')


def open_history(page: Page) -> None:
    page.get_by_role("tab", name=re.compile("Calls")).click()
    expect(page.get_by_test_id("history")).to_be_visible()


def video_frames_decoded(page: Page) -> int:
    """``framesDecoded`` of the remote video, straight from the page's RTCPeerConnection."""
    return int(
        page.evaluate(
            """async () => {
                const pc = window.dmcall.session && window.dmcall.session.pc;
                if (!pc) return 0;
                let frames = 0;
                (await pc.getStats()).forEach((r) => {
                    if (r.type === "inbound-rtp" && r.kind === "video") frames += r.framesDecoded || 0;
                });
                return frames;
            }"""
        )
    )


def wait_until(check: Callable[[], Any], *, timeout: float = 30.0, what: str) -> Any:
    """Poll ``check`` until it returns something truthy (for conditions outside the DOM)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.25)


def seed_group(stack: Stack, group: str, members: list[str], posted: list[str]) -> None:
    """A group conversation on policy (platform facts): ``members``, of whom ``posted`` posted."""
    token = issue_token(CommonSettings(), seed.SEED_IDENTITY, scope="platform")
    with httpx.Client(
        base_url=stack.policy.url, headers={"Authorization": f"Bearer {token}"}, timeout=10.0
    ) as http:
        for user in members:
            http.put(f"/v1/platform/groups/{group}/members/{user}").raise_for_status()
        for user in posted:
            http.post(
                f"/v1/platform/groups/{group}/messages", json={"sender": user}
            ).raise_for_status()
