"""Fit and fold-in: they learn what they should and nothing else; checkpoints round-trip."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters import training
from adapters.adapter import AdapterConfig, PluginAdapter, read_checkpoint_meta
from adapters.base_model import BaseModel, tiny_model
from adapters.corpus import QA, Document
from adapters.encoder import EncoderConfig
from adapters.errors import CheckpointError, InvalidInputError
from adapters.examples import ANSWER_END, Example
from adapters.generation import greedy_generate
from adapters.prompts import chat_prompt
from adapters.training import (
    FitConfig,
    FoldInConfig,
    FoldInResult,
    build_examples,
    covered_examples,
    fit,
    fold_in,
    resolved_precision,
    step_precision,
)

TEXT = "The Eiffel Tower in Paris was completed in 1889 by Gustave Eiffel for the World Fair."
TEXTS = [TEXT, "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911."]


def _base_weights(base: BaseModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in base.model.state_dict().items() if ".U" not in k and ".V" not in k}


def _shared(adapter: PluginAdapter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter.shared_parameters()]


def test_fold_in_lowers_loss_and_leaves_shared_and_base_untouched(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    base_before, shared_before = _base_weights(tiny), _shared(tiny_adapter)
    [result] = fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [TEXT], FoldInConfig(steps=15, lr=0.3))
    assert result.loss < result.initial_loss - 0.05
    assert result.plugin.shape == tiny_adapter.plugin_shape and result.plugin.dtype == "float32"
    assert float(abs(result.plugin).sum()) > 0
    for before, after in zip(shared_before, tiny_adapter.shared_parameters(), strict=True):
        assert torch.equal(before, after)
    for name, tensor in tiny.model.state_dict().items():
        if name in base_before:
            assert torch.equal(base_before[name], tensor), name


def test_fold_in_rejects_empty_text(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    with pytest.raises(InvalidInputError):
        fold_in(tiny_adapter, tiny.model, tiny.tokenizer, ["   "], FoldInConfig(steps=1))


def test_fold_in_of_several_documents_equals_one_at_a_time(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    together = fold_in(
        tiny_adapter, tiny.model, tiny.tokenizer, TEXTS, FoldInConfig(steps=5, lr=0.2, precision="float32")
    )
    for text, joint in zip(TEXTS, together, strict=True):
        [alone] = fold_in(
            tiny_adapter, tiny.model, tiny.tokenizer, [text], FoldInConfig(steps=5, lr=0.2, precision="float32")
        )
        assert abs(alone.loss - joint.loss) < 1e-3


def test_normalized_fold_in_lowers_loss_with_one_rms_step_per_document(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    config = FoldInConfig(steps=1, lr=0.3, l2=0.0, precision="float32", optimizer="normalized")
    together = fold_in(tiny_adapter, tiny.model, tiny.tokenizer, TEXTS, config)
    for text, joint in zip(TEXTS, together, strict=True):
        # x0 = 0 without an encoder: one step moves each plugin by exactly rms lr, whatever the other document's
        # gradient (Adam's first step would be about lr on every coordinate instead)
        assert tiny_adapter.encoder is None
        assert abs(float((joint.plugin**2).mean()) ** 0.5 - 0.3) < 1e-4
        assert float(abs(joint.plugin).max()) > 0.3 * 1.5  # spread as the gradient is, not as its sign
        [alone] = fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [text], config)
        assert abs(float(abs(alone.plugin - joint.plugin).max())) < 1e-4
    [longer] = fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [TEXT], config.model_copy(update={"steps": 10}))
    assert longer.loss < longer.initial_loss - 0.05


def test_fold_in_in_groups_sums_the_plugins_each_group_writes_alone(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    qas = [QA(str(i), q, (a,)) for i, (q, a) in enumerate([("Who built it?", "Eiffel"), ("When?", "1889")])]
    config = FoldInConfig(examples="qa", steps=3, lr=0.2, precision="float32", max_examples=None)
    [grouped] = fold_in(
        tiny_adapter,
        tiny.model,
        tiny.tokenizer,
        [Document("d", TEXT, questions=qas)],
        config.model_copy(update={"groups": 2}),
    )
    alone = [
        fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [Document("d", TEXT, questions=[qa])], config)[0]
        for qa in qas
    ]
    assert abs(grouped.plugin - (alone[0].plugin + alone[1].plugin)).max() < 1e-4
    assert abs(grouped.initial_loss - (alone[0].initial_loss + alone[1].initial_loss) / 2) < 1e-3
    assert grouped.loss < grouped.initial_loss - 0.05  # the sum holds what each group wrote
    [ungrouped] = fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [Document("d", TEXT, questions=qas)], config)
    assert abs(grouped.plugin - ungrouped.plugin).max() > 1e-3


def test_fold_in_reports_the_loss_of_the_starting_plugin_as_initial(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    [still] = fold_in(
        tiny_adapter, tiny.model, tiny.tokenizer, [TEXT], FoldInConfig(steps=1, lr=1e-9, precision="float32")
    )
    [moved] = fold_in(
        tiny_adapter, tiny.model, tiny.tokenizer, [TEXT], FoldInConfig(steps=3, lr=0.3, precision="float32")
    )
    assert still.loss is not None and moved.loss is not None and moved.initial_loss is not None
    assert abs(still.loss - still.initial_loss) < 1e-4  # a step that barely moves x: the same loss before and after
    assert abs(moved.initial_loss - still.initial_loss) < 1e-5  # before any step, whatever the steps do
    assert moved.loss < moved.initial_loss - 0.05


def _fold_in_each(tiny: BaseModel, adapter: PluginAdapter, configs: list[FoldInConfig]) -> list[list[FoldInResult]]:
    """TEXTS folded in once per config: what must not depend on how the steps are computed."""
    return [fold_in(adapter, tiny.model, tiny.tokenizer, TEXTS, config) for config in configs]


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_fold_in_micro_batches_accumulate_the_full_batch_gradient(
    tiny: BaseModel, tiny_adapter: PluginAdapter, distill: float
) -> None:
    runs = _fold_in_each(
        tiny,
        tiny_adapter,
        [
            FoldInConfig(steps=4, lr=0.2, micro_batch=size, distill=distill, precision="float32")
            for size in (1, 3, 1000)
        ],
    )
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert abs(a.loss - b.loss) < 1e-4
            assert float(abs(a.plugin - b.plugin).max()) < 1e-4


def test_fold_in_makes_the_same_plugins_with_either_attention_kernel_compiled_or_not(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    configs = [FoldInConfig(steps=4, lr=0.2, precision="float32", attention=k) for k in ("fused", "math", "auto")]
    compiled = FoldInConfig(steps=4, lr=0.2, precision="float32", compile=True)
    runs = _fold_in_each(tiny, tiny_adapter, [*configs, compiled])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert float(abs(a.plugin - b.plugin).max()) < 1e-4
            assert float(abs(a.plugin).max()) > 0.1  # the steps moved it: the equality is not two zeros


def test_bfloat16_fold_in_lands_near_float32_and_keeps_plugins_float32(
    tiny: BaseModel, tiny_adapter: PluginAdapter
) -> None:
    runs = {
        p: fold_in(tiny_adapter, tiny.model, tiny.tokenizer, [TEXT], FoldInConfig(steps=6, lr=0.3, precision=p))[0]
        for p in ("float32", "bfloat16")
    }
    full, half = runs["float32"], runs["bfloat16"]
    assert half.plugin.dtype == "float32" and half.loss is not None and half.initial_loss is not None
    assert half.loss < half.initial_loss - 0.05
    assert abs(half.initial_loss - full.initial_loss) < 0.05  # bfloat16 keeps ~3 digits: close, not equal
    assert float(abs(half.plugin - full.plugin).max()) > 0
    cos = torch.nn.functional.cosine_similarity(
        torch.from_numpy(half.plugin).flatten(), torch.from_numpy(full.plugin).flatten(), dim=0
    )
    assert cos > 0.95


def test_step_precision_switches_autocast_for_the_steps_only(tiny: BaseModel) -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with step_precision(tiny.model, "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32
    with step_precision(tiny.model, "float32"):
        assert (a @ b).dtype == torch.float32
    assert resolved_precision(tiny.model, "auto") in {"float32", "bfloat16"}
    assert resolved_precision(tiny.model, "float32") == "float32"


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_without_bfloat16_arithmetic_is_warned_about(
    tiny: BaseModel, native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(training, "_bf16_native", lambda device: native)
    training._warn_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="adapters.training"):
        assert resolved_precision(tiny.model, "bfloat16") == "bfloat16"  # what was asked, warned or not
        assert resolved_precision(tiny.model, "auto") == ("bfloat16" if native else "float32")
    assert ("emulated" in caplog.text) is not native


def test_fit_learns_shared_matrices_and_leaves_base_untouched(tiny: BaseModel) -> None:
    config = AdapterConfig(rank=4, targets=["o", "down"], layers=[-2, -1], encoder=EncoderConfig(layer=1, hidden=32))
    adapter = PluginAdapter(tiny, config)
    docs = [
        Document(
            f"d{i}", f"Document {i} is about the number {i * 7}.", {}, [QA(f"q{i}", f"Number in {i}?", (str(i * 7),))]
        )
        for i in range(6)
    ]
    base_before, shared_before = _base_weights(tiny), _shared(adapter)
    report = fit(adapter, tiny.model, tiny.tokenizer, docs, FitConfig(epochs=8, batch_size=3, lr=3e-3), progress=False)
    assert report.steps == 16
    assert sum(report.losses[-3:]) < sum(report.losses[:3])
    assert any(not torch.equal(b, a) for b, a in zip(shared_before, adapter.shared_parameters(), strict=True))
    for name, tensor in tiny.model.state_dict().items():
        if name in base_before:
            assert torch.equal(base_before[name], tensor), name
    # after fit, the encoder writes document-dependent plugins
    [a, b] = fold_in(adapter, tiny.model, tiny.tokenizer, [docs[0].text, docs[1].text], FoldInConfig(steps=0))
    assert abs(a.plugin - b.plugin).max() > 0


def _numbered_docs(answer_offset: int) -> list[Document]:
    return [
        Document(
            f"d{i}",
            f"Document {i} was written in Paris in {1900 + i}.",
            {},
            [QA(f"q{i}", f"When was document {i} written?", (str(1900 + i + answer_offset),))],
        )
        for i in range(4)
    ]


@pytest.mark.parametrize("store", [None, "questions"])
def test_fit_with_a_store_builder_writes_x_from_the_text_alone(store: str | None) -> None:
    """With a store builder the gold questions only teach U, V to read x: with U, V (nearly) frozen, x comes out
    the same whatever the gold answers say. Without one, the gold answers write x too."""
    plugins = []
    for offset in (0, 50):
        tiny = tiny_model(seed=0)
        adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3))
        config = FitConfig(epochs=3, batch_size=4, lr=1e-12, x_lr=0.1, store=store, store_examples=4)
        report = fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(offset), config, progress=False)
        assert report.plugins is not None and report.plugins.shape == (4, *adapter.plugin_shape)
        assert float(abs(report.plugins).max()) > 0
        plugins.append(report.plugins)
    gap = float(abs(plugins[0] - plugins[1]).max())
    assert (gap < 1e-6) if store else (gap > 1e-3)


def test_bfloat16_fit_follows_the_float32_one_and_keeps_weights_float32() -> None:
    losses = {}
    for precision in ("float32", "bfloat16"):
        tiny = tiny_model(seed=0)
        adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3))
        config = FitConfig(epochs=4, batch_size=2, lr=3e-3, x_lr=0.1, store="questions", precision=precision)
        report = fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
        assert all(p.dtype == torch.float32 for p in adapter.shared_parameters())
        assert report.plugins is not None and report.plugins.dtype == "float32"
        losses[precision] = report.losses
    half, full = losses["bfloat16"], losses["float32"]
    assert sum(half[-3:]) < sum(half[:3])
    assert abs(half[0] - full[0]) < 0.05 * full[0] and half != full  # rounded, not another computation


def test_compiled_fit_learns_the_same_shared_matrices_and_plugins() -> None:
    fitted = []
    for compiled in (False, True):
        tiny = tiny_model(seed=0)
        adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[1, 3], seed=3))
        config = FitConfig(epochs=3, batch_size=2, lr=3e-3, x_lr=0.1, store="questions", compile=compiled)
        report = fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
        fitted.append((report, _shared(adapter)))
    (eager, shared), (compiled_report, compiled_shared) = fitted
    assert eager.plugins is not None and compiled_report.plugins is not None
    assert float(abs(eager.plugins).max()) > 0.01  # the steps moved x: the equality is not two zeros
    assert float(abs(eager.plugins - compiled_report.plugins).max()) < 1e-4
    for a, b in zip(shared, compiled_shared, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    start = _shared(PluginAdapter(tiny_model(seed=0), AdapterConfig(rank=4, layers=[1, 3], seed=3)))
    assert any(float((a - b).abs().max()) > 1e-3 for a, b in zip(shared, start, strict=True))  # U, V did move


def test_fit_clips_the_shared_gradient_norm() -> None:
    """Adam divides out a gradient's scale, except against its eps: a norm clipped far below eps barely moves U, V,
    which shows the clip is applied to the step."""
    moved = {}
    for clip in (None, 1e-12):
        tiny = tiny_model(seed=0)
        adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3))
        before = _shared(adapter)
        config = FitConfig(epochs=2, batch_size=2, lr=3e-3, x_lr=0.1, store="questions", clip=clip)
        fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
        moved[clip] = sum(float((a - b).abs().sum()) for a, b in zip(adapter.shared_parameters(), before, strict=True))
    assert moved[None] > 0 and moved[1e-12] < 0.01 * moved[None]


def test_nested_fit_trains_u_v_to_read_real_fold_in_plugins() -> None:
    """Each step folds its documents in with U, V frozen, then U, V learn the gold answers through those plugins:
    the loss falls, only U, V move, and no free plugins come back."""
    tiny = tiny_model(seed=0)
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3))
    before = _shared(adapter)
    config = FitConfig(epochs=8, batch_size=2, lr=1e-2, store="questions", store_examples=4, nested=2, nested_lr=0.3)
    report = fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
    assert report.plugins is None and report.steps == 16
    assert sum(report.losses[-3:]) < 0.95 * sum(report.losses[:3])
    assert all(not torch.equal(a, b) for a, b in zip(adapter.shared_parameters(), before, strict=True))
    assert not any(p.requires_grad for p in adapter.shared_parameters())  # frozen again after the fit


def test_nested_fit_reads_each_question_through_its_retrieved_composition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each question retrieves the next document, not its own (Example.composed): every step folds that one in too
    and U, V read the composition of the retrieved plugins by their softmax weights."""
    docs = _numbered_docs(0)
    docs = [
        dataclasses.replace(
            d,
            questions=[dataclasses.replace(d.questions[0], retrieved=((f"d{(i + 1) % 4}", 0.9), (d.id, 0.2)))],
        )
        for i, d in enumerate(docs)
    ]
    tiny = tiny_model(seed=0)
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-1], seed=3))
    folded: list[dict[str, torch.Tensor]] = []
    read: list[torch.Tensor] = []
    real_fold_in, real_use = training.fold_in, adapter.use

    def recording_fold_in(*args: object, **kwargs: object) -> list[FoldInResult]:
        results = real_fold_in(*args, **kwargs)  # type: ignore[arg-type]
        texts = [d.text for d in args[3]]  # type: ignore[attr-defined]
        folded.append({t.split()[1]: torch.from_numpy(r.plugin) for t, r in zip(texts, results, strict=True)})
        return results

    def recording_use(z: torch.Tensor, **kwargs: object) -> object:
        if "shared" in kwargs:  # the step that trains U, V (fold-in's own steps pass no shared weights)
            read.append(z.detach().clone())
        return real_use(z, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "fold_in", recording_fold_in)
    monkeypatch.setattr(adapter, "use", recording_use)
    config = FitConfig(epochs=1, batch_size=1, lr=1e-2, store="questions", store_examples=4, nested=2, nested_lr=0.3)
    report = fit(adapter, tiny.model, tiny.tokenizer, docs, config, progress=False)
    assert report.steps == 4
    weights = torch.softmax(torch.tensor([0.9, 0.2]) / config.composition_temperature, dim=0)
    for plugins, z in zip(folded, read, strict=True):
        assert len(plugins) == 2  # the batch's document and the one its question retrieves
        [own] = [n for n in plugins if str((int(n) + 3) % 4) not in plugins]  # the one whose predecessor is absent
        [nxt] = [n for n in plugins if n != own]
        expected = weights[0] * plugins[nxt] + weights[1] * plugins[own]
        torch.testing.assert_close(z[0].float(), expected.to(z.device).float(), atol=1e-5, rtol=1e-4)


