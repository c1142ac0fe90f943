"""The span selector: candidate spans located in the text, features from the bare model, a fit that learns which
spans hold answers, saved beside the adapter and asked by fold-in for its first examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.adapter import PluginAdapter
from adapters.base_model import BaseModel, tiny_model
from adapters.corpus import QA, Document
from adapters.errors import CheckpointError, InvalidInputError
from adapters.examples import ANSWER_END, Example
from adapters.spans import WEIGHTS_FILE, SpanSelector, candidates, features, fit_selector, selected_examples
from adapters.training import FoldInConfig, fold_in_examples

TEXT = "The old tower in Lyon was finished in 1889 by local builders. Later the tower in Lyon was painted red in 1901."


def _docs(n: int) -> list[Document]:
    """Documents whose questions always ask for the year."""
    cities = ["Paris", "Lyon", "Nice", "Rome", "Oslo", "Bern"]
    return [
        Document(
            f"d{i}",
            f"The bridge of {cities[i % 6]} was opened in {1800 + 7 * i} by the old guild of masons.",
            questions=[QA(f"q{i}", "When was the bridge opened?", (str(1800 + 7 * i),))],
        )
        for i in range(n)
    ]


def test_candidates_are_distinct_first_mentions_located_in_the_text() -> None:
    cands = candidates(TEXT)
    assert [c.span for c in cands] == ["old tower", "Lyon", "1889", "local builders", "tower", "1901"]
    for c in cands:
        assert TEXT[c.offset + c.start : c.offset + c.end] == c.span
    assert [c.sentence for c in cands] == [0, 0, 0, 0, 1, 1]
    assert cands[2].question() == Example(
        "The old tower in Lyon was finished in when by local builders?", "1889" + ANSWER_END
    )
    # a window keeps that many words each side, the sentence's own punctuation between them
    assert cands[2].question(2) == Example("finished in when by local?", "1889" + ANSWER_END)
    assert cands[1].question(1) == Example("in what was?", "Lyon" + ANSWER_END)
    assert cands[0].question(9) == cands[0].question()  # the sentence is shorter than the window


def test_features_come_from_the_bare_model_with_an_adapter_attached(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    cands = candidates(TEXT)
    attached = features(tiny.model, tiny.tokenizer, TEXT, cands, tiny_adapter)
    bare_model = tiny_model(seed=0)  # the same weights, no adapter
    bare = features(bare_model.model, bare_model.tokenizer, TEXT, cands)
    assert attached.shape == (len(cands), tiny.model.config.hidden_size + 9)
    assert torch.allclose(attached, bare, atol=1e-5)
    with tiny_adapter.use(None):  # the adapter's shared term is on outside a gate: the states differ
        shared = tiny.model(**tiny.tokenizer(TEXT, return_tensors="pt"), output_hidden_states=True)
    plain = bare_model.model(**bare_model.tokenizer(TEXT, return_tensors="pt"), output_hidden_states=True)
    assert not torch.allclose(shared.hidden_states[-1], plain.hidden_states[-1], atol=1e-4)


def test_a_fitted_selector_ranks_the_asked_kind_of_span_first(tiny: BaseModel) -> None:
    selector, loss = fit_selector(tiny.model, tiny.tokenizer, _docs(12), steps=200, lr=0.05)
    assert loss < 0.3
    held_out = "The bridge of Turin was opened in 1777 by the old guild of masons."
    [best] = selector.select(tiny.model, tiny.tokenizer, held_out, 1)
    assert best.span == "1777"
    [examples] = selected_examples(selector, tiny.model, tiny.tokenizer, [held_out], 2)
    assert (
        len(examples) == 2
        and Example("The bridge of Turin was opened in when by the old guild of masons?", "1777" + ANSWER_END)
        in examples
    )
    assert selector.select(tiny.model, tiny.tokenizer, "no spans here at all", 3) == []
    with pytest.raises(ValueError, match="no document with questions"):
        fit_selector(tiny.model, tiny.tokenizer, [Document("x", held_out)])


def test_fold_in_asks_the_selected_spans_first_with_a_selector_saved_beside_the_adapter(
    tiny: BaseModel, tiny_adapter: PluginAdapter, tmp_path: Path
) -> None:
    config = FoldInConfig(selected=1, max_examples=3)
    doc = Document("d", TEXT)
    with pytest.raises(InvalidInputError, match="no span selector"):
        fold_in_examples(tiny_adapter, tiny.model, tiny.tokenizer, [doc], config)
    selector, _ = fit_selector(tiny.model, tiny.tokenizer, _docs(12), steps=200, lr=0.05)
    tiny_adapter.save(tmp_path)
    selector.save(tmp_path)
    loaded = PluginAdapter.load(tmp_path, tiny_model(seed=0))
    assert loaded.selector is not None
    assert torch.allclose(loaded.selector.weight, selector.weight)
    tiny_adapter.selector = loaded.selector
    [made] = fold_in_examples(tiny_adapter, tiny.model, tiny.tokenizer, [doc], config)
    [first] = selected_examples(loaded.selector, tiny.model, tiny.tokenizer, [TEXT], 1, tiny_adapter)
    assert len(made) == 3 and made[0] == first[0]  # the selected question first, the rules fill the cap
    (tmp_path / WEIGHTS_FILE).unlink()
    assert PluginAdapter.load(tmp_path, tiny_model(seed=0)).selector is None
    narrow = SpanSelector(torch.zeros(3), torch.zeros(1), torch.zeros(3), torch.ones(3))
    narrow.save(tmp_path)
    with pytest.raises(CheckpointError, match="span selector"):
        PluginAdapter.load(tmp_path, tiny_model(seed=0))


def test_the_gold_diagnostic_asks_every_candidate_holding_a_gold_answer_and_nothing_else(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    doc = Document("d", TEXT, questions=[QA("q", "When was it painted?", ("1901",)), QA("r", "Where?", ("Lyon",))])
    config = FoldInConfig(examples="none", selected=1, selected_gold=True, selected_window=2, max_examples=None)
    assert tiny_adapter.selector is None  # the diagnostic needs none
    [made] = fold_in_examples(tiny_adapter, tiny.model, tiny.tokenizer, [doc], config)
    cands = candidates(TEXT)
    assert made == [cands[1].question(2), cands[5].question(2)]  # document order; one per gold answer
    with pytest.raises(ValueError, match="selector or the gold answers"):
        selected_examples(None, tiny.model, tiny.tokenizer, [TEXT], 1)


def test_a_question_the_writer_asks_of_two_spans_is_dropped_for_both_and_their_rule_made_ones_stay(
    tiny: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cands = candidates(TEXT)
    gold = [[cands[1].span, cands[2].span, cands[5].span]]  # three spans chosen, as a perfect selector would
    asked = ["When was it finished?", "when was it finished? ", "When was the tower painted?"]

    def ask(_w: object, _m: object, _t: object, groups: list[list[tuple[str, str]]], *_: object) -> list:
        return [[Example(q, a + ANSWER_END) for q, (_, a) in zip(asked, pairs, strict=True)] for pairs in groups]

    monkeypatch.setattr("adapters.spans.ask_groups", ask)
    writer = object()  # only handed to ask_groups
    [made] = selected_examples(None, tiny.model, tiny.tokenizer, [TEXT], 3, None, 2, writer, gold)  # type: ignore[arg-type]
    chosen = [c for c in cands if c.span in gold[0]]
    assert made == [Example("When was the tower painted?", cands[5].span + ANSWER_END)] + [
        c.question(2) for c in chosen
    ]
