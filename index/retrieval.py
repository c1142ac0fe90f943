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


def neighbourhoods(docs: Sequence[Document], vectors: np.ndarray, size: int) -> list[list[int]]:
    """The documents cut into groups of at most size, each an article's paragraph and its nearest unassigned
    paragraphs of the same article (by the rows of vectors, unit length): the distractors retrieval finds."""
    groups = []
    for article in sorted({d.article for d in docs}):
        left = [i for i, d in enumerate(docs) if d.article == article]
        while left:
            sims = vectors[left] @ vectors[left[0]]  # (len(left),), the first one's own 1.0 first
            group = [left[j] for j in np.argsort(-sims, kind="stable")[:size]]
            groups.append(group)
            left = [i for i in left if i not in group]
    return groups


def with_retrieved_contexts(
    docs: Sequence[Document], embedder: TextEmbedder, k: int, within: int | None = None
) -> list[Document]:
    """The documents with each question's top-k documents (by the embedder, in score order, as the query path
    ranks them) attached as its contexts, and their ids with their scores. Where retrieval misses the question's
    own document, it replaces the k-th: a fitting example must be answerable from its prompt. within: retrieve only
    among the question's neighbourhood of that many paragraphs (neighbourhoods), so that a nested fit folds in
    every plugin a step composes together (FitConfig.nested); None: among all documents."""
    if k < 1:
        raise InvalidInputError(f"retrieve at least one paragraph per question, not {k}")
    if within is not None and within < k:
        raise InvalidInputError(f"retrieve {k} paragraphs among neighbourhoods of at least as many, not {within}")
    vectors = embedder.embed([d.text for d in docs])  # (N, d)
    first = np.cumsum([0] + [len(d.questions) for d in docs])  # document i's questions are rows first[i]: ...
    asked = embedder.embed([qa.question for d in docs for qa in d.questions])  # (Q, d), one encoder pass
    groups = [list(range(len(docs)))] if within is None else neighbourhoods(docs, vectors, within)
    attached: list[list[QA]] = [[] for _ in docs]
    for group in groups:
        questions = [(i, qa) for i in group for qa in docs[i].questions]
        if not questions:
            continue
        rows = asked[np.concatenate([np.arange(first[i], first[i + 1]) for i in group])]  # (q, d)
        index = VectorIndex(vectors.shape[1], kind="flat")
        index.build(np.array(group), vectors[group])
        ids, scores = index.search(rows, min(k, len(group)))  # (q, k) each
        for (i, qa), q, row, row_scores in zip(questions, rows, ids, scores, strict=True):
            top = [(int(j), float(s)) for j, s in zip(row, row_scores, strict=True)]
            if i not in [j for j, _ in top]:
                top[-1] = (i, float(vectors[i] @ q))
            contexts = tuple(docs[j].text for j, _ in top)
            retrieved = tuple((docs[j].id, s) for j, s in top)
            attached[i].append(dataclasses.replace(qa, contexts=contexts, retrieved=retrieved))
    return [dataclasses.replace(d, questions=qs) for d, qs in zip(docs, attached, strict=True)]
