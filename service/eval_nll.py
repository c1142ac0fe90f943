"""A fast probe of fold-in methods: the gold answers' NLL under a paragraph's own plugin, no plugin and another
article's plugin, on paragraphs of validation articles (never the evaluation articles). No generation, so a
method can be compared in minutes; `kplug eval squad` remains the benchmark."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.adapter import PluginAdapter
from adapters.base_model import load_base_model
from adapters.corpus import load_squad
from adapters.examples import qa_examples
from adapters.training import FoldInConfig, answer_nll, fold_in
from service.eval_squad import sample_paragraphs


@dataclass
class NllOptions:
    data: Path
    articles: list[int]
    adapter: Path
    fold_in: FoldInConfig
    max_paragraphs: int | None = 8
    seed: int = 0
    model: str = "smollm2"


def eval_nll(options: NllOptions, out: Path | None = None) -> dict[str, Any]:
    base = load_base_model(options.model)
    adapter = PluginAdapter.load(options.adapter, base)
    paragraphs = sample_paragraphs(
        load_squad(options.data, options.articles), options.articles, options.max_paragraphs, options.seed
    )
    started = time.perf_counter()
    # only the capacity diagnostic ("qa") may read the gold questions; every method gets the text alone
    capacity = options.fold_in.examples == "qa"
    inputs = list(paragraphs) if capacity else [p.text for p in paragraphs]
    results = fold_in(adapter, base.model, base.tokenizer, inputs, options.fold_in)
    seconds = (time.perf_counter() - started) / len(paragraphs)
    plugins = torch.tensor(np.stack([r.plugin for r in results]))  # (N, M, r)
    examples, own = [], []
    for i, p in enumerate(paragraphs):
        for ex in qa_examples(p):
            examples.append(ex)
            own.append(i)
    rng = random.Random(options.seed + 1)
    wrong = [
        rng.choice(
            [j for j, q in enumerate(paragraphs) if q.article != paragraphs[i].article] or [(i + 1) % len(paragraphs)]
        )
        for i in own
    ]
    own_t, wrong_t = torch.tensor(own), torch.tensor(wrong)
    nll = {
        name: answer_nll(adapter, base.model, base.tokenizer, examples, z)
        for name, z in (
            ("own", plugins[own_t]),
            ("zero", torch.zeros_like(plugins[own_t])),
            ("wrong", plugins[wrong_t]),
        )
    }
    report = {
        "nll": {k: round(float(v.mean()), 4) for k, v in nll.items()},
        "own_below_zero": round(float((nll["own"] < nll["zero"]).float().mean()), 3),
        "own_below_wrong": round(float((nll["own"] < nll["wrong"]).float().mean()), 3),
        "fold_in_seconds_per_doc": round(seconds, 2),
        "fold_in_loss": {"initial": _mean(r.initial_loss for r in results), "final": _mean(r.loss for r in results)},
        "questions": len(examples),
        "paragraphs": len(paragraphs),
        "config": {
            "data": str(options.data),
            "articles": options.articles,
            "adapter": str(options.adapter),
            "fold_in": options.fold_in.model_dump(),
            "max_paragraphs": options.max_paragraphs,
            "seed": options.seed,
            "model": options.model,
        },
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _mean(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None
