"""Typed dependencies: the runtime (503 until loaded) and the optional API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReadyError, UnauthorizedError
from service.runtime import Runtime
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    if not runtime.ready:
        raise NotReadyError(request.app.state.load_error or "the service is still loading")
    return runtime


def require_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """With KPLUG_API_KEY set, demand `Authorization: Bearer <key>` (compared in constant time, never logged)."""
    if settings.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = settings.api_key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
        raise UnauthorizedError("missing or wrong API key (Authorization: Bearer <key>)")


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
AUTH = [Depends(require_key)]
