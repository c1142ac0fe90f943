"""`kplug bench adapter`: decoding speed with a composed plugin against the bare model, fold-in time (the encoder's,
and refined by gradient steps: against the settings before, and compiled), plugin size.

The bare and the adapted model are separate copies timed alternately in one run, so machine noise hits both.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.adapter import PluginAdapter
from adapters.base_model import DEFAULT_MODEL, BaseModel, load_base_model
from adapters.generation import greedy_generate
from adapters.plugin import compose, retrieval_weights
from adapters.prompts import chat_prompt
from adapters.spans import selected_examples
from adapters.training import FoldInConfig, fold_in

CHUNK = 4  # documents a registration folds in together (service.registrar.CHUNK)
# Five documents (the first is 150 words: the fold-in timing document).
DOCUMENTS = [
    "The Great Library of Alexandria was one of the largest and most significant libraries of the ancient world. "
    "It was part of a larger research institution called the Mouseion, dedicated to the Muses. The library was "
    "conceived and opened during the reign of Ptolemy I Soter or his son Ptolemy II Philadelphus. Scholars there "
    "copied, edited and catalogued texts from across the Mediterranean, and the poet Callimachus compiled the "
    "Pinakes, a bibliographic survey of its holdings that ran to 120 scrolls. Ships that entered the harbour were "
    "searched for books, which were copied, with the copies returned to the owners and the originals kept. The "
    "library declined gradually over several centuries rather than in one fire. Funding fell under the later "
    "Ptolemies, scholars were expelled in 145 BC, and Julius Caesar's siege of 48 BC burned part of its "
    "collection. By the fourth century AD little of it remained, though the daughter library at the Serapeum "
    "survived until 391.",
    "Photosynthesis converts light energy into chemical energy stored in glucose. Chlorophyll in the chloroplasts "
    "absorbs mostly blue and red light, and oxygen is released as a by-product of splitting water.",
    "The Rhine rises in the Swiss Alps, forms part of the border between Germany and France, and flows into the "
    "North Sea in the Netherlands after a course of about 1,230 kilometres.",
    "Ada Lovelace wrote notes in 1843 on Charles Babbage's Analytical Engine that included an algorithm for "
    "computing Bernoulli numbers, often called the first computer program.",
    "The Treaty of Westphalia of 1648 ended the Thirty Years' War and established the principle of state "
    "sovereignty that shaped the European state system for centuries.",
]
PROMPT = "Tell me about the history of libraries and how they preserved knowledge."


def _tokens_per_s(run: Any, new_tokens: int) -> float:
    started = time.perf_counter()
    run()
    return new_tokens / (time.perf_counter() - started)


def bench_adapter(
    adapter_dir: Path,
    model: str = DEFAULT_MODEL,
    new_tokens: int = 64,
    repeats: int = 5,
    refine_repeats: int = 3,
    against: Path | None = None,
) -> dict[str, Any]:
    """against: a second adapter whose refined fold-in (the defaults, uncompiled) is timed in the same alternation,
    so that two parametrisations' fold-in speeds are compared in one run rather than across sessions."""
    torch.manual_seed(0)
    bare = load_base_model(model)
    base = load_base_model(model)
    adapter = PluginAdapter.load(adapter_dir, base)
    other = None
    if against is not None:
        other_base = load_base_model(model)
        other = (other_base, PluginAdapter.load(against, other_base))
    prompt = [chat_prompt(base.tokenizer, PROMPT)]

    started = time.perf_counter()
    [timed] = fold_in(adapter, base.model, base.tokenizer, DOCUMENTS[:1], FoldInConfig())
    fold_in_s = time.perf_counter() - started
    others = fold_in(adapter, base.model, base.tokenizer, DOCUMENTS[1:], FoldInConfig())
    plugins = torch.from_numpy(np.stack([timed.plugin] + [r.plugin for r in others]))  # (5, M, r)
    z = compose(plugins, retrieval_weights(torch.tensor([0.62, 0.55, 0.51, 0.47, 0.44])))[None]  # (1, M, r)

    # Refined fold-in (the store fits' recipe: 5 steps at lr 1.0 on rule-made questions) on the 150-word document,
    # with fold-in's defaults, with the settings they replaced (micro-batches of 8, the fused attention kernel) and
    # compiled, timed alternately: the ratios are this run's, whatever the machine's load. The compiled one is
    # compiled first, and that first fold-in timed apart.
    configs = {
        "before": FoldInConfig(steps=5, lr=1.0, micro_batch=8, attention="fused"),
        "now": FoldInConfig(steps=5, lr=1.0),
        "compiled": FoldInConfig(steps=5, lr=1.0, compile=True),
    }
    started = time.perf_counter()
    fold_in(adapter, base.model, base.tokenizer, DOCUMENTS[:1], configs["compiled"])
    first_compiled = time.perf_counter() - started
    refine: dict[str, list[float]] = {name: [] for name in [*configs, "against"]}
    for _ in range(refine_repeats):
        for name, config in configs.items():
            started = time.perf_counter()
            fold_in(adapter, base.model, base.tokenizer, DOCUMENTS[:1], config)
            refine[name].append(time.perf_counter() - started)
        if other is not None:
            started = time.perf_counter()
            fold_in(other[1], other[0].model, other[0].tokenizer, DOCUMENTS[:1], configs["now"])
            refine["against"].append(time.perf_counter() - started)
    now, before, compiled = (statistics.median(refine[name]) for name in ("now", "before", "compiled"))
    compared: dict[str, Any] = {}
    if refine["against"]:
        seconds = statistics.median(refine["against"])
        compared = {
            "against": str(against),
            "against_refined_fold_in_seconds": round(seconds, 3),
            "refined_fold_in_ratio_to_against": round(now / seconds, 3),  # < 1: this adapter folds in faster
        }

    asking = _time_asking(adapter, base, refine_repeats) if adapter.writer and adapter.selector else {}

    def run_bare() -> None:
        greedy_generate(bare.model, bare.tokenizer, None, prompt, None, new_tokens, stop_at_eos=False)

    def run_plugin() -> None:
        greedy_generate(base.model, base.tokenizer, adapter, prompt, z, new_tokens, stop_at_eos=False)

    run_bare()  # warm-up
    run_plugin()
    base_rates, plugin_rates = [], []
    for _ in range(repeats):
        base_rates.append(_tokens_per_s(run_bare, new_tokens))
        plugin_rates.append(_tokens_per_s(run_plugin, new_tokens))
    base_tps, plugin_tps = statistics.median(base_rates), statistics.median(plugin_rates)
    words = len(DOCUMENTS[0].split())
    return {
        "base_tokens_per_s": round(base_tps, 2),
        "plugin_tokens_per_s": round(plugin_tps, 2),
        "ratio": round(plugin_tps / base_tps, 3),
        "fold_in_seconds_per_doc": round(fold_in_s, 3),
        "fold_in_document_words": words,
        "refined_fold_in_seconds": round(now, 3),
        "refined_fold_in_seconds_before": round(before, 3),
        "refined_fold_in_speedup": round(before / now, 3),
        "refined_fold_in_seconds_compiled": round(compiled, 3),
        "refined_fold_in_compiled_speedup": round(now / compiled, 3),  # against the defaults, uncompiled
        "refined_fold_in_first_compiled_seconds": round(first_compiled, 3),  # compilation included
        "bytes_per_plugin": adapter.plugin_bytes,
        "plugin_shape": list(adapter.plugin_shape),
        "adapted_modules": len(adapter.module_names),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "adapter": str(adapter_dir),
        "model": base.identity.name,
        **compared,
        **asking,
    }


def _time_asking(adapter: PluginAdapter, base: BaseModel, repeats: int) -> dict[str, Any]:
    """The question writer asking about 8 selected spans of each of the four documents a registration chunk folds
    in (--fold-in-selected 8 --fold-in-selected-written): in one set of batches across them, against one
    document at a time, timed alternately."""
    selector, writer = adapter.selector, adapter.writer
    assert selector is not None and writer is not None
    docs = DOCUMENTS[:CHUNK]

    def ask(texts: list[str]) -> None:
        selected_examples(selector, base.model, base.tokenizer, texts, 8, adapter, 5, writer)

    ask(docs)  # warm-up
    together, alone = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        ask(docs)
        together.append((time.perf_counter() - started) / len(docs))
        started = time.perf_counter()
        for doc in docs:
            ask([doc])
        alone.append((time.perf_counter() - started) / len(docs))
    batched, single = statistics.median(together), statistics.median(alone)
    return {
        "selected_written_seconds_per_doc": round(batched, 3),
        "selected_written_seconds_per_doc_alone": round(single, 3),
        "selected_written_batching_speedup": round(single / batched, 3),
    }