def test_nested_batches_keep_documents_that_compose_each_other_together() -> None:
    links = {0: {0, 1}, 1: {1}, 2: {2}, 3: {3, 4}, 4: {4}, 5: {5}}
    for _ in range(5):
        batches = training._nested_batches(links, 2, random.Random(_))
        assert sorted(d for b in batches for d in b) == list(range(6))
        assert [0, 1] in batches and [3, 4] in batches and all(len(b) <= 2 for b in batches)
    singles = {d: {d} for d in range(5)}
    assert [len(b) for b in training._nested_batches(singles, 2, random.Random(0))] == [2, 2, 1]


def test_covered_examples_keep_reading_and_the_closed_book_ones_a_store_target_answers() -> None:
    stored = [Example("When was it built?", "in 1889" + ANSWER_END), Example("Who?", "Gustave Eiffel" + ANSWER_END)]
    asked = [
        Example("When was the tower completed?", "1889" + ANSWER_END),
        Example("Where is the tower?", "Paris" + ANSWER_END),
        Example("Read: ... Where is the tower?", "Paris" + ANSWER_END, reading=True),
        Example("Who built it?", "Eiffel" + ANSWER_END),
    ]
    assert covered_examples(asked, stored) == [asked[0], asked[2], asked[3]]


def test_a_covered_fit_drops_the_closed_book_examples_no_store_example_answers() -> None:
    """The years are in the documents: with their true answers the gold questions are covered and kept; two
    shifted by 50 are not, and the fit has two examples fewer to take steps on. None covered is an error."""
    docs = _numbered_docs(0)[:2] + _numbered_docs(50)[2:]
    steps = []
    for covered in (False, True):
        tiny = tiny_model(seed=0)
        adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-1], seed=3))
        config = FitConfig(batch_size=1, store="questions", store_examples=4, store_covered=covered)
        steps.append(fit(adapter, tiny.model, tiny.tokenizer, docs, config, progress=False).steps)
    assert steps[1] == steps[0] - 2
    with pytest.raises(InvalidInputError, match="store examples cover"):
        fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(50), config, progress=False)


