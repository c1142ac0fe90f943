"""The adapter a fresh install uses: fitted on SQuAD articles 0-23 and shipped in the package (`make default-adapter`
rebuilds it reproducibly)."""

from __future__ import annotations

from pathlib import Path

from adapters.adapter import CONFIG_FILE
from adapters.errors import CheckpointError

DEFAULT_ADAPTER_DIR = Path(__file__).parent / "default"


def default_adapter_dir() -> Path:
    if not (DEFAULT_ADAPTER_DIR / CONFIG_FILE).exists():
        raise CheckpointError(f"the default adapter is missing from {DEFAULT_ADAPTER_DIR}: run `make default-adapter`")
    return DEFAULT_ADAPTER_DIR
