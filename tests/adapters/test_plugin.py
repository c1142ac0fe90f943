"""The plugin math: the layer equals its dense weight, composition is linear, batching is per row."""

from __future__ import annotations

import torch
from torch import nn

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import BaseModel, tiny_model
from adapters.corpus import parse_range
from adapters.plugin import compose, delta_weight, low_rank_delta, modulated_forward, retrieval_weights, subspace
from index import codec


def _module(out_f: int = 12, in_f: int = 10, r: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(out_f, in_f, generator=g)
    U = torch.randn(out_f, r, generator=g)
    V = torch.randn(r, in_f, generator=g)
    A = subspace(7, 0, r, in_f)
    return W, U, V, A


def test_layer_output_equals_dense_weight() -> None:
    W, U, V, A = _module()
    h = torch.randn(2, 5, 10)  # (B, T, in)
    z = torch.randn(2, 3)  # (B, r)
    y = modulated_forward(h, W, U, V, A, z, scale=0.5)
    for b in range(2):
        dense = W + delta_weight(U, V, A, z[b], 0.5)
        torch.testing.assert_close(y[b], h[b] @ dense.T)


def test_subspace_regenerates_from_seed() -> None:
    assert torch.equal(subspace(5, 2, 4, 8), subspace(5, 2, 4, 8))
    assert not torch.equal(subspace(5, 2, 4, 8), subspace(6, 2, 4, 8))
    assert not torch.equal(subspace(5, 2, 4, 8), subspace(5, 3, 4, 8))


def test_composition_with_unit_weights_is_weighted_sum_of_single_deltas() -> None:
    _, U, V, A = _module()
    plugins = torch.randn(4, 1, 3)  # (K, M, r)
    weights = retrieval_weights(torch.tensor([0.9, 0.5, 0.7, 0.1]))
    assert abs(float(weights.sum()) - 1) < 1e-6
    z = compose(plugins, weights)[0]
    combined = delta_weight(U, V, A, z, 2.0)
    singles = sum(w * delta_weight(U, V, A, x[0], 2.0) for w, x in zip(weights, plugins, strict=True))
    torch.testing.assert_close(combined, singles)


def test_zero_composition_is_base_plus_uv() -> None:
    W, U, V, A = _module()
    h = torch.randn(1, 4, 10)
    expected = h @ (W + 1.5 * U @ V).T
    torch.testing.assert_close(modulated_forward(h, W, U, V, A, torch.zeros(1, 3), 1.5), expected)
    torch.testing.assert_close(modulated_forward(h, W, U, V, A, None, 1.5), expected)
    torch.testing.assert_close(low_rank_delta(h, U, V, A, None, 1.5), h @ (1.5 * U @ V).T)


def test_wrapped_module_matches_dense_weight_in_a_model(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    module = tiny_adapter.plugin_modules[2]
    h = torch.randn(1, 3, module.base.in_features)
    x = torch.randn(1, *tiny_adapter.plugin_shape)
    with tiny_adapter.use(x):
        y = module(h)
    dense = module.base.weight + delta_weight(module.U, module.V, module.A, x[0, int(module.slot)], module.scale)
    torch.testing.assert_close(y, h @ dense.T)


def test_batch_of_compositions_equals_single_forwards(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    ids = torch.randint(3, 200, (4, 9))
    z = torch.randn(4, *tiny_adapter.plugin_shape)  # (B, M, r): a different composition per row
    with torch.no_grad(), tiny_adapter.use(z):
        batched = tiny.model(ids).logits
    for b in range(4):
        with torch.no_grad(), tiny_adapter.use(z[b : b + 1]):
            single = tiny.model(ids[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # the rows really differ


def test_composition_changes_logits_and_none_restores(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    ids = torch.randint(3, 200, (1, 6))
    with torch.no_grad():
        before = tiny.model(ids).logits
        with tiny_adapter.use(torch.randn(*tiny_adapter.plugin_shape) * 5):
            during = tiny.model(ids).logits
        after = tiny.model(ids).logits
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after)


def test_attaching_keeps_base_linear_objects(tiny: BaseModel) -> None:
    original = tiny.model.model.layers[0].self_attn.q_proj
    assert isinstance(original, nn.Linear)
    adapter = PluginAdapter(tiny, AdapterConfig(rank=2, targets=["q"], layers=[0, -1]))
    assert adapter.plugin_modules[0].base is original
    assert adapter.module_names == ["layers.0.self_attn.q_proj", "layers.3.self_attn.q_proj"]


def test_two_layer_ranges_adapt_both_and_size_the_plugin() -> None:
    """`--layers 1-2,4-5` (as `8-15,22-29` on the real model): every module of both ranges, none between, and the
    plugin's bytes count them all; fit and fold-in cache the frozen states below the lowest adapted layer."""
    config = AdapterConfig(rank=3, targets=["o", "down"], layers=parse_range("1-2,4-5"))
    adapter = PluginAdapter(tiny_model(layers=6), config)
    assert adapter.layer_ids == [1, 2, 4, 5]
    assert [n.split(".")[1] for n in adapter.module_names] == ["1", "1", "2", "2", "4", "4", "5", "5"]
    assert adapter.plugin_shape == (8, 3) and adapter.plugin_bytes == 8 * 3 * codec.ITEMSIZE["float16"] == 48
    assert adapter.lowest_layer == 1


def test_gate_zero_rows_are_the_bare_model(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        bare = tiny.model(ids).logits  # the adapter is attached: z = None still applies UV
        z = torch.randn(2, *tiny_adapter.plugin_shape)
        with tiny_adapter.use(z, gate=torch.tensor([0.0, 1.0])):
            mixed = tiny.model(ids).logits
        with tiny_adapter.use(None, gate=torch.zeros(2)):
            off = tiny.model(ids).logits
        with tiny_adapter.use(z[1:]):
            plugged = tiny.model(ids[1:]).logits
    for module in tiny_adapter.plugin_modules:  # the bare reference, with every delta removed by hand
        module.U.data.zero_()
    with torch.no_grad():
        reference = tiny.model(ids).logits
    assert not torch.allclose(bare, reference)
    torch.testing.assert_close(off, reference)
    torch.testing.assert_close(mixed[0], reference[0])
    torch.testing.assert_close(mixed[1:], plugged, atol=1e-5, rtol=1e-4)


def test_shared_zero_rows_get_the_plugins_term_alone(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    """shared (B,) weights the shared term V h per row: 0 leaves W h + s U (z * (A h)), as if V were zero."""
    ids = torch.randint(3, 200, (2, 6))
    z = torch.randn(2, *tiny_adapter.plugin_shape)
    with torch.no_grad():
        with tiny_adapter.use(z, shared=torch.tensor([0.0, 1.0])):
            mixed = tiny.model(ids).logits
        with tiny_adapter.use(z):
            full = tiny.model(ids).logits
        for module in tiny_adapter.plugin_modules:
            module.V.data.zero_()
        with tiny_adapter.use(z):
            plugin_term = tiny.model(ids).logits
    assert not torch.allclose(full[0], plugin_term[0])  # V h is part of a full row's output
    torch.testing.assert_close(mixed[0], plugin_term[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], full[1], atol=1e-5, rtol=1e-4)


def test_core_plugin_layer_equals_dense_weight_and_composes_linearly() -> None:
    """A core plugin (r x k per module, AdapterConfig.keys) is still a weight delta s U (V + Z A / sqrt(k)), linear in
    z: a composition's delta is the weighted sum of its plugins' deltas."""
    W, U, V, _ = _module(r=3)
    A = subspace(7, 0, 5, 10)  # (k, in): five keys for a rank-3 module
    h = torch.randn(2, 4, 10)  # (B, T, in)
    z = torch.randn(2, 15)  # (B, r * k)
    y = modulated_forward(h, W, U, V, A, z, scale=0.5)
    for b in range(2):
        core = z[b].view(3, 5)  # (r, k)
        dense = W + 0.5 * U @ (V + core @ A / 5**0.5)
        torch.testing.assert_close(y[b], h[b] @ dense.T)
        torch.testing.assert_close(delta_weight(U, V, A, z[b], 0.5), dense - W)
    weights = torch.tensor([0.25, 0.75])
    composed = compose(z[:, None], weights)[0]  # (r * k,)
    singles = sum(w * delta_weight(U, V, A, x, 0.5) for w, x in zip(weights, z, strict=True))
    torch.testing.assert_close(delta_weight(U, V, A, composed, 0.5), singles)


def test_core_adapter_sizes_its_plugin_and_batches_per_row(tiny: BaseModel) -> None:
    config = AdapterConfig(rank=2, keys=3, targets=["o", "down"], layers=[1, 2])
    adapter = PluginAdapter(tiny, config)
    assert adapter.plugin_shape == (4, 6) and adapter.plugin_bytes == 4 * 6 * codec.ITEMSIZE["float16"]
    assert tuple(adapter.plugin_modules[0].A.shape) == (3, adapter.plugin_modules[0].base.in_features)
    for module in adapter.plugin_modules:  # V = 0 at init: give the shared term a value so that it is exercised
        assert module.V is not None
        module.V.data.normal_(0, 0.05)
    ids = torch.randint(3, 200, (2, 7))
    z = torch.randn(2, *adapter.plugin_shape)
    with torch.no_grad():
        with adapter.use(z):
            batched = tiny.model(ids).logits
        with adapter.use(z[1:]):
            single = tiny.model(ids[1:]).logits
        with adapter.use(None):
            plain = tiny.model(ids).logits
    torch.testing.assert_close(batched[1:], single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched, plain)
