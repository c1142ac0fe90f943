"""Text embedding, the FAISS index and the SQLite plugin store."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
