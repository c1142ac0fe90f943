"""The plugin store: SQLite (WAL) is the source of truth for documents, plugins and registration jobs; the FAISS
index is a snapshot derived from it.

Every document write (text + embedding + plugin + a change-log row) is one transaction, committed with
``synchronous=FULL`` before it is acknowledged. The change log numbers writes; the FAISS snapshot records the
number it reflects, so on open a stale snapshot is caught up from the log and a missing or corrupt one rebuilt.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import faiss
import numpy as np

from adapters.errors import ConflictError, InvalidInputError, NotFoundError, StoreCorruptError
from index import codec
from index.codec import PluginFormat
from index.vectors import IndexKind, VectorIndex

log = logging.getLogger(__name__)

DB_FILE = "store.sqlite3"
INDEX_FILE = "index.faiss"
# 3: the plugin format (index/codec.py) recorded in meta; 2: float16 plugins, no record; 1: float32. Both migrate
# on open. float16 by default: fold-in's x has |x| of order 1-10, where it keeps three significant digits.
SCHEMA_VERSION = 3
OnConflict = Literal["overwrite", "skip", "fail"]
# BM25's budget, in documents holding a query word, summed over its words (PluginStore._bm25): its time at 100k
# documents was about 1.1 ms per 1000 (README, "Index"); a query of 8 words loses none in under 625 documents.
MAX_POSTINGS = 5000
# left out of a query's BM25 match: they hold no content and match nearly every document
STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "how", "in", "is", "it"}
    | {"its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "what", "when", "where", "which", "who"}
    | {"whom", "why", "with"}
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    num INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS plugins (
    num INTEGER PRIMARY KEY REFERENCES documents(num) ON DELETE CASCADE,
    vector BLOB NOT NULL,  -- M x r in the store's plugin format
    norm REAL NOT NULL,
    adapter_id TEXT NOT NULL,
    loss REAL
);
-- the documents' words for BM25 (FTS5 over documents.text, kept in step by the triggers inside each write)
CREATE VIRTUAL TABLE IF NOT EXISTS lexicon USING fts5(text, content='documents', content_rowid='num');
-- each word's document count: BM25 reads only a query's rarest words (PluginStore._bm25)
CREATE VIRTUAL TABLE IF NOT EXISTS lexicon_words USING fts5vocab(lexicon, 'row');
CREATE TRIGGER IF NOT EXISTS lexicon_insert AFTER INSERT ON documents BEGIN
    INSERT INTO lexicon (rowid, text) VALUES (new.num, new.text);
END;
CREATE TRIGGER IF NOT EXISTS lexicon_delete AFTER DELETE ON documents BEGIN
    INSERT INTO lexicon (lexicon, rowid, text) VALUES ('delete', old.num, old.text);
END;
CREATE TRIGGER IF NOT EXISTS lexicon_update AFTER UPDATE OF text ON documents BEGIN
    INSERT INTO lexicon (lexicon, rowid, text) VALUES ('delete', old.num, old.text);
    INSERT INTO lexicon (rowid, text) VALUES (new.num, new.text);
END;
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, num INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL,
    request TEXT NOT NULL,
    results TEXT NOT NULL,
    error TEXT
);
"""


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class StoredDocument:
    id: str
    num: int
    text: str
    metadata: dict[str, Any]
    content_hash: str
    created_at: float
    updated_at: float
    plugin: np.ndarray | None  # (M, r) float32, decoded from the store's format
    norm: float | None
    adapter_id: str | None
    loss: float | None


