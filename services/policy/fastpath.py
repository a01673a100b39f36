"""The permission query's fast path: ``GET /v1/permissions/{callee}`` answered in front of
the middleware stack.

The query is asked every time a DM conversation opens, and the generic stack (tracing
middleware, metrics, CORS, body limit, routing, dependency injection) costs several times
the query itself (see docs/policy.md, "Performance"). This ASGI layer answers the common
case directly, with the same answer, the same metrics series and one server span, and
hands everything else to the full app unchanged, which then answers exactly as before:

- another method or path, a callee that is not a valid user id (-> 422 there);
- no bearer token, or one the verifier refuses (-> 401 there);
- a request with an ``Origin`` header (browsers: the CORS middleware must see it).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Receive, Scope, Send

from services.policy.deps import CachingVerifier
from services.policy.domain import decide
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore
from shared import telemetry
from shared.auth import AuthError
from shared.contracts import RejectReason
from shared.ids import ID_PATTERN

log = logging.getLogger(__name__)

PREFIX = "/v1/permissions/"
ROUTE = "/v1/permissions/{callee}"
_CALLEE = re.compile(ID_PATTERN)

_ANSWER: dict[RejectReason | None, bytes] = {
    None: b'{"callee":"%s","allowed":true,"media":["audio","video"],"reason":null}',
    **{
        reason: b'{"callee":"%%s","allowed":false,"media":[],"reason":"%s"}' % reason.value.encode()
        for reason in RejectReason
    },
}


def permission_json(callee: str, reason: RejectReason | None) -> bytes:
    """The answer's JSON; ``callee`` matched the user id pattern, so it needs no escaping."""
    return _ANSWER[reason] % callee.encode()


_SPAN_ATTRIBUTES = {"http.request.method": "GET", "http.route": ROUTE}
_UNAVAILABLE = b'{"error":"unavailable","message":"the policy store does not answer"}'


class PermissionFastPath:
    """Wraps the app's middleware stack; the store and the token verifier are the app's
    own (``app.state``), looked up on the first request since the lifespan makes them."""

    def __init__(self, app: ASGIApp, *, service: str, settings: PolicySettings) -> None:
        self.app = app
        self.settings = settings
        self.store: PolicyStore | None = None
        self.verifier: CachingVerifier | None = None
        self.tracer = telemetry.tracer("dmcall.policy")
        self.latency = telemetry.HTTP_LATENCY.labels(service, "GET", ROUTE)
        self.counts = {
            status: telemetry.HTTP_REQUESTS.labels(service, "GET", ROUTE, str(status))
            for status in (200, 503)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith(PREFIX) or scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        callee = path[len(PREFIX) :]
        token = _bearer(scope["headers"])
        if token is None or _CALLEE.fullmatch(callee) is None:
            await self.app(scope, receive, send)
            return
        if self.store is None or self.verifier is None:
            state = scope["app"].state
            self.store, self.verifier = state.policy_store, state.policy_verifier
        try:
            caller = self.verifier.verify(token).user_id
        except AuthError:
            await self.app(scope, receive, send)
            return
        await self._answer(scope, send, self.store, caller, callee)

    async def _answer(
        self, scope: Scope, send: Send, store: PolicyStore, caller: str, callee: str
    ) -> None:
        started = time.perf_counter()
        parent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                parent = telemetry.extract_context({"traceparent": value})
        with self.tracer.start_as_current_span(
            f"GET {ROUTE}", context=parent, kind=SpanKind.SERVER, attributes=_SPAN_ATTRIBUTES
        ) as span:
            try:
                facts = await store.facts(caller, callee)
            except Exception as exc:  # Redis down or slow: a clear 503, as JSON
                log.warning("permission %s -> %s: store failed: %s", caller, callee, exc)
                span.record_exception(exc)
                await _respond(send, 503, _UNAVAILABLE)
                self.counts[503].inc()
                self.latency.observe(time.perf_counter() - started)
                return
            verdict = decide(facts, require_premium=self.settings.require_premium)
            if verdict.detail is not None:
                if span.is_recording():
                    span.set_attribute("dmcall.policy.detail", verdict.detail.value)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("permission %s -> %s denied: %s", caller, callee, verdict.detail)
            await _respond(send, 200, permission_json(callee, verdict.reason))
        self.counts[200].inc()
        self.latency.observe(time.perf_counter() - started)


def _bearer(headers: Any) -> str | None:
    """The bearer token, or None when absent/malformed or the request is a browser's."""
    token = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, rest = value.partition(b" ")
            if scheme.lower() != b"bearer" or not rest.strip():
                return None
            token = rest.strip().decode("latin-1")
        elif name == b"origin":
            return None
    return token


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
