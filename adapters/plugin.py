"""The plugin math, as pure functions: no modules, no I/O.

For one adapted linear module m with frozen weight W (out, in)::

    y  = W h + s * U (V h + z * (A h))            s = alpha / r, * elementwise
    dW = s * U (V + diag(z) A)                    the U(V + A*x) of the seed idea

    W (out, in)  frozen base weight            U (out, r)  shared up matrix, fitted once
    A (r, in)    the keys: random from a seed  V (r, in)   shared down matrix, fitted once
                 (or fitted with U, V)
    x_d (M, r)   document d's plugin           z (M, r)    a query's composition, sum_d w_d x_d

The delta is linear in z, so composing plugins is a weighted sum of small vectors, and B requests with B
different compositions are one batched forward with Z of shape (B, M, r): no weight swap, no merge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def subspace(seed: int, module_index: int, rank: int, in_features: int) -> Tensor:
    """The random subspace A of one module, from the adapter seed: fixed (regenerated, never stored), or the start
    of a learned key map."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + module_index)
    # N(0, 1/in) rows keep A h of order 1 for an RMS-normalised h
    return torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)  # (r, in)


def low_rank_delta(
    h: Tensor,
    U: Tensor,
    V: Tensor | None,
    A: Tensor,
    z: Tensor | None,
    scale: float,
    gate: Tensor | None = None,
    shared: Tensor | None = None,
) -> Tensor:
    """The adapter's contribution s * U (V h + z * (A h)).

    z is (B, r), one row per batch row, or None for z = 0; gate (B,) scales each row's whole delta, so a row with
    gate 0 is exactly the bare base model while its neighbours in the batch use plugins; shared (B,) scales only
    the shared term V h, so a row with shared 0 gets the plugins' term s U (z * (A h)) alone. V None is an adapter
    without the shared term (V = 0, not computed).
    """
    inner = h.new_zeros(*h.shape[:-1], A.shape[0]) if V is None else h @ V.T  # (B, T, r)
    if shared is not None and V is not None:
        inner = inner * shared[:, None, None].to(h.dtype)
    if z is not None:
        inner = inner + z[:, None, :].to(h.dtype) * (h @ A.T)  # (B, T, r)
    delta = scale * (inner @ U.T)  # (B, T, out)
    return delta if gate is None else delta * gate[:, None, None].to(h.dtype)


def modulated_forward(h: Tensor, W: Tensor, U: Tensor, V: Tensor, A: Tensor, z: Tensor | None, scale: float) -> Tensor:
    """y = W h + s * U (V h + z * (A h)) for h (B, T, in)."""
    return h @ W.T + low_rank_delta(h, U, V, A, z, scale)  # (B, T, out)


def delta_weight(U: Tensor, V: Tensor, A: Tensor, z: Tensor, scale: float) -> Tensor:
    """dW = s * U (V + diag(z) A) as a dense (out, in) matrix, for one module and one z of shape (r,)."""
    return scale * U @ (V + z[:, None] * A)  # (out, in)


def compose(plugins: Tensor, weights: Tensor) -> Tensor:
    """z = sum_d w_d x_d: plugins (K, M, r), weights (K,) -> (M, r)."""
    return torch.einsum("k,kmr->mr", weights.to(plugins.dtype), plugins)  # (M, r)


def retrieval_weights(scores: Tensor, temperature: float = 0.01) -> Tensor:
    """Composition weights from retrieval scores (K,): a softmax that sums to 1, so the shared UV counts once."""
    if scores.numel() == 0:
        return scores
    return torch.softmax(scores / temperature, dim=0)  # (K,)