def test_a_covered_fit_needs_a_store_builder(tiny: BaseModel) -> None:
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-1]))
    with pytest.raises(InvalidInputError, match="store builder"):
        fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), FitConfig(store_covered=True), progress=False)


def test_nested_fit_needs_a_store_builder(tiny: BaseModel) -> None:
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-1]))
    with pytest.raises(InvalidInputError, match="store builder"):
        fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), FitConfig(nested=2), progress=False)


def test_fit_with_a_store_builder_needs_free_plugins(tiny: BaseModel) -> None:
    config = AdapterConfig(rank=4, layers=[-1], encoder=EncoderConfig(layer=1, hidden=32))
    with pytest.raises(InvalidInputError, match="without an encoder"):
        fit(PluginAdapter(tiny, config), tiny.model, tiny.tokenizer, _numbered_docs(0), FitConfig(store="questions"))


def test_generation_leaves_base_untouched(tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    before = _base_weights(tiny)
    z = torch.randn(2, *tiny_adapter.plugin_shape)
    prompts = [chat_prompt(tiny.tokenizer, "hello"), chat_prompt(tiny.tokenizer, "a longer question here")]
    outs = greedy_generate(tiny.model, tiny.tokenizer, tiny_adapter, prompts, z, 5)
    assert len(outs) == 2
    for name, tensor in tiny.model.state_dict().items():
        if name in before:
            assert torch.equal(before[name], tensor), name


def test_checkpoint_round_trip_gives_same_outputs(tmp_path: Path, tiny: BaseModel, tiny_adapter: PluginAdapter) -> None:
    ids = torch.randint(3, 200, (2, 7))
    z = torch.randn(2, *tiny_adapter.plugin_shape)
    with torch.no_grad(), tiny_adapter.use(z):
        expected = tiny.model(ids).logits
    ckpt_id = tiny_adapter.save(tmp_path / "ckpt")
    meta = read_checkpoint_meta(tmp_path / "ckpt")
    assert meta["base_model"]["sha256"] == tiny.identity.sha256 and meta["seed"] == 3

    fresh = tiny_model(seed=0)
    loaded = PluginAdapter.load(tmp_path / "ckpt", fresh)
    assert loaded.checkpoint_id == ckpt_id
    with torch.no_grad(), loaded.use(z):
        torch.testing.assert_close(fresh.model(ids).logits, expected)


def test_checkpoint_for_another_base_model_is_refused(tmp_path: Path, tiny_adapter: PluginAdapter) -> None:
    tiny_adapter.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="fitted on base model"):
        PluginAdapter.load(tmp_path / "ckpt", tiny_model(seed=1))


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, tiny: BaseModel) -> None:
    with pytest.raises(CheckpointError, match="no adapter checkpoint"):
        PluginAdapter.load(tmp_path, tiny)


