"""Plugin math, attaching it to a causal LM, fit and fold-in, checkpoints."""

import os

# Models come from local files and packages only; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
