"""`kplug bench retrieval` (the own paragraph's rank by cosine alone and with BM25 added) and `kplug bench index`,
real MiniLM and SQLite."""

from __future__ import annotations

from collections import Counter

import numpy as np

from adapters.corpus import QA, Document
from index.bench import _zipf_words, bench_index, bench_retrieval
from index.embedder import Embedder

TEXTS = [
    ("The Eiffel Tower was built of wrought iron in 1889.", "When was the tower built?"),
    ("The Thames flows through London to the North Sea.", "Which sea does the Thames reach?"),
    ("Photosynthesis turns light into chemical energy.", "What does photosynthesis make?"),
]
DOCS = [Document(f"d{i}", text, questions=[QA(str(i), q, ())]) for i, (text, q) in enumerate(TEXTS)]


def test_the_bench_ranks_every_question_against_every_registered_paragraph() -> None:
    result = bench_retrieval(DOCS, [0.0, 0.5])
    assert (result["paragraphs"], result["questions"], result["k"]) == (3, 3, 3)
    assert [r["lexical_weight"] for r in result["rows"]] == [0.0, 0.5]
    assert all(r["top3"] == 1.0 and r["search_ms"] > 0 for r in result["rows"])  # three paragraphs: all in the top 3
    embedder = Embedder()  # cosine alone: the bench's top-1 is the embeddings' own nearest paragraph
    sims = embedder.embed([d.questions[0].question for d in DOCS]) @ embedder.embed([d.text for d in DOCS]).T
    assert result["rows"][0]["top1"] == np.mean(sims.argmax(1) == np.arange(3))
    assert result["rows"][1]["top1"] == 1.0  # each question shares a rare word with its own paragraph only


def test_the_index_bench_times_search_with_and_without_the_query_words() -> None:
    result = bench_index((2, 4), sizes=(300,), queries=5, add_docs=5, batch=100)
    for name in ("search", "search_lexical"):
        assert 0 < result[f"{name}_p50_ms_300"] <= result[f"{name}_p99_ms_300"]
    assert result["add_docs_per_s_with_embedding"] > 0


def test_synthetic_words_fall_off_as_natural_text_does() -> None:
    words = " ".join(_zipf_words(np.random.default_rng(0), (200, 120))).split()
    counts = sorted(Counter(words).values(), reverse=True)
    assert counts[0] > 20 * counts[len(counts) // 2]  # a few words everywhere, most rare
