"""The generation engine: one thread decodes every active request together, each row with its own composition.

It is also the process's only torch thread. libgomp gives its full team only to the first thread that uses it;
a second torch thread ran a decode step at single-core speed (61 ms against 35 ms on 2 cores), so loading, query
embeddings and fold-in are handed to this thread with ``call`` and run between decoding steps.

Each decoding step is one forward of the batch (B, 1) with Z (B, M, r), a gate (B,) (0: the bare model, for the
`none` and `context` modes) and the weight of the shared term (B,). A new request is prefilled alone, then joins at
the next step: its KV cache is left-padded to the batch's length (or the batch to its) and concatenated; a finished
row is dropped. Padding is masked, so a request's output is the one it would get alone.

A request with partner readers takes adjacent rows, its own first, all on the same prompt and sharing one token
list; each step picks one token from a weighted sum of the rows' log-probabilities (never one a gatekeeping partner
finds implausible), and the rows leave together.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from adapters.adapter import PluginAdapter
from adapters.errors import OverloadedError
from adapters.forward import CausalLM

log = logging.getLogger(__name__)
T = TypeVar("T")


def _settle(future: Future[T], fn: Callable[[], T]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    z: Tensor | None  # (M, r) composition; None: z = 0
    use_adapter: bool  # False: this row runs the bare base model
    max_new_tokens: int
    min_new_tokens: int = 0  # end-of-text is suppressed before this many tokens (fixed-length benchmarks)
    temperature: float = 0.0
    seed: int | None = None
    timeout_s: float = 120.0
    shared_weight: float = 1.0  # the weight of the shared term U V h (0: the plugins' term alone)
    # other readers of the same prompt decoded beside this one: each token is picked from weight * this row's
    # log-probabilities + the sum of each partner's weight * its log-probabilities
    partners: list[Reader] = field(default_factory=list)
    weight: float = 1.0


@dataclass
class Reader:
    """A partner row: the bare model (use_adapter False) or the adapter with composition z (None: z = 0).
    plausibility > 0 makes it a gatekeeper: a token it finds less than plausibility times as likely as its own top
    token is never picked (contrastive decoding's plausibility constraint), whatever the other rows say."""

    z: Tensor | None
    use_adapter: bool
    weight: float
    plausibility: float = 0.0


@dataclass
class Finished:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | time_limit | cancelled
    ttft_ms: float
    generate_ms: float


class RequestHandle:
    """The caller's side of a request: text pieces, then a Finished (or an exception), on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | Finished | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.monotonic()

    def _emit(self, event: str | Finished | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[str | Finished]:
        while True:
            event = await self._queue.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return

    async def result(self) -> Finished:
        async for event in self.events():
            if isinstance(event, Finished):
                return event
        raise RuntimeError("request ended without a result")


@dataclass
class _Row:
    handle: RequestHandle
    request: GenerationRequest
    deadline: float
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.monotonic)
    partner: bool = False  # a partner reader of the request whose own row comes first


class Engine:
    def __init__(
        self,
        model: CausalLM | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        adapter: PluginAdapter | None = None,
        max_batch: int = 8,
        queue_size: int = 64,
    ) -> None:
        self.max_batch = max_batch
        self.queue_size = queue_size
        self._pending: collections.deque[tuple[RequestHandle, GenerationRequest]] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._thread: threading.Thread | None = None
        if model is not None and tokenizer is not None and adapter is not None:
            self.bind(model, tokenizer, adapter)

    def bind(self, model: CausalLM, tokenizer: PreTrainedTokenizerBase, adapter: PluginAdapter) -> None:
        """The model to decode with (it may be loaded by a ``call`` on this engine's thread first)."""
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.eos_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}
        self._reset()
        self._stopping = False
        self.tokens_generated = 0
        self.steps = 0

    # ---- public -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kplug-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn on the engine's thread, between decoding steps; its result or exception comes in the future."""
        future: Future[T] = Future()
        if threading.current_thread() is self._thread:  # already on it: run now, never wait on ourselves
            _settle(future, fn)
            return future
        with self._wake:
            self._tasks.append((fn, future))
            self._wake.notify()
        return future

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        handle = RequestHandle(loop)
        with self._wake:
            if len(self._pending) >= self.queue_size:
                raise OverloadedError(f"generation queue full ({self.queue_size} waiting)", retry_after_s=2)
            self._pending.append((handle, request))
            self._wake.notify()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ---- the decoding thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._rows and not self._tasks:
                    self._wake.wait()
                if self._stopping:
                    break
                task = self._tasks.popleft() if self._tasks else None
                admitted: list[tuple[RequestHandle, GenerationRequest]] = []
                rows = len(self._rows)
                while self._pending and (rows == 0 or rows + _width(self._pending[0][1]) <= self.max_batch):
                    handle, request = self._pending.popleft()
                    admitted.append((handle, request))
                    rows += _width(request)
            if task is not None:  # one task between steps, so the batch keeps moving
                fn, future = task
                if future.set_running_or_notify_cancel():
                    _settle(future, fn)
            try:
                for handle, request in admitted:
                    self._admit(handle, request)
                if self._rows:
                    self._step()
            except Exception as exc:  # a failed forward must not take the engine down
                log.exception("engine step failed; failing %d active requests", len(self._rows))
                for row in self._rows:
                    row.handle._emit(exc)
                self._reset()
        for row in self._rows:
            row.handle._emit(RuntimeError("the engine stopped"))
        for handle, _ in self._pending:
            handle._emit(RuntimeError("the engine stopped"))
        for _, future in self._tasks:
            future.cancel()

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._z = torch.zeros(0, *self.adapter.plugin_shape)
        self._gate = torch.zeros(0)
        self._shared = torch.zeros(0)

    def _composition(self, request: GenerationRequest) -> tuple[Tensor, Tensor, Tensor]:
        """(W, M, r), (W,), (W,): z, gate and shared weight of a request's rows, its own and its partners'."""
        readers = [Reader(request.z, request.use_adapter, request.weight), *request.partners]
        zero = torch.zeros(self.adapter.plugin_shape)
        z = torch.stack([(r.z if r.z is not None else zero).to(torch.float32) for r in readers])
        gate = torch.tensor([1.0 if r.use_adapter else 0.0 for r in readers])
        return z, gate, torch.full((len(readers),), request.shared_weight)

    def _admit(self, handle: RequestHandle, request: GenerationRequest) -> None:
        if handle.cancelled:
            return
        row = _Row(handle, request, deadline=handle.submitted + request.timeout_s)
        if request.seed is not None:
            row.generator = torch.Generator().manual_seed(request.seed)
        rows = [row] + [
            _Row(handle, request, deadline=row.deadline, ids=row.ids, partner=True) for _ in request.partners
        ]
        z, gate, shared = self._composition(request)
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([request.prompt_ids] * len(rows))  # (W, T)
        with self.adapter.use(z, gate, shared):
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]  # (W, V)
        if self._advance(row, self._pick(_scores(logits, 0, request), row)):
            return  # done after one token: never joins the batch
        self._join(rows, cache, z, gate, shared)

    def _join(self, rows: list[_Row], cache: DynamicCache, z: Tensor, gate: Tensor, shared: Tensor) -> None:
        new_len = len(rows[0].request.prompt_ids)
        row_mask = torch.ones(len(rows), new_len, dtype=torch.long)
        if self._cache is None:
            self._cache, self._mask = cache, row_mask
        else:
            length = max(self._mask.shape[1], new_len)
            for mine, theirs in zip(_layers(self._cache), _layers(cache), strict=True):
                (k1, v1), (k2, v2) = _kv(mine), _kv(theirs)
                mine.keys = torch.cat([_left_pad(k1, length), _left_pad(k2, length)])  # (B+W, H, L, D)
                mine.values = torch.cat([_left_pad(v1, length), _left_pad(v2, length)])
            self._mask = torch.cat([_left_pad_mask(self._mask, length), _left_pad_mask(row_mask, length)])
        self._rows.extend(rows)
        self._z = torch.cat([self._z, z])  # (B, M, r)
        self._gate = torch.cat([self._gate, gate])  # (B,)
        self._shared = torch.cat([self._shared, shared])  # (B,)

    def _step(self) -> None:
        assert self._cache is not None
        last = torch.tensor([[row.ids[-1]] for row in self._rows])  # (B, 1)
        mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long)], dim=1)  # (B, L+1)
        pos = (mask.sum(1, keepdim=True) - 1).clamp(min=0)  # (B, 1): each row's own position
        with self.adapter.use(self._z, self._gate, self._shared):
            out = self.model(
                input_ids=last, attention_mask=mask, position_ids=pos, past_key_values=self._cache, use_cache=True
            )
        self._mask = mask
        self.steps += 1
        logits = out.logits[:, -1]  # (B, V)
        keep: list[int] = []
        lead_kept = False
        for i, row in enumerate(self._rows):
            if row.partner:  # leaves with its request's own row, before it
                if lead_kept:
                    keep.append(i)
            else:
                lead_kept = not self._advance(row, self._pick(_scores(logits, i, row.request), row))
                if lead_kept:
                    keep.append(i)
        if len(keep) < len(self._rows):
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep)
        assert self._cache is not None
        mask = self._mask[index]  # (B', L)
        first = int((mask.cumsum(1) == 0).sum(1).min())  # leading columns that are padding in every row
        for layer in _layers(self._cache):
            keys, values = _kv(layer)
            layer.keys, layer.values = keys[index, :, first:], values[index, :, first:]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]
        self._z, self._gate, self._shared = self._z[index], self._gate[index], self._shared[index]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _pick(self, logits: Tensor, row: _Row) -> int:
        if len(row.ids) < row.request.min_new_tokens:
            masked = logits.clone()
            masked[list(self.eos_ids)] = float("-inf")
            if torch.isfinite(masked).any():  # a gatekeeping reader may have left end-of-text alone
                logits = masked
        temperature = row.request.temperature
        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = F.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int) -> bool:
        """Record a token for row and stream its text; True when the row is finished."""
        now = time.monotonic()
        reason = None
        if row.handle.cancelled:
            reason = "cancelled"
        elif token in self.eos_ids:
            reason = "stop"
        else:
            row.ids.append(token)
            self.tokens_generated += 1
            if row.first_token_at is None:
                row.first_token_at = now
            text = self._decode(row.ids)
            if not text.endswith("\ufffd"):  # hold back half a multi-byte character
                piece, row.emitted = text[len(row.emitted) :], text
                if piece:
                    row.handle._emit(piece)
            if len(row.ids) >= row.request.max_new_tokens:
                reason = "length"
            elif now > row.deadline:
                reason = "time_limit"
        if reason is None:
            return False
        text = self._decode(row.ids)
        if text != row.emitted and text.startswith(row.emitted):
            row.handle._emit(text[len(row.emitted) :])
        first = row.first_token_at or now
        row.handle._emit(
            Finished(
                text=text,
                prompt_tokens=len(row.request.prompt_ids),
                completion_tokens=len(row.ids),
                finish_reason=reason,
                ttft_ms=(first - row.handle.submitted) * 1000,
                generate_ms=(now - row.started) * 1000,
            )
        )
        return True


