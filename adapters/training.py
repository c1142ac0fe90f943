"""Fit (learn the shared U, V, encoder; and fold-in's question writer) and fold-in (learn one document's x_d with
everything shared frozen).

Both minimise the answer NLL of training examples made from documents (``EXAMPLE_BUILDERS``); fold-in may add
context distillation (``adapters.distill``). Layers below the lowest adapted one are run once per example
and cached; each step runs only the adapted top of the network, and the LM head only where there are targets.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from adapters.adapter import PluginAdapter
from adapters.corpus import Document
from adapters.distill import SoftBatch, SoftTargets, self_study_examples, soft_batch, soft_nll, teacher_targets
from adapters.encoder import token_features
from adapters.errors import InvalidInputError
from adapters.examples import EXAMPLE_BUILDERS, Example, answer_targets, covers, reader_target, spread
from adapters.forward import (
    IGNORE,
    CausalLM,
    LayerCall,
    call_layer,
    embed,
    label_nll,
    run_layers,
    target_nll,
    top_hidden,
)
from adapters.generation import greedy_generate
from adapters.plugin import retrieval_weights
from adapters.prompts import chat_prompt
from adapters.qgen import QuestionWriter, training_pairs, written_examples
from adapters.spans import selected_examples

log = logging.getLogger(__name__)
Precision = Literal["auto", "float32", "bfloat16"]  # of the steps' matrix products; see step_precision
Attention = Literal["auto", "math", "fused"]  # the steps' attention kernel; see step_attention
Optimizer = Literal["adam", "normalized"]  # fold-in's update rule; see FoldInConfig.optimizer


class FoldInConfig(Schema):
    model_config = ConfigDict(extra="forbid")

    examples: str = "questions"  # rule-made questions from the text; see the README's method notes
    steps: int | None = Field(None, ge=0)  # None: 0 with an encoder (its plugin as it is), else 30
    lr: float = Field(0.1, gt=0)
    l2: float = Field(1e-4, ge=0)
    max_len: int = Field(256, ge=8)
    # Examples per forward and backward: 32 ran a 5-step fold-in 1.2x faster than 8 on 2 cores (fewer, larger
    # operations; README, "Fold-in speed, measured"), without the several GB that one batch of all examples takes.
    micro_batch: int = Field(32, ge=1)
    distill: float = Field(0.0, ge=0)  # weight of context distillation (adapters.distill); 0: answer NLL alone
    self_study: int = Field(0, ge=0)  # examples per document written by the model reading it (adapters.distill)
    written: int = Field(0, ge=0)  # questions per document asked by the adapter's question writer (adapters.qgen)
    selected: int = Field(0, ge=0)  # questions per document for the spans the adapter's span selector ranks highest
    # their questions keep this many words each side of the span (0: the whole sentence)
    selected_window: int = Field(0, ge=0)
    # each selected span asked by the adapter's question writer too, before its rule-made question
    selected_written: bool = False
    # A diagnostic, never the method (it reads the gold answers): the selected spans are every candidate holding one
    # of the document's gold answers, a perfect selector's choice (the eval's --capacity-examples gold-selected).
    selected_gold: bool = False
    max_examples: int | None = Field(16, ge=1)  # per document, all sources; None: all the builder makes
    # The steps' matrix products: bfloat16 autocast (x, its optimiser and the losses stay float32) halves fold-in on
    # a CPU with bfloat16 instructions and moves plugins by about 1% (README, "Fold-in in bfloat16").
    # auto: bfloat16 where the hardware has it, float32 elsewhere, where emulated bfloat16 would be slower.
    precision: Precision = "auto"
    # The steps' attention kernel. auto: PyTorch's math kernel on a CPU, where the fused (flash) kernel's backward
    # took a quarter of a fold-in step on these short examples, ten times its forward; the fused default elsewhere.
    attention: Attention = "auto"
    # Run the steps' decoder layers through torch.compile (compiled_layer): 1.5x faster steps on 2 cores, where most
    # of an eager step was elementwise work and copies between the matrix products (README, "Fold-in speed,
    # measured"), for a compilation of about a minute once per process (seconds with Inductor's disk cache warm).
    compile: bool = False
    # adam: Adam at lr, whose first steps move every coordinate of x by about lr, those with a near-zero gradient too.
    # normalized: each plugin moves along its own gradient, scaled to an rms step of lr (normalized_step).
    optimizer: Optimizer = "adam"
    # Split each document's examples into this many groups, each written into its own plugin by the steps, and sum
    # them: with Adam every plugin moves about lr a coordinate a step, so each group's facts get a full step's budget
    # at the same cost (each example still runs every step).
    groups: int = Field(1, ge=1)


class FitConfig(Schema):
    model_config = ConfigDict(extra="forbid")

    examples: str = "qa"
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    x_lr: float = Field(0.05, gt=0)  # free per-document x, when the adapter has no encoder
    # Text-only builder whose examples alone train each fitting document's free x, as fold-in will; the
    # `examples` (gold questions) then train U, V to read that x and never move it. None: all examples train x.
    store: str | None = None
    store_examples: int | None = Field(16, ge=1)  # per document, spread over it as fold-in does
    # of those, questions asked by the adapter's question writer (as fold-in's `written`), the builder's the rest
    store_written: int = Field(0, ge=0)
    # and of those, questions about the spans the adapter's span selector picks (as fold-in's `selected`)
    store_selected: int = Field(0, ge=0)
    # their questions' window and the writer's question for each, as fold-in's selected_window and selected_written
    store_selected_window: int = Field(0, ge=0)
    store_selected_written: bool = False
    # Closed-book examples only where one of the document's store examples holds their answer (contained): U, V then
    # learn to read what x can hold, not to guess answers no store example wrote. Reading examples are all kept.
    store_covered: bool = False
    # Nested fit (needs `store`): each step folds its batch_size documents in as registration will (this many
    # steps at nested_lr from x = 0, U, V frozen), then trains U, V on their `examples` read through those plugins,
    # held constant (first order). 0: a free x per document, written over the epochs instead.
    nested: int = Field(0, ge=0)
    nested_lr: float = Field(1.0, gt=0)
    # softmax temperature over the retrieval scores of examples that compose plugins (Example.composed), as the
    # service's composition_temperature
    composition_temperature: float = Field(0.01, gt=0)
    l2: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # U, V's gradient norm is clipped to this (None: not clipped); with lr 1e-3 it kept the rank-512 fit from the
    # divergence it had at lr 2e-3 unclipped (README, "Rank 512 in 16 KB of float8")
    clip: float | None = Field(None, gt=0)
    max_len: int = Field(256, ge=8)
    seed: int = 0
    # as FoldInConfig.precision; float32 by default until a bfloat16 fit is compared with a float32 one
    precision: Precision = "float32"
    compile: bool = False  # as FoldInConfig.compile, for the fit's steps (and a nested fit's fold-ins)
    # Reading examples' targets. gold: the reference span. reader: the bare model's own answer with the same prompt
    # where it holds a reference answer, the span elsewhere (reader_targets), so that the fit changes the reader only
    # where it is wrong; measured a tie with gold (README, "Reading targets that keep the bare reader").
    reading_targets: Literal["gold", "reader"] = "gold"


@dataclass
class FoldInResult:
    plugin: np.ndarray  # (M, r) float32
    loss: float | None  # objective after fold-in; None on the amortised path (no steps, nothing trained)
    initial_loss: float | None  # objective at the starting plugin
    seconds: float


@dataclass
class FitReport:
    steps: int
    losses: list[float]
    seconds: float
    plugins: np.ndarray | None = None  # (N, M, r) the fitting documents' free x; None with an encoder
    reader_targets: int | None = None  # reading examples whose target became the bare reader's answer


@dataclass
class _Encoded:
    doc: int  # index of the document the example was made from
    ids: Tensor  # (T,)
    labels: Tensor  # (T,)
    soft: SoftTargets | None = None  # the teacher's, when fold-in distils
    reading: bool = False  # Example.reading
    composed: tuple[tuple[str, float], ...] = ()  # Example.composed


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, doc: int, examples: Sequence[Example], max_len: int
) -> list[_Encoded]:
    out = []
    for ex in examples:
        text = chat_prompt(tokenizer, ex.prompt) if ex.chat else ex.prompt
        prompt = tokenizer(text, add_special_tokens=False).input_ids if text else []
        target = tokenizer(ex.target, add_special_tokens=False).input_ids
        ids = (prompt + target)[:max_len]
        labels = ([IGNORE] * len(prompt) + target)[:max_len]
        if any(label != IGNORE for label in labels[1:]):
            out.append(_Encoded(doc, torch.tensor(ids), torch.tensor(labels), reading=ex.reading, composed=ex.composed))
    return out


def _by_length(examples: Sequence[_Encoded]) -> list[int]:
    return sorted(range(len(examples)), key=lambda i: len(examples[i].ids))


def _pad(rows: Sequence[Tensor], value: float | int) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=value)


def model_device(model: CausalLM) -> torch.device:
    return next(model.parameters()).device


class _PrefixCache:
    """Hidden states at the first adapted layer, per example, computed once without gradient, kept on the model's
    device (examples are tokenised on the CPU)."""

    def __init__(self, model: CausalLM, examples: Sequence[_Encoded], start: int, batch: int = 16) -> None:
        self.start = start
        self.device = model_device(model)
        self.states: list[Tensor] = [torch.empty(0)] * len(examples)
        order = _by_length(examples)  # batches of similar length: little padding
        with torch.no_grad():
            for i in range(0, len(order), batch):
                chunk = order[i : i + batch]
                ids = _pad([examples[j].ids for j in chunk], 0).to(self.device)  # (B, T)
                mask = _pad([torch.ones_like(examples[j].ids) for j in chunk], 0).to(self.device)  # (B, T)
                h = run_layers(model, embed(model, ids), mask, 0, start)  # (B, T, d)
                for row, j in enumerate(chunk):
                    self.states[j] = h[row, : len(examples[j].ids)]

    def batch(self, idx: Sequence[int], examples: Sequence[_Encoded]) -> tuple[Tensor, Tensor, Tensor]:
        h = _pad([self.states[i] for i in idx], 0.0)  # (B, T, d)
        mask = _pad([torch.ones(len(examples[i].ids), dtype=torch.long) for i in idx], 0)  # (B, T)
        labels = _pad([examples[i].labels for i in idx], IGNORE)  # (B, T)
        return h, mask.to(self.device), labels.to(self.device)


def _doc_features(
    adapter: PluginAdapter, model: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> list[Tensor]:
    """Encoder inputs per document, (T, 2d) each; empty when the adapter has no encoder."""
    if adapter.encoder is None:
        return []
    cfg = adapter.encoder.config
    feats = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids[: cfg.max_tokens]])  # (1, T)
        ids = ids.to(model_device(model))
        feats.append(token_features(model, cfg.layer, ids, torch.ones_like(ids))[0])  # (T, 2d)
    return feats


def _encode_docs(adapter: PluginAdapter, feats: Sequence[Tensor]) -> Tensor:
    assert adapter.encoder is not None
    x = _pad(list(feats), 0.0)  # (N, T, 2d)
    mask = _pad([torch.ones(len(f), device=f.device) for f in feats], 0.0)  # (N, T)
    return adapter.encoder(x, mask)  # (N, M, r)


def build_examples(name: str, docs: Sequence[Document]) -> list[list[Example]]:
    if name not in EXAMPLE_BUILDERS:
        raise InvalidInputError(f"unknown example builder {name!r}; known: {sorted(EXAMPLE_BUILDERS)}")
    return [EXAMPLE_BUILDERS[name](doc) for doc in docs]


def encode_plugins(
    adapter: PluginAdapter, model: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> Tensor:
    """The starting plugins (N, M, r): the encoder's output, or zeros without an encoder."""
    if adapter.encoder is None:
        return torch.zeros(len(texts), *adapter.plugin_shape, device=model_device(model))
    with torch.no_grad():
        return _encode_docs(adapter, _doc_features(adapter, model, tokenizer, texts))


