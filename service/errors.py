"""The one place where library errors become HTTP status codes and bodies: {"error": {"type", "message"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    CheckpointError,
    ConflictError,
    DeadlineExceededError,
    InvalidInputError,
    KplugError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    StoreCorruptError,
)

STATUS: list[tuple[type[KplugError], int]] = [
    (InvalidInputError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (OverloadedError, 429),
    (DeadlineExceededError, 504),
    (CheckpointError, 503),
    (ModelNotFoundError, 503),
    (StoreCorruptError, 500),
]


class PayloadTooLargeError(InvalidInputError):
    """A request body over the configured size."""


class UnauthorizedError(KplugError):
    """A missing or wrong API key."""


class NotReadyError(KplugError):
    """The model, adapter, store or index is still loading."""


def status_of(exc: KplugError) -> int:
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, UnauthorizedError):
        return 401
    if isinstance(exc, NotReadyError):
        return 503
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 500)


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, **extra}}


def install(app: FastAPI) -> None:
    @app.exception_handler(KplugError)
    async def _library(_: Request, exc: KplugError) -> JSONResponse:
        headers = {}
        if isinstance(exc, OverloadedError):
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, UnauthorizedError):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=status_of(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return JSONResponse(error_body("ValidationError", f"{where}: {first['msg']}", details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body("HTTPError", str(exc.detail)), status_code=exc.status_code)
