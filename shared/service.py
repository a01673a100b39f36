"""What every service's app is built from: a lifespan that owns its clients, the common
routes (``/healthz``, ``/readyz``, ``/metrics``), JSON errors, a body-size limit, request
metrics and tracing.

A service's ``app.py`` calls :func:`create_service_app` with its settings, its routers and
a ``setup`` context manager that builds its stores and registers its consumers on the
:class:`Runtime`; nothing is created at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from aiormq.exceptions import AMQPConnectionError
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import gc_tuning, telemetry
from shared import redis as shared_redis
from shared.auth import TokenVerifier
from shared.bus import Bus
from shared.edge import bounded_protocol
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """Background tasks a service keeps: each is cancelled and awaited on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Runtime:
    """The clients one service process owns, made in its lifespan."""

    service: str
    settings: CommonSettings
    redis: Redis
    bus: Bus
    tasks: TaskSet = field(default_factory=TaskSet)


Setup = Callable[[FastAPI, Runtime], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def _nothing(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
    yield


def create_service_app(
    *,
    service: str,
    settings: CommonSettings,
    routers: Sequence[APIRouter],
    setup: Setup = _nothing,
    description: str = "",
) -> FastAPI:
    """The app of ``service`` (its OpenAPI title ``dmcall <service>``)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        telemetry.setup_logging(service, settings.log_level)
        redis = shared_redis.connect(settings, name=f"dmcall-{service}")
        bus = Bus(settings, redis, service)
        runtime = Runtime(service=service, settings=settings, redis=redis, bus=bus)
        app.state.runtime = runtime
        app.state.settings = settings
        app.state.token_verifier = TokenVerifier(settings)
        loop = asyncio.get_running_loop()
        # (not where the loop cannot: a worker thread, as Starlette's TestClient runs apps)
        listening = False
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGUSR1, log_tasks)
            listening = True
        try:
            async with setup(app, runtime):
                runtime.tasks.spawn(bus.start(), name=f"{service}-bus-start")
                gc_tuning.tune()
                log.info("%s up (instance %s)", service, settings.instance_id)
                yield
        finally:
            await runtime.tasks.close()
            await bus.close()
            await redis.aclose()
            # the spans of the last seconds would wait for a batch that never comes
            await asyncio.to_thread(provider.force_flush, 2000)
            if listening:  # last: a shutdown that hangs above can still be asked why
                loop.remove_signal_handler(signal.SIGUSR1)

    provider = telemetry.setup_tracing(
        service,
        settings.otel_exporter_otlp_endpoint,
        sampled=telemetry.sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg),
    )
    app = FastAPI(
        title=f"dmcall {service}",
        description=description,
        version="1.0.0",
        lifespan=lifespan,
        # spans and metrics are _TelemetryMiddleware's, not FastAPI's own
        telemetry={"tracing": False, "metrics": False, "logs": False},
        openapi_url=None,  # set below, once the API's routes are in
    )
    app.state.service = service
    # The service's own routes first, then the operations routes, then the docs: a request
    # is matched against the routes in order, and every route it is not costs FastAPI
    # ~10,000 CPU instructions (policy's permission query 1.46 -> 1.37 M instructions for
    # the 9 routes it no longer passes; docs/performance.md)
    for router in routers:
        app.include_router(router)
    app.include_router(_ops_router(service))
    app.openapi_url = "/openapi.json"
    app.setup()  # FastAPI's /openapi.json, /docs and /redoc, after everything else
    _install_errors(app)
    app.add_middleware(_BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        expose_headers=["Location", "Retry-After"],
        max_age=600,
    )
    app.add_middleware(
        _TelemetryMiddleware, service=service, tracer=provider.get_tracer("dmcall.http")
    )
    return app


def log_tasks() -> None:
    """``kill -USR1 <pid>``, in every service: log each asyncio task and where it waits.
    For a process that does not stop (tools/stack.py sends it before a SIGKILL)."""
    for task in asyncio.all_tasks():
        stack = io.StringIO()
        task.print_stack(limit=8, file=stack)
        log.warning("task %s:\n%s", task.get_name(), stack.getvalue())


def server_config(app: FastAPI, settings: CommonSettings, port: int) -> uvicorn.Config:
    """How every service is served: uvloop, httptools, a 20 s graceful drain on SIGTERM."""
    telemetry.setup_logging(str(getattr(app.state, "service", app.title)), settings.log_level)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        loop="uvloop",
        http=bounded_protocol(
            max_head_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_connections=settings.max_connections,
        ),
        # WebSockets: websockets' Sans-I/O protocol (timers, no tasks per socket) and no
        # permessage-deflate (a browser offers it; its zlib state costs ~34 KB a socket
        # for messages of a few hundred bytes): 72 -> 38 KB per idle browser-like device,
        # docs/performance.md "Scale"
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_keep_alive=settings.http_keep_alive_s,
        access_log=False,
        # no logging config of uvicorn's own: its loggers go through the root handler of
        # telemetry.setup_logging (one format, credentials redacted)
        log_config=None,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=20,
        proxy_headers=True,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )


def run(app: FastAPI, settings: CommonSettings, port: int) -> None:
    """Serve one app; SIGTERM drains connections before the lifespan ends."""
    uvicorn.Server(server_config(app, settings, port)).run()


# --------------------------------------------------------------------------- common routes


def app_state(request: Request, name: str, kind: type[T]) -> T:
    """An object the lifespan put on ``app.state``, checked to be of the type expected."""
    value = getattr(request.app.state, name, None)
    if not isinstance(value, kind):
        raise RuntimeError(f"app.state.{name} is {type(value).__name__}, not {kind.__name__}")
    return value


def _ops_router(service: str) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str | int]:
        return {"status": "ok", "service": service, "pid": os.getpid()}

    @router.get(
        "/readyz",
        summary="The broker and Redis answer",
        responses={503: {"description": "A dependency does not answer"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        runtime = app_state(request, "runtime", Runtime)
        checks = {"rabbitmq": runtime.bus.ready, "redis": await _redis_ok(runtime.redis)}
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unready", "service": service, "checks": checks},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        body, content_type = telemetry.metrics_payload()
        return Response(body, media_type=content_type)

    return router


async def _redis_ok(redis: Redis) -> bool:
    try:
        async with asyncio.timeout(1.0):
            return bool(await redis.ping())
    except Exception:
        return False


# --------------------------------------------------------------------------- errors


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    422: "validation_error",
    429: "rate_limited",
    431: "headers_too_large",
    503: "unavailable",
}


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """The one shape of every error: ``{"error": <code>, "message": <text>, ...}``."""
    return {"error": _STATUS_CODES.get(status, "error"), "message": message, **extra}


# A backing service (Redis, the broker) that does not answer: the request may be retried.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    AMQPConnectionError,
)


def _install_errors(app: FastAPI) -> None:
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        """Redis or the broker does not answer: a JSON 503 to retry, never a 500."""
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(
            error_body(503, "a backing service does not answer; retry shortly"),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, unavailable)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: the same JSON shape as every other error (the traceback goes to the log)."""
        if isinstance(exc, UNAVAILABLE_ERRORS):  # raised through a middleware
            return await unavailable(request, exc)
        return JSONResponse(error_body(500, "internal error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            body = {**error_body(exc.status_code, str(exc.detail.get("message", ""))), **exc.detail}
        else:
            body = error_body(exc.status_code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": list(err.get("loc", ())),
                "msg": err.get("msg", ""),
                "type": err.get("type", ""),
            }
            for err in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(
            error_body(
                422, f"{where}: {first['msg']}" if where else str(first["msg"]), detail=errors
            ),
            status_code=422,
        )


# --------------------------------------------------------------------------- middleware


class _BodyLimitMiddleware:
    """Refuses a body over the limit with 413 before a handler reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            error_body(413, f"request body is larger than {self.max_bytes} bytes"),
            status_code=413,
        )
        await response({"type": "http"}, _empty_receive, send)


class _TooLarge(StarletteHTTPException):
    """A body (chunked, so without a Content-Length to refuse up front) passed the limit
    while being read. An HTTPException, so FastAPI's body parsing re-raises it as the 413 it
    is instead of wrapping it in a 400, and the JSON error handler answers it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than {max_bytes} bytes")


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


_UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class _TelemetryMiddleware:
    """A request's metrics, and its server span (the WebSocket's for its whole life).

    The tracer provider's sampler decides once, as the span starts (telemetry.py): an
    unsampled span records nothing and is not described here (no name, URL or status);
    it only carries the trace id to the request's logs and the events it publishes.
    """

    def __init__(self, app: ASGIApp, service: str, tracer: trace.Tracer) -> None:
        self.app = app
        self.service = service
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span: trace.Span = trace.INVALID_SPAN
        if scope["path"] not in _UNTRACED_PATHS:
            carrier = {
                k.decode(): v for k, v in scope["headers"] if k in telemetry.PROPAGATED_HEADERS
            }
            parent = telemetry.extract_context(carrier) if carrier else None
            # a caller's unsampled trace: its span stands in (telemetry.unsampled_parent)
            stand_in = telemetry.unsampled_parent(parent) if parent is not None else None
            span = (
                stand_in
                if stand_in is not None
                else self.tracer.start_span("HTTP", context=parent, kind=trace.SpanKind.SERVER)
            )
        with trace.use_span(span, end_on_exit=True):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                if span.is_recording():
                    _describe(span, scope, route, status)
                if scope["type"] == "http":
                    method = scope["method"]
                    telemetry.HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
                    telemetry.HTTP_LATENCY.labels(self.service, method, route).observe(
                        time.perf_counter() - started
                    )


def _describe(span: trace.Span, scope: Scope, route: str, status: int) -> None:
    """A sampled server span's name and attributes (OpenTelemetry's HTTP conventions);
    the query string has its credentials masked (a WebSocket's and a stream's ``?token=``)."""
    method = scope.get("method", "GET")
    span.update_name(f"{method} {route}")
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "http.route": route,
        "url.scheme": scope.get("scheme", "http"),
        "url.path": scope["path"],
    }
    if scope.get("query_string"):
        attributes["url.query"] = telemetry.redact(scope["query_string"].decode("latin-1"))
    if scope["type"] == "http":
        attributes["http.response.status_code"] = status
        if status >= 500:
            span.set_status(trace.StatusCode.ERROR)
    span.set_attributes(attributes)