def fold_in_steps(adapter: PluginAdapter, config: FoldInConfig) -> int:
    """Gradient steps fold-in takes: by default none on top of an encoder (its plugin as it is), else 30."""
    if config.steps is not None:
        return config.steps
    return 0 if adapter.encoder is not None else 30


def _bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, hence the guard
    return device.type == "cpu" and check is not None and bool(check())


def resolved_precision(model: CausalLM, precision: Precision) -> str:
    """What "auto" means on the model's device: bfloat16 or float32."""
    device = next(model.parameters()).device
    if precision == "bfloat16" and not _bf16_native(device):
        _warn_emulated(device.type)
    if precision != "auto":
        return precision
    return "bfloat16" if _bf16_native(device) else "float32"


@functools.cache
def _warn_emulated(device_type: str) -> None:
    # measured on a 2-core AVX2 CPU: a one-step fold-in 150 s in bfloat16 against 6 s in float32
    log.warning(
        "bfloat16 asked for, but the %s has no bfloat16 arithmetic: emulated, far slower (use auto)", device_type
    )


def step_precision(model: CausalLM, precision: Precision) -> contextlib.AbstractContextManager[object]:
    """The context fold-in's steps run in: bfloat16 autocast or plain float32."""
    if resolved_precision(model, precision) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def step_attention(model: CausalLM, attention: Attention) -> contextlib.AbstractContextManager[object]:
    """A fresh context for fold-in's steps that picks their attention kernel (see FoldInConfig.attention)."""
    if attention == "fused" or (attention == "auto" and model_device(model).type != "cpu"):
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@functools.cache
def compiled_layer() -> LayerCall:
    """call_layer through torch.compile, shared by every layer: identical layers reuse one compiled graph (a plugin
    module's row of z is a tensor, not an int to specialise on), so fold-in compiles a few graphs, not one per layer.
    Dynamic shapes: batches of any size and length reuse them."""
    compiled = torch.compile(call_layer, dynamic=True)

    # One graph per kind of layer (adapted, plain, the first: its input needs no gradient), with and without
    # gradients (the final loss), with and without a padding mask: more than Dynamo's default of 8 graphs per
    # function, past which it would run the layers uncompiled.
    @torch._dynamo.config.patch(recompile_limit=64)
    def call(layer: Any, h: Tensor, mask: Any, rope: tuple[Tensor, Tensor], pos: Tensor) -> Tensor:
        return compiled(layer, h, mask, rope, pos)

    return call