@dataclass
class Job:
    id: str
    state: str  # queued | running | succeeded | failed
    created_at: float
    updated_at: float
    total: int
    done: int
    request: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class PluginStore:
    """Documents, plugins and jobs in SQLite, with the FAISS index kept in step. Safe to share across threads."""

    def __init__(
        self,
        folder: Path,
        dim: int,
        plugin_shape: tuple[int, int],
        adapter_id: str,
        index_kind: IndexKind = "auto",
        snapshot_every: int = 200,
        plugin_format: PluginFormat = "float16",  # for a new store; an existing one keeps the format it records
    ) -> None:
        self.folder = folder
        self.dim = dim
        self.plugin_shape = plugin_shape
        self.plugin_format = plugin_format
        self.adapter_id = adapter_id
        self.snapshot_every = snapshot_every
        self._lock = threading.RLock()
        folder.mkdir(parents=True, exist_ok=True)
        self._db = self._open_db(folder / DB_FILE)
        self._check_meta()
        self.index = VectorIndex(dim, index_kind)
        self._writes_since_snapshot = 0
        self._load_index()

    # ---- opening ------------------------------------------------------------------------------------------

    @staticmethod
    def _open_db(path: Path) -> sqlite3.Connection:
        existed = path.exists() and path.stat().st_size > 0
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            if existed:
                status = db.execute("PRAGMA quick_check").fetchone()[0]
                if status != "ok":
                    raise sqlite3.DatabaseError(status)
            had_lexicon = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'lexicon'").fetchone() is not None
            db.executescript(SCHEMA)
            if not had_lexicon:  # a store from before the lexicon: index the documents it already holds
                db.execute("INSERT INTO lexicon (lexicon) VALUES ('rebuild')")
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(
                f"{path} is not a readable SQLite store ({exc}); refusing to start on an empty store. "
                "Restore it from a backup or move it away to start afresh."
            ) from exc
        return db

    def _check_meta(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            with self._tx():
                for key, value in {
                    "schema_version": SCHEMA_VERSION,
                    "dim": self.dim,
                    "adapter_id": self.adapter_id,
                    "plugin_format": self.plugin_format,
                }.items():
                    self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, str(value)))
            return
        version, asked = int(meta["schema_version"]), self.plugin_format
        if version in (1, 2):
            self._migrate(version)
        elif version != SCHEMA_VERSION:
            raise StoreCorruptError(f"store schema {version}, this version reads {SCHEMA_VERSION}")
        else:
            recorded = meta["plugin_format"]
            if recorded not in codec.FORMATS:
                raise StoreCorruptError(f"store plugin format {recorded!r}, this version reads {codec.FORMATS}")
            self.plugin_format = cast(PluginFormat, recorded)
        if self.plugin_format != asked:
            log.warning("the store keeps plugins as %s; %s applies to new stores only", self.plugin_format, asked)
        if int(meta["dim"]) != self.dim:
            raise ConflictError(f"store embeddings have {meta['dim']} dimensions, the embedder gives {self.dim}")
        stale = self.stale_count()
        if stale:
            log.warning(
                "%d stored plugins belong to another adapter than %s; they are left out of compositions "
                "until re-registered (`kplug reregister` or POST /documents/reregister)",
                stale,
                self.adapter_id,
            )

    def _migrate(self, version: int) -> None:
        """Schema 1 or 2 -> 3, in one transaction (a crash leaves the old schema): float32 plugins (1) are rewritten
        as float16, and the format, float16, is recorded."""
        self.plugin_format = "float16"
        with self._tx():
            rows = self._db.execute("SELECT num, vector FROM plugins").fetchall() if version == 1 else []
            top = codec.MAX_VALUE["float16"]
            for num, blob in rows:
                # clip: a value beyond float16's range would become inf; none of fold-in's plugins comes near it
                half = codec.encode(np.clip(np.frombuffer(blob, dtype=np.float32), -top, top), "float16")
                self._db.execute(
                    "UPDATE plugins SET vector = ?, norm = ? WHERE num = ?",
                    (half, float(np.linalg.norm(codec.decode(half, "float16"))), num),
                )
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('plugin_format', 'float16')")
        log.info("store schema %d -> %d: %d plugins rewritten as float16", version, SCHEMA_VERSION, len(rows))

    @property
    def plugin_bytes(self) -> int:
        return self.plugin_shape[0] * self.plugin_shape[1] * codec.ITEMSIZE[self.plugin_format]

    def _encode(self, plugin: np.ndarray) -> bytes:
        return codec.encode(plugin, self.plugin_format)

    def _decode(self, blob: bytes) -> np.ndarray:
        return codec.decode(blob, self.plugin_format)

    def _load_index(self) -> None:
        path = self.folder / INDEX_FILE
        current = self.sequence()
        if not path.exists():
            log.info("no FAISS snapshot at %s: building it from SQLite", path)
            self.rebuild_index()
            return
        try:
            snap_seq = self.index.load(path)
        except (StoreCorruptError, RuntimeError) as exc:
            log.warning("FAISS snapshot unusable (%s): rebuilding it from SQLite", exc)
            self.rebuild_index()
            return
        if snap_seq > current:
            log.warning("FAISS snapshot is ahead of the store (%d > %d): rebuilding", snap_seq, current)
            self.rebuild_index()
            return
        if snap_seq < current:
            replayed = self._catch_up(snap_seq)
            log.info("FAISS snapshot at change %d, store at %d: caught up %d documents", snap_seq, current, replayed)
        if len(self.index) != self.count():
            log.warning("FAISS index holds %d vectors, store %d documents: rebuilding", len(self.index), self.count())
            self.rebuild_index()
        elif snap_seq < current:
            self.snapshot()

    def _catch_up(self, since: int) -> int:
        nums = [r[0] for r in self._db.execute("SELECT DISTINCT num FROM changes WHERE seq > ?", (since,))]
        rows = dict(
            self._db.execute(
                f"SELECT num, embedding FROM documents WHERE num IN ({','.join('?' * len(nums))})", nums
            ).fetchall()
        )
        self.index.remove(np.array(nums, dtype=np.int64))
        present = [n for n in nums if n in rows]
        if present:
            vectors = np.stack([np.frombuffer(rows[n], dtype=np.float32) for n in present])
            self.index.add(np.array(present, dtype=np.int64), vectors)
        return len(nums)

    def rebuild_index(self) -> None:
        with self._lock:
            rows = self._db.execute("SELECT num, embedding FROM documents ORDER BY num").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = (
                np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
                if rows
                else np.zeros((0, self.dim), np.float32)
            )
            self.index.build(ids, vectors)
            self.snapshot()

    def snapshot(self) -> None:
        """Write the FAISS snapshot atomically, stamped with the store sequence it reflects."""
        with self._lock:
            self.index.save(self.folder / INDEX_FILE, self.sequence())
            self._writes_since_snapshot = 0

    def close(self) -> None:
        with self._lock:
            if self._writes_since_snapshot:
                self.snapshot()
            self._db.close()

    # ---- transactions -------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def sequence(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def _after_write(self) -> None:
        self._writes_since_snapshot += 1
        if self._writes_since_snapshot >= self.snapshot_every:
            self.snapshot()

    # ---- documents ----------------------------------------------------------------------------------------

    def put(
        self,
        doc_id: str,
        text: str,
        metadata: dict[str, Any],
        embedding: np.ndarray,
        plugin: np.ndarray,
        loss: float | None = None,
        on_conflict: OnConflict = "overwrite",
    ) -> str:
        """Write one document with its embedding and plugin in one transaction; returns created/updated/skipped."""
        return self.put_many([(doc_id, text, metadata, embedding, plugin, loss)], on_conflict)[0]

    def put_many(
        self,
        documents: Sequence[tuple[str, str, dict[str, Any], np.ndarray, np.ndarray, float | None]],
        on_conflict: OnConflict = "overwrite",
    ) -> list[str]:
        """Write (id, text, metadata, embedding, plugin, loss) rows in one transaction: all of them or none."""
        rows = [self._checked(*doc) for doc in documents]
        now = time.time()
        statuses = []
        written: list[tuple[int, np.ndarray]] = []
        with self._lock:
            with self._tx():
                for doc_id, text, metadata, embedding, plugin, loss in rows:
                    row = self._db.execute("SELECT num FROM documents WHERE id = ?", (doc_id,)).fetchone()
                    if row is not None and on_conflict == "skip":
                        statuses.append("skipped")
                        continue
                    if row is not None and on_conflict == "fail":
                        raise ConflictError(f"document {doc_id!r} already exists")
                    doc = (text, json.dumps(metadata), content_hash(text), embedding.tobytes(), now)
                    if row is None:
                        cur = self._db.execute(
                            "INSERT INTO documents (id, text, metadata, content_hash, embedding, created_at, "
                            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (doc_id, *doc, now),
                        )
                        num = int(cur.lastrowid or 0)
                    else:
                        num = int(row[0])
                        self._db.execute(
                            "UPDATE documents SET text=?, metadata=?, content_hash=?, embedding=?, updated_at=? "
                            "WHERE num=?",
                            (*doc, num),
                        )
                    self._db.execute(
                        "INSERT OR REPLACE INTO plugins VALUES (?, ?, ?, ?, ?)",
                        (num, self._encode(plugin), float(np.linalg.norm(plugin)), self.adapter_id, loss),
                    )
                    self._db.execute("INSERT INTO changes (op, num) VALUES ('put', ?)", (num,))
                    statuses.append("created" if row is None else "updated")
                    written.append((num, embedding))
            # after the commit, before the lock is released: readers never see store and index disagree
            if written:
                nums = np.array([n for n, _ in written], dtype=np.int64)
                self.index.remove(nums)
                self.index.add(nums, np.stack([e for _, e in written]))
            self._after_write()
        return statuses

    def _checked(
        self, doc_id: str, text: str, metadata: dict[str, Any], embedding: np.ndarray, plugin: np.ndarray,
        loss: float | None,
    ) -> tuple[str, str, dict[str, Any], np.ndarray, np.ndarray, float | None]:  # fmt: skip
        if not text.strip():
            raise InvalidInputError(f"document {doc_id!r}: empty text")
        embedding = np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1)
        plugin = np.ascontiguousarray(plugin, dtype=np.float32)
        if embedding.shape != (self.dim,) or tuple(plugin.shape) != self.plugin_shape:
            raise InvalidInputError(
                f"document {doc_id!r}: embedding {embedding.shape} / plugin {plugin.shape}, "
                f"expected ({self.dim},) / {self.plugin_shape}"
            )
        if not (np.isfinite(embedding).all() and np.isfinite(plugin).all()):
            raise InvalidInputError(f"document {doc_id!r}: non-finite embedding or plugin")
        top = codec.MAX_VALUE[self.plugin_format]
        if np.abs(plugin).max(initial=0.0) > top:
            raise InvalidInputError(
                f"document {doc_id!r}: plugin values beyond the range of {self.plugin_format} ({top:g})"
            )
        # the norm is stored beside the vector: take both from the rounded values that are kept
        return doc_id, text, metadata, embedding, self._decode(self._encode(plugin)).reshape(plugin.shape), loss

    def delete(self, doc_id: str) -> None:
        with self._lock:
            with self._tx():
                row = self._db.execute("SELECT num FROM documents WHERE id = ?", (doc_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no document {doc_id!r}")
                self._db.execute("DELETE FROM documents WHERE num = ?", (row[0],))
                self._db.execute("INSERT INTO changes (op, num) VALUES ('delete', ?)", (row[0],))
            self.index.remove(np.array([row[0]]))
            self._after_write()

    def exists(self, doc_ids: Sequence[str]) -> set[str]:
        with self._lock:
            marks = ",".join("?" * len(doc_ids))
            return {r[0] for r in self._db.execute(f"SELECT id FROM documents WHERE id IN ({marks})", list(doc_ids))}

    def _documents(self, where: str, params: Sequence[Any]) -> list[StoredDocument]:
        rows = self._db.execute(
            "SELECT d.id, d.num, d.text, d.metadata, d.content_hash, d.created_at, d.updated_at, "
            f"p.vector, p.norm, p.adapter_id, p.loss FROM documents d LEFT JOIN plugins p ON p.num = d.num {where}",
            list(params),
        ).fetchall()
        return [
            StoredDocument(
                r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6],
                None if r[7] is None else self._decode(r[7]).reshape(self.plugin_shape),
                r[8], r[9], r[10],
            )
            for r in rows
        ]  # fmt: skip

    def get(self, doc_id: str) -> StoredDocument:
        with self._lock:
            docs = self._documents("WHERE d.id = ?", (doc_id,))
        if not docs:
            raise NotFoundError(f"no document {doc_id!r}")
        return docs[0]

    def page(self, offset: int = 0, limit: int = 50) -> list[StoredDocument]:
        with self._lock:
            return self._documents("ORDER BY d.num LIMIT ? OFFSET ?", (limit, offset))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def embedding(self, doc_id: str) -> np.ndarray:
        with self._lock:
            row = self._db.execute("SELECT embedding FROM documents WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no document {doc_id!r}")
        return np.frombuffer(row[0], dtype=np.float32)

    # ---- retrieval ----------------------------------------------------------------------------------------

    def search(
        self,
        query: np.ndarray,
        k: int,
        text: str = "",
        lexical_weight: float = 0.0,
        pool: int = 20,
        max_postings: int = MAX_POSTINGS,
    ) -> list[tuple[str, float]]:
        """Top-k documents, best first: (id, score). The score is the cosine of text embeddings, plus, with a query
        text and a lexical weight, that weight times the document's BM25 score for the query's words (the rarest of
        them, while the documents they are in add up to at most max_postings): the pool best by cosine and the pool
        best by BM25 are scored both ways, and the best k of them kept."""
        with self._lock:
            nums, scores = self.index.search(query[None], max(k, pool) if lexical_weight else k)
            dense = {int(n): float(s) for n, s in zip(nums[0], scores[0], strict=True)}
            lexical = self._bm25(text, pool, set(dense), max_postings) if lexical_weight and text else {}
            missing = [n for n in lexical if n not in dense]
            for num, blob in self._rows("SELECT num, embedding FROM documents WHERE num IN ({})", missing):
                dense[num] = float(np.frombuffer(blob, dtype=np.float32) @ query)
            names = dict(self._rows("SELECT num, id FROM documents WHERE num IN ({})", list(dense)))
        ranked = sorted(((s + lexical_weight * lexical.get(n, 0.0), n) for n, s in dense.items()), reverse=True)
        return [(names[n], score) for score, n in ranked if n in names][:k]

    def _rows(self, sql: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """sql's rows with its "IN ({})" filled by values (none when values is empty)."""
        return self._db.execute(sql.format(",".join("?" * len(values))), list(values)).fetchall() if values else []

    def _bm25(self, text: str, pool: int, also: set[int], max_postings: int) -> dict[int, float]:
        """BM25 (FTS5's, made positive: higher is better) of the pool best documents for text's words, and of the
        documents also named; documents without one of them score 0. FTS5 scores every document that holds a word
        of the query, so the words are taken rarest first while the documents they are in add up to at most
        max_postings: the commonest words, which cost the most time and add the least (their IDF is low), are left
        out in a large collection, and in a small one every word usually counts."""
        words = sorted({w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS})
        counts = dict(self._rows("SELECT term, doc FROM lexicon_words WHERE term IN ({})", words))
        kept, total = [], 0
        for word in sorted(words, key=lambda w: counts.get(w, 0)):
            total += counts.get(word, 0)
            if total > max_postings:
                break
            kept.append(word)
        if not kept:
            return {}
        match = " OR ".join(f'"{w}"' for w in kept)  # quoted: a word is never read as FTS5 syntax
        rows = self._db.execute("SELECT rowid, -bm25(lexicon) FROM lexicon WHERE lexicon MATCH ?", (match,)).fetchall()
        best = heapq.nlargest(pool, rows, key=lambda r: r[1])  # one scan for both: a second costs as much again
        return {int(n): float(s) for n, s in best + [r for r in rows if r[0] in also]}

    def plugins(self, doc_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Plugins of the current adapter for these ids (others are stale and left out)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT d.id, p.vector FROM documents d JOIN plugins p ON p.num = d.num "
                f"WHERE p.adapter_id = ? AND d.id IN ({','.join('?' * len(doc_ids))})",
                [self.adapter_id, *doc_ids],
            ).fetchall()
        return {r[0]: self._decode(r[1]).reshape(self.plugin_shape) for r in rows}

    # ---- plugin analytics ---------------------------------------------------------------------------------

    def _plugin_matrix(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            rows = self._db.execute(
                "SELECT d.id, p.vector FROM documents d JOIN plugins p ON p.num = d.num "
                "WHERE p.adapter_id = ? ORDER BY d.num",
                (self.adapter_id,),
            ).fetchall()
        ids = [r[0] for r in rows]
        size = self.plugin_shape[0] * self.plugin_shape[1]
        matrix = np.stack([self._decode(r[1]) for r in rows]) if rows else np.zeros((0, size), np.float32)
        return ids, matrix  # (N, M*r)

    def uniqueness(self, doc_id: str) -> tuple[float, float]:
        """|x_d| and its percentile among the collection's plugins (0-100)."""
        ids, matrix = self._plugin_matrix()
        if doc_id not in ids:
            raise NotFoundError(f"no plugin of the current adapter for {doc_id!r}")
        norms = np.linalg.norm(matrix, axis=1)
        mine = norms[ids.index(doc_id)]
        return float(mine), float(100.0 * (norms <= mine).mean())

    def similar(self, doc_id: str, k: int) -> list[tuple[str, float]]:
        """The k documents whose plugins have the highest cosine with this one's."""
        ids, matrix = self._plugin_matrix()
        if doc_id not in ids:
            raise NotFoundError(f"no plugin of the current adapter for {doc_id!r}")
        unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # (N, M*r)
        me = ids.index(doc_id)
        cos = unit @ unit[me]  # (N,)
        cos[me] = -np.inf
        order = np.argsort(-cos)[: max(0, min(k, len(ids) - 1))]
        return [(ids[i], float(cos[i])) for i in order]

    def clusters(self, n_clusters: int, seed: int = 0) -> dict[str, int]:
        """k-means of the plugin directions: document id -> cluster number."""
        ids, matrix = self._plugin_matrix()
        if not 1 <= n_clusters <= len(ids):
            raise InvalidInputError(f"{n_clusters} clusters for {len(ids)} plugins")
        unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        kmeans = faiss.Kmeans(unit.shape[1], n_clusters, niter=25, seed=seed, spherical=True)
        kmeans.train(np.ascontiguousarray(unit))
        _, labels = kmeans.index.search(np.ascontiguousarray(unit), 1)
        return {i: int(c) for i, c in zip(ids, labels[:, 0], strict=True)}

    def stale_count(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM documents d LEFT JOIN plugins p ON p.num = d.num "
                "WHERE p.adapter_id IS NULL OR p.adapter_id != ?",
                (self.adapter_id,),
            ).fetchone()
        return int(row[0])

    def stale_ids(self) -> list[str]:
        """Documents whose plugin belongs to another adapter: fold them in again to use them."""
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT d.id FROM documents d LEFT JOIN plugins p ON p.num = d.num "
                    "WHERE p.adapter_id IS NULL OR p.adapter_id != ? ORDER BY d.num",
                    (self.adapter_id,),
                )
            ]

    # ---- registration jobs --------------------------------------------------------------------------------

    def create_job(self, job_id: str, request: dict[str, Any], total: int) -> Job:
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT INTO jobs VALUES (?, 'queued', ?, ?, ?, 0, ?, '[]', NULL)",
                (job_id, now, now, total, json.dumps(request)),
            )
        return self.get_job(job_id)

    def update_job(
        self,
        job_id: str,
        state: str | None = None,
        results: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> None:
        with self._tx():
            if state is not None:
                self._db.execute("UPDATE jobs SET state=? WHERE id=?", (state, job_id))
            if results is not None:
                self._db.execute(
                    "UPDATE jobs SET results=?, done=? WHERE id=?", (json.dumps(results), len(results), job_id)
                )
            if error is not None:
                self._db.execute("UPDATE jobs SET error=? WHERE id=?", (error, job_id))
            self._db.execute("UPDATE jobs SET updated_at=? WHERE id=?", (time.time(), job_id))

    def get_job(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}")
        return Job(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), json.loads(row[7]), row[8])

    def unfinished_jobs(self) -> list[Job]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
        return [self.get_job(i) for i in ids]

    def job_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
