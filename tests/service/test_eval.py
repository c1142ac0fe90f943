"""The SQuAD benchmark harness, end to end on the tiny model: every run scored, report files written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import tiny_model
from adapters.corpus import QA, Document
from adapters.encoder import EncoderConfig
from adapters.errors import InvalidInputError, KplugError
from adapters.metrics import f1
from adapters.plugin import retrieval_weights
from adapters.training import FoldInConfig
from service.eval_squad import (
    RUNS,
    EvalOptions,
    Question,
    SquadEval,
    answer_sources,
    compare_answers,
    eval_squad,
    markdown,
    misrouted,
    paired,
    parse_runs,
    sample_paragraphs,
)
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings


def _squad(path: Path) -> None:
    articles = []
    for a in range(4):
        paragraphs = []
        for p in range(3):
            fact = f"The {['red', 'blue', 'green'][p]} tower of town {a} was built in {1800 + 10 * a + p}."
            qas = [
                {
                    "id": f"{a}-{p}",
                    "question": f"When was the {['red', 'blue', 'green'][p]} tower of town {a} built?",
                    "answers": [{"text": str(1800 + 10 * a + p), "answer_start": 0}],
                }
            ]
            paragraphs.append({"context": fact + " It is tall.", "qas": qas})
        articles.append({"title": f"Town {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": articles}))


def _options(tmp_path: Path, **overrides: Any) -> EvalOptions:
    """The tiny benchmark: `_squad`'s articles 0-1 to fit, 2-3 to evaluate, the adapter saved in tmp_path."""
    defaults: dict[str, Any] = {"fold_in": FoldInConfig()}
    return EvalOptions(
        data=tmp_path / "squad.json",
        fit_articles=[0, 1],
        eval_articles=[2, 3],
        adapter=tmp_path / "adapter",
        model="tiny",
        **(defaults | overrides),
    )


