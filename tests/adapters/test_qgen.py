"""The question writer: a LoRA present only while attached, fitted on gold questions, saved beside the adapter,
and asked by fold-in for questions about a document's spans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import BaseModel, load_base_model, tiny_model
from adapters.corpus import QA, Document
from adapters.errors import InvalidInputError
from adapters.examples import ANSWER_END, Example, spread
from adapters.qgen import QuestionWriter, answer_spans, training_pairs, written_examples
from adapters.spans import SHAPE, SpanSelector
from adapters.training import FitConfig, FoldInConfig, fit, fit_writer, fold_in_examples

TEXT = "The old tower was finished in 1889 by local builders."
QUESTION = "When was the tower finished?"
DOC = Document("d", TEXT, questions=[QA("q", QUESTION, ("1889",)), QA("x", "Not in a sentence?", ("absent",))])


def _logits(base: BaseModel) -> torch.Tensor:
    ids = base.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return base.model(input_ids=ids).logits


def test_the_writer_changes_the_model_only_while_attached(tiny: BaseModel) -> None:
    bare = _logits(tiny)
    writer = QuestionWriter(tiny.model, rank=4)
    with torch.no_grad():
        for p in writer.up.values():
            p.normal_(0, 0.5)
    with writer.attached(tiny.model):
        assert not torch.allclose(_logits(tiny), bare, atol=1e-4)
    assert torch.equal(_logits(tiny), bare)


def test_training_pairs_keep_questions_whose_answer_lies_in_a_sentence() -> None:
    [pair] = training_pairs([DOC])
    assert pair.prompt == f"Sentence: {TEXT}\nAnswer: 1889\nQuestion:"
    assert pair.target == f" {QUESTION}{ANSWER_END}"


def test_fold_in_refuses_written_questions_without_a_writer_and_loads_one_saved_beside_the_adapter(
    tiny: BaseModel, tiny_adapter: PluginAdapter, tmp_path: Path
) -> None:
    for config in (FoldInConfig(written=2, max_examples=4), FoldInConfig(selected=1, selected_written=True)):
        with pytest.raises(InvalidInputError, match="no question writer"):
            fold_in_examples(tiny_adapter, tiny.model, tiny.tokenizer, [DOC], config)
    writer, losses = fit_writer(tiny.model, tiny.tokenizer, [DOC], steps=10, batch_size=2, lr=1e-2, progress=False)
    assert losses[-1] < losses[0]
    tiny_adapter.save(tmp_path)
    writer.save(tmp_path)
    fresh = tiny_model(seed=0)  # the same weights as tiny, without the adapter attached to it
    loaded = PluginAdapter.load(tmp_path, fresh)
    assert loaded.writer is not None
    for side in ("down", "up"):
        for key, value in getattr(writer, side).items():
            assert torch.allclose(getattr(loaded.writer, side)[key], value, atol=1e-3)  # float16 on disk
    assert PluginAdapter.load(tmp_path, tiny_model(seed=0)).writer is not None
    resumed, more = fit_writer(fresh.model, fresh.tokenizer, [DOC], 5, 2, 1e-2, progress=False, init=loaded.writer)
    assert resumed is loaded.writer and more[0] < losses[0]  # fitted further, from where the first fit stopped
    (tmp_path / "qgen.safetensors").unlink()
    assert PluginAdapter.load(tmp_path, tiny_model(seed=0)).writer is None


def test_a_fitted_writer_asks_its_question_and_fold_in_and_the_store_fit_put_it_first() -> None:
    base = load_base_model()  # the real model: the tiny one cannot fit a question in a few steps
    adapter = PluginAdapter(base, AdapterConfig(rank=4, targets=["o"], seed=3))
    writer, _ = fit_writer(base.model, base.tokenizer, [DOC], steps=20, batch_size=2, lr=3e-3, progress=False)
    expected = Example(QUESTION, "1889" + ANSWER_END)
    assert written_examples(writer, base.model, base.tokenizer, TEXT, 4, adapter) == [expected]
    adapter.writer = writer
    [made] = fold_in_examples(adapter, base.model, base.tokenizer, [DOC], FoldInConfig(written=1, max_examples=2))
    assert made[0] == expected and len(made) == 2  # the written question first, the rules fill the cap
    # a selector that picks numbers: its span asked by the writer, then by the rules, then the builder's
    width = base.model.config.hidden_size + SHAPE
    digit = torch.zeros(width).index_fill_(0, torch.tensor([width - SHAPE + 1]), 1.0)  # shape_features' digit
    adapter.selector = SpanSelector(digit, torch.zeros(1), torch.zeros(width), torch.ones(width))
    config = FoldInConfig(selected=1, selected_written=True, max_examples=3)
    [made] = fold_in_examples(adapter, base.model, base.tokenizer, [DOC], config)
    rule = Example("The old tower was finished in when by local builders?", "1889" + ANSWER_END)
    assert made[:2] == [expected, rule] and len(made) == 3
    # asked in one batch with another document's span (a longer prompt first): the same questions, regrouped
    other = Document("e", "Much later, a second and much longer bridge over the wide river was opened in 1901.")
    [second, together] = fold_in_examples(adapter, base.model, base.tokenizer, [other, DOC], config)
    assert together == made
    assert second[0].target == "1901" + ANSWER_END and all(e.target != "1889" + ANSWER_END for e in second)
    # the store fit writes each fitting document's x from the same examples fold-in will use, written ones included
    plugins = []
    for written in (1, 0):
        config = FitConfig(epochs=2, batch_size=4, lr=1e-12, x_lr=0.1, store="questions", store_examples=2)
        report = fit(
            adapter, base.model, base.tokenizer, [DOC], config.model_copy(update={"store_written": written}), False
        )
        assert report.plugins is not None
        plugins.append(report.plugins)
    assert float(abs(plugins[0] - plugins[1]).max()) > 1e-4


def test_a_store_fit_with_written_questions_needs_a_writer(tiny: BaseModel) -> None:
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-1]))
    config = FitConfig(store="questions", store_written=2)
    with pytest.raises(InvalidInputError, match="no question writer"):
        fit(adapter, tiny.model, tiny.tokenizer, [DOC], config, progress=False)


def test_each_distinct_span_is_asked_about_once_and_an_empty_spread_is_empty() -> None:
    text = "Gustave Eiffel built a tower in Paris. Years later he left Paris and moved to Lyon in 1901."
    spans = answer_spans(text)
    assert [span for _, span in spans] == ["Gustave Eiffel", "Paris", "Lyon", "1901"]
    assert spans[1][0] == "Gustave Eiffel built a tower in Paris."  # the first mention's sentence
    assert spread(spans, 0) == [] and spread(spans, 2) == [spans[0], spans[2]]
