"""The FastAPI application: built by `create_app`, never at import time. The lifespan loads the model, adapter,
store and index in the background, so /health answers at once and /ready turns 200 when everything is loaded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.errors import error_body
from service.metrics import Metrics
from service.routes import documents, generate, health, openai
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)


class LimitsAndMetrics:
    """ASGI middleware: refuse bodies over the limit (413) and record count and latency by route template."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            self._record(scope, 413, started)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise errors.PayloadTooLargeError(f"request body over {self.max_body_bytes} bytes")
            return message

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_status)
        finally:
            self._record(scope, status, started)

    async def _too_large(self, send: Send) -> None:
        import json

        body = json.dumps(error_body("PayloadTooLarge", f"request body over {self.max_body_bytes} bytes")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.observe_request(path, scope.get("method", ""), status, time.perf_counter() - started)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime: Runtime = app.state.runtime
        loading = asyncio.create_task(asyncio.to_thread(runtime.load))

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                app.state.load_error = f"{type(task.exception()).__name__}: {task.exception()}"
                log.error("start-up failed: %s", app.state.load_error)

        loading.add_done_callback(report)
        try:
            yield
        finally:
            await asyncio.wait([loading])
            await asyncio.to_thread(runtime.close)

    app = FastAPI(title="Knowledge Plugins", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = Runtime(settings, metrics)
    app.state.load_error = None
    _register_gauges(app.state.runtime, metrics)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(documents.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


def _register_gauges(runtime: Runtime, metrics: Metrics) -> None:
    metrics.gauge(
        "kplug_queue_depth", "Generation requests waiting for a batch slot.", lambda: runtime.engine.queue_depth
    )
    metrics.gauge("kplug_running_batch_size", "Requests decoding in the current batch.", lambda: runtime.engine.running)
    metrics.gauge("kplug_documents", "Documents stored.", lambda: runtime.store.count())
    metrics.gauge(
        "kplug_plugins",
        "Plugins stored for the loaded adapter.",
        lambda: runtime.store.count() - runtime.store.stale_count(),
    )
    metrics.gauge(
        "kplug_registration_jobs",
        "Registration jobs by state.",
        lambda: {k: float(v) for k, v in runtime.store.job_counts().items()},
        label="state",
    )