def test_eval_squad_reports_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _squad(tmp_path / "squad.json")
    # which runs send a composition to the engine: scores on the tiny model cannot tell (they are all 0)
    run_, submit, prepare = SquadEval._run, Runtime.submit, Runtime.prepare
    current: list[str] = []
    has_z: dict[str, set[bool]] = {}
    shared: dict[str, set[float]] = {}
    hits: dict[tuple[str, str], list[Any]] = {}

    def record_run(self: SquadEval, mode: Any, retrieval: str, questions: Any) -> Any:
        current[:] = [f"{mode}/{retrieval}"]
        return run_(self, mode, retrieval, questions)

    def record_submit(self: Runtime, prepared: Any) -> Any:
        has_z.setdefault(current[0], set()).add(prepared.request.z is not None)
        shared.setdefault(current[0], set()).add(prepared.request.shared_weight)
        return submit(self, prepared)

    def record_prepare(self: Runtime, query: str, mode: Any, *args: Any, **kwargs: Any) -> Any:
        hits.setdefault((current[0], mode), []).append(kwargs.get("hits"))
        return prepare(self, query, mode, *args, **kwargs)

    monkeypatch.setattr(Runtime, "prepare", record_prepare)
    monkeypatch.setattr(SquadEval, "_run", record_run)
    monkeypatch.setattr(Runtime, "submit", record_submit)
    base = tiny_model()
    config = AdapterConfig(rank=4, targets=["o", "down"], layers=[-2, -1], encoder=EncoderConfig(layer=1, hidden=16))
    PluginAdapter(base, config).save(tmp_path / "adapter")
    options = _options(
        tmp_path, max_paragraphs=4, max_new_tokens=4, batch=4, capacity_paragraphs=2, runs=parse_runs("all")
    )
    report = eval_squad(options, tmp_path / "out" / "squad.json")
    expected = {f"{m}/{r}" for m, r in RUNS} | {"capacity/oracle", "none/capacity-subset"}
    assert set(report["results"]) == expected
    assert report["config"]["capacity"] == {"paragraphs": 2, "steps": 60, "lr": 0.3, "examples": "qa"}
    for key, row in report["results"].items():
        assert set(row) == {"contained", "em", "f1", "context_tokens", "latency_ms", "n"}, key
        assert 0 <= row["contained"] <= 1 and row["n"] > 0
    assert report["results"]["plugins/oracle"]["n"] == 4 and report["results"]["plugins/oracle"]["context_tokens"] == 0
    assert report["results"]["context/oracle"]["context_tokens"] > 5
    assert report["bytes_per_plugin"] == 4 * 4 * 2 and report["fold_in_seconds_per_doc"] > 0
    assert 0 <= report["retrieval_recall_at_k"] <= 1 and "plugin_nn_same_article" in report["similarity"]
    assert set(report["plugins"]) == {"rms", "mean_norm"} and min(report["plugins"].values()) >= 0
    assert set(report["paired"]) == {
        "plugins/oracle vs none/none",
        "plugins/oracle vs plugins/wrong",
        "plugins/oracle vs plugins/shared",
        "combine/retrieved vs context/retrieved",
        "combine/retrieved vs combine/retrieved-shared",
        "combine/retrieved-unshared vs context/retrieved",
        "combine/retrieved-unshared vs combine/retrieved",
        "plugins/oracle-unshared vs none/none",
        "plugins/oracle-unshared vs plugins/oracle",
        "combine/retrieved vs combine/retrieved-wrong",
    }
    # V = 0 here, so the shared adapter without plugins is the bare model: "shared" runs must drop the plugins
    scores = {k: (r["contained"], r["f1"]) for k, r in report["results"].items()}
    assert scores["plugins/shared"] == scores["none/none"]
    assert scores["combine/retrieved-shared"] == scores["context/retrieved"]
    # and dropping the shared term changes nothing: "unshared" runs keep the plugins
    assert scores["plugins/oracle-unshared"] == scores["plugins/oracle"]
    assert scores["combine/retrieved-unshared"] == scores["combine/retrieved"]
    assert report["results"]["combine/retrieved-shared"]["context_tokens"] > 5
    assert has_z["plugins/oracle"] == has_z["combine/retrieved"] == has_z["plugins/wrong"] == {True}
    assert has_z["plugins/shared"] == has_z["combine/retrieved-shared"] == {False}
    assert has_z["plugins/oracle-unshared"] == has_z["combine/retrieved-unshared"] == {True}
    assert has_z["combine/retrieved-wrong"] == {True}  # and another article's plugin, not the retrieved ones
    # its plugins are those of the plugins/wrong run, question by question; its prompt that of combine/retrieved
    assert hits["combine/retrieved-wrong", "plugins"] == hits["plugins/wrong", "plugins"]
    assert hits["combine/retrieved-wrong", "combine"] == hits["combine/retrieved", "combine"]
    assert (
        report["results"]["combine/retrieved-wrong"]["context_tokens"]
        == report["results"]["combine/retrieved"]["context_tokens"]
    )
    assert {k for k, weights in shared.items() if weights == {0.0}} == {
        "plugins/oracle-unshared",
        "combine/retrieved-unshared",
    }
    assert all(weights in ({0.0}, {1.0}) for weights in shared.values())
    sources = report["answer_sources"]  # reading runs with retrieval only
    assert set(sources) == {
        "context/retrieved",
        "combine/retrieved",
        "combine/retrieved-shared",
        "combine/retrieved-unshared",
        "combine/retrieved-wrong",
    }
    assert all(abs(sum(shares.values()) - 1) < 1e-9 for shares in sources.values())
    assert report["config"]["paragraphs"] == 4 and report["config"]["eval_articles"] == "2-3"
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / "out" / f"squad{suffix}").stat().st_size > 100
    answers = [json.loads(line) for line in (tmp_path / "out" / "squad.answers.jsonl").read_text().splitlines()]
    assert len(answers) == report["config"]["questions"] == 4
    assert all(a["id"][0] in "23" and a["references"] and len(a["retrieved"]) == 3 for a in answers)
    assert all(set(a["outputs"]) == {f"{m}/{r}" for m, r in RUNS} for a in answers)
    for key in answers[0]["outputs"]:  # the answers written are the ones scored
        f1s = [f1(a["outputs"][key], a["references"]) for a in answers]
        assert abs(sum(f1s) / len(f1s) - report["results"][key]["f1"]) < 1e-9, key


