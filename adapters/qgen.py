"""A question writer for fold-in: a small LoRA on the base model, fitted on the fitting articles' gold questions
(sentence + answer span -> question), so that registration can ask a document's facts back in the words SQuAD's
questions use. The 135M model cannot write usable questions unaided (README, method notes); rule-made questions are
usable but land far from real ones. The writer is attached only while it writes (forward hooks), so the served
model is untouched, and its weights live beside the adapter's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from adapters.corpus import Document
from adapters.errors import CheckpointError
from adapters.examples import ANSWER_END, Example, cloze_spans, sentences, spread
from adapters.forward import IGNORE, CausalLM

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


@dataclass(frozen=True)
class _Pair:
    prompt: str
    target: str


def training_pairs(docs: Sequence[Document]) -> list[_Pair]:
    """(sentence + answer -> question) for every gold question whose first answer lies in one sentence."""
    out = []
    for doc in docs:
        sents = sentences(doc.text)
        for qa in doc.questions:
            if not qa.answers:
                continue
            answer = qa.answers[0]
            sent = next((s for s in sents if answer in s), None)
            if sent is not None:
                out.append(_Pair(_prompt(sent, answer), " " + qa.question + ANSWER_END))
    return out


def fit_writer(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[QuestionWriter, list[float]]:
    """A writer fitted by next-token loss on the questions of docs; the base model stays frozen."""
    rng = random.Random(seed)
    pairs = training_pairs(docs)
    rng.shuffle(pairs)
    writer = QuestionWriter(model, seed=seed)
    params = [p.requires_grad_(True) for p in writer.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="question writer", disable=not progress)
    with torch.enable_grad(), writer.attached(model):
        for step in bar:
            chunk = [pairs[(step * batch_size + j) % len(pairs)] for j in range(batch_size)]
            ids, labels, mask = _batch(tokenizer, chunk)
            states = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
            targets = labels[:, 1:]  # (B, T-1)
            chosen = targets != IGNORE
            logits = model.lm_head(states[:, :-1][chosen])  # (N, V): the head only on the questions' tokens
            loss = nn.functional.cross_entropy(logits.float(), targets[chosen])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    for p in params:
        p.requires_grad_(False)
    return writer, losses


def _batch(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[_Pair]) -> tuple[Tensor, Tensor, Tensor]:
    rows, labels = [], []
    for p in pairs:
        prompt = tokenizer(p.prompt, add_special_tokens=False).input_ids
        target = tokenizer(p.target, add_special_tokens=False).input_ids
        rows.append(torch.tensor(prompt + target))
        labels.append(torch.tensor([IGNORE] * len(prompt) + target))
    ids = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T), right padded
    lab = nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE)  # (B, T)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)  # (B, T)
    return ids, lab, mask


def answer_spans(text: str) -> list[tuple[str, str]]:
    """(sentence, span) for the first mention of every distinct entity or number span, in order: asking about one
    span many times would crowd out the rest of the document."""
    seen: set[str] = set()
    out = []
    for sent in sentences(text):
        body = sent.rstrip(".!? ")
        for s, e in cloze_spans(body):
            if body[s:e].lower() not in seen:
                seen.add(body[s:e].lower())
                out.append((sent, body[s:e]))
    return out


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
    chosen = spread(answer_spans(text), n)
    if not chosen:
        return []
    tokenizer.padding_side = "left"
    batch = tokenizer([_prompt(s, a) for s, a in chosen], return_tensors="pt", padding=True, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids(ANSWER_END)
    off = adapter.use(None, torch.zeros(len(chosen))) if adapter is not None else nullcontext()
    with torch.no_grad(), writer.attached(model), off:  # the bare base model plus the writer
        out = model.generate(
            **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=end
        )  # (B, T + new)
    new = out[:, batch["input_ids"].shape[1] :]
    questions = [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in new]
    return [Example(q, a + ANSWER_END) for q, (_, a) in zip(questions, chosen, strict=True) if q.endswith("?")]
