"""The plugin math, as pure functions: no modules, no I/O.

For one adapted linear module m with frozen weight W (out, in)::

    y  = W h + s * U (V h + z * (A h))            s = alpha / r, * elementwise
    dW = s * U (V + diag(z) A)                    the U(V + A*x) of the seed idea

    W (out, in)  frozen base weight            U (out, r)  shared up matrix, fitted once
    A (r, in)    the keys: random from a seed  V (r, in)   shared down matrix, fitted once
                 (or fitted with U, V)
    x_d (M, r)   document d's plugin           z (M, r)    a query's composition, sum_d w_d x_d

A core plugin (AdapterConfig.keys = k) replaces the diagonal by a full r x k matrix per module, so that a document
can send each key direction to any value direction (a linear key-value memory, not r fixed key-value pairs it can
only turn up or down)::

    y  = W h + s * U (V h + Z (A h) / sqrt(k))     Z (r, k): one module's row of z, viewed as a matrix
    A (k, in)    x_d, z (M, r * k)

The 1/sqrt(k) keeps the term's size for entries of a given size what the diagonal's is, so that fold-in's step
sizes carry over. The delta is linear in z either way, so composing plugins is a weighted sum of small vectors, and
B requests with B different compositions are one batched forward with Z of shape (B, M, P): no weight swap, no merge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def subspace(seed: int, module_index: int, rows: int, in_features: int) -> Tensor:
    """The random subspace A of one module (rows: r, or k for core plugins), from the adapter seed: fixed
    (regenerated, never stored), or the start of a learned key map."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + module_index)
    # N(0, 1/in) rows keep A h of order 1 for an RMS-normalised h
    return torch.randn(rows, in_features, generator=gen) / math.sqrt(in_features)  # (rows, in)


def plugin_term(keys: Tensor, z: Tensor, rank: int) -> Tensor:
    """z's share of the inner term for keys A h (B, T, k): z (B, r) modulates them elementwise (k = r), z (B, r * k)
    is a core, r x k per row, applied as Z (A h) / sqrt(k). -> (B, T, r)."""
    k = keys.shape[-1]
    if z.shape[-1] == rank and k == rank:
        return z[:, None, :] * keys  # (B, T, r)
    core = z.view(z.shape[0], rank, k)  # (B, r, k)
    return torch.einsum("btk,brk->btr", keys, core) / math.sqrt(k)  # (B, T, r)


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
    """The adapter's contribution s * U (V h + z * (A h)), or s * U (V h + Z (A h) / sqrt(k)) for core plugins.

    z is (B, r) (or (B, r * k), a core), one row per batch row, or None for z = 0; gate (B,) scales each row's whole
    delta, so a row with gate 0 is exactly the bare base model while its neighbours in the batch use plugins; shared
    (B,) scales only the shared term V h, so a row with shared 0 gets the plugins' term alone. V None is an adapter
    without the shared term (V = 0, not computed).
    """
    rank = U.shape[1]
    inner = h.new_zeros(*h.shape[:-1], rank) if V is None else h @ V.T  # (B, T, r)
    if shared is not None and V is not None:
        inner = inner * shared[:, None, None].to(h.dtype)
    if z is not None:
        inner = inner + plugin_term(h @ A.T, z.to(h.dtype), rank)  # (B, T, r)
    delta = scale * (inner @ U.T)  # (B, T, out)
    return delta if gate is None else delta * gate[:, None, None].to(h.dtype)


def modulated_forward(h: Tensor, W: Tensor, U: Tensor, V: Tensor, A: Tensor, z: Tensor | None, scale: float) -> Tensor:
    """y = W h + s * U (V h + z * (A h)) for h (B, T, in)."""
    return h @ W.T + low_rank_delta(h, U, V, A, z, scale)  # (B, T, out)


def delta_weight(U: Tensor, V: Tensor, A: Tensor, z: Tensor, scale: float) -> Tensor:
    """dW = s * U (V + diag(z) A) as a dense (out, in) matrix, for one module and one z of shape (r,); for a core z
    of shape (r * k,), dW = s * U (V + Z A / sqrt(k))."""
    r, k = U.shape[1], A.shape[0]
    if z.numel() == r and k == r:
        return scale * U @ (V + z[:, None] * A)  # (out, in)
    return scale * U @ (V + z.view(r, k) @ A / math.sqrt(k))  # (out, in)


def compose(plugins: Tensor, weights: Tensor) -> Tensor:
    """z = sum_d w_d x_d: plugins (K, M, P), weights (K,) -> (M, P)."""
    return torch.einsum("k,kmp->mp", weights.to(plugins.dtype), plugins)  # (M, P)


def retrieval_weights(scores: Tensor, temperature: float = 0.01) -> Tensor:
    """Composition weights from retrieval scores (K,): a softmax that sums to 1, so the shared UV counts once."""
    if scores.numel() == 0:
        return scores
    return torch.softmax(scores / temperature, dim=0)  # (K,)