def test_reading_examples_ask_closed_book_and_with_the_document_as_combine_does() -> None:
    from adapters.examples import ANSWER_END, reading_examples
    from adapters.prompts import user_message

    doc = Document("d", "The tower was built in 1889 by Eiffel.", questions=[
        QA("1", "When was the tower built?", ("1889",)),
        QA("2", "Who built the tower?", ("Eiffel",)),
    ])  # fmt: skip
    made = reading_examples(doc)
    assert [(e.prompt, e.target) for e in made] == [
        ("When was the tower built?", "1889" + ANSWER_END),
        ("Who built the tower?", "Eiffel" + ANSWER_END),
        (user_message("When was the tower built?", [doc.text]), "1889" + ANSWER_END),
    ]
    [three] = build_examples("qa+reading-3", [doc])  # every question (up to 3) read again with the document
    assert [e.prompt for e in three[2:]] == [user_message(qa.question, [doc.text]) for qa in doc.questions]
    [only] = build_examples("reading", [doc])  # the reading question alone, nothing closed-book
    assert [(e.prompt, e.target) for e in only] == [(made[2].prompt, made[2].target)]


def test_length_grouped_batches_cover_an_epoch_once_with_little_padding() -> None:
    import random

    from adapters.training import _length_grouped

    lengths = [random.Random(i).choice([20, 400]) for i in range(1000)]
    batches = _length_grouped(lengths, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 32 for b in batches)
    mixed = sum(len({lengths[i] for i in b}) > 1 for b in batches)
    assert mixed <= 20  # at most one batch per sorted window straddles the two lengths
    assert batches != _length_grouped(lengths, 32, random.Random(1))  # shuffled, by seed


