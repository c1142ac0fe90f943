"""Request and response models of the HTTP API, in one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["plugins", "context", "combine", "none"]
OnConflict = Literal["overwrite", "skip", "fail"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- documents and jobs ------------------------------------------------------------------------------------


class DocumentIn(Strict):
    id: str | None = Field(None, min_length=1, max_length=256)
    text: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class RegisterRequest(Strict):
    documents: list[DocumentIn] = Field(min_length=1)
    on_conflict: OnConflict = "overwrite"


class JobDocument(Strict):
    id: str
    status: str  # queued | created | updated | skipped | failed
    uniqueness: float | None = None
    loss: float | None = None
    seconds: float | None = None
    error: str | None = None


class Progress(Strict):
    done: int
    total: int


class JobOut(Strict):
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: Progress
    documents: list[JobDocument]
    error: str | None = None


class PluginInfo(Strict):
    norm: float
    uniqueness_percentile: float | None
    adapter_id: str
    stale: bool  # fitted with another adapter than the one loaded: fold it in again to use it
    loss: float | None


class DocumentOut(Strict):
    id: str
    text: str
    metadata: dict[str, Any]
    content_hash: str
    created_at: float
    updated_at: float
    plugin: PluginInfo | None


class DocumentPage(Strict):
    documents: list[DocumentOut]
    total: int
    offset: int
    limit: int


class SimilarDocument(Strict):
    id: str
    cosine: float


class SimilarOut(Strict):
    id: str
    similar: list[SimilarDocument]


class ClustersOut(Strict):
    clusters: dict[str, int]


# ---- generation ---------------------------------------------------------------------------------------------


class GenerateRequest(Strict):
    query: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    mode: Mode = "plugins"
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    seed: int | None = None
    stream: bool = False


class UsedDocument(Strict):
    id: str
    score: float
    weight: float


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int


class Timings(Strict):
    retrieval: float
    compose: float
    generate: float


class GenerateResponse(Strict):
    text: str
    documents: list[UsedDocument]
    usage: Usage
    timings_ms: Timings
    finish_reason: str
    mode: Mode


# ---- OpenAI-compatible ----------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send many optional knobs (top_p, n, user, ...); unknown ones are ignored, not refused.
    model_config = ConfigDict(extra="ignore")

    model: str = "kplug"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    seed: int | None = None
    stream: bool = False
    # extensions: how the plugins are chosen
    top_k: int | None = Field(None, ge=1)
    mode: Mode = "plugins"
