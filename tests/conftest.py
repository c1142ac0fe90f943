"""Shared fixtures: the tiny model for fast tests, the real SmolLM2 for the slow path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import BaseModel, load_base_model, tiny_model

torch.manual_seed(0)


@pytest.fixture
def tiny() -> BaseModel:
    return tiny_model(seed=0)


@pytest.fixture
def tiny_adapter(tiny: BaseModel) -> PluginAdapter:
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, alpha=8.0, targets=["q", "v", "o", "up", "down"], seed=3))
    with torch.no_grad():  # a "fitted" adapter: V != 0 so that UV is part of every output
        for m in adapter.plugin_modules:
            m.V.normal_(0, 0.05)
    return adapter


@pytest.fixture(scope="session")
def smollm2() -> Iterator[BaseModel]:
    yield load_base_model()
