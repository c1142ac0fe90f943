"""Context distillation for fold-in: the teacher is the same network with the document in its prompt (plugin 0),
the student has the plugin and no document.

On each training example the student matches the teacher's next-token distribution (its top K tokens,
renormalised) at every position of the question, the end of turn and the answer: the teacher's predictions there
carry what the document says, at some 40 positions per example instead of the 3 or so of an answer span. Soft
targets are computed once per fold-in, one forward pass per example; the student's head is evaluated only on each
position's K teacher tokens. Measured in the README's method notes ("context distillation").

Self-study (after Cartridges, arXiv 2506.06266) writes training examples instead of soft targets: fixed seed
prompts about the document's entities, answered greedily by the bare base model (gate 0: no shared U V, unlike the
distillation teacher) with the document in its prompt. The 135M
model cannot write usable questions, but it can answer "Tell me about X." from a paragraph it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from adapters.examples import ANSWER_END, Example, entities, spread
from adapters.forward import CausalLM, embed, row_mean, top_hidden
from adapters.generation import greedy_generate
from adapters.prompts import chat_prompt

if TYPE_CHECKING:
    from adapters.adapter import PluginAdapter

TOP_K = 32
SEED_PROMPTS = ("What do you know about {}?", "Tell me about {}.")
_MARK = "\x00"  # stands for the question while the chat template is split where the question starts


@dataclass
class SoftTargets:
    """The teacher's next-token distribution over its top K tokens at each of the example's last P positions."""

    probs: Tensor  # (P, K), rows sum to 1
    ids: Tensor  # (P, K) token ids


@dataclass
class SoftBatch:
    """Soft targets of a padded micro-batch, flattened over (row, position)."""

    rows: Tensor  # (N,) row in the batch
    positions: Tensor  # (N,) position whose next token is predicted
    probs: Tensor  # (N, K)
    ids: Tensor  # (N, K)


def question_prefix(tokenizer: PreTrainedTokenizerBase, document: str | None = None) -> list[int]:
    """Token ids of the chat prompt up to where the question starts: alone (the student), or after the document."""
    if document is None:
        text = chat_prompt(tokenizer, _MARK).split(_MARK)[0]
    else:  # the context mode's prompt; a newline, not a space, before the question so its tokens are the student's
        text = chat_prompt(tokenizer, _MARK, [document]).split(_MARK)[0].rstrip() + "\n"
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def teacher_targets(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    document: str,
    examples: Sequence[Tensor],
    k: int = TOP_K,
    batch: int = 8,
) -> list[SoftTargets | None]:
    """Soft targets for chat examples (ids (T,) starting with the student's question prefix) of one document.

    The teacher reads the same question and answer tokens after the document; examples that do not start with
    the question prefix (raw-text examples) get None.
    """
    student = question_prefix(tokenizer)
    teacher = torch.tensor(question_prefix(tokenizer, document))
    n = len(student)
    suffixes = {i: ids[n:] for i, ids in enumerate(examples) if ids[:n].tolist() == student and len(ids) > n}
    out: list[SoftTargets | None] = [None] * len(examples)
    order = sorted(suffixes, key=lambda i: len(suffixes[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            rows = [torch.cat([teacher, suffixes[i]]) for i in chunk]
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T), right padded
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)  # (B, T)
            with adapter.use(torch.zeros(len(chunk), *adapter.plugin_shape)):
                states = top_hidden(model, embed(model, ids), mask, 0)  # (B, T, d)
            for j, i in enumerate(chunk):
                p = len(suffixes[i])
                logp = F.log_softmax(model.lm_head(states[j, len(teacher) - 1 : len(teacher) - 1 + p]).float(), -1)
                top, idx = logp.topk(k, dim=-1)  # (P, K)
                out[i] = SoftTargets(torch.softmax(top, -1), idx)
    return out


def soft_batch(targets: Sequence[SoftTargets | None], lengths: Sequence[int]) -> SoftBatch | None:
    """Flatten the soft targets of a micro-batch whose rows have these unpadded lengths; None if it has none."""
    parts = [(j, t, n) for j, (t, n) in enumerate(zip(targets, lengths, strict=True)) if t is not None]
    if not parts:
        return None
    # the last P tokens of a row are predicted from positions n-P-1 .. n-2
    positions = [torch.arange(n - len(t.ids) - 1, n - 1) for _, t, n in parts]
    return SoftBatch(
        rows=torch.cat([torch.full((len(t.ids),), j) for j, t, _ in parts]),
        positions=torch.cat(positions),
        probs=torch.cat([t.probs for _, t, _ in parts]),
        ids=torch.cat([t.ids for _, t, _ in parts]),
    )


def soft_nll(model: CausalLM, out: Tensor, soft: SoftBatch) -> Tensor:
    """Cross-entropy of the student's top states out (B, T, d) against the teacher's soft targets, mean per row (B,).

    The head is evaluated on each position's K teacher tokens only and renormalised over them.
    """
    states = out[soft.rows, soft.positions]  # (N, d)
    logits = torch.einsum("nd,nkd->nk", states, model.lm_head.weight[soft.ids])  # (N, K)
    ce = -(soft.probs * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (N,)
    return row_mean(ce, soft.rows, out.shape[0])


def self_study_examples(
    adapter: PluginAdapter,
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    document: str,
    n: int,
    new_tokens: int = 40,
) -> list[Example]:
    """Up to n examples: seed prompts about entities spread over the document, and the bare model's greedy answers
    with the document in its prompt (the target the plugin must reproduce without it)."""
    seeds = spread(entities(document), n)
    queries = [SEED_PROMPTS[i % len(SEED_PROMPTS)].format(e) for i, e in enumerate(seeds)]
    if not queries:
        return []
    prompts = [chat_prompt(tokenizer, q, [document]) for q in queries]
    answers = greedy_generate(model, tokenizer, adapter, prompts, None, new_tokens, gate=torch.zeros(len(prompts)))
    return [Example(q, a + ANSWER_END) for q, a in zip(queries, answers, strict=True) if a]
