"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from service.routes.deps import require_key

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
    if not runtime.ready:
        error = request.app.state.load_error
        body = {"status": "failed" if error else "loading", "error": error}
        return JSONResponse(body, status_code=503)
    return JSONResponse(
        {
            "status": "ready",
            "model": runtime.base.identity.name,
            "adapter": runtime.adapter.checkpoint_id,
            "documents": runtime.store.count(),
            "stale_plugins": runtime.store.stale_count(),
        }
    )


@router.get("/metrics", dependencies=[Depends(require_key)], response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