def _width(request: GenerationRequest) -> int:
    return 1 + len(request.partners)


def _scores(logits: Tensor, i: int, request: GenerationRequest) -> Tensor:
    """What the request whose own row is i picks its token from: its logits, or with partners (rows i + 1, ...)
    the weighted sum of every row's log-probabilities, less the tokens a gatekeeping partner rules out."""
    if not request.partners:
        return logits[i]
    weights = torch.tensor([request.weight] + [p.weight for p in request.partners])  # (W,)
    logp = F.log_softmax(logits[i : i + len(weights)].float(), -1)  # (W, V)
    scores = (weights[:, None] * logp).sum(0)
    for row, p in enumerate(request.partners, start=1):
        if p.plausibility > 0:  # its top token always stays, so something can be picked
            implausible = logp[row] < logp[row].max() + math.log(p.plausibility)
            scores = scores.masked_fill(implausible, -math.inf)
    return scores


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The per-layer key/value holders, (B, H, L, D) each; full-attention models only."""
    layers = list(cache.layers)
    if not all(isinstance(layer, DynamicLayer) for layer in layers):
        raise TypeError("the engine batches full-attention caches only")
    return layers  # type: ignore[return-value]


def _kv(layer: DynamicLayer) -> tuple[Tensor, Tensor]:
    if layer.keys is None or layer.values is None:
        raise RuntimeError("an uninitialised cache layer in an active batch")
    return layer.keys, layer.values


def _left_pad(t: Tensor, length: int) -> Tensor:
    """(B, H, L, D) -> (B, H, length, D) with zeros on the left."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))


def _left_pad_mask(mask: Tensor, length: int) -> Tensor:
    return F.pad(mask, (length - mask.shape[1], 0))
