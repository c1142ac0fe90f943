"""Fold-in's span selector: which of a document's answer-like spans (examples.fact_spans) its questions will ask
about. Fold-in writes a plugin from questions about a few spans; SQuAD asks about 3.4 of a paragraph's 25 candidate
spans, and rule-made questions for exactly the asked spans answer three times more than for spans spread over the
paragraph (README, "Fold-in's update rule, groups of examples, ..."). A linear score on the bare base model's hidden
state over the span (middle layer, where a span's role in its sentence is most legible) and a few shape features,
fitted (``fit_selector``) on the fitting articles' paragraphs: label 1 where the span holds a gold answer. Its
weights live beside the adapter's, as the question writer's do.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from adapters.corpus import Document
from adapters.errors import CheckpointError
from adapters.examples import Example, cloze_spans, fact_spans, fact_wh, in_place_question, sentences
from adapters.forward import CausalLM, embed, run_layers
from adapters.metrics import contained
from adapters.qgen import QuestionWriter, ask_groups

if TYPE_CHECKING:
    from adapters.adapter import PluginAdapter

WEIGHTS_FILE = "spans.safetensors"
LAYER = 16  # of SmolLM2's 30: on articles 20-23, top 8 spans held 0.44 of the answers, layer 8 0.39, layer 30 0.41
MAX_TOKENS = 2048  # spans past this many tokens of a long document are not candidates
SHAPE = 9  # shape features (shape_features)


@dataclass(frozen=True)
class Candidate:
    body: str  # its sentence without the final punctuation
    start: int  # in body
    end: int
    offset: int  # of body in the document's text
    sentence: int
    sentences: int
    entity: bool  # an entity or number (cloze_spans), not a noun chunk, ordinal or number word

    @property
    def span(self) -> str:
        return self.body[self.start : self.end]

    def question(self, window: int = 0) -> Example:
        """The rule-made question of examples.fact_examples (in-place phrasing) with the span as its answer; with a
        window, only that many words of the sentence each side of the span."""
        if not window:
            return in_place_question(self.body, self.start, self.end)
        before = [m.start() for m in re.finditer(r"\S+", self.body[: self.start])]
        after = [self.end + m.end() for m in re.finditer(r"\S+", self.body[self.end :])]
        lo = before[-window] if len(before) > window else 0
        hi = after[window - 1] if len(after) > window else len(self.body)
        body = self.body[lo:hi].rstrip(",;: ")
        return in_place_question(body, self.start - lo, self.end - lo)


def candidates(text: str) -> list[Candidate]:
    """The first mention of every distinct answer-like span, in document order."""
    out: list[Candidate] = []
    seen: set[str] = set()
    sents = sentences(text)
    pos = 0
    for i, sent in enumerate(sents):
        offset = max(text.find(sent, pos), 0)
        pos = offset + len(sent)
        body = sent.rstrip(".!? ")
        entities = set(cloze_spans(body))
        for start, end in fact_spans(body):
            if body[start:end].lower() not in seen:
                seen.add(body[start:end].lower())
                out.append(Candidate(body, start, end, offset, i, len(sents), (start, end) in entities))
    return out


def shape_features(text: str, c: Candidate) -> list[float]:
    span = c.span
    return [
        float(fact_wh(span) == "when"),
        float(span[:1].isdigit()),
        float(c.entity),
        float(span[:1].isupper()),
        float(len(span.split())),
        c.sentence / c.sentences,
        float(c.sentence == 0),
        c.start / max(len(c.body), 1),
        float(text.lower().count(span.lower())),
    ]


def features(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    cands: Sequence[Candidate],
    adapter: PluginAdapter | None = None,
) -> Tensor:
    """(n, d + shape features): the mean hidden state of each candidate's tokens at LAYER, bare base model (gate 0
    where an adapter is attached), and its shape features; zeros for a span past MAX_TOKENS."""
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)
    offsets = enc.pop("offset_mapping")[0]  # (T, 2) character range of each token
    layer = min(LAYER, len(model.model.layers))
    bare = nullcontext() if adapter is None else adapter.use(None, gate=torch.zeros(1, device=model.device))
    with torch.no_grad(), bare:  # the layers below LAYER only: neither the rest nor the head is read
        ids, attention = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
        hidden = run_layers(model, embed(model, ids), attention, 0, layer)[0].float()
    rows = []
    for c in cands:
        lo, hi = c.offset + c.start, c.offset + c.end
        mask = ((offsets[:, 1] > lo) & (offsets[:, 0] < hi)).to(hidden.device)
        state = hidden[mask].mean(0) if mask.any() else hidden.new_zeros(hidden.shape[-1])
        rows.append(torch.cat([state.cpu(), torch.tensor(shape_features(text, c))]))
    return torch.stack(rows) if rows else torch.zeros(0, hidden.shape[-1] + SHAPE)


class SpanSelector:
    """A linear score on standardised features."""

    def __init__(self, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> None:
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std

    def score(self, feats: Tensor) -> Tensor:
        return ((feats - self.mean) / self.std) @ self.weight + self.bias

    def select(
        self,
        model: CausalLM,
        tokenizer: PreTrainedTokenizerBase,
        text: str,
        n: int,
        adapter: PluginAdapter | None = None,
    ) -> list[Candidate]:
        """The n best-scored candidates, in document order."""
        cands = candidates(text)
        if not cands or n == 0:
            return []
        scores = self.score(features(model, tokenizer, text, cands, adapter))
        best = sorted(torch.topk(scores, min(n, len(cands))).indices.tolist())
        return [cands[i] for i in best]

    def save(self, directory: Path) -> None:
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(directory / WEIGHTS_FILE)

    @classmethod
    def load(cls, directory: Path, model: CausalLM) -> SpanSelector | None:
        """The selector saved in directory, or None when it has none."""
        path = directory / WEIGHTS_FILE
        if not path.exists():
            return None
        t = load_file(str(path))
        width = model.config.hidden_size + SHAPE
        if any(t.get(k, torch.zeros(0)).shape != (width,) for k in ("weight", "mean", "std")):
            raise CheckpointError(f"{path} does not fit this model's span selector (expected {width} features)")
        return cls(t["weight"], t["bias"], t["mean"], t["std"])


def selected_examples(
    selector: SpanSelector | None,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    n: int,
    adapter: PluginAdapter | None = None,
    window: int = 0,
    writer: QuestionWriter | None = None,
    answers: Sequence[Sequence[str]] | None = None,
) -> list[list[Example]]:
    """Each text's rule-made question (Candidate.question's window) for each of the n spans the selector ranks
    highest; with a writer, first its question for each, given the span's sentence (where it wrote one that no other
    span of the text shares), asked for all texts together. The two phrasings answer different questions, and
    together more than either (README, "Written and rule-made questions ..."). With each text's gold answers (a
    diagnostic, never the method: a perfect selector), every candidate that holds one instead, as fit_selector labels
    them."""
    if answers is None:
        if selector is None:
            raise ValueError("selected_examples needs a selector or the gold answers")
        chosen = [selector.select(model, tokenizer, text, n, adapter) for text in texts]
    else:
        chosen = [[c for c in candidates(t) if contained(c.span, a)] for t, a in zip(texts, answers, strict=True)]
    made = [[c.question(window) for c in cs] for cs in chosen]
    if writer is None:
        return made
    written = ask_groups(writer, model, tokenizer, [[(c.body, c.span) for c in cs] for cs in chosen], adapter)
    return [_unambiguous(w) + m for w, m in zip(written, made, strict=True)]


def _unambiguous(examples: Sequence[Example]) -> list[Example]:
    """The examples whose question no other example of the document asks: the writer asks two spans of one
    sentence the same question now and then ("Who wrote about the Great Pestilence?" for "historian" and for
    "Francis Aidan Gasquet"), and one question with two answers teaches the plugin neither (README, "One question,
    one answer ...": 5% of the examples; their rule-made questions stay)."""
    keys = [e.prompt.strip().lower() for e in examples]
    asked = Counter(keys)
    return [e for e, k in zip(examples, keys, strict=True) if asked[k] == 1]


def fit_selector(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    steps: int = 300,
    lr: float = 1e-2,
    l2: float = 1e-2,
    seed: int = 0,
) -> tuple[SpanSelector, float]:
    """A selector fitted by logistic loss on every candidate of docs (label: it holds one of the document's gold
    answers, contained as the benchmark's metric), full batch; and its final training loss."""
    feats, labels = [], []
    for doc in docs:
        cands = candidates(doc.text)
        if cands and doc.questions:
            feats.append(features(model, tokenizer, doc.text, cands))
            answers = [a for qa in doc.questions for a in qa.answers]
            labels += [contained(c.span, answers) for c in cands]
    if not feats:
        raise ValueError("no document with questions and candidate spans to fit a span selector on")
    x = torch.cat(feats)
    y = torch.tensor(labels)
    mean, std = x.mean(0), x.std(0) + 1e-4
    x = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], generator=gen) * 0.01).requires_grad_(True)
    bias = torch.zeros(1).requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
            loss = bce + l2 * weight.pow(2).sum()
            loss.backward()
            opt.step()
    return SpanSelector(weight.detach(), bias.detach(), mean, std), float(loss.detach())