def layer_call_for(compiled: bool) -> LayerCall:
    return compiled_layer() if compiled else call_layer


def fold_in_examples(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    config: FoldInConfig,
) -> list[list[Example]]:
    """Each document's training examples: its self-study examples, written questions and selected spans' questions
    first, then the builder's, spread over the document to fill the rest of max_examples."""
    if (config.written or config.selected_written) and adapter.writer is None:
        raise InvalidInputError("fold-in asks for written questions but the adapter has no question writer")
    if config.selected and adapter.selector is None and not config.selected_gold:
        raise InvalidInputError("fold-in asks for selected spans but the adapter has no span selector")
    selected: list[list[Example]] = [[] for _ in docs]
    if config.selected:
        writer = adapter.writer if config.selected_written else None
        texts = [d.text for d in docs]
        gold = [[a for qa in d.questions for a in qa.answers] for d in docs] if config.selected_gold else None
        selected = selected_examples(
            adapter.selector, model, tokenizer, texts, config.selected, adapter, config.selected_window, writer, gold
        )
    out = []
    for doc, made, chosen in zip(docs, build_examples(config.examples, docs), selected, strict=True):
        n = config.self_study
        first = self_study_examples(adapter, model, tokenizer, doc.text, n) if n else []
        if config.written and adapter.writer is not None:
            first += written_examples(adapter.writer, model, tokenizer, doc.text, config.written, adapter)
        first += chosen
        room = None if config.max_examples is None else max(0, config.max_examples - len(first))
        out.append(first + spread(made, room))
    return out


