"""Issue 12, F2: no bearer token, media token or TURN credential reaches any log line.

Real processes at DEBUG (every level), a call placed and accepted over real WebSockets,
then every log line of the run is searched for each credential handed out.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from shared import telemetry
from shared.media_registry import MediaRegistry
from shared.service import create_service_app
from shared.settings import CommonSettings
from shared.telemetry import redact
from tests.conftest import auth
from tests.support.signaling import NODE, Device, allow_call, place_and_accept
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

TURN_SECRET = "a-turn-secret-shared-with-coturn-f2"
TURN_URLS = ["turn:turn.example.com:3478?transport=udp"]


@pytest.mark.parametrize(
    "line",
    [
        "WebSocket /v1/ws?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln&device_id=d1 [accepted]",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln",
        "Authorization: Bearer opaque-token-value",
        '{"username": "1700000000:bob", "credential": "q83kXYZ+/w=="}',
        "{'media_token': 'abc.def.ghi'}",
        "POST https://push.example/abc?auth=secret-value&x=1",
    ],
)
def test_f2_redact_masks_every_credential_shape(line: str) -> None:
    masked = redact(line)
    assert "<redacted>" in masked
    for secret in ("eyJ", "c2ln", "opaque-token-value", "q83kXYZ", "abc.def.ghi", "secret-value"):
        assert secret not in masked


def test_f2_redact_leaves_ordinary_lines_alone() -> None:
    line = "call c-1 alice -> bob ringing on 2 devices device_id=d1"
    assert redact(line) == line


async def test_f2_no_credential_in_any_log_line_of_a_call(
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    settings: CommonSettings,
    redis_client: Redis,
) -> None:
    policy = spawn("policy", LOG_LEVEL="DEBUG")
    signaling = spawn(
        "signaling",
        LOG_LEVEL="DEBUG",
        TURN_URLS=json.dumps(TURN_URLS),
        TURN_SECRET=TURN_SECRET,
    )
    await MediaRegistry(redis_client, settings).heartbeat(NODE, ttl_s=600)
    platform = token("platform-svc", scope="platform")
    async with httpx.AsyncClient(base_url=policy.url, timeout=15) as policy_http:
        await allow_call(policy_http, platform, "alice", "bob")
    alice_token, bob_token = token("alice"), token("bob")
    secrets = {platform, alice_token, bob_token, TURN_SECRET}

    alice = await Device.connect(signaling.url, alice_token, "alice", "a1")
    bob = await Device.connect(signaling.url, bob_token, "bob", "b1")
    try:
        async with httpx.AsyncClient(base_url=signaling.url, timeout=15) as http:
            call_id, accepted = await place_and_accept(
                http, lambda user: {"alice": alice_token, "bob": bob_token}[user], alice, bob
            )
            handoff = accepted.json()
            secrets.add(handoff["media_token"])
            secrets.update(server["credential"] for server in handoff["ice_servers"])
            pushed = await alice.expect(type="call.state", call_id=call_id, state="accepted")
            secrets.add(pushed["media_token"])
            secrets.update(server["credential"] for server in pushed["ice_servers"])
            # a forged token and a bad one in the query are refused, and not logged either
            forged = alice_token[:-4] + "AAAA"
            secrets.add(forged)
            refused = await http.get("/v1/calls", headers=auth(forged))
            assert refused.status_code == 401
            ice = await http.get("/v1/ice-servers", headers=auth(alice_token))
            secrets.update(server["credential"] for server in ice.json()["ice_servers"])
    finally:
        await alice.close()
        await bob.close()
    policy.stop()
    signaling.stop()

    assert signaling.log_path is not None and policy.log_path is not None
    logs = signaling.log_path.read_text() + policy.log_path.read_text()
    # the WebSocket connect lines are there (so the search below searched them), masked
    assert "/v1/ws?token=<redacted>" in logs
    for secret in secrets:
        assert secret not in logs, f"a credential ({secret[:6]}...) reached a log line"


class _Collector:
    """An OTLP/HTTP endpoint of the test's own: keeps every exported payload."""

    def __init__(self) -> None:
        import http.server
        import threading

        bodies: list[bytes] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.bodies = bodies
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


async def test_f2_no_token_in_any_exported_trace_span(
    spawn: Callable[..., ServiceProcess], token: Callable[..., str]
) -> None:
    collector = _Collector()
    try:
        # every trace kept (the default keeps 1% of new ones)
        signaling = spawn(
            "signaling",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
            OTEL_TRACES_SAMPLER="parentbased_always_on",
        )
        alice_token = token("alice")
        alice = await Device.connect(signaling.url, alice_token, "alice", "a1")
        async with httpx.AsyncClient(base_url=signaling.url, timeout=15) as http:
            assert (await http.get("/v1/calls", headers=auth(alice_token))).status_code == 200
        await alice.close()
        # spans go out in batches (every 5 s by default), and the last one on the way out
        await eventually(lambda: b"/v1/ws" in b"".join(collector.bodies), timeout=20)
        signaling.stop()
        exported = b"".join(collector.bodies)
        assert b"/v1/ws" in exported  # the WebSocket's server span was exported...
        assert alice_token.encode() not in exported  # ...without its ?token=
        assert alice_token.split(".")[2].encode() not in exported
    finally:
        collector.close()


async def test_only_a_sampled_request_has_a_server_span_and_its_query_is_masked(
    settings: CommonSettings,
) -> None:
    """The caller's traceparent decides: sampled (flags 01), the request's server span is
    recorded, in the caller's trace, ``?token=`` masked; unsampled (00), none is."""
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("test", None, extra_processor=SimpleSpanProcessor(exporter))
    app = create_service_app(service="test", settings=settings, routers=[])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    secret = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for flags in ("01", "00"):
                traceparent = f"00-{trace_id}-00f067aa0ba902b7-{flags}"
                response = await client.get(
                    f"/nowhere?token={secret}", headers={"traceparent": traceparent}
                )
                assert response.status_code == 404
        [span] = exporter.get_finished_spans()
    finally:
        exporter.shutdown()  # the process's provider keeps the processor
    assert span.context is not None and span.context.trace_id == int(trace_id, 16)
    assert span.name == "GET unmatched"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 404
    assert span.attributes["url.query"] == "token=<redacted>"


@pytest.mark.parametrize(
    "line",
    [
        "call c-1 alice -> bob ringing on 2 devices device_id=d1",
        "GET /v1/ws?TOKEN=abc.def&device_id=d1",
        "x-Auth: Bearer opaque",
        "basic dXNlcjpwYXNz in a header",
        '{"Credential": "q83kXYZ"}',
        "PassWord=hunter2",
        "p256DH: BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA",
        "a jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln at the end",
        # non-ASCII letters that (?i) matches to ASCII ones: always scanned
        "\u017fecret=hunter2",
        "to\u212aen=abc.def",
        "credent\u0131al=xyz",
        "caf\u00e9 opened for bob, nothing secret here",
    ],
)
def test_the_quick_check_never_skips_a_line_the_scans_would_change(line: str) -> None:
    assert redact(line) == telemetry._redact_scan(line)
