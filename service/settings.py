"""All service settings in one class: environment (KPLUG_ prefix) and command-line flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.training import FoldInConfig
from index.codec import PluginFormat


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "knowledge-plugins"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KPLUG_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)  # store, index, and an adapter of its own if any
    model: str = "smollm2"  # "smollm2", "tiny" or a local Hugging Face folder
    cache_dir: Path | None = None  # where the dequantised SmolLM2 lives; default: the user's cache directory
    adapter: Path | None = None  # default: DATA_DIR/adapter if present, else the shipped default adapter
    embedder: str = "minilm"  # "minilm" (the packaged all-MiniLM-L6-v2) or a sentence-transformers folder
    index_kind: Literal["flat", "ivf", "auto"] = "auto"
    plugin_format: PluginFormat = "float16"  # how a new store keeps plugins: float16, or float8 (half the bytes)
    fold_in: FoldInConfig = Field(default_factory=FoldInConfig)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # when set, every route but /health and /ready needs it as a bearer token

    # retrieval and generation
    default_top_k: int = Field(3, ge=1)
    max_top_k: int = Field(20, ge=1)
    default_max_new_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    # retrieval's score: cosine of MiniLM embeddings + this times BM25 over the documents' words (0: cosine alone).
    # On articles 20-23 (160 paragraphs, 783 questions) the own paragraph came first for 0.693 by cosine, 0.898 at
    # 0.05, and within the top 3 for 0.867 against 0.973 (README, "Retrieval by words and meaning").
    lexical_weight: float = Field(0.05, ge=0)
    composition_temperature: float = Field(0.01, gt=0)  # softmax over retrieval scores (0.01 measured over 0.05)
    composition_scale: float = Field(1.0, gt=0)  # z = scale * sum_d w_d x_d: how strongly a composition is applied
    # combine decodes beside a bare reader of the same prompt and picks each token from (1 - mix) * its
    # log-probabilities + mix * the adapted reader's (0: the adapted reader alone) ...
    combine_mix: float = Field(0.0, ge=0, lt=1)
    # ... or from the bare reader's + guidance * (the adapted reader's - the same reader's with no plugin): the
    # bare reader moved by what the plugins alone change
    combine_guidance: float = Field(0.0, ge=0)
    # with either: tokens the bare reader finds less than plausibility times as likely as its top token are never
    # picked, so the plugins only choose among what the bare reader would say (0: no cut-off; 1: the bare reader)
    combine_plausibility: float = Field(0.0, ge=0, le=1)
    max_batch: int = Field(8, ge=1)  # rows decoded together in one forward
    queue_size: int = Field(64, ge=1)  # waiting generation requests; beyond it 429
    request_timeout_s: float = Field(120.0, gt=0)

    # input limits
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_query_chars: int = Field(4_000, ge=1)
    max_text_chars: int = Field(50_000, ge=1)
    max_documents_per_call: int = Field(256, ge=1)
    max_page_size: int = Field(500, ge=1)
    max_pending_jobs: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _one_combine_reader(self) -> Settings:
        if self.combine_mix > 0 and self.combine_guidance > 0:
            raise ValueError("combine_mix and combine_guidance are two ways to combine readers: set one")
        if self.combine_plausibility > 0 and self.combine_mix == 0 and self.combine_guidance == 0:
            raise ValueError(
                "combine_plausibility cuts off a bare reader's tokens: set combine_mix or combine_guidance"
            )
        return self

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        return None if value == "" else value

    def adapter_dir(self) -> Path:
        from adapters.default import default_adapter_dir

        if self.adapter is not None:
            return self.adapter
        own = self.data_dir / "adapter"
        return own if (own / "adapter.json").exists() else default_adapter_dir()
