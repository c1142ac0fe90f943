"""OpenAI-compatible chat completions and model list: retrieval runs on the last user message."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from adapters.errors import InvalidInputError
from service.engine import Finished
from service.protocol import ChatCompletionRequest
from service.routes.deps import AUTH, RuntimeDep
from service.routes.generate import check_limits, record, stream_events

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=AUTH)
MODEL_ID = "kplug"
FINISH = {"stop": "stop", "length": "length", "time_limit": "length", "cancelled": "stop"}


@router.get("/models")
def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "kplug"}]}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep) -> dict[str, Any] | StreamingResponse:
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise InvalidInputError("messages: at least one user message is needed")
    last = users[-1]
    query = body.messages[last].text()
    history = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages[:last]
        if m.role in ("system", "developer", "user", "assistant")
    ]
    top_k, max_new = check_limits(runtime.settings, query, body.top_k, body.max_completion_tokens or body.max_tokens)
    prepared = await asyncio.to_thread(
        runtime.prepare, query, body.mode, top_k, max_new, body.temperature or 0.0, body.seed, history
    )
    handle = runtime.submit(prepared)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    extension = {"documents": prepared.documents}

    if not body.stream:
        final = await handle.result()
        record(runtime, body.mode, final)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": final.text},
                    "finish_reason": FINISH[final.finish_reason],
                }
            ],
            "usage": {
                "prompt_tokens": final.prompt_tokens,
                "completion_tokens": final.completion_tokens,
                "total_tokens": final.prompt_tokens + final.completion_tokens,
            },
            "kplug": extension,
        }

    def chunk(delta: dict[str, str], finish: str | None) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def sse() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        async for event in stream_events(handle):
            if isinstance(event, Finished):
                record(runtime, body.mode, event)
                yield chunk({}, FINISH[event.finish_reason])
            else:
                yield chunk({"content": event}, None)
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
