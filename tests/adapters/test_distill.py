"""Context distillation and self-study: the teacher's targets line up with the student's tokens, fold-in learns
them, and self-study examples are the bare model's answers about the document."""

from __future__ import annotations

import torch

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import BaseModel, load_base_model
from adapters.corpus import Document
from adapters.distill import question_prefix, self_study_examples, soft_batch, soft_nll, teacher_targets
from adapters.examples import ANSWER_END, Example, question_examples
from adapters.forward import embed, top_hidden
from adapters.generation import greedy_generate
from adapters.prompts import chat_prompt
from adapters.training import FoldInConfig, encode_examples, fold_in, fold_in_examples

TEXT = "The Eiffel Tower in Paris was completed in 1889 by Gustave Eiffel for the World Fair."
EXAMPLES = [
    Example("The Eiffel Tower was completed in when?", "1889<|im_end|>"),
    Example("Who built the tower in Paris?", "Gustave Eiffel<|im_end|>"),
    Example("", TEXT, chat=False),
]


def _states(adapter: PluginAdapter, base: BaseModel, rows: list[torch.Tensor]) -> torch.Tensor:
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)  # (B, T)
    with adapter.use(torch.zeros(len(rows), *adapter.plugin_shape)):
        return top_hidden(base.model, embed(base.model, ids), mask, 0)  # (B, T, d)


def test_teacher_targets_cover_the_question_and_answer_and_skip_raw_text(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    encoded = encode_examples(tiny.tokenizer, 0, EXAMPLES, 256)
    targets = teacher_targets(tiny_adapter, tiny.model, tiny.tokenizer, TEXT, [e.ids for e in encoded], k=8)
    prefix = len(question_prefix(tiny.tokenizer))
    for e, t in zip(encoded[:2], targets[:2], strict=True):
        assert t is not None
        assert t.ids.shape == t.probs.shape == (len(e.ids) - prefix, 8)
        assert torch.allclose(t.probs.sum(-1), torch.ones(len(t.ids)))
    assert targets[2] is None


def test_soft_loss_is_smallest_for_the_teacher_itself(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    """Positions count from each row's end: on the teacher's own tokens the cross-entropy is the teacher's entropy,
    its minimum; on the student's (no document) it is larger."""
    encoded = encode_examples(tiny.tokenizer, 0, EXAMPLES[:2], 256)
    targets = teacher_targets(tiny_adapter, tiny.model, tiny.tokenizer, TEXT, [e.ids for e in encoded], k=8)
    n = len(question_prefix(tiny.tokenizer))
    teacher = torch.tensor(question_prefix(tiny.tokenizer, TEXT))
    teacher_rows = [torch.cat([teacher, e.ids[n:]]) for e in encoded]
    student_rows = [e.ids for e in encoded]
    entropy = torch.stack([-(t.probs * t.probs.log()).sum(-1).mean() for t in targets if t is not None])  # (2,)
    with torch.no_grad():
        for rows, tight in ((teacher_rows, True), (student_rows, False)):
            soft = soft_batch(targets, [len(r) for r in rows])
            assert soft is not None
            ce = soft_nll(tiny.model, _states(tiny_adapter, tiny, rows), soft)  # (2,)
            assert torch.allclose(ce, entropy, atol=1e-4) == tight
            assert bool((ce >= entropy - 1e-4).all())


def test_fold_in_with_distillation_lowers_its_loss_and_moves_the_plugin(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    plain, distilled = (
        fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [TEXT], FoldInConfig(steps=15, lr=0.3, distill=weight))[0]
        for weight in (0.0, 1.0)
    )
    assert distilled.loss is not None and distilled.initial_loss is not None and plain.initial_loss is not None
    assert distilled.loss < distilled.initial_loss - 0.05
    assert distilled.initial_loss > plain.initial_loss  # the soft term is added to the answer NLL
    assert float(abs(distilled.plugin - plain.plugin).max()) > 1e-3


def test_self_study_answers_are_the_bare_models_with_the_document_in_its_prompt() -> None:
    base = load_base_model()  # the real model: the tiny one answers only whitespace
    queries = ["What do you know about The Eiffel Tower in Paris?", "Tell me about Gustave Eiffel."]
    prompts = [chat_prompt(base.tokenizer, q, [TEXT]) for q in queries]
    bare = greedy_generate(base.model, base.tokenizer, None, prompts, None, 8)  # before any adapter is attached
    adapter = PluginAdapter(base, AdapterConfig(rank=4, targets=["v", "o"], seed=3))
    with torch.no_grad():  # a shared delta large enough to change every answer if it were applied
        for m in adapter.plugin_modules:
            m.V.normal_(0, 1.0)
    assert greedy_generate(base.model, base.tokenizer, adapter, prompts, None, 8) != bare
    made = self_study_examples(adapter, base.model, base.tokenizer, TEXT, 2, new_tokens=8)
    assert [e.prompt for e in made] == queries
    assert [e.target for e in made] == [a + ANSWER_END for a in bare] and all(bare)
    config = FoldInConfig(self_study=2, max_examples=3)  # fold-in puts them first and fills up with the rules
    [mixed] = fold_in_examples(adapter, base.model, base.tokenizer, [Document("d", TEXT)], config)
    assert [e.prompt for e in mixed] == [*queries, question_examples(Document("d", TEXT))[0].prompt]


def test_fold_in_examples_spread_the_builders_over_the_cap(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    doc = [Document("d", TEXT)]
    rules = question_examples(doc[0])
    assert len(rules) > 3
    everything = fold_in_examples(tiny_adapter, tiny.model, tiny.tokenizer, doc, FoldInConfig(max_examples=None))
    capped = fold_in_examples(tiny_adapter, tiny.model, tiny.tokenizer, doc, FoldInConfig(max_examples=3))
    assert everything == [rules]
    assert capped == [[rules[int(i * len(rules) / 3)] for i in range(3)]]
