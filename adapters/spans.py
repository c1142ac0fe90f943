"""Fold-in's span selector: which spans of a document its questions will ask about. Fold-in writes a plugin from
questions about a few spans; rule-made questions for exactly the spans SQuAD asks about answer three times more
than for spans spread over the paragraph (README, "Fold-in's update rule, groups of examples, ..."). The candidates
are every run of one to four words that neither starts nor ends with a function word (about 160 a paragraph,
holding 0.90 of SQuAD's answers); each is scored by a linear function of the bare base model's hidden states at a
middle layer (averaged over the span, at its first and last token, and at the token after it, which has read the
span) and a few shape features, fitted (``fit_selector``) on the fitting articles' paragraphs with label 1 where
the span holds a gold answer. Selection takes the best-scored spans that do not overlap. Its weights live beside
the adapter's, as the question writer's do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from adapters.corpus import Document
from adapters.errors import CheckpointError
from adapters.examples import _STOP, ANSWER_END, Example, _fact_wh, sentences
from adapters.forward import CausalLM
from adapters.metrics import contained

if TYPE_CHECKING:
    from adapters.adapter import PluginAdapter

WEIGHTS_FILE = "spans.safetensors"
# of SmolLM2's 30 (measured with the rules' answer-like spans as candidates, a span's mean state: on articles 20-23
# the top 8 held 0.44 of the answers with layer 16, 0.39 with layer 8, 0.41 with layer 30)
LAYER = 16
MAX_TOKENS = 2048  # spans past this many tokens of a long document are not candidates
LONGEST = 4  # words: runs of up to 4 hold 0.90 of SQuAD's answers, up to 5 0.94 for a fifth more candidates
SHAPE = 9  # shape features
_WORD = re.compile(r"[A-Za-z0-9][\w'\-.,]*[\w%]|[A-Za-z0-9%]")
_YEAR = re.compile(r"^(?:1\d{3}|20\d{2})$")


@dataclass(frozen=True)
class Candidate:
    body: str  # its sentence without the final punctuation
    start: int  # in body
    end: int
    offset: int  # of body in the document's text
    sentence: int
    sentences: int

    @property
    def span(self) -> str:
        return self.body[self.start : self.end]

    @property
    def chars(self) -> tuple[int, int]:
        """Its character range in the document's text."""
        return self.offset + self.start, self.offset + self.end

    def question(self) -> Example:
        """The rule-made question of examples.fact_examples (in-place phrasing) with the span as its answer."""
        wh = _fact_wh(self.span)
        return Example(f"{self.body[: self.start]}{wh}{self.body[self.end :]}?", self.span + ANSWER_END)


def candidates(text: str) -> list[Candidate]:
    """The first mention of every distinct run of 1 to LONGEST words that neither starts nor ends with a function
    word, in document order."""
    out: list[Candidate] = []
    seen: set[str] = set()
    sents = sentences(text)
    pos = 0
    for i, sent in enumerate(sents):
        offset = max(text.find(sent, pos), 0)
        pos = offset + len(sent)
        body = sent.rstrip(".!? ")
        words = [(m.start(), m.end()) for m in _WORD.finditer(body)]
        content = [body[a:b].lower() not in _STOP for a, b in words]
        for first in range(len(words)):
            for last in range(first, min(first + LONGEST, len(words))):
                if not (content[first] and content[last]):
                    continue
                start, end = words[first][0], words[last][1]
                if body[start:end].lower() not in seen:
                    seen.add(body[start:end].lower())
                    out.append(Candidate(body, start, end, offset, i, len(sents)))
    return out


def shape_features(text: str, c: Candidate) -> list[float]:
    words = c.span.split()
    return [
        float(bool(_YEAR.match(c.span))),
        float(c.span[:1].isdigit()),
        float(c.span[:1].isupper()),
        sum(w[:1].isupper() for w in words) / len(words),
        float(len(words)),
        c.sentence / c.sentences,
        float(c.sentence == 0),
        c.start / max(len(c.body), 1),
        float(text.lower().count(c.span.lower())),
    ]


def features(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    cands: Sequence[Candidate],
    adapter: PluginAdapter | None = None,
) -> Tensor:
    """(n, 4 d + SHAPE): each candidate's hidden states at LAYER of the bare base model (gate 0 where an adapter is
    attached), averaged over its tokens, at its first and last token and at the token after it, and its shape
    features; a span past MAX_TOKENS gets the last token's states."""
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)
    offsets = enc.pop("offset_mapping")[0]  # (T, 2) character range of each token
    layer = min(LAYER, len(model.model.layers))
    device = next(model.parameters()).device
    with torch.no_grad():
        if adapter is None:
            hidden = model(**enc.to(device), output_hidden_states=True).hidden_states[layer][0].float().cpu()
        else:
            with adapter.use(None, gate=torch.zeros(1, device=device)):
                hidden = model(**enc.to(device), output_hidden_states=True).hidden_states[layer][0].float().cpu()
    if not cands:
        return torch.zeros(0, 4 * hidden.shape[-1] + SHAPE)
    ranges = torch.tensor([c.chars for c in cands])  # (n, 2)
    inside = (offsets[None, :, 1] > ranges[:, :1]) & (offsets[None, :, 0] < ranges[:, 1:])  # (n, T)
    t = hidden.shape[0]
    inside[~inside.any(1), -1] = True  # past the window: the last token stands in
    mean = inside.float() @ hidden / inside.sum(1, keepdim=True)
    first = inside.float().argmax(1)
    last = t - 1 - inside.flip(1).float().argmax(1)
    after = (last + 1).clamp(max=t - 1)
    shape = torch.tensor([shape_features(text, c) for c in cands])
    return torch.cat([mean, hidden[first], hidden[last], hidden[after], shape], 1)


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
        """The n best-scored candidates that overlap no better one, in document order."""
        cands = candidates(text)
        if not cands or n == 0:
            return []
        scores = self.score(features(model, tokenizer, text, cands, adapter))
        chosen: list[Candidate] = []
        for i in torch.argsort(scores, descending=True).tolist():
            lo, hi = cands[i].chars
            if all(hi <= a or b <= lo for a, b in (c.chars for c in chosen)):
                chosen.append(cands[i])
                if len(chosen) == n:
                    break
        return sorted(chosen, key=lambda c: c.chars)

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
        width = 4 * model.config.hidden_size + SHAPE
        if any(t.get(k, torch.zeros(0)).shape != (width,) for k in ("weight", "mean", "std")):
            raise CheckpointError(f"{path} does not fit this model's span selector (expected {width} features)")
        return cls(t["weight"], t["bias"], t["mean"], t["std"])


def selected_examples(
    selector: SpanSelector,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    n: int,
    adapter: PluginAdapter | None = None,
) -> list[Example]:
    """One rule-made question for each of the n spans the selector ranks highest."""
    return [c.question() for c in selector.select(model, tokenizer, text, n, adapter)]


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