def test_coverage_says_which_questions_the_fold_in_examples_ask(tmp_path: Path) -> None:
    """Each tiny paragraph's sentence has two number spans, "town N" first and the answer (the year) second: with
    every example the year is a target, with only the first example it is not, unless that example's target is
    the clause around "town N", which holds the year too."""
    _squad(tmp_path / "squad.json")
    config = AdapterConfig(rank=4, targets=["o"], layers=[-1])
    PluginAdapter(tiny_model(), config).save(tmp_path / "adapter")

    def coverage(max_examples: int, examples: str = "questions") -> dict[str, Any]:
        fold = FoldInConfig(steps=1, max_examples=max_examples, examples=examples)
        runs = [("plugins", "oracle")]
        options = _options(tmp_path, max_paragraphs=3, max_new_tokens=2, capacity_paragraphs=0, fold_in=fold, runs=runs)
        return eval_squad(options, None)["coverage"]

    every, first = coverage(16), coverage(1)
    assert every["examples"] == "questions" and every["questions_covered"] == 1.0
    assert (
        every["plugins/oracle contained, uncovered"] is None and every["plugins/oracle contained, covered"] is not None
    )
    assert first["questions_covered"] == 0.0 and first["plugins/oracle contained, covered"] is None
    assert 0.0 <= every["plugins/oracle answered with another target"] <= 1.0
    assert coverage(1, "about")["questions_covered"] == 1.0


def test_a_misrouted_answer_is_a_wrong_one_holding_another_target_of_its_paragraph() -> None:
    targets = ["1889", "Gustave Eiffel", "12"]
    assert misrouted("It was Gustave Eiffel.", ["1889"], targets)
    assert not misrouted("in 1889", ["1889"], targets)  # right: not misrouted
    assert not misrouted("12 metres", ["1889"], targets)  # a short number matches by chance: not counted
    assert not misrouted("Paris", ["1889"], targets)  # wrong, but none of its targets


def test_eval_keeps_plugins_in_the_format_asked_and_reports_their_bytes(tmp_path: Path) -> None:
    _squad(tmp_path / "squad.json")
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o"], layers=[-1])).save(tmp_path / "adapter")
    fold = FoldInConfig(steps=1)
    runs = [("plugins", "oracle")]
    options = _options(
        tmp_path, max_paragraphs=2, max_new_tokens=2, capacity_paragraphs=0, fold_in=fold, runs=runs,
        plugin_format="float8",
    )  # fmt: skip
    report = eval_squad(options, None)
    assert report["bytes_per_plugin"] == 1 * 4 and report["config"]["plugin_format"] == "float8"
    assert "(float8)" in markdown(report)


def test_compiled_fold_in_is_compiled_at_start_up_and_answers_as_the_uncompiled_one(tmp_path: Path) -> None:
    _squad(tmp_path / "squad.json")
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o", "down"], layers=[1, 3])).save(tmp_path / "adapter")
    reports = []
    for compiled in (False, True):
        fold = FoldInConfig(steps=2, lr=0.5, precision="float32", compile=compiled)
        options = _options(
            tmp_path, max_paragraphs=3, max_new_tokens=3, capacity_paragraphs=0, fold_in=fold,
            runs=[("plugins", "oracle")],
        )  # fmt: skip
        reports.append(eval_squad(options, tmp_path / f"compiled-{compiled}.json"))
    plain, compiled = reports
    assert plain["fold_in_warmup_seconds"] is None and compiled["fold_in_warmup_seconds"] > 0
    assert "compiled" in markdown(compiled) and "compiled" not in markdown(plain)
    answers = [(tmp_path / f"compiled-{c}.answers.jsonl").read_text().splitlines() for c in (False, True)]
    assert answers[0] == answers[1] and len(answers[0]) == 3


def test_fold_in_that_cannot_compile_stops_start_up_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o"], layers=[-1])).save(tmp_path / "adapter")

    def no_compiler(*args: Any) -> None:
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr("service.runtime.fold_in", no_compiler)
    fold = FoldInConfig(steps=1, compile=True)
    runtime = Runtime(Settings(data_dir=tmp_path, model="tiny", adapter=tmp_path / "adapter", fold_in=fold), Metrics())
    with pytest.raises(KplugError, match=r"C\+\+ compiler.*KPLUG_FOLD_IN__COMPILE"):
        runtime.load()
    thread = runtime.engine._thread  # stopped, not left waiting for work that never comes
    assert not runtime.ready and thread is not None and not thread.is_alive()


