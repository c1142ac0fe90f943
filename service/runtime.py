"""What the service holds while it runs: base model, adapter, embedder, store, engine, registrar, and the query
path that ties them together (retrieve, weigh, compose, prompt)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters.adapter import PluginAdapter
from adapters.base_model import BaseModel, load_base_model
from adapters.errors import CheckpointError, KplugError
from adapters.plugin import compose, retrieval_weights
from adapters.prompts import chat_prompt, user_message
from adapters.training import fold_in, fold_in_steps
from index.embedder import Embedder
from index.store import PluginStore
from service.engine import Engine, GenerationRequest, Reader, RequestHandle
from service.metrics import Metrics
from service.protocol import Mode
from service.registrar import Registrar
from service.settings import Settings

log = logging.getLogger(__name__)

# Folded in at start-up when fold-in is compiled, so that the first registration does not wait for the compiler.
WARM_UP_TEXT = (
    "The Eiffel Tower was built by Gustave Eiffel's company for the 1889 World's Fair in Paris. It is 330 metres "
    "tall and was the tallest man-made structure in the world until 1930. About seven million people visit it "
    "each year, and it was painted for the nineteenth time in 2019."
)


@dataclass
class Prepared:
    """A query made ready for the engine: its documents, composition and prompt."""

    request: GenerationRequest
    documents: list[dict[str, Any]]  # {"id", "score", "weight"}
    context_tokens: int
    retrieval_ms: float
    compose_ms: float
    mode: Mode


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ready = False
        self.base: BaseModel
        self.adapter: PluginAdapter
        self.embedder: Embedder
        self.store: PluginStore
        self.engine: Engine
        self.registrar: Registrar
        self.fold_in_warmup_s: float | None = None  # the compilation, when fold-in is compiled

    def load(self) -> None:
        s = self.settings
        started = time.perf_counter()
        self.engine = Engine(max_batch=s.max_batch, queue_size=s.queue_size)
        self.engine.start()
        try:
            self.engine.call(self._load_models).result()  # torch runs on the engine's thread only
            if s.fold_in.compile and fold_in_steps(self.adapter, s.fold_in) > 0:
                self.engine.call(self._warm_up_fold_in).result()
        except BaseException:
            self.engine.stop()
            raise
        assert self.adapter.checkpoint_id is not None
        self.store = PluginStore(
            s.data_dir / "store",
            self.embedder.dim,
            self.adapter.plugin_shape,
            self.adapter.checkpoint_id,
            s.index_kind,
            plugin_format=s.plugin_format,
        )
        self.engine.bind(self.base.model, self.base.tokenizer, self.adapter)
        self.registrar = Registrar(
            self.store, self.embedder, self.adapter, self.base.model, self.base.tokenizer, s.fold_in, self.engine,
            s.max_pending_jobs,
        )  # fmt: skip
        self.registrar.start()
        self.ready = True
        log.info(
            "ready in %.1f s: %s, adapter %s (%d modules, plugin %d bytes), %d documents",
            time.perf_counter() - started,
            self.base.identity.name,
            self.adapter.checkpoint_id,
            len(self.adapter.module_names),
            self.store.plugin_bytes,
            self.store.count(),
        )

    def _load_models(self) -> None:
        s = self.settings
        self.base = load_base_model(s.model, s.cache_dir)
        self.adapter = PluginAdapter.load(s.adapter_dir(), self.base)
        # refuse at start what every registration would fail on
        if (s.fold_in.written or s.fold_in.selected_written) and self.adapter.writer is None:
            raise CheckpointError(f"fold-in asks for written questions but {s.adapter_dir()} has no question writer")
        if s.fold_in.selected and self.adapter.selector is None:
            raise CheckpointError(f"fold-in asks for selected spans but {s.adapter_dir()} has no span selector")
        self.embedder = Embedder(s.embedder)

    def _warm_up_fold_in(self) -> None:
        started = time.perf_counter()
        try:
            fold_in(self.adapter, self.base.model, self.base.tokenizer, [WARM_UP_TEXT], self.settings.fold_in)
        except Exception as exc:  # e.g. no C++ compiler for Inductor (the Docker image has none)
            raise KplugError(
                f"compiling fold-in failed ({type(exc).__name__}: {exc}); unset KPLUG_FOLD_IN__COMPILE to fold in "
                "uncompiled"
            ) from exc
        self.fold_in_warmup_s = time.perf_counter() - started
        log.info("fold-in compiled in %.1f s", self.fold_in_warmup_s)

    def search(self, query: str, top_k: int) -> list[tuple[str, float]]:
        """Embed and search on the engine's thread: a FAISS search on a request thread left an OpenMP team there
        that slowed every later decoding step (71 ms against 40 ms, measured)."""
        weight = self.settings.lexical_weight
        return self.engine.call(
            lambda: self.store.search(self.embedder.embed([query])[0], top_k, query, weight)
        ).result()

    def _compose(self, hits: list[tuple[str, float]], mode: Mode) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
        """Weights from the scores and the composed plugin (on the engine's thread: torch runs nowhere else)."""
        weights = retrieval_weights(
            torch.tensor([score for _, score in hits]), self.settings.composition_temperature
        )  # (K,)
        documents: list[dict[str, Any]] = [
            {"id": i, "score": s, "weight": float(w)} for (i, s), w in zip(hits, weights, strict=True)
        ]
        if mode not in ("plugins", "combine") or not hits:
            return documents, None
        plugins = self.store.plugins([i for i, _ in hits])
        usable = [(plugins[d["id"]], d["weight"]) for d in documents if d["id"] in plugins]
        if not usable:
            return documents, None
        stacked = torch.from_numpy(np.stack([p for p, _ in usable]))  # (K, M, r)
        z = compose(stacked, torch.tensor([w for _, w in usable]))  # (M, r)
        return documents, z * self.settings.composition_scale

    def close(self) -> None:
        if not self.ready:
            return
        self.ready = False
        self.registrar.stop()
        self.engine.stop()
        self.store.close()

    # ---- the query path -----------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.base.tokenizer(text, add_special_tokens=False).input_ids)

    def prepare(
        self,
        query: str,
        mode: Mode,
        top_k: int,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        history: list[dict[str, str]] | None = None,
        hits: list[tuple[str, float]] | None = None,
        min_new_tokens: int = 0,
    ) -> Prepared:
        """Retrieve top_k documents for query (unless hits are given), weigh them, compose their plugins and
        build the prompt."""
        started = time.perf_counter()
        if mode == "none":
            hits = []
        elif hits is None:
            hits = self.search(query, top_k)
        retrieved = time.perf_counter()
        documents, z = self.engine.call(lambda: self._compose(hits or [], mode)).result()
        composed = time.perf_counter()
        contexts = [self.store.get(d["id"]).text for d in documents] if mode in ("context", "combine") else []
        tokenizer = self.base.tokenizer
        messages = list(history or [])
        messages.append({"role": "user", "content": user_message(query, contexts)})
        prompt = str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        context_tokens = 0
        if contexts:
            context_tokens = len(prompt_ids) - self.count_tokens(chat_prompt(tokenizer, query))
        partners, weight = self._readers(mode)
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            z=z,
            use_adapter=mode in ("plugins", "combine"),
            shared_weight=0.0 if mode == "combine" and not self.adapter.config.shared_in_reading else 1.0,
            partners=partners,
            weight=weight,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            seed=seed,
            timeout_s=self.settings.request_timeout_s,
        )
        self.metrics.retrieval.observe(retrieved - started)
        self.metrics.compose.observe(composed - retrieved)
        return Prepared(
            request, documents, context_tokens, (retrieved - started) * 1000, (composed - retrieved) * 1000, mode
        )

    def _readers(self, mode: Mode) -> tuple[list[Reader], float]:
        """Partner readers decoded beside a request's own row, and its own row's weight (combine_mix,
        combine_guidance, combine_plausibility)."""
        s = self.settings
        if mode != "combine":
            return [], 1.0
        if s.combine_guidance > 0:
            bare = Reader(None, False, 1.0, s.combine_plausibility)
            return [bare, Reader(None, True, -s.combine_guidance)], s.combine_guidance
        if s.combine_mix > 0:
            return [Reader(None, False, 1 - s.combine_mix, s.combine_plausibility)], s.combine_mix
        return [], 1.0

    def submit(self, prepared: Prepared) -> RequestHandle:
        return self.engine.submit(prepared.request, asyncio.get_running_loop())
