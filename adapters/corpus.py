"""Documents to fit on, register or evaluate: JSONL of {"id", "text", "metadata"?} or a SQuAD-format file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import InvalidInputError


@dataclass(frozen=True)
class QA:
    id: str
    question: str
    answers: tuple[str, ...]
    contexts: tuple[str, ...] = ()  # fitting only: the paragraphs retrieval gives this question (index.retrieval)
    retrieved: tuple[tuple[str, float], ...] = ()  # fitting only: those paragraphs' document ids and scores


@dataclass
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    questions: list[QA] = field(default_factory=list)  # SQuAD only; fitting may use them, registration never

    @property
    def article(self) -> int:
        return int(self.metadata.get("article", -1))


def parse_range(spec: str) -> list[int]:
    """ "0-23" or "1,3,5-7" -> sorted article numbers."""
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise InvalidInputError(f"bad range {spec!r}: expected e.g. 0-23 or 1,3,5-7") from exc
    return sorted(out)


def load_squad(path: Path, articles: list[int] | None = None) -> list[Document]:
    """Paragraphs as documents (id squad-AA-PPP), with their questions; only the given articles if any."""
    try:
        data = json.loads(path.read_text())["data"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not a SQuAD-format file: {exc}") from exc
    docs = []
    for a, article in enumerate(data):
        if articles is not None and a not in articles:
            continue
        for p, para in enumerate(article["paragraphs"]):
            qas = [QA(q["id"], q["question"].strip(), tuple(ans["text"] for ans in q["answers"])) for q in para["qas"]]
            meta = {"title": article["title"], "article": a, "paragraph": p, "source": "squad"}
            docs.append(Document(f"squad-{a:02d}-{p:03d}", para["context"], meta, qas))
    return docs


def load_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidInputError(f"{path}:{line_no}: expected a JSON object with a text field") from exc
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"{path}:{line_no}: text must be a non-empty string")
            doc_id = row.get("id") or content_id(text)
            docs.append(Document(str(doc_id), text, dict(row.get("metadata") or {})))
    return docs


def load_corpus(path: Path, articles: list[int] | None = None) -> list[Document]:
    """A JSONL file (one document a line) or a SQuAD-format JSON file, by content."""
    if not path.exists():
        raise InvalidInputError(f"no such file: {path}")
    with path.open() as f:
        head = f.read(1)
    if head == "{" and path.suffix != ".jsonl":
        return load_squad(path, articles)
    return load_jsonl(path)


def content_id(text: str) -> str:
    """The id of a document given without one: a hash of its content."""
    import hashlib

    return "sha-" + hashlib.sha256(text.encode()).hexdigest()[:16]
