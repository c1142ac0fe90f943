"""The FAISS index: cosine search (inner product on unit vectors) under your own int64 ids, and its snapshot file.

A snapshot is derived data: a header (magic, the store sequence it reflects, a sha256 of the payload) and the
serialised index, written to a temp file, fsynced and renamed over the old one. A torn or corrupt file fails its
checksum on load and is rebuilt from the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from adapters.errors import StoreCorruptError

MAGIC = b"KPLUGIX1"
_HEADER = struct.Struct("<8sq32s")  # magic, store sequence, sha256 of the payload

IndexKind = Literal["flat", "ivf", "auto"]


class VectorIndex:
    """Exact (flat) or approximate (IVF) inner-product search with removable ids.

    "auto" stays exact up to ``ivf_threshold`` vectors; above it a rebuild trains an IVF index with about
    sqrt(N) lists and probes ``nprobe`` of them.
    """

    def __init__(self, dim: int, kind: IndexKind = "auto", ivf_threshold: int = 200_000, nprobe: int = 16) -> None:
        self.dim = dim
        self.kind = kind
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        # Any: faiss's partial stubs disagree with its SWIG API (remove_ids takes arrays, id_map exists)
        self.index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with these vectors, choosing the index type by size."""
        n = len(ids)
        approximate = self.kind == "ivf" or (self.kind == "auto" and n > self.ivf_threshold)
        if approximate and n >= 64:
            lists = max(8, int(np.sqrt(n)))
            quantizer = faiss.IndexFlatIP(self.dim)
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, lists, faiss.METRIC_INNER_PRODUCT)
            ivf.train(np.ascontiguousarray(vectors, dtype=np.float32))
            self.index = faiss.IndexIDMap2(ivf)
            self.set_nprobe(self.nprobe)
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if n:
            self.add(ids, vectors)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)  # (N, d)
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def vector(self, doc_id: int) -> np.ndarray:
        return np.asarray(self.index.reconstruct(int(doc_id)), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids, scores), each (Q, k') with k' = min(k, size); nothing for an empty index."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # (Q, d)
        k = min(k, len(self))
        if k <= 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.int64), empty.astype(np.float32)
        scores, ids = self.index.search(queries, k)  # (Q, k) each
        keep = ids[0] >= 0  # IVF may find fewer than k; FAISS pads with -1
        return ids[:, keep], scores[:, keep]

    # ---- snapshot -----------------------------------------------------------------------------------------

    def save(self, path: Path, sequence: int) -> None:
        payload = faiss.serialize_index(self.index).tobytes()
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, sequence, hashlib.sha256(payload).digest()))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def load(self, path: Path) -> int:
        """Load a snapshot; returns the store sequence it reflects. Raises StoreCorruptError on any damage."""
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            raise StoreCorruptError(f"{path}: truncated")
        magic, sequence, digest = _HEADER.unpack_from(data)
        payload = data[_HEADER.size :]
        if magic != MAGIC or hashlib.sha256(payload).digest() != digest:
            raise StoreCorruptError(f"{path}: bad header or checksum")
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        if index.d != self.dim:
            raise StoreCorruptError(f"{path}: dimension {index.d}, expected {self.dim}")
        self.index = index
        self.set_nprobe(self.nprobe)
        return int(sequence)

    def set_nprobe(self, nprobe: int) -> None:
        """How many IVF lists a search visits (no effect on an exact index)."""
        self.nprobe = nprobe
        with contextlib.suppress(RuntimeError):  # not an IVF index
            faiss.extract_index_ivf(self.index).nprobe = nprobe
