"""`kplug bench adapter` end to end on the tiny model: every figure it reports is measured and consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import TINY_MODEL, tiny_model
from adapters.bench import bench_adapter
from adapters.encoder import EncoderConfig
from adapters.qgen import QuestionWriter
from adapters.spans import SHAPE, SpanSelector


def test_bench_adapter_times_decoding_and_every_fold_in(tmp_path: Path) -> None:
    config = AdapterConfig(rank=4, targets=["o", "down"], layers=[-2, -1], encoder=EncoderConfig(layer=1, hidden=16))
    PluginAdapter(tiny_model(), config).save(tmp_path / "adapter")
    result = bench_adapter(tmp_path / "adapter", TINY_MODEL, new_tokens=4, repeats=1, refine_repeats=1)
    assert result["base_tokens_per_s"] > 0 and result["plugin_tokens_per_s"] > 0
    # the ratio of the unrounded rates: within rounding of the ratio of the reported ones
    assert result["ratio"] == pytest.approx(result["plugin_tokens_per_s"] / result["base_tokens_per_s"], abs=2e-3)
    now, before = result["refined_fold_in_seconds"], result["refined_fold_in_seconds_before"]
    assert now > 0 and before > 0
    assert abs(result["refined_fold_in_speedup"] - before / now) < 0.01 * before / now + 1e-3
    compiled = result["refined_fold_in_seconds_compiled"]
    assert (
        compiled > 0 and abs(result["refined_fold_in_compiled_speedup"] - now / compiled) < 0.01 * now / compiled + 1e-3
    )
    assert result["refined_fold_in_first_compiled_seconds"] > 0
    assert result["bytes_per_plugin"] == 4 * 4 * 2  # 2 layers x (o, down) = 4 modules, rank 4, float16 at rest
    assert result["plugin_shape"] == [4, 4] and result["fold_in_document_words"] == 159
    assert "selected_written_seconds_per_doc" not in result  # no writer or selector beside this adapter


def test_bench_adapter_times_a_second_adapter_alternately(tmp_path: Path) -> None:
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, layers=[-1])).save(tmp_path / "diagonal")
    base = tiny_model()
    PluginAdapter(base, AdapterConfig(rank=2, keys=4, layers=[-1])).save(tmp_path / "core")
    # a writer and a selector beside it: the selected spans' written questions are timed too
    QuestionWriter(base.model, rank=2, alpha=4.0).save(tmp_path / "core")
    width = base.model.config.hidden_size + SHAPE
    SpanSelector(torch.zeros(width), torch.zeros(1), torch.zeros(width), torch.ones(width)).save(tmp_path / "core")
    result = bench_adapter(
        tmp_path / "core", TINY_MODEL, new_tokens=2, repeats=1, refine_repeats=1, against=tmp_path / "diagonal"
    )
    seconds = result["against_refined_fold_in_seconds"]
    assert result["against"] == str(tmp_path / "diagonal") and seconds > 0
    ratio = result["refined_fold_in_seconds"] / seconds
    assert abs(result["refined_fold_in_ratio_to_against"] - ratio) < 0.01 * ratio + 1e-3
    assert result["plugin_shape"] == [2, 8]  # o and down of one layer, each a 2 x 4 core
    together, alone = result["selected_written_seconds_per_doc"], result["selected_written_seconds_per_doc_alone"]
    assert together > 0 and alone > 0
    # the tiny model asks in milliseconds: the ratio of the unrounded times, within the rounding of the reported ones
    low, high = (alone - 5e-4) / (together + 5e-4), (alone + 5e-4) / max(together - 5e-4, 1e-9)
    assert low - 1e-3 <= result["selected_written_batching_speedup"] <= high + 1e-3