def test_learned_keys_are_fitted_saved_and_frozen_in_fold_in(tmp_path: Path) -> None:
    tiny = tiny_model(seed=0)
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3, learn_keys=True))
    assert not any(p.requires_grad for p in adapter.shared_parameters())  # frozen until fit thaws them
    seeded = [m.A.detach().clone() for m in adapter.plugin_modules]
    config = FitConfig(epochs=3, batch_size=4, lr=1e-2, x_lr=0.1, store="questions", store_examples=4)
    fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
    assert all(not torch.equal(a, m.A) for a, m in zip(seeded, adapter.plugin_modules, strict=True))
    adapter.save(tmp_path / "ckpt")

    fresh = tiny_model(seed=0)
    loaded = PluginAdapter.load(tmp_path / "ckpt", fresh)
    for m, n in zip(adapter.plugin_modules, loaded.plugin_modules, strict=True):
        torch.testing.assert_close(m.A, n.A)
    fitted = _shared(loaded)
    fold_in(loaded, fresh.model, fresh.tokenizer, [TEXT], FoldInConfig(steps=3, lr=0.3, precision="float32"))
    for before, after in zip(fitted, loaded.shared_parameters(), strict=True):
        assert torch.equal(before, after) and after.grad is None  # fold-in neither moves nor differentiates them


