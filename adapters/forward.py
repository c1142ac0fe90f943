"""A causal LM's forward split at a layer, so that frozen lower layers run once and are cached.

Layers below the lowest adapted one do not depend on the plugin: fit and fold-in compute their output once per
example (``run_layers(..., 0, start)``) and every training step runs only ``start..n`` plus the head, on the
target positions alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.masking_utils import create_causal_mask

IGNORE = -100
# A Hugging Face causal LM of the Llama family (model.model.layers, rotary_emb, norm; lm_head): duck-typed.
CausalLM = Any


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids (B, T) that skip padding, for left or right padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class SharedPrefix:
    """Keys and values of a prompt prefix that every row of a batch starts with, recorded once per plugin row.

    The decoder layers' attention calls ``update`` (the one method of a Hugging Face Cache it uses): while
    recording, it keeps each layer's keys and values; afterwards it puts them before a batch's own, row i reading
    prefix row ``rows[i]``. Attention over [prefix; rest] is then exactly that of the whole sequence, without
    running the prefix once per row.
    """

    def __init__(self) -> None:
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.rows: Tensor | None = None  # None while recording

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.rows is None:
            self.kv[layer_idx] = (key, value)  # (P_rows, kv_heads, P, head_dim)
            return key, value
        k, v = self.kv[layer_idx]
        return torch.cat([k[self.rows], key], dim=2), torch.cat([v[self.rows], value], dim=2)


def run_layers(
    model: CausalLM,
    h: Tensor,
    attention_mask: Tensor,
    start: int,
    end: int,
    prefix: SharedPrefix | None = None,
    prefix_len: int = 0,
) -> Tensor:
    """Decoder layers [start, end) on hidden states h (B, T, d); returns (B, T, d).

    With a recorded prefix (``prefix.rows`` set), h continues it: positions start at ``prefix_len`` and every token
    also attends to the prefix. A prefix whose rows are None is recorded by this call.
    """
    inner = model.model
    pos = positions(attention_mask) + prefix_len  # (B, T)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=h,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=pos - prefix_len,
    )
    if prefix is not None and prefix.rows is not None:
        if mask is None:  # sdpa's causal shortcut: spell the mask out, it now has the prefix's columns too
            mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).tril()[None, None]
            mask = mask.expand(h.shape[0], 1, -1, -1)
        seen = torch.ones if mask.dtype == torch.bool else torch.zeros  # attend: True, or an additive 0
        mask = torch.cat([seen(*mask.shape[:3], prefix_len, dtype=mask.dtype, device=mask.device), mask], dim=-1)
    rope = inner.rotary_emb(h, position_ids=pos)  # (cos, sin), each (B, T, head_dim)
    for layer in inner.layers[start:end]:
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos, cache=prefix)
    return h


def embed(model: CausalLM, input_ids: Tensor) -> Tensor:
    return model.model.embed_tokens(input_ids)  # (B, T, d)


def top_hidden(
    model: CausalLM,
    h: Tensor,
    attention_mask: Tensor,
    start: int,
    prefix: SharedPrefix | None = None,
    prefix_len: int = 0,
) -> Tensor:
    """Layers start..n and the final norm on h (B, T, d): the states the LM head reads, (B, T, d)."""
    n = len(model.model.layers)
    return model.model.norm(run_layers(model, h, attention_mask, start, n, prefix, prefix_len))


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


def target_nll(model: CausalLM, h: Tensor, attention_mask: Tensor, labels: Tensor, start: int) -> Tensor:
    """Mean next-token NLL per row (B,) on labelled positions, running layers start..n from h (B, T, d)."""
    return label_nll(model, top_hidden(model, h, attention_mask, start), labels)