def test_eval_composes_retrieved_plugins_at_the_temperature_asked_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _squad(tmp_path / "squad.json")
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o"], layers=[-1])).save(tmp_path / "adapter")
    seen: list[float] = []

    def spy(scores: torch.Tensor, temperature: float) -> torch.Tensor:
        seen.append(temperature)
        return retrieval_weights(scores, temperature)

    monkeypatch.setattr("service.runtime.retrieval_weights", spy)
    runs = [("plugins", "retrieved")]
    options = _options(
        tmp_path, max_paragraphs=2, max_new_tokens=2, capacity_paragraphs=0, fold_in=FoldInConfig(steps=0),
        runs=runs, composition_temperature=0.2,  # not the default: the flag must reach the runtime
    )  # fmt: skip
    report = eval_squad(options, None)
    assert seen and set(seen) == {0.2}
    assert report["config"]["composition_temperature"] == 0.2


def test_compositions_are_applied_at_the_scale_set_and_the_report_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KPLUG_COMPOSITION_SCALE multiplies z: with oracle retrieval (one plugin, weight 1) z is the scaled plugin."""
    _squad(tmp_path / "squad.json")
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o"], layers=[-1])).save(tmp_path / "adapter")
    sent: list[tuple[torch.Tensor, torch.Tensor]] = []
    submit = Runtime.submit

    def record(self: Runtime, prepared: Any) -> Any:
        [doc] = prepared.documents
        plugin = torch.from_numpy(self.store.plugins([doc["id"]])[doc["id"]])
        sent.append((prepared.request.z, plugin))
        return submit(self, prepared)

    monkeypatch.setattr(Runtime, "submit", record)
    monkeypatch.setenv("KPLUG_COMPOSITION_SCALE", "2.5")
    options = _options(
        tmp_path, max_paragraphs=2, max_new_tokens=2, capacity_paragraphs=0, fold_in=FoldInConfig(steps=1),
        runs=[("plugins", "oracle")],
    )  # fmt: skip
    report = eval_squad(options, None)
    assert report["config"]["composition_scale"] == 2.5
    assert sent and all(plugin.abs().sum() > 0 for _, plugin in sent)
    for z, plugin in sent:
        torch.testing.assert_close(z, 2.5 * plugin.to(z.dtype))


def test_paragraph_sample_is_fixed_and_seeded(tmp_path: Path) -> None:
    _squad(tmp_path / "squad.json")
    from adapters.corpus import load_squad

    docs = load_squad(tmp_path / "squad.json")
    first = [d.id for d in sample_paragraphs(docs, [2, 3], 3, seed=0)]
    assert first == [d.id for d in sample_paragraphs(docs, [2, 3], 3, seed=0)]
    assert all(d.article in (2, 3) for d in sample_paragraphs(docs, [2, 3], 3, seed=0))
    assert len(sample_paragraphs(docs, [2, 3], None, seed=0)) == 6


def test_runs_subset_is_parsed_in_benchmark_order_and_unknown_runs_are_refused() -> None:
    assert parse_runs("plugins/wrong, none/none") == [("none", "none"), ("plugins", "wrong")]
    assert parse_runs("all") == list(RUNS)
    default = parse_runs(None)  # every run but the -unshared and -wrong diagnostics: by name or "all"
    assert ("plugins", "oracle") in default and ("combine", "retrieved-shared") in default
    assert not any(r.endswith(("-unshared", "-wrong")) for _, r in default) and len(default) == len(RUNS) - 3
    assert parse_runs("plugins/oracle-unshared") == [("plugins", "oracle-unshared")]
    for bad in ("plugins/nowhere", "", "context"):
        with pytest.raises(InvalidInputError):
            parse_runs(bad)


def test_answer_sources_tell_own_paragraph_from_distractors() -> None:
    texts = {"own": "The tower was built in 1889 by Eiffel.", "other": "The bridge was built in 1932 by Bradfield."}
    q = Question(Document("own", texts["own"]), QA("1", "When was the tower built?", ("1889",)), [], "other")
    q.retrieved.extend([("own", 0.9), ("other", 0.8)])
    outputs = ["In 1889.", "Eiffel", "1932", "The tower is tall", ""]
    shares = answer_sources(outputs, [q] * len(outputs), texts)
    assert shares == {"right": 0.2, "own paragraph": 0.2, "other retrieved paragraph": 0.2, "neither": 0.4}


def test_paired_comparison_counts_wins_and_losses_and_tests_them() -> None:
    doc = Document("p", "The tower was built in 1889.")
    questions = [Question(doc, QA(str(i), "When?", ("1889",)), [], "q") for i in range(12)]
    a = ["1889"] * 10 + ["no", "no"]  # right on 10
    b = ["no"] * 10 + ["1889", "1889"]  # right on the other 2
    t = paired(a, b, questions)
    assert (t["wins"], t["losses"]) == (10, 2)
    assert abs(t["sign_test_p"] - 2 * (1 + 12 + 66) / 2**12) < 1e-12  # exact binomial, two-sided
    low, high = t["f1_diff_ci95"]
    assert 0 < low <= t["f1_diff"] <= high and abs(t["f1_diff"] - 8 / 12) < 1e-9
    same = paired(a, a, questions)
    assert (same["wins"], same["losses"], same["sign_test_p"], same["f1_diff"]) == (0, 0, 1.0, 0.0)


def test_compare_pairs_runs_of_two_answer_files_by_question(tmp_path: Path) -> None:
    def write(name: str, runs: dict[str, list[str]], ids: range = range(12)) -> Path:
        rows = [
            {"id": f"q{i}", "paragraph": "p", "question": "When?", "references": ["1889"],
             "retrieved": ["p", "o"] if i % 2 else ["o", "p"],
             "outputs": {run: outs[i] for run, outs in runs.items()}}
            for i in ids
        ]  # fmt: skip
        path = tmp_path / f"{name}.answers.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in (reversed(rows) if name == "b" else rows)))
        return path

    a = write("a", {"combine/retrieved": ["1889"] * 10 + ["no", "no"]})
    b = write("b", {"context/retrieved": ["no"] * 10 + ["1889", "1889"], "none/none": ["no"] * 12})  # other order
    t = compare_answers((a, "combine/retrieved"), (b, "context/retrieved"))
    assert (t["wins"], t["losses"], t["n"]) == (10, 2, 12)
    assert t["a"]["contained"] == 10 / 12 and t["b"]["contained"] == 2 / 12
    own, other = t["by_top1"]["top1_own"], t["by_top1"]["top1_other"]  # odd ids have their own paragraph first
    assert (own["n"], own["wins"], own["losses"]) == (6, 5, 1)
    assert (other["n"], other["wins"], other["losses"]) == (6, 5, 1)
    with pytest.raises(InvalidInputError, match="no run 'combine/oracle'"):
        compare_answers((a, "combine/oracle"), (b, "none/none"))
    short = write("c", {"none/none": ["no"] * 12}, range(6))
    with pytest.raises(InvalidInputError, match="different questions"):
        compare_answers((a, "combine/retrieved"), (short, "none/none"))
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not an answers file"):
        compare_answers((a, "combine/retrieved"), (tmp_path / "bad.jsonl", "none/none"))


def test_eval_nll_probe_scores_own_zero_and_wrong_plugins(tmp_path: Path) -> None:
    """Plugins folded in on their paragraphs' own questions (the capacity diagnostic) must lower those answers'
    NLL below no plugin and below another article's plugin."""
    from service.eval_nll import NllOptions, eval_nll

    _squad(tmp_path / "squad.json")
    base = tiny_model()
    PluginAdapter(base, AdapterConfig(rank=4, targets=["o", "down"], layers=[-2, -1])).save(tmp_path / "adapter")
    options = NllOptions(
        data=tmp_path / "squad.json",
        articles=[2, 3],
        adapter=tmp_path / "adapter",
        fold_in=FoldInConfig(examples="qa", steps=15, lr=0.3),
        max_paragraphs=4,
        model="tiny",
    )
    report = eval_nll(options, tmp_path / "nll.json")
    assert json.loads((tmp_path / "nll.json").read_text()) == report
    assert report["questions"] == 4 and report["paragraphs"] == 4
    nll = report["nll"]
    assert nll["own"] < nll["zero"] and nll["own"] < nll["wrong"]
    assert report["own_below_wrong"] == 1.0


