"""`kplug bench index`: add throughput, search latency at 1k / 10k / 100k documents, bytes on disk per document.

Add throughput is measured with the real embedder (texts of about 120 words) and without it (precomputed unit
vectors). Search latency is the store's own search for single queries, over synthetic unit vectors at the larger
sizes: by embedding alone (FAISS plus the SQLite id lookup), and with the query's words too (the service's default:
FTS5's BM25 beside FAISS), over texts drawn from a Zipfian vocabulary as natural text is, so that a query's common
words are in much of the collection and its rare ones in little of it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters.corpus import Document
from index.embedder import Embedder
from index.store import STOPWORDS, PluginStore

WORDS = [
    "river",
    "library",
    "engine",
    "treaty",
    "harbour",
    "scholar",
    "protein",
    "voltage",
    "dynasty",
    "orbit",
    "glacier",
    "parliament",
    "enzyme",
    "cathedral",
    "railway",
    "telescope",
    "copper",
    "monsoon",
    "algorithm",
    "symphony",
]


def _texts(rng: np.random.Generator, n: int, words: int = 120) -> list[str]:
    return [" ".join(rng.choice(WORDS, words)) + f" #{i}" for i in range(n)]


def _zipf_words(rng: np.random.Generator, shape: tuple[int, int], skip: int = 0, vocabulary: int = 30_000) -> list[str]:
    """Texts of pseudo-words whose frequencies fall as 1 / rank, as words' do in English, the skip commonest left
    out (a query's stopwords, which the store drops)."""
    p = 1.0 / np.arange(1, vocabulary + 1)
    p[:skip] = 0
    draws = rng.choice(vocabulary, shape, p=p / p.sum())
    return [" ".join(f"w{w}" for w in row) for row in draws]


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_index(
    plugin_shape: tuple[int, int],
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000),
    queries: int = 300,
    add_docs: int = 300,
    batch: int = 500,
    lexical_weight: float = 0.05,
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    embedder = Embedder()
    dim = embedder.dim
    result: dict[str, Any] = {"plugin_shape": list(plugin_shape), "dim": dim, "queries": queries}
    root = Path(tempfile.mkdtemp(prefix="kplug-bench-"))
    try:
        # add throughput, one document per transaction as the service writes them
        store = PluginStore(root / "add", dim, plugin_shape, "bench")
        texts = _texts(rng, add_docs)
        plugins = rng.standard_normal((add_docs, *plugin_shape)).astype(np.float32)
        started = time.perf_counter()
        for i, text in enumerate(texts):
            store.put(f"e{i}", text, {}, embedder.embed([text])[0], plugins[i])
        result["add_docs_per_s_with_embedding"] = round(add_docs / (time.perf_counter() - started), 1)
        vectors = _unit(rng, add_docs, dim)
        started = time.perf_counter()
        for i in range(add_docs):
            store.put(f"v{i}", texts[i], {}, vectors[i], plugins[i])
        result["add_docs_per_s_without_embedding"] = round(add_docs / (time.perf_counter() - started), 1)
        started = time.perf_counter()
        store.put_many([(f"b{i}", texts[i], {}, vectors[i], plugins[i], None) for i in range(add_docs)])
        result["add_docs_per_s_batched_without_embedding"] = round(add_docs / (time.perf_counter() - started), 1)
        store.close()

        # search latency by collection size, one growing store
        store = PluginStore(root / "search", dim, plugin_shape, "bench", index_kind="flat", snapshot_every=10**9)
        have = 0
        for size in sorted(sizes):
            while have < size:
                n = min(batch, size - have)
                vecs = _unit(rng, n, dim)
                small = rng.standard_normal((n, *plugin_shape)).astype(np.float32)
                words = _zipf_words(rng, (n, 120))
                store.put_many([(f"s{have + i}", words[i], {}, vecs[i], small[i], None) for i in range(n)])
                have += n
            qs = _unit(rng, queries, dim)
            qtexts = _zipf_words(rng, (queries, 8), skip=len(STOPWORDS))  # a question's words less its stopwords
            label = f"{size // 1000}k" if size % 1000 == 0 else str(size)
            for name, weight in (("search", 0.0), ("search_lexical", lexical_weight)):
                store.search(qs[0], 3, qtexts[0], weight)  # warm-up
                times = []
                for q, text in zip(qs, qtexts, strict=True):
                    started = time.perf_counter()
                    store.search(q, 3, text, weight)
                    times.append((time.perf_counter() - started) * 1000)
                result[f"{name}_p50_ms_{label}"] = round(float(np.percentile(times, 50)), 3)
                result[f"{name}_p99_ms_{label}"] = round(float(np.percentile(times, 99)), 3)
            if size == 10_000 or size == max(sizes):
                store.snapshot()
                store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                result[f"bytes_per_document_{label}"] = round(_folder_bytes(root / "search") / size)
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def bench_retrieval(docs: Sequence[Document], weights: Sequence[float], k: int = 3) -> dict[str, Any]:
    """`kplug bench retrieval`: how often each question's own paragraph is retrieved first and within the top k,
    every paragraph of docs registered, for each lexical weight (cosine + weight * BM25); with search latency."""
    embedder = Embedder()
    vectors = embedder.embed([d.text for d in docs])
    questions = [(d.id, qa.question) for d in docs for qa in d.questions]
    queries = embedder.embed([q for _, q in questions])
    folder = Path(tempfile.mkdtemp(prefix="kplug-bench-retrieval-"))
    rows = []
    try:
        store = PluginStore(folder, embedder.dim, (1, 1), "bench")
        store.put_many([(d.id, d.text, {}, v, np.zeros((1, 1)), None) for d, v in zip(docs, vectors, strict=True)])
        for weight in weights:
            started = time.perf_counter()
            pairs = zip(queries, questions, strict=True)
            hits = [[i for i, _ in store.search(q, k, text, weight)] for q, (_, text) in pairs]
            ms = (time.perf_counter() - started) * 1000 / max(len(questions), 1)
            top1 = float(np.mean([h[:1] == [own] for h, (own, _) in zip(hits, questions, strict=True)]))
            topk = float(np.mean([own in h for h, (own, _) in zip(hits, questions, strict=True)]))
            rows.append({"lexical_weight": weight, "top1": top1, f"top{k}": topk, "search_ms": ms})
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"paragraphs": len(docs), "questions": len(questions), "k": k, "rows": rows}