def test_core_plugins_are_fitted_folded_in_and_reloaded(tmp_path: Path) -> None:
    """AdapterConfig.keys: the store fit writes r x k cores per module, fold-in lowers its loss with them, and a
    reloaded checkpoint gives the same outputs for the same plugin."""
    tiny = tiny_model(seed=0)
    adapter = PluginAdapter(tiny, AdapterConfig(rank=2, keys=3, layers=[-2, -1], seed=3, learn_keys=True))
    config = FitConfig(epochs=3, batch_size=4, lr=1e-2, x_lr=0.1, store="questions", store_examples=4)
    report = fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
    assert report.plugins is not None and report.plugins.shape[1:] == (4, 6) == adapter.plugin_shape
    # lr 0.3 oscillates on this tiny model (on an AVX2 CPU 15 steps lowered the loss by 0.043, 30 by 0.013);
    # 60 steps at 0.1 lower it steadily (0.09 there)
    [folded] = fold_in(adapter, tiny.model, tiny.tokenizer, [TEXT], FoldInConfig(steps=60, lr=0.1))
    assert folded.plugin.shape == (4, 6) and folded.loss < folded.initial_loss - 0.05
    adapter.save(tmp_path / "ckpt")
    fresh = tiny_model(seed=0)
    loaded = PluginAdapter.load(tmp_path / "ckpt", fresh)
    ids = tiny.tokenizer(TEXT, return_tensors="pt").input_ids
    z = torch.from_numpy(folded.plugin)
    with torch.no_grad(), adapter.use(z):
        expected = tiny.model(ids).logits
    with torch.no_grad(), loaded.use(z):
        torch.testing.assert_close(fresh.model(ids).logits, expected)