def fold_in(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str | Document],
    config: FoldInConfig,
) -> list[FoldInResult]:
    """Plugins for documents, with U, V, A and the encoder frozen; they are folded in together, one row each.

    Registration passes texts; a Document with questions is for diagnostics whose example builder reads them.
    """
    docs = [d if isinstance(d, Document) else Document(str(i), d) for i, d in enumerate(documents)]
    texts = [d.text for d in docs]
    for text in texts:
        if not text.strip():
            raise InvalidInputError("cannot fold in an empty document")
    started = time.perf_counter()
    x0 = encode_plugins(adapter, model, tokenizer, texts)  # (N, M, r)
    steps = fold_in_steps(adapter, config)
    if steps == 0:  # the amortised path: one encoder forward, nothing trained, no loss to report
        seconds = (time.perf_counter() - started) / len(texts)
        return [FoldInResult(x.float().cpu().numpy().copy(), None, None, seconds) for x in x0]
    g = config.groups
    # row i * g + j of x is group j of document i: its examples j, j + g, ...; a document's plugin is its rows' sum
    per_row = [exs[j::g] for exs in fold_in_examples(adapter, model, tokenizer, docs, config) for j in range(g)]
    examples = [e for i, exs in enumerate(per_row) for e in encode_examples(tokenizer, i, exs, config.max_len)]
    if not examples:
        raise InvalidInputError("the document yields no training examples")
    if config.distill > 0:
        for i, text in enumerate(t for t in texts for _ in range(g)):
            mine = [e for e in examples if e.doc == i]
            soft = teacher_targets(adapter, model, tokenizer, text, [e.ids for e in mine])
            for e, targets in zip(mine, soft, strict=True):
                e.soft = targets
    precision = step_precision(model, config.precision)
    with precision:
        cache = _PrefixCache(model, examples, adapter.lowest_layer)
    device = model_device(model)
    doc_of_example = torch.tensor([e.doc for e in examples], device=device)
    n = torch.bincount(doc_of_example, minlength=len(per_row))  # (N * g,) examples per row; a row may have none
    counts = n.clamp(min=1)
    # Micro-batches of similar length, padded once: one full batch of every example is several GB of
    # activations, and allocating it each step cost more time (page faults) than the arithmetic.
    order = _by_length(examples)
    layer_call = layer_call_for(config.compile)
    chunks = [order[i : i + config.micro_batch] for i in range(0, len(order), config.micro_batch)]
    batches: list[tuple[Tensor, Tensor, Tensor, Tensor, SoftBatch | None]] = [
        (
            torch.tensor([examples[i].doc for i in c], device=device),
            *cache.batch(c, examples),
            soft_batch([examples[i].soft for i in c], [len(examples[i].ids) for i in c]),
        )
        for c in chunks
    ]

    def per_doc_loss(x: Tensor, backward: bool = False) -> Tensor:  # x (N * g, M, r) -> (N * g,), mean per row
        total = torch.zeros(len(per_row), device=device)
        for doc_of, h, mask, labels, soft in batches:
            with precision, step_attention(model, config.attention), adapter.use(x[doc_of]):
                out = top_hidden(model, h, mask, adapter.lowest_layer, layer_call)  # (b, T, d)
                rows = label_nll(model, out, labels).float()  # (b,)
                if soft is not None:
                    rows = rows + config.distill * soft_nll(model, out, soft).float()
            part = torch.zeros(len(per_row), device=device).index_add(0, doc_of, rows) / counts  # (N * g,)
            if backward:  # accumulate per chunk so that only one chunk's activations live at a time
                part.sum().backward()
            total += part.detach()
        return total

    x = (x0 / g).repeat_interleave(g, dim=0).requires_grad_(True)  # the rows sum to x0
    opt = torch.optim.Adam([x], lr=config.lr) if config.optimizer == "adam" else None
    losses: list[Tensor] = []
    with torch.enable_grad():  # callers (the engine's thread) may have switched gradients off
        for _ in range(steps):
            x.grad = None
            losses.append(per_doc_loss(x, backward=True))
            (config.l2 * (x**2).sum()).backward()
            if opt is not None:
                opt.step()
            else:
                normalized_step(x, config.lr)
    summed = x.detach().unflatten(0, (len(texts), g)).sum(1)  # (N, M, r)
    per_doc_n = n.float().view(len(texts), g)

    def by_doc(loss: Tensor) -> Tensor:  # (N * g,) row means -> (N,) means over each document's examples
        return (loss.view(len(texts), g) * per_doc_n).sum(1) / per_doc_n.sum(1).clamp(min=1)

    with torch.no_grad():  # every row's examples under its document's summed plugin, as a query will read them
        final = by_doc(per_doc_loss(summed.repeat_interleave(g, dim=0)))
        # the first step's loss is at x0 (no separate forward for it) unless the rows split x0 between them
        initial = by_doc(losses[0] if g == 1 else per_doc_loss(x0.repeat_interleave(g, dim=0)))
    seconds = (time.perf_counter() - started) / len(texts)
    plugins = summed.float().cpu().numpy()
    final, initial = final.cpu(), initial.cpu()
    return [FoldInResult(plugins[i].copy(), float(final[i]), float(initial[i]), seconds) for i in range(len(texts))]


