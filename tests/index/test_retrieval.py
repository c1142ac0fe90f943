"""Retrieved contexts for fitting: each question gets its top-k paragraphs, its own always among them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from adapters.corpus import QA, Document
from adapters.errors import InvalidInputError
from adapters.examples import reading_examples
from adapters.prompts import user_message
from index.retrieval import neighbourhoods, with_retrieved_contexts

VOCAB = ["tower", "paris", "bridge", "london", "river", "built", "iron", "stone"]


class WordEmbedder:
    """Unit bag-of-words vectors over a fixed vocabulary: which paragraph a question retrieves is predictable."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        v = np.array([[t.lower().count(w) for w in VOCAB] for t in texts], dtype=np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _docs() -> list[Document]:
    texts = [
        "The tower in Paris was built of iron.",
        "The bridge in London crosses the river.",
        "The stone bridge over the river was built in London.",
    ]
    questions = [
        [QA("a", "What was the Paris tower built of?", ("iron",))],
        [QA("b", "Which river does the London bridge cross?", ("the river",))],
        [QA("c", "What is the tower made of? iron tower", ("stone",))],  # retrieves the Paris paragraph first
    ]
    return [Document(f"d{i}", t, questions=q) for i, (t, q) in enumerate(zip(texts, questions, strict=True))]


def test_questions_get_their_top_k_in_score_order_with_their_own_paragraph_kept() -> None:
    docs = _docs()
    out = with_retrieved_contexts(docs, WordEmbedder(), k=2)
    assert [d.text for d in out] == [d.text for d in docs]  # the documents themselves are unchanged
    [a], [b], [c] = (d.questions for d in out)
    assert (a.question, a.answers) == ("What was the Paris tower built of?", ("iron",))
    assert a.contexts[0] == docs[0].text and len(a.contexts) == 2
    assert set(b.contexts) == {docs[1].text, docs[2].text}
    assert c.contexts[0] == docs[0].text  # ranked first by score
    assert docs[2].text in c.contexts  # its own paragraph, whatever retrieval ranks
    assert docs[0].questions[0].contexts == ()  # the input is not modified


def test_top_one_missing_its_own_paragraph_is_replaced_by_it() -> None:
    out = with_retrieved_contexts(_docs(), WordEmbedder(), k=1)
    assert [d.questions[0].contexts for d in out] == [(d.text,) for d in _docs()]


def test_reading_examples_show_the_attached_contexts() -> None:
    [doc] = with_retrieved_contexts(_docs(), WordEmbedder(), k=2)[2:]
    made = reading_examples(doc)
    assert made[-1].prompt == user_message(doc.questions[0].question, doc.questions[0].contexts)
    assert made[-1].prompt.count("\n\n") >= 2  # two paragraphs and the question


def test_no_paragraphs_to_retrieve_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="at least one"):
        with_retrieved_contexts(_docs(), WordEmbedder(), k=-1)


def test_retrieved_ids_and_scores_follow_the_contexts_in_score_order() -> None:
    docs = _docs()
    out = with_retrieved_contexts(docs, WordEmbedder(), k=2)
    text_of = {d.id: d.text for d in docs}
    for doc in out:
        [qa] = doc.questions
        assert tuple(text_of[i] for i, _ in qa.retrieved) == qa.contexts
        [first, second] = [s for _, s in qa.retrieved]
        assert first >= second or qa.retrieved[-1][0] == doc.id  # ranked, unless the own paragraph was put last


def _articles() -> list[Document]:
    """Two articles: the first has two Paris and two London paragraphs, the second one more Paris paragraph."""
    texts = [
        ("The tower in Paris was built of iron.", 0),
        ("The bridge in London crosses the river.", 0),
        ("Paris has an iron tower.", 0),
        ("London has a stone bridge over the river.", 0),
        ("Paris built a tower.", 1),
    ]
    return [
        Document(f"d{i}", t, {"article": a}, [QA(f"q{i}", "What is in Paris? tower", ("tower",))])
        for i, (t, a) in enumerate(texts)
    ]


def test_neighbourhoods_group_an_articles_nearest_paragraphs() -> None:
    docs = _articles()
    vectors = WordEmbedder().embed([d.text for d in docs])
    assert neighbourhoods(docs, vectors, 2) == [[0, 2], [1, 3], [4]]
    assert neighbourhoods(docs, vectors, 3) == [[0, 2, 1], [3], [4]]  # what is left makes a smaller one


def test_retrieval_within_neighbourhoods_stays_inside_them() -> None:
    """Every question asks about Paris: among all paragraphs the London ones would retrieve Paris paragraphs,
    within neighbourhoods of two they retrieve only their own neighbourhood's."""
    docs = _articles()
    everywhere = with_retrieved_contexts(docs, WordEmbedder(), k=2)
    assert {i for i, _ in everywhere[1].questions[0].retrieved} != {"d1", "d3"}
    within = with_retrieved_contexts(docs, WordEmbedder(), k=2, within=2)
    assert [{i for i, _ in d.questions[0].retrieved} for d in within] == [
        {"d0", "d2"},
        {"d1", "d3"},
        {"d0", "d2"},
        {"d1", "d3"},
        {"d4"},
    ]
    with pytest.raises(InvalidInputError, match="neighbourhoods"):
        with_retrieved_contexts(docs, WordEmbedder(), k=3, within=2)