def test_fixed_keys_are_regenerated_from_the_seed_not_stored(tmp_path: Path, tiny_adapter: PluginAdapter) -> None:
    tiny_adapter.save(tmp_path / "ckpt")
    assert not any(k.startswith("A.") for k in load_file(str(tmp_path / "ckpt" / "adapter.safetensors")))


def test_checkpoint_without_its_learned_keys_is_a_clear_error(tmp_path: Path, tiny_adapter: PluginAdapter) -> None:
    tiny_adapter.save(tmp_path / "ckpt")  # fixed keys: no A stored
    meta_path = tmp_path / "ckpt" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["learn_keys"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lacks A\.0"):
        PluginAdapter.load(tmp_path / "ckpt", tiny_model(seed=0))


def test_adapter_without_shared_term_is_the_bare_model_until_a_plugin_is_applied(tmp_path: Path) -> None:
    tiny = tiny_model(seed=0)
    ids = tiny.tokenizer("The river floods in spring.", return_tensors="pt").input_ids
    with torch.no_grad():
        bare = tiny.model(ids).logits
    adapter = PluginAdapter(tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3, shared_term=False))
    assert all(m.V is None for m in adapter.plugin_modules)
    config = FitConfig(epochs=3, batch_size=4, lr=1e-2, x_lr=0.1, store="questions", store_examples=4)
    fitted_u = [m.U.detach().clone() for m in adapter.plugin_modules]
    report = fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), config, progress=False)
    assert all(not torch.equal(u, m.U) for u, m in zip(fitted_u, adapter.plugin_modules, strict=True))
    adapter.save(tmp_path / "ckpt")
    assert not any(k.startswith("V.") for k in load_file(str(tmp_path / "ckpt" / "adapter.safetensors")))

    fresh = tiny_model(seed=0)
    loaded = PluginAdapter.load(tmp_path / "ckpt", fresh)
    assert report.plugins is not None
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(ids).logits, bare)  # z = 0: exactly the bare model
        with loaded.use(torch.zeros(loaded.plugin_shape)):
            torch.testing.assert_close(fresh.model(ids).logits, bare)
        with loaded.use(torch.from_numpy(report.plugins[0])):
            assert not torch.allclose(fresh.model(ids).logits, bare, atol=1e-4)  # a plugin alone moves it


