"""Reference batched greedy decoding with one composition per row. The service's engine must match it."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from adapters.forward import CausalLM

if TYPE_CHECKING:  # the adapter module loads the question writer, which generates with this
    from adapters.adapter import PluginAdapter


def greedy_generate(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    adapter: PluginAdapter | None,
    prompts: Sequence[str],
    z: Tensor | None,
    max_new_tokens: int,
    stop_at_eos: bool = True,
    gate: Tensor | None = None,
) -> list[str]:
    """Greedy continuations of chat prompts; z (B, M, r) gives row b its own plugin composition (None: z = 0),
    gate (B,) scales each row's delta (0: the bare base model)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), adapter.use(z, gate) if adapter is not None else nullcontext():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id if stop_at_eos else None,
            min_new_tokens=0 if stop_at_eos else max_new_tokens,
        )  # (B, T + new)
    new = out[:, batch["input_ids"].shape[1] :]  # (B, new)
    return [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in new]