def normalized_step(x: Tensor, lr: float) -> None:
    """x[i] -= lr * g[i] / rms(g[i]) for each document's plugin x[i]: a step of rms lr, as Adam's first, but spread
    over the coordinates as the gradient is, so that coordinates the examples barely touch stay near x0."""
    assert x.grad is not None
    g = x.grad
    rms = g.pow(2).mean(dim=tuple(range(1, g.dim())), keepdim=True).sqrt().clamp_min(1e-12)  # (N, 1, 1)
    with torch.no_grad():
        x -= lr * g / rms


def fit(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    config: FitConfig,
    progress: bool = True,
) -> FitReport:
    """Learn U, V (and the encoder, or else a free x per fitting document) on docs; the base stays frozen."""
    started = time.perf_counter()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    per_doc = build_examples(config.examples, docs)
    stored = None  # each document's store examples, as fold-in makes them from its text alone
    if config.store is not None and (config.store_covered or not config.nested):  # a nested fit folds them in itself
        stored = fold_in_examples(
            adapter, model, tokenizer, [Document(d.id, d.text) for d in docs], _store_fold_in(config)
        )
    if config.store_covered:
        if stored is None:
            raise InvalidInputError("closed-book examples covered by store examples: give a store builder")
        per_doc = [covered_examples(exs, made) for exs, made in zip(per_doc, stored, strict=True)]
    kept = None
    if config.reading_targets == "reader":
        per_doc, kept = reader_targets(adapter, model, tokenizer, per_doc, progress=progress)
    examples = [e for i, exs in enumerate(per_doc) for e in encode_examples(tokenizer, i, exs, config.max_len)]
    if not examples:
        covered = " that its store examples cover" if config.store_covered else ""
        raise InvalidInputError(f"no {config.examples!r} training examples{covered} in the fitting corpus")
    if config.nested:
        report = _fit_nested(adapter, model, tokenizer, docs, examples, config, progress)
        report.reader_targets = kept
        return report
    n_read = len(examples)  # with a store builder, examples from n_read on are the ones that write x
    if stored is not None:
        if adapter.encoder is not None:
            raise InvalidInputError("fit with a store builder learns a free x per document: fit without an encoder")
        for i, exs in enumerate(stored):
            examples += encode_examples(tokenizer, i, exs, config.max_len)
    precision = step_precision(model, config.precision)
    with precision:
        cache = _PrefixCache(model, examples, adapter.lowest_layer)
    feats = _doc_features(adapter, model, tokenizer, [d.text for d in docs])
    free_x = None
    opts: list[torch.optim.Optimizer] = []
    if adapter.encoder is None:
        # one row per document, updated lazily: a document's x moves only on steps that see its examples, as
        # fold-in's does, instead of drifting on the momentum of steps that did not
        free_x = torch.nn.Embedding(len(docs), int(np.prod(adapter.plugin_shape)), sparse=True, device=cache.device)
        torch.nn.init.zeros_(free_x.weight)
        opts.append(torch.optim.SparseAdam(free_x.parameters(), lr=config.x_lr))
    opts.append(_shared_optimizer(adapter, config))
    total = max(1, int(config.epochs * len(examples) / config.batch_size))
    layer_call = layer_call_for(config.compile)
    lengths = [len(e.ids) for e in examples]
    queue: list[list[int]] = []
    losses: list[float] = []
    bar = tqdm(range(total), desc="fit", disable=not progress)
    with _training(adapter):
        for _ in bar:
            if not queue:
                queue = _length_grouped(lengths, config.batch_size, rng)
            idx = queue.pop()
            h, mask, labels = cache.batch(idx, examples)
            doc_ids = torch.tensor([examples[i].doc for i in idx], device=cache.device)  # (B,)
            if free_x is not None:
                z = free_x(doc_ids).view(len(idx), *adapter.plugin_shape)  # (B, M, r)
                if config.store is not None:  # only the store examples write x; the others read it
                    writes = torch.tensor([i >= n_read for i in idx], device=cache.device)[:, None, None]  # (B, 1, 1)
                    z = torch.where(writes, z, z.detach())
            else:
                unique, inverse = torch.unique(doc_ids, return_inverse=True)
                with precision:
                    z = _encode_docs(adapter, [feats[int(u)] for u in unique])[inverse].float()  # (B, M, r)
            with precision, adapter.use(z, shared=_shared_weights(adapter, examples, idx, cache.device)):
                nll = target_nll(model, h, mask, labels, adapter.lowest_layer, layer_call).float().mean()
            loss = nll + config.l2 * (z**2).sum(dim=(1, 2)).mean()
            _step(adapter, opts, loss, config.clip)
            losses.append(nll.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    plugins = None if free_x is None else free_x.weight.detach().view(len(docs), *adapter.plugin_shape).cpu().numpy()
    return FitReport(total, losses, time.perf_counter() - started, plugins, kept)


READER_TOKENS = 24  # the answer budget of `kplug eval squad`: the reader's answers as the eval would cut them


def reader_targets(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    per_doc: Sequence[Sequence[Example]],
    batch: int = 32,
    progress: bool = False,
) -> tuple[list[list[Example]], int]:
    """Each reading example with the bare model's greedy answer to its prompt as target where that answer holds a
    reference answer (examples.reader_target), and how many were replaced."""
    out = [list(exs) for exs in per_doc]
    reading = [(i, j) for i, exs in enumerate(per_doc) for j, ex in enumerate(exs) if ex.reading]
    reading.sort(key=lambda ij: len(per_doc[ij[0]][ij[1]].prompt))  # batches of similar length: little padding
    kept = 0
    for k in tqdm(range(0, len(reading), batch), desc="reader targets", disable=not progress):
        chunk = reading[k : k + batch]
        prompts = [chat_prompt(tokenizer, per_doc[i][j].prompt) for i, j in chunk]
        gate = torch.zeros(len(chunk), device=model_device(model))  # (B,): every row the bare base model
        answers = greedy_generate(model, tokenizer, adapter, prompts, None, READER_TOKENS, gate=gate)
        for (i, j), answer in zip(chunk, answers, strict=True):
            # fewer tokens than the budget: it stopped (re-tokenising the decoded text may differ by a token)
            finished = len(tokenizer(answer, add_special_tokens=False).input_ids) < READER_TOKENS
            out[i][j] = reader_target(per_doc[i][j], answer, finished)
            kept += out[i][j] is not per_doc[i][j]
    return out, kept


def covered_examples(examples: Sequence[Example], stored: Sequence[Example]) -> list[Example]:
    """FitConfig.store_covered: the reading examples, and the closed-book ones whose answer a store target holds."""
    targets = answer_targets(stored)
    return [e for e in examples if e.reading or covers(targets, answer_targets([e]))]


def _shared_weights(
    adapter: PluginAdapter, examples: Sequence[_Encoded], idx: Sequence[int], device: torch.device
) -> Tensor | None:
    """Each row's weight of the shared term (B,): 0 for reading examples where the adapter reads without it
    (AdapterConfig.shared_in_reading), as `combine` will; None (every row 1) otherwise."""
    if adapter.config.shared_in_reading:
        return None
    return torch.tensor([float(not examples[i].reading) for i in idx], device=device)


def _store_fold_in(config: FitConfig, **more: object) -> FoldInConfig:
    """The fold-in a fit's store builder stands for: its examples, as registration makes them."""
    return FoldInConfig(
        examples=config.store,
        written=config.store_written,
        selected=config.store_selected,
        selected_window=config.store_selected_window,
        selected_written=config.store_selected_written,
        max_examples=config.store_examples,
        precision=config.precision,
        compile=config.compile,
        **more,
    )


def _shared_optimizer(adapter: PluginAdapter, config: FitConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(adapter.shared_parameters(), lr=config.lr, weight_decay=config.weight_decay)


@contextlib.contextmanager
def _training(adapter: PluginAdapter, thawed: bool = True) -> Iterator[None]:
    """U, V (and the encoder) trainable inside, frozen again after; thawed=False freezes them inside."""
    for p in adapter.shared_parameters():
        p.requires_grad_(thawed)
    adapter.train(thawed)
    try:
        yield
    finally:
        adapter.train(not thawed)
        for p in adapter.shared_parameters():
            p.requires_grad_(not thawed)


def _step(adapter: PluginAdapter, opts: Sequence[torch.optim.Optimizer], loss: Tensor, clip: float | None) -> None:
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(adapter.shared_parameters(), clip)
    for opt in opts:
        opt.step()


def _fit_nested(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    examples: Sequence[_Encoded],
    config: FitConfig,
    progress: bool,
) -> FitReport:
    """FitConfig.nested: U, V learn to read the plugins fold-in actually makes, not a free x that many small
    updates wrote over the epochs (README, "Fitting U, V through real fold-in")."""
    if config.store is None:
        raise InvalidInputError("a nested fit folds documents in with a store builder: give one")
    if adapter.encoder is not None:
        raise InvalidInputError("a nested fit folds plugins in from x = 0: fit without an encoder")
    started = time.perf_counter()
    rng = random.Random(config.seed)
    fold = _store_fold_in(config, steps=config.nested, lr=config.nested_lr, max_len=config.max_len)
    precision = step_precision(model, config.precision)
    with precision:
        cache = _PrefixCache(model, examples, adapter.lowest_layer)
    position = {d.id: j for j, d in enumerate(docs)}
    # each example's plugin as the query path makes it: its retrieved documents' plugins weighted by their scores
    # (Example.composed), or its own document's alone
    mixes = [
        (
            [position[d] for d, _ in e.composed],
            retrieval_weights(torch.tensor([s for _, s in e.composed]), config.composition_temperature),
        )
        if e.composed
        else ([e.doc], torch.ones(1))
        for e in examples
    ]
    of_doc: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        of_doc.setdefault(e.doc, []).append(i)
    links = {d: {j for i in idx for j in mixes[i][0]} for d, idx in of_doc.items()}
    opt = _shared_optimizer(adapter, config)
    layer_call = layer_call_for(config.compile)
    queue = _nested_batches(links, config.batch_size, rng)
    total = max(1, int(config.epochs * len(queue)))
    losses: list[float] = []
    bar = tqdm(range(total), desc="nested fit", disable=not progress)
    with _training(adapter):
        for _ in bar:
            if not queue:
                queue = _nested_batches(links, config.batch_size, rng)
            group = queue.pop()
            folded_docs = sorted(set(group).union(*(links[d] for d in group)))  # every plugin the batch composes
            with _training(adapter, thawed=False):  # as registration: U, V frozen, no gradient kept for them
                folded = fold_in(adapter, model, tokenizer, [Document(str(d), docs[d].text) for d in folded_docs], fold)
            plugins = torch.from_numpy(np.stack([r.plugin for r in folded])).to(cache.device)  # (F, M, P)
            idx = [i for d in group for i in of_doc[d]]
            row = {d: k for k, d in enumerate(folded_docs)}
            weights = torch.zeros(len(idx), len(folded_docs))  # (B, F)
            for n, i in enumerate(idx):
                for d, w in zip(*mixes[i], strict=True):
                    weights[n, row[d]] += w
            z = torch.einsum("bf,fmp->bmp", weights.to(cache.device), plugins)  # (B, M, P)
            h, mask, labels = cache.batch(idx, examples)
            shared = _shared_weights(adapter, examples, idx, cache.device)
            with precision, adapter.use(z, shared=shared):
                nll = target_nll(model, h, mask, labels, adapter.lowest_layer, layer_call).float().mean()
            _step(adapter, [opt], nll, config.clip)
            losses.append(nll.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return FitReport(total, losses, time.perf_counter() - started)


def _nested_batches(links: dict[int, set[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of a nested fit's document batches, shuffled: documents whose examples compose each other's plugins
    (links: document -> the documents its examples compose) kept together, so that one fold-in serves them all,
    packed up to batch_size. With no links, a shuffled cut into batch_size."""
    parent = {d: d for d in links}

    def root(d: int) -> int:
        while parent[d] != d:
            d = parent[d]
        return d

    for d, linked in links.items():
        for j in linked:
            if j in parent:
                parent[root(j)] = root(d)
    components: dict[int, list[int]] = {}
    for d in sorted(links):
        components.setdefault(root(d), []).append(d)
    pieces = [c[k : k + batch_size] for c in components.values() for k in range(0, len(c), batch_size)]
    batches: list[list[int]] = []
    for piece in rng.sample(pieces, len(pieces)):
        if not batches or len(batches[-1]) + len(piece) > batch_size:
            batches.append([])
        batches[-1] += piece
    return batches


def _length_grouped(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches, shuffled, but sorted by length within windows of 50 batches (Hugging Face's
    group_by_length): a batch mixing short questions with paragraph-long prompts would be mostly padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def fit_writer(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    init: QuestionWriter | None = None,
) -> tuple[QuestionWriter, list[float]]:
    """Fold-in's question writer (adapters.qgen), fitted by next-token loss on the gold questions of docs (mean
    over question tokens); the base model stays frozen, and the whole network runs: the writer adapts every layer.
    With init, that writer is fitted further (its examples in the seed's order) instead of a new one."""
    pairs = training_pairs(docs)
    random.Random(seed).shuffle(pairs)
    examples = encode_examples(tokenizer, 0, pairs, max_len=1024)  # a sentence and a question: never truncated
    writer = init or QuestionWriter(model, seed=seed)
    params = [p.requires_grad_(True) for p in writer.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="question writer", disable=not progress)
    with torch.enable_grad(), writer.attached(model):
        for step in bar:
            chunk = [examples[(step * batch_size + j) % len(examples)] for j in range(batch_size)]
            ids, labels = _pad([e.ids for e in chunk], 0), _pad([e.labels for e in chunk], IGNORE)  # (B, T)
            mask = _pad([torch.ones_like(e.ids) for e in chunk], 0)  # (B, T)
            states = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
            targets = labels[:, 1:]  # (B, T-1)
            chosen = targets != IGNORE
            logits = model.lm_head(states[:, :-1][chosen])  # (N, V): the head only on the questions' tokens
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[chosen])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    for p in params:
        p.requires_grad_(False)
    return writer, losses


def answer_nll(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    plugins: Tensor,
    max_len: int = 256,
    batch: int = 16,
) -> Tensor:
    """Mean answer NLL per example (n,) with example i under plugin plugins[i] (n, M, r): a probe of what a plugin
    does to questions it was not trained on, without generating."""
    encoded = [e for i, ex in enumerate(examples) for e in encode_examples(tokenizer, i, [ex], max_len)]
    if len(encoded) != len(examples):
        raise InvalidInputError("every probe example needs a prompt and a target")
    cache = _PrefixCache(model, encoded, adapter.lowest_layer)
    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch):
            idx = list(range(start, min(start + batch, len(encoded))))
            h, mask, labels = cache.batch(idx, encoded)
            with adapter.use(plugins[idx]):
                out.append(target_nll(model, h, mask, labels, adapter.lowest_layer))
    return torch.cat(out)
