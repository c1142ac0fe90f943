"""The batching engine: concurrent rows give what each request gives alone, and what the reference decoder gives."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from adapters.adapter import PluginAdapter
from adapters.base_model import BaseModel
from adapters.errors import OverloadedError
from adapters.generation import greedy_generate
from adapters.prompts import chat_prompt
from service.engine import Engine, Finished, GenerationRequest, Reader

QUESTIONS = ["hi", "what is a cat?", "tell me a much longer story about the sea", "x", "why", "numbers 1 2 3"]


def _requests(tiny: BaseModel, adapter: PluginAdapter) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i, q in enumerate(QUESTIONS):
        ids = tiny.tokenizer(chat_prompt(tiny.tokenizer, q), add_special_tokens=False).input_ids
        z = torch.randn(*adapter.plugin_shape, generator=g) * 3
        shared = 0.0 if i == 4 else 1.0  # one row with the plugins' term alone
        out.append(GenerationRequest(ids, z, i % 3 != 0, max_new_tokens=6 + 2 * i, shared_weight=shared))
    return out


async def _run(engine: Engine, requests: list[GenerationRequest]) -> list[Finished]:
    loop = asyncio.get_running_loop()
    handles = [engine.submit(r, loop) for r in requests]
    return [await h.result() for h in handles]


def test_concurrent_requests_equal_single_requests_and_reference(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, tiny_adapter, max_batch=4)
    engine.start()
    try:
        requests = _requests(tiny, tiny_adapter)
        together = asyncio.run(_run(engine, requests))  # 6 requests, batches of at most 4: rows join and leave
        alone = [asyncio.run(_run(engine, [r]))[0] for r in requests]
    finally:
        engine.stop()
    assert engine.steps > 0
    for t, a, r in zip(together, alone, requests, strict=True):
        assert t.text == a.text
        assert t.completion_tokens == a.completion_tokens <= r.max_new_tokens
        prompt = tiny.tokenizer.decode(r.prompt_ids)
        z = r.z[None] if r.use_adapter else None  # type: ignore[index]
        if r.shared_weight == 0:
            with tiny_adapter.use(z, shared=torch.zeros(1)):
                [ref] = greedy_generate(tiny.model, tiny.tokenizer, None, [prompt], None, r.max_new_tokens)
        elif r.use_adapter:
            [ref] = greedy_generate(tiny.model, tiny.tokenizer, tiny_adapter, [prompt], z, r.max_new_tokens)
        else:
            with tiny_adapter.use(None, gate=torch.zeros(1)):
                [ref] = greedy_generate(tiny.model, tiny.tokenizer, None, [prompt], None, r.max_new_tokens)
        assert t.text.strip() == ref


def test_streamed_pieces_add_up_to_the_text(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, tiny_adapter)
    engine.start()

    async def stream() -> tuple[str, Finished]:
        handle = engine.submit(_requests(tiny, tiny_adapter)[2], asyncio.get_running_loop())
        pieces, final = [], None
        async for event in handle.events():
            if isinstance(event, Finished):
                final = event
            else:
                pieces.append(event)
        assert final is not None
        return "".join(pieces), final

    try:
        joined, final = asyncio.run(stream())
    finally:
        engine.stop()
    assert joined.strip() == final.text.strip() and final.finish_reason in ("stop", "length")


def test_full_queue_is_refused(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, tiny_adapter, queue_size=2)  # not started: nothing drains

    async def flood() -> None:
        loop = asyncio.get_running_loop()
        request = _requests(tiny, tiny_adapter)[0]
        engine.submit(request, loop)
        engine.submit(request, loop)
        with pytest.raises(OverloadedError):
            engine.submit(request, loop)

    asyncio.run(flood())


def test_time_limit_ends_a_request_cleanly(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, tiny_adapter)
    engine.start()
    try:
        request = _requests(tiny, tiny_adapter)[1]
        request.max_new_tokens, request.timeout_s = 10_000, 0.3
        [result] = asyncio.run(_run(engine, [request]))
        [after] = asyncio.run(_run(engine, [_requests(tiny, tiny_adapter)[0]]))  # the engine carries on
    finally:
        engine.stop()
    assert result.finish_reason in ("time_limit", "stop") and after.finish_reason in ("stop", "length")


def _mixed_reference(tiny: BaseModel, adapter: PluginAdapter, request: GenerationRequest) -> list[int]:
    """Greedy decoding by full recomputation: each token is the argmax of the weighted sum of every reader's
    log-probabilities (the request's own and its partners')."""
    readers = [Reader(request.z, request.use_adapter, request.weight), *request.partners]
    zero = torch.zeros(adapter.plugin_shape)
    z = torch.stack([r.z if r.z is not None else zero for r in readers])
    gate = torch.tensor([1.0 if r.use_adapter else 0.0 for r in readers])
    weights = torch.tensor([r.weight for r in readers])
    ids = list(request.prompt_ids)
    for _ in range(request.max_new_tokens):
        with torch.no_grad(), adapter.use(z, gate):
            logits = tiny.model(input_ids=torch.tensor([ids] * len(readers))).logits[:, -1].float().log_softmax(-1)
        scores = (weights[:, None] * logits).sum(0)
        for r, logp in zip(readers, logits, strict=True):  # gatekeepers rule out what they find implausible
            if r.plausibility > 0:
                scores[logp.exp() < r.plausibility * logp.exp().max()] = -torch.inf
        token = int(scores.argmax())
        if token == tiny.tokenizer.eos_token_id:
            break
        ids.append(token)
    return ids[len(request.prompt_ids) :]


def test_requests_with_partner_readers_decode_their_mixture_beside_plain_rows(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    requests = _requests(tiny, tiny_adapter)
    for r in requests[1:]:  # request 0 (bare) stays one row; no request's rows outgrow max_batch
        r.use_adapter, r.shared_weight, r.weight = True, 1.0, 0.5
        r.partners = [Reader(None, False, 0.5)]  # the mix: half the bare reader
    requests[2].weight, requests[2].partners = 2.0, [Reader(None, False, 1.0), Reader(None, True, -2.0)]  # guidance
    requests[3].weight, requests[3].partners = 2.0, [Reader(None, False, 1.0, 0.5), Reader(None, True, -2.0)]
    engine = Engine(tiny.model, tiny.tokenizer, tiny_adapter, max_batch=5)
    engine.start()
    try:
        together = asyncio.run(_run(engine, requests))  # rows join and leave beside each other and a plain row
        alone = asyncio.run(_run(engine, [replace(r, partners=[], weight=1.0) for r in requests[1:]]))
    finally:
        engine.stop()
    for t, r in zip(together[1:], requests[1:], strict=True):
        assert t.text == tiny.tokenizer.decode(_mixed_reference(tiny, tiny_adapter, r), skip_special_tokens=True)
    assert together[0].text == asyncio.run(_single(tiny, tiny_adapter, requests[0])).text
    assert any(a.text != t.text for a, t in zip(alone, together[1:], strict=True))  # the partners count


def test_a_gatekeeping_reader_rules_out_what_it_finds_implausible(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    request = replace(_requests(tiny, tiny_adapter)[1], max_new_tokens=12, weight=8.0)
    guided = [Reader(None, False, 1.0), Reader(None, True, -8.0)]  # strong guidance: far from the bare reader
    bare = replace(request, use_adapter=False, z=None, weight=1.0)

    def decode(plausibility: float) -> str:
        gated = [replace(guided[0], plausibility=plausibility), guided[1]]
        return asyncio.run(_single(tiny, tiny_adapter, replace(request, partners=gated))).text

    ungated, loose, strict = decode(0.0), decode(0.5), decode(1.0)
    assert strict == asyncio.run(_single(tiny, tiny_adapter, bare)).text  # only the bare reader's top token passes
    assert len({ungated, loose, strict}) == 3  # the cut-off binds, and less at 0.5 than at 1
    assert loose == tiny.tokenizer.decode(
        _mixed_reference(
            tiny, tiny_adapter, replace(request, partners=[replace(guided[0], plausibility=0.5), guided[1]])
        ),
        skip_special_tokens=True,
    )


async def _single(tiny: BaseModel, adapter: PluginAdapter, request: GenerationRequest) -> Finished:
    engine = Engine(tiny.model, tiny.tokenizer, adapter)
    engine.start()
    try:
        return (await _run(engine, [request]))[0]
    finally:
        engine.stop()