def test_reading_examples_without_the_shared_term_never_train_v() -> None:
    for shared_in_reading in (False, True):
        tiny = tiny_model(seed=0)
        adapter = PluginAdapter(
            tiny, AdapterConfig(rank=4, layers=[-2, -1], seed=3, shared_in_reading=shared_in_reading)
        )
        reading_only = FitConfig(examples="reading", epochs=2, batch_size=4, lr=1e-2, x_lr=0.1)
        fit(adapter, tiny.model, tiny.tokenizer, _numbered_docs(0), reading_only, progress=False)
        moved = any(torch.count_nonzero(m.V) > 0 for m in adapter.plugin_modules if m.V is not None)
        assert moved == shared_in_reading  # read without V h, V gets no gradient from them


def test_reader_target_keeps_the_readers_answer_only_where_it_holds_a_reference() -> None:
    from adapters.examples import ANSWER_END, Example, reader_target

    ex = Example("Context: ...", "1889" + ANSWER_END, reading=True, answers=("1889", "in 1889"))
    sentence = "The tower was completed in 1889."
    assert reader_target(ex, sentence, True).target == sentence + ANSWER_END
    assert reader_target(ex, "It was completed in 1889 by", False).target == "It was completed in 1889 by"
    assert reader_target(ex, "It was completed in 18890.", True) is ex  # on word boundaries only
    assert reader_target(ex, "Gustave Eiffel built it.", True) is ex


def test_reader_targets_take_the_bare_models_answers_for_reading_examples_only() -> None:
    from adapters.base_model import load_base_model
    from adapters.examples import ANSWER_END, Example
    from adapters.metrics import normalize_answer
    from adapters.training import READER_TOKENS, reader_targets

    base = load_base_model()  # the real model: the tiny one answers only whitespace
    prompts = [f"Context:\n{TEXT}\n\nQuestion: {q}" for q in ("When was the tower completed?", "Who built it?")]
    bare = greedy_generate(
        base.model, base.tokenizer, None, [chat_prompt(base.tokenizer, p) for p in prompts], None, READER_TOKENS
    )  # before any adapter is attached
    adapter = PluginAdapter(base, AdapterConfig(rank=4, targets=["v", "o"], seed=3))
    with torch.no_grad():  # a shared delta that would change the answers if it were applied
        for m in adapter.plugin_modules:
            m.V.normal_(0, 1.0)
    said = normalize_answer(bare[0]).split()[-1]  # a word the bare reader says: a reference it holds
    per_doc = [
        [Example(prompts[0], "gold" + ANSWER_END, reading=True, answers=(said,))],
        [
            Example(prompts[1], "zzzq" + ANSWER_END, reading=True, answers=("zzzq",)),  # a reference it never says
            Example(prompts[0], "gold" + ANSWER_END, answers=(said,)),  # closed-book: never replaced
        ],
    ]
    out, kept = reader_targets(adapter, base.model, base.tokenizer, per_doc, batch=1)
    assert kept == 1
    stopped = len(base.tokenizer(bare[0]).input_ids) < READER_TOKENS  # an answer cut at the budget is not ended
    assert out[0][0].target == bare[0] + ANSWER_END * stopped and out[0][0].prompt == prompts[0]
    assert out[1] == per_doc[1]
