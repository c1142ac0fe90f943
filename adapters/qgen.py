"""A question writer for fold-in: a small LoRA on the base model, fitted (``training.fit_writer``) on the fitting
articles' gold questions (sentence + answer span -> question), so that registration can ask a document's facts
back in the words SQuAD's questions use. The 135M model cannot write usable questions unaided (README, method
notes); rule-made questions are usable but land far from real ones. The writer is attached only while it writes
(forward hooks), so the served model is untouched, and its weights live beside the adapter's. Measured: its
questions read like SQuAD's; instead of rule-made ones they answer no more ("Knowledge with written questions"),
beside them, for the selected spans, more (README, "Written and rule-made questions for the selected spans").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from adapters.corpus import Document
from adapters.errors import CheckpointError
from adapters.examples import ANSWER_END, Example, first_mentions, sentences, spread
from adapters.forward import CausalLM
from adapters.generation import greedy_generate

if TYPE_CHECKING:
    from adapters.adapter import PluginAdapter

WEIGHTS_FILE = "qgen.safetensors"
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


def _prompt(sentence: str, answer: str) -> str:
    return f"Sentence: {sentence}\nAnswer: {answer}\nQuestion:"


def _linear(module: nn.Module) -> nn.Linear:
    base = getattr(module, "base", module)  # a PluginLinear keeps the frozen original as base
    assert isinstance(base, nn.Linear)
    return base


class QuestionWriter:
    """LoRA factors (down (r, in), up (out, r)) for TARGETS of every layer; up starts at 0 (the bare model).

    Not an nn.Module: it hangs off the plugin adapter without joining its parameters or its checkpoint id.
    """

    def __init__(self, model: CausalLM, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> None:
        self.scale = alpha / rank
        gen = torch.Generator().manual_seed(seed)
        self.down: dict[str, Tensor] = {}
        self.up: dict[str, Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            for path in TARGETS:
                lin = _linear(layer.get_submodule(path))
                key = f"{i}.{path}"
                self.down[key] = torch.randn(rank, lin.in_features, generator=gen) / lin.in_features**0.5
                self.up[key] = torch.zeros(lin.out_features, rank)

    def parameters(self) -> list[Tensor]:
        return [*self.down.values(), *self.up.values()]

    @contextmanager
    def attached(self, model: CausalLM) -> Iterator[None]:
        """The model with the writer's delta added to every target's output, for the duration of the block."""
        handles = []
        for i, layer in enumerate(model.model.layers):
            for path in TARGETS:
                key = f"{i}.{path}"
                down, up = self.down[key], self.up[key]

                def hook(
                    _m: nn.Module, args: tuple[Tensor, ...], out: Tensor, d: Tensor = down, u: Tensor = up
                ) -> Tensor:
                    return out + self.scale * (args[0] @ d.T) @ u.T  # (B, T, out)

                handles.append(layer.get_submodule(path).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def save(self, directory: Path) -> None:
        tensors = {f"down.{k}": v.detach().half().contiguous() for k, v in self.down.items()}
        tensors |= {f"up.{k}": v.detach().half().contiguous() for k, v in self.up.items()}
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"scale": str(self.scale)})
        tmp.replace(directory / WEIGHTS_FILE)

    @classmethod
    def load(cls, directory: Path, model: CausalLM) -> QuestionWriter | None:
        """The writer saved in directory, or None when it has none."""
        path = directory / WEIGHTS_FILE
        if not path.exists():
            return None
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            scale = float((f.metadata() or {}).get("scale", 2.0))
        rank = next(v.shape[0] for k, v in tensors.items() if k.startswith("down."))
        writer = cls(model, rank=rank, alpha=scale * rank)
        for name, value in tensors.items():
            side, _, key = name.partition(".")
            factors = {"down": writer.down, "up": writer.up}.get(side, {})
            if key not in factors or factors[key].shape != value.shape:
                raise CheckpointError(f"{path}: {name} does not fit this model's question writer")
            factors[key] = value.float()
        return writer


def training_pairs(docs: Sequence[Document]) -> list[Example]:
    """(sentence + answer -> question) raw-text examples for every gold question whose first answer lies in one
    sentence."""
    out = []
    for doc in docs:
        sents = sentences(doc.text)
        for qa in doc.questions:
            if not qa.answers:
                continue
            answer = qa.answers[0]
            sent = next((s for s in sents if answer in s), None)
            if sent is not None:
                out.append(Example(_prompt(sent, answer), " " + qa.question + ANSWER_END, chat=False))
    return out


def answer_spans(text: str) -> list[tuple[str, str]]:
    """(sentence, span) for the first mention of every distinct entity or number span, in order."""
    return [(sent, sent[start:end]) for sent, start, end in first_mentions(text)]


def written_examples(
    writer: QuestionWriter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    n: int,
    adapter: PluginAdapter | None = None,
    new_tokens: int = 32,
) -> list[Example]:
    """Up to n examples: the writer's question for answer spans spread over the document, the span as target."""
    return ask_groups(writer, model, tokenizer, [spread(answer_spans(text), n)], adapter, new_tokens)[0]


def ask_groups(
    writer: QuestionWriter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[Sequence[tuple[str, str]]],
    adapter: PluginAdapter | None = None,
    new_tokens: int = 32,
    batch: int = 32,
) -> list[list[Example]]:
    """The writer's question for each (sentence, answer span) of each group (a document), the span as its answer;
    none where it wrote no question. All groups' prompts go in batches of up to `batch` of similar length: one small
    batch per document left the 2 cores mostly waiting (README, "U, V fitted to read the written and rule-made
    plugins": 1.47x for a registration's 4 documents)."""
    flat = [(g, _prompt(s, a), a) for g, pairs in enumerate(groups) for s, a in pairs]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i][1]))
    questions = [""] * len(flat)
    with writer.attached(model):
        for k in range(0, len(order), batch):
            chunk = order[k : k + batch]
            prompts = [flat[i][1] for i in chunk]
            bare = torch.zeros(len(chunk))  # gate 0: the bare base model, plus the writer
            written = greedy_generate(model, tokenizer, adapter, prompts, None, new_tokens, gate=bare)
            for i, q in zip(chunk, written, strict=True):
                questions[i] = q
    out: list[list[Example]] = [[] for _ in groups]
    for (g, _, a), q in zip(flat, questions, strict=True):
        if q.endswith("?"):
            out[g].append(Example(q, a + ANSWER_END))
    return out
