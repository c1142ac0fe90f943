"""Retrieval over a fitting corpus, so that fitting can show the reader what `combine` will show it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from adapters.corpus import QA, Document
from adapters.errors import InvalidInputError
from index.vectors import VectorIndex


class TextEmbedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def with_retrieved_contexts(docs: Sequence[Document], embedder: TextEmbedder, k: int) -> list[Document]:
    """The documents with each question's top-k documents (by the embedder, in score order, as the query path
    ranks them) attached as its contexts. Where retrieval misses the question's own document, it replaces the
    k-th: a fitting example must be answerable from its prompt."""
    if k < 1:
        raise InvalidInputError(f"retrieve at least one paragraph per question, not {k}")
    vectors = embedder.embed([d.text for d in docs])  # (N, d)
    index = VectorIndex(vectors.shape[1], kind="flat")
    index.build(np.arange(len(docs)), vectors)
    questions = [(i, qa) for i, d in enumerate(docs) for qa in d.questions]
    ids, _ = index.search(embedder.embed([qa.question for _, qa in questions]), k)  # (Q, k)
    attached: list[list[QA]] = [[] for _ in docs]
    for (i, qa), row in zip(questions, ids, strict=True):
        top = [int(j) for j in row]
        if i not in top:
            top[-1] = i
        attached[i].append(dataclasses.replace(qa, contexts=tuple(docs[j].text for j in top)))
    return [dataclasses.replace(d, questions=qs) for d, qs in zip(docs, attached, strict=True)]
