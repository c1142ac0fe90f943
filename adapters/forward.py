"""A causal LM's forward split at a layer, so that frozen lower layers run once and are cached.

Layers below the lowest adapted one do not depend on the plugin: fit and fold-in compute their output once per
example (``run_layers(..., 0, start)``) and every training step runs only ``start..n`` plus the head, on the
target positions alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.masking_utils import create_causal_mask

IGNORE = -100
# A Hugging Face causal LM of the Llama family (model.model.layers, rotary_emb, norm; lm_head): duck-typed.
CausalLM = Any
# One decoder layer's forward: (layer, h, mask, (cos, sin), position ids) -> h
LayerCall = Callable[[Any, Tensor, Any, tuple[Tensor, Tensor], Tensor], Tensor]


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids (B, T) that skip padding, for left or right padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def call_layer(layer: Any, h: Tensor, mask: Any, rope: tuple[Tensor, Tensor], pos: Tensor) -> Tensor:
    """One decoder layer on h (B, T, d): the unit that fold-in and fit may compile (training.compiled_layer)."""
    return layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)


def run_layers(
    model: CausalLM, h: Tensor, attention_mask: Tensor, start: int, end: int, call: LayerCall = call_layer
) -> Tensor:
    """Decoder layers [start, end) on hidden states h (B, T, d), each through call; returns (B, T, d)."""
    inner = model.model
    pos = positions(attention_mask)  # (B, T)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=h, attention_mask=attention_mask, past_key_values=None, position_ids=pos
    )
    rope = inner.rotary_emb(h, position_ids=pos)  # (cos, sin), each (B, T, head_dim)
    for layer in inner.layers[start:end]:
        h = call(layer, h, mask, rope, pos)
    return h


def embed(model: CausalLM, input_ids: Tensor) -> Tensor:
    return model.model.embed_tokens(input_ids)  # (B, T, d)


def top_hidden(model: CausalLM, h: Tensor, attention_mask: Tensor, start: int, call: LayerCall = call_layer) -> Tensor:
    """Layers start..n and the final norm on h (B, T, d): the states the LM head reads, (B, T, d)."""
    return model.model.norm(run_layers(model, h, attention_mask, start, len(model.model.layers), call))


def row_mean(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Mean of values (N,) per row index (N,) -> (n_rows,); rows without values get 0."""
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return total / torch.bincount(rows, minlength=n_rows).clamp(min=1)


def label_nll(model: CausalLM, out: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token NLL per row (B,) on labelled positions of top states out (B, T, d)."""
    targets = labels[:, 1:]  # (B, T-1)
    chosen = targets != IGNORE  # (B, T-1)
    logits = model.lm_head(out[:, :-1][chosen])  # (N, V): the head only where there is a target
    token_nll = F.cross_entropy(logits.float(), targets[chosen], reduction="none")  # (N,)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[chosen]  # (N,)
    return row_mean(token_nll, rows, labels.shape[0])


def target_nll(
    model: CausalLM, h: Tensor, attention_mask: Tensor, labels: Tensor, start: int, call: LayerCall = call_layer
) -> Tensor:
    """Mean next-token NLL per row (B,) on labelled positions, running layers start..n from h (B, T, d)."""
    return label_nll(model, top_hidden(model, h, attention_mask, start, call), labels)
