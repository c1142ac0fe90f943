"""POST /generate: retrieve, compose and generate; JSON, or Server-Sent Events with one event per text piece."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from adapters.errors import InvalidInputError
from service.engine import Finished, RequestHandle
from service.protocol import GenerateRequest, GenerateResponse, Mode, Timings, Usage, UsedDocument
from service.routes.deps import AUTH, RuntimeDep
from service.runtime import Prepared, Runtime
from service.settings import Settings

router = APIRouter(tags=["generate"], dependencies=AUTH)


def check_limits(settings: Settings, query: str, top_k: int | None, max_new_tokens: int | None) -> tuple[int, int]:
    """Validate the knobs against the configured limits; returns (top_k, max_new_tokens) with defaults applied."""
    if not query.strip():
        raise InvalidInputError("query is empty")
    if len(query) > settings.max_query_chars:
        raise InvalidInputError(f"query has {len(query)} characters; at most {settings.max_query_chars}")
    k = top_k or settings.default_top_k
    if k > settings.max_top_k:
        raise InvalidInputError(f"top_k {k} is over the limit of {settings.max_top_k}")
    n = max_new_tokens or settings.default_max_new_tokens
    if n > settings.max_new_tokens:
        raise InvalidInputError(f"max_new_tokens {n} is over the limit of {settings.max_new_tokens}")
    return k, n


def response_of(prepared: Prepared, final: Finished) -> GenerateResponse:
    return GenerateResponse(
        text=final.text,
        documents=[UsedDocument(**d) for d in prepared.documents],
        usage=Usage(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            context_tokens=prepared.context_tokens,
        ),
        timings_ms=Timings(retrieval=prepared.retrieval_ms, compose=prepared.compose_ms, generate=final.generate_ms),
        finish_reason=final.finish_reason,
        mode=prepared.mode,
    )


def record(runtime: Runtime, mode: Mode, final: Finished) -> None:
    runtime.metrics.tokens.inc(final.completion_tokens, mode=mode)
    if final.completion_tokens:
        runtime.metrics.ttft.observe(final.ttft_ms / 1000, mode=mode)


async def stream_events(handle: RequestHandle) -> AsyncIterator[str | Finished]:
    """The engine's events; a client that goes away cancels its row."""
    try:
        async for event in handle.events():
            yield event
    finally:
        handle.cancel()


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, runtime: RuntimeDep) -> GenerateResponse | StreamingResponse:
    top_k, max_new = check_limits(runtime.settings, body.query, body.top_k, body.max_new_tokens)
    if body.min_new_tokens > max_new:
        raise InvalidInputError(f"min_new_tokens {body.min_new_tokens} is over max_new_tokens {max_new}")
    prepared = await asyncio.to_thread(
        runtime.prepare, body.query, body.mode, top_k, max_new, body.temperature, body.seed,
        min_new_tokens=body.min_new_tokens,
    )  # fmt: skip
    handle = runtime.submit(prepared)
    if not body.stream:
        final = await handle.result()
        record(runtime, body.mode, final)
        return response_of(prepared, final)

    async def sse() -> AsyncIterator[str]:
        async for event in stream_events(handle):
            if isinstance(event, Finished):
                record(runtime, body.mode, event)
                yield f"event: done\ndata: {response_of(prepared, event).model_dump_json()}\n\n"
            else:
                yield f"event: token\ndata: {json.dumps({'text': event})}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