def test_fold_in_flags_reach_the_probe(tmp_path: Path) -> None:
    from service.cli import main

    _squad(tmp_path / "squad.json")
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o"], layers=[-1])).save(tmp_path / "adapter")
    probe = ["eval", "nll", "--data", str(tmp_path / "squad.json"), "--articles", "2-3", "--max-paragraphs", "2"]
    probe += ["--adapter", str(tmp_path / "adapter"), "--model", "tiny", "--fold-in-steps", "2", "--fold-in-lr", "0.5"]
    assert main([*probe, "--fold-in-max-examples", "3", "--out", str(tmp_path / "three.json")]) == 0
    assert main([*probe, "--out", str(tmp_path / "default.json")]) == 0
    three, default = (
        json.loads((tmp_path / f).read_text())["config"]["fold_in"] for f in ("three.json", "default.json")
    )
    assert (three["steps"], three["lr"], three["max_examples"]) == (2, 0.5, 3)
    assert default["max_examples"] == 16


def test_fit_init_continues_a_saved_adapter(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from adapters.adapter import checkpoint_id
    from service.cli import main

    _squad(tmp_path / "squad.json")
    fit = ["fit", "--data", str(tmp_path / "squad.json"), "--articles", "0-1", "--model", "tiny", "--rank", "4",
           "--layers", "0-1", "--encoder-layer", "1", "--epochs", "1", "--batch-size", "2"]  # fmt: skip
    assert main([*fit, "--out", str(tmp_path / "a"), "--seed", "1"]) == 0
    # a tiny learning rate: continuing stays next to the saved weights; a fresh fit (other seed) does not
    assert main([*fit, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--lr", "1e-9"]) == 0
    assert main([*fit, "--out", str(tmp_path / "c"), "--lr", "1e-9"]) == 0
    a, b, c = (load_file(str(tmp_path / f / "adapter.safetensors")) for f in "abc")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    meta = json.loads((tmp_path / "b" / "adapter.json").read_text())
    assert meta["extra"]["init"]["checkpoint"] == checkpoint_id(tmp_path / "a")


def test_fit_asks_written_store_questions_with_a_writer_it_saves_beside_the_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters.base_model import tiny_model
    from adapters.qgen import WEIGHTS_FILE, QuestionWriter
    from service.cli import main

    _squad(tmp_path / "squad.json")
    fit = ["fit", "--data", str(tmp_path / "squad.json"), "--articles", "0", "--model", "tiny", "--rank", "4",
           "--layers", "0-1", "--no-encoder", "--epochs", "1", "--batch-size", "2", "--store", "questions",
           "--store-written", "2"]  # fmt: skip
    assert main([*fit, "--out", str(tmp_path / "a")]) == 2
    assert "no question writer" in capsys.readouterr().err
    assert main([*fit, "--writer", str(tmp_path / "a"), "--out", str(tmp_path / "a")]) == 2
    assert f"no question writer in {tmp_path / 'a'}" in capsys.readouterr().err
    (tmp_path / "w").mkdir()
    QuestionWriter(tiny_model(seed=0).model, rank=2).save(tmp_path / "w")
    assert main([*fit, "--writer", str(tmp_path / "w"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / WEIGHTS_FILE).exists()  # fold-in asks with the writer the fit used
    assert json.loads((tmp_path / "b" / "adapter.json").read_text())["extra"]["fit"]["store_written"] == 2


def test_eval_checks_and_reports_what_the_adapter_was_fitted_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters.base_model import pick_device
    from service.cli import main

    _squad(tmp_path / "squad.json")
    fit = ["fit", "--data", str(tmp_path / "squad.json"), "--model", "tiny", "--rank", "4", "--layers", "0-1",
           "--no-encoder", "--epochs", "1", "--batch-size", "2", "--store", "questions", "--max-docs", "2"]  # fmt: skip
    assert main([*fit, "--articles", "1", "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())["extra"]
    assert meta["articles"] == "1" and meta["documents"] == 2 and meta["fit"]["store"] == "questions"
    assert meta["device"] == str(pick_device("auto"))  # --device auto: recorded as the device it resolved to
    assert main([*fit, "--articles", "0", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "adapter.json").read_text())["extra"]["articles"] == "1,0"
    # the eval's own --fit-articles default does not hide what the adapter was fitted on
    evaluate = ["eval", "squad", "--data", str(tmp_path / "squad.json"), "--model", "tiny", "--adapter",
                str(tmp_path / "a"), "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main([*evaluate, "--fit-articles", "0", "--eval-articles", "1"]) == 2
    assert "fitting articles 1 overlap" in capsys.readouterr().err
    evaluate[evaluate.index(str(tmp_path / "a"))] = str(tmp_path / "b")  # continued on article 0: 1 is still in it
    assert main([*evaluate, "--fit-articles", "2", "--eval-articles", "1"]) == 2
    assert not (tmp_path / "r.json").exists()
    # a sampled fit says how many paragraphs it saw: "articles 1" alone would claim all of them
    evaluate[evaluate.index(str(tmp_path / "b"))] = str(tmp_path / "a")
    run = ["--eval-articles", "2-3", "--max-paragraphs", "2", "--runs", "none/none", "--capacity-paragraphs", "0"]
    assert main([*evaluate, *run, "--fold-in-steps", "1", "--max-new-tokens", "2"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["config"]["fit_documents"] == 2
    assert "adapter fitted on 2 paragraphs of articles 1-1;" in (tmp_path / "r.md").read_text()


def test_combine_reads_without_the_shared_term_where_the_adapter_was_fitted_so(tmp_path: Path) -> None:
    config = AdapterConfig(rank=4, targets=["o"], layers=[-1], shared_in_reading=False)
    PluginAdapter(tiny_model(), config).save(tmp_path / "adapter")
    runtime = Runtime(Settings(data_dir=tmp_path, model="tiny", adapter=tmp_path / "adapter"), Metrics())
    runtime.load()
    try:
        weights = {
            mode: runtime.prepare("When?", mode, 3, 2, 0.0, None, hits=[]).request.shared_weight
            for mode in ("none", "plugins", "context", "combine")
        }
    finally:
        runtime.close()
    assert weights == {"none": 1.0, "plugins": 1.0, "context": 1.0, "combine": 0.0}


def test_combine_readers_reach_combine_requests_only_and_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _squad(tmp_path / "squad.json")
    PluginAdapter(tiny_model(), AdapterConfig(rank=4, targets=["o"], layers=[-1])).save(tmp_path / "adapter")
    sent: list[tuple[str, float, list[tuple[bool, float, float]]]] = []
    submit = Runtime.submit

    def record(self: Runtime, prepared: Any) -> Any:
        r = prepared.request
        sent.append((prepared.mode, r.weight, [(p.use_adapter, p.weight, p.plausibility) for p in r.partners]))
        assert all(p.z is None for p in r.partners)
        return submit(self, prepared)

    monkeypatch.setattr(Runtime, "submit", record)
    runs = [("context", "retrieved"), ("combine", "retrieved")]
    for given, readers in (
        ({"combine_mix": 0.4}, (0.4, [(False, 0.6, 0.0)])),  # 0.4 adapted + 0.6 bare
        ({"combine_guidance": 1.5}, (1.5, [(False, 1.0, 0.0), (True, -1.5, 0.0)])),  # bare + 1.5 (plugins - none)
        (  # the same, only among the tokens the bare reader finds at least a tenth as likely as its top one
            {"combine_guidance": 1.5, "combine_plausibility": 0.1},
            (1.5, [(False, 1.0, 0.1), (True, -1.5, 0.0)]),
        ),
    ):
        sent.clear()
        options = _options(
            tmp_path, max_paragraphs=2, max_new_tokens=2, capacity_paragraphs=0, fold_in=FoldInConfig(steps=0),
            runs=runs, **given,
        )  # fmt: skip
        report = eval_squad(options, None)
        assert all(report["config"][flag] == value for flag, value in given.items())
        assert {(w, tuple(p)) for mode, w, p in sent if mode == "combine"} == {(readers[0], tuple(readers[1]))}
        assert {(w, tuple(p)) for mode, w, p in sent if mode == "context"} == {(1.0, ())}
    with pytest.raises(ValidationError):  # a weight of 1 would drop the bare reader: use mix 0 for that
        SquadEval(_options(tmp_path, combine_mix=1.0), tmp_path / "work")
    with pytest.raises(ValidationError):  # two ways to combine at once
        SquadEval(_options(tmp_path, combine_mix=0.3, combine_guidance=1.0), tmp_path / "work")
    with pytest.raises(ValidationError):  # a cut-off is a fraction of the top token's probability
        SquadEval(_options(tmp_path, combine_guidance=1.0, combine_plausibility=1.5), tmp_path / "work")
    with pytest.raises(ValidationError):  # no bare reader to cut off by
        SquadEval(_options(tmp_path, combine_plausibility=0.1), tmp_path / "work")


def test_fit_selector_saves_a_selector_beside_the_adapter_that_eval_folds_in_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters.spans import WEIGHTS_FILE
    from service.cli import main

    _squad(tmp_path / "squad.json")
    selector = ["fit-selector", "--data", str(tmp_path / "squad.json"), "--articles", "0-1", "--model", "tiny"]
    assert main([*selector, "--adapter", str(tmp_path / "a")]) == 2  # no adapter there to sit beside
    assert "no adapter checkpoint" in capsys.readouterr().err
    fit = ["fit", "--data", str(tmp_path / "squad.json"), "--articles", "0-1", "--model", "tiny", "--rank", "4",
           "--layers", "0-1", "--no-encoder", "--epochs", "1", "--batch-size", "2",
           "--out", str(tmp_path / "a")]  # fmt: skip
    assert main(fit) == 0
    evaluate = ["eval", "squad", "--data", str(tmp_path / "squad.json"), "--model", "tiny", "--adapter",
                str(tmp_path / "a"), "--out", str(tmp_path / "r.json"), "--fit-articles", "0-1", "--eval-articles",
                "2-3", "--runs", "plugins/oracle", "--capacity-paragraphs", "0", "--fold-in-steps", "1",
                "--max-new-tokens", "2", "--fold-in-selected", "1", "--fold-in-max-examples", "1"]  # fmt: skip
    assert main(evaluate) == 2
    assert "has no span selector" in capsys.readouterr().err
    assert main([*selector, "--adapter", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / WEIGHTS_FILE).exists()
    assert main([*evaluate, "--fold-in-selected-written"]) == 2  # refused at start: no writer beside the adapter
    assert "has no question writer" in capsys.readouterr().err
    assert main(evaluate) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["fold_in"]["selected"] == 1
    # the selector asks about one span a paragraph, the year its question wants in every fitting paragraph
    assert report["coverage"]["questions_covered"] == 1.0
    assert "1 selected-span + questions" in (tmp_path / "r.md").read_text()
    # a fit whose store writes each x from the selected spans, with a's selector, keeps that selector beside it
    store = [*fit[:-1], str(tmp_path / "b"), "--store", "facts", "--store-examples", "1", "--store-selected", "1"]
    assert main([*store, "--selector", str(tmp_path / "r.json")]) == 2
    assert "no span selector" in capsys.readouterr().err
    assert main([*store, "--selector", str(tmp_path / "a"), "--store-selected-written"]) == 2
    assert "no question writer" in capsys.readouterr().err  # as fold-in would refuse it
    assert main([*store, "--selector", str(tmp_path / "a"), "--store-selected-window", "2"]) == 0
    fitted = json.loads((tmp_path / "b" / "adapter.json").read_text())["extra"]["fit"]
    assert fitted["store_selected"] == 1 and fitted["store_selected_window"] == 2
    assert (tmp_path / "b" / WEIGHTS_FILE).read_bytes() == (tmp_path / "a" / WEIGHTS_FILE).read_bytes()
