"""The amortised plugin encoder: document text -> x_d (M, r) in one forward pass, no gradient steps.

It reads the frozen base model's hidden states of the document at a low layer (run only up to that layer),
maps every token through a small MLP and pools over tokens::

    f_t = [h_t^(L); e_t]                  (T, 2d)   layer-L state and input embedding of token t
    x_d = reshape(mean_t MLP(f_t))        (M, r)

Fitted jointly with U, V on the fitting corpus, so that U, V learn to read what the encoder writes. The output
layer starts at zero: a new encoder yields x = 0, the bare base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field
from torch import Tensor, nn

if TYPE_CHECKING:
    from adapters.base_model import BaseModel
    from adapters.forward import CausalLM


class EncoderConfig(Schema):
    model_config = ConfigDict(extra="forbid")

    layer: int = Field(8, ge=0)  # hidden states after this many decoder layers
    hidden: int = Field(512, ge=1)
    max_tokens: int = Field(512, ge=8)


class PluginEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, base: BaseModel, plugin_shape: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.plugin_shape = plugin_shape
        d = base.model.config.hidden_size
        m, r = plugin_shape
        self.mlp = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, config.hidden), nn.GELU())
        self.out = nn.Linear(config.hidden, m * r)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def trainable_state(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def load_trainable_state(self, tensors: dict[str, Tensor]) -> None:
        self.load_state_dict(tensors)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """features (B, T, 2d) from ``token_features``, mask (B, T) of real tokens -> plugins (B, M, r)."""
        per_token = self.out(self.mlp(features))  # (B, T, M*r)
        weights = mask.to(per_token.dtype)[..., None]  # (B, T, 1)
        pooled = (per_token * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, M*r)
        return pooled.view(-1, *self.plugin_shape)  # (B, M, r)


def token_features(model: CausalLM, layer: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[h^(layer); embedding] per token (B, T, 2d), running only the first `layer` decoder layers, no plugin."""
    from adapters.forward import run_layers

    with torch.no_grad():
        emb = model.model.embed_tokens(input_ids)  # (B, T, d)
        h = run_layers(model, emb, attention_mask, 0, layer)  # (B, T, d)
    return torch.cat([h, emb], dim=-1)  # (B, T, 2d)
