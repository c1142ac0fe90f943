"""`kplug eval squad`: do plugins carry their document's knowledge? The SQuAD benchmark of the project.

Paragraphs are documents, questions are queries, split by article. The adapter is fitted on the fitting articles
(or given with --adapter); evaluation paragraphs are registered through the service's own registration path
(embedding + fold-in from the paragraph text alone) into a fresh store, and every mode runs through the service's
own query path (retrieval, composition, prompt, batching engine) with greedy decoding and one token budget.

Runs: none; plugins, context and combine with oracle retrieval (the question's own paragraph) and with the top-3
from FAISS; plugins/wrong, a control where each question gets another article's paragraph plugin; and
capacity/oracle, a diagnostic where plugins are trained on their own paragraph's gold questions (never the method).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.adapter import read_checkpoint_meta
from adapters.corpus import QA, Document, load_squad
from adapters.errors import InvalidInputError
from adapters.examples import answer_targets, covers
from adapters.metrics import contained, exact_match, f1, normalize_answer
from adapters.training import FoldInConfig, fold_in, fold_in_examples, fold_in_steps, resolved_precision
from index.codec import PluginFormat
from service.metrics import Metrics
from service.protocol import Mode
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)

RUNS: list[tuple[Mode, str]] = [
    ("none", "none"),
    ("plugins", "oracle"),
    ("plugins", "retrieved"),
    ("plugins", "wrong"),
    ("context", "oracle"),
    ("context", "retrieved"),
    ("combine", "oracle"),
    ("combine", "retrieved"),
    ("plugins", "shared"),
    ("combine", "retrieved-shared"),
    ("plugins", "oracle-unshared"),
    ("combine", "retrieved-unshared"),
    ("combine", "retrieved-wrong"),
]
# "shared" runs apply the shared U, V with z = 0 (no plugin): what the plugins themselves add is the difference;
# "unshared" runs apply the plugins' term alone (the shared term U V h off): the bare model plus the documents' plugins.
# "retrieved-wrong" keeps the retrieved paragraphs in the prompt but composes another article's plugin: do the
# plugins add to reading through their own documents' content? These diagnostics run only on request (slow).
DEFAULT_RUNS = [run for run in RUNS if not run[1].endswith(("-unshared", "-wrong"))]


def parse_runs(spec: str | None) -> list[tuple[Mode, str]]:
    """A spec such as "none/none,plugins/oracle" -> a subset of RUNS, in RUNS order; None -> DEFAULT_RUNS;
    "all" -> every run."""
    if spec is None:
        return list(DEFAULT_RUNS)
    if spec.strip() == "all":
        return list(RUNS)
    wanted = {tuple(part.strip().split("/", 1)) for part in spec.split(",") if part.strip()}
    known = {f"{m}/{r}" for m, r in RUNS}
    unknown = sorted("/".join(w) for w in wanted if "/".join(w) not in known)
    if unknown or not wanted:
        raise InvalidInputError(f"unknown runs {unknown or spec!r}; known: {sorted(known)}")
    return [run for run in RUNS if run in wanted]


@dataclass
class EvalOptions:
    data: Path
    fit_articles: list[int]
    eval_articles: list[int]
    adapter: Path
    max_paragraphs: int | None = None
    seed: int = 0
    top_k: int = 3
    max_new_tokens: int = 24
    batch: int = 32
    model: str = "smollm2"
    fold_in: FoldInConfig | None = None
    plugin_format: PluginFormat = "float16"
    composition_temperature: float | None = None  # None: the service's setting (KPLUG_COMPOSITION_TEMPERATURE)
    combine_mix: float | None = None  # None: the service's setting (KPLUG_COMBINE_MIX)
    combine_guidance: float | None = None  # None: the service's setting (KPLUG_COMBINE_GUIDANCE)
    combine_plausibility: float | None = None  # None: the service's setting (KPLUG_COMBINE_PLAUSIBILITY)
    capacity_paragraphs: int = 12
    # The diagnostic's fold-in: 60 steps at lr 0.3 push hard (milestone zero); 5 at 1.0 ask what the method's
    # budget writes when the examples are the very questions asked.
    capacity_steps: int = 60
    capacity_lr: float = 0.3
    # the gold questions; "gold-spans": rule-made questions for the gold answers; "gold-selected": the fold-in's
    # selected-span questions (its window and writer) for every candidate span holding a gold answer
    capacity_examples: str = "qa"
    runs: Sequence[tuple[Mode, str]] = tuple(DEFAULT_RUNS)


@dataclass
class Question:
    doc: Document
    qa: QA
    retrieved: list[tuple[str, float]]
    wrong: str


def sample_paragraphs(docs: Sequence[Document], articles: list[int], n: int | None, seed: int) -> list[Document]:
    """A fixed, seeded sample of evaluation paragraphs (with all their questions), in corpus order."""
    pool = [d for d in docs if d.article in articles]
    if n is None or n >= len(pool):
        return pool
    chosen = set(random.Random(seed).sample(range(len(pool)), n))
    return [d for i, d in enumerate(pool) if i in chosen]


def _per_question(
    metric: Callable[[str, Sequence[str]], float], outputs: Sequence[str], questions: Sequence[Question]
) -> np.ndarray:
    return np.array([metric(o, q.qa.answers) for o, q in zip(outputs, questions, strict=True)])


def _score(outputs: Sequence[str], questions: Sequence[Question]) -> dict[str, float]:
    return {
        name: float(_per_question(metric, outputs, questions).mean())
        for name, metric in (("contained", contained), ("em", exact_match), ("f1", f1))
    }


class SquadEval:
    def __init__(self, options: EvalOptions, workdir: Path) -> None:
        self.o = options
        fold = options.fold_in or FoldInConfig()
        given: dict[str, Any] = {
            "composition_temperature": options.composition_temperature,
            "combine_mix": options.combine_mix,
            "combine_guidance": options.combine_guidance,
            "combine_plausibility": options.combine_plausibility,
        }
        settings = Settings(
            data_dir=workdir,
            model=options.model,
            adapter=options.adapter,
            max_batch=options.batch,
            queue_size=10**6,
            request_timeout_s=10**6,
            fold_in=fold,
            plugin_format=options.plugin_format,
            **{k: v for k, v in given.items() if v is not None},  # None: the service's setting
        )
        self.runtime = Runtime(settings, Metrics())

    def run(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The report, and every question with each run's answer (for reading the answers, not scoring them)."""
        o, rt = self.o, self.runtime
        docs = load_squad(o.data, sorted(set(o.eval_articles)))
        paragraphs = sample_paragraphs(docs, o.eval_articles, o.max_paragraphs, o.seed)
        rt.load()
        try:
            fold_s = self._register(paragraphs)
            questions = self._questions(paragraphs)
            recall = float(np.mean([q.doc.id in {i for i, _ in q.retrieved} for q in questions]))
            results: dict[str, dict[str, Any]] = {}
            outputs: dict[str, list[str]] = {}
            for mode, retrieval in o.runs:
                key = f"{mode}/{retrieval}"
                started = time.perf_counter()
                outputs[key], results[key] = self._run(mode, retrieval, questions)
                log.info("%s: %s (%.0f s)", key, results[key], time.perf_counter() - started)
            if o.capacity_paragraphs:
                results["capacity/oracle"], results["none/capacity-subset"] = self._capacity(paragraphs, questions)
            analysis = self._analysis(paragraphs, questions, outputs)
            analysis.update(self._coverage(paragraphs, questions, outputs))
            texts = {d.id: d.text for d in paragraphs}
            reading = [k for k in outputs if k.split("/")[0] in ("context", "combine") and "retrieved" in k]
            analysis["answer_sources"] = {k: answer_sources(outputs[k], questions, texts) for k in reading}
        finally:
            rt.close()
        answers = [
            {
                "id": q.qa.id,
                "paragraph": q.doc.id,
                "question": q.qa.question,
                "references": list(q.qa.answers),
                "retrieved": [doc_id for doc_id, _ in q.retrieved],
                "outputs": {key: texts[i] for key, texts in outputs.items()},
            }
            for i, q in enumerate(questions)
        ]
        report = {
            "results": results,
            "retrieval_recall_at_k": recall,
            "fold_in_seconds_per_doc": fold_s,
            "fold_in_warmup_seconds": rt.fold_in_warmup_s,  # compiling fold-in at start-up; None: not compiled
            "bytes_per_plugin": rt.store.plugin_bytes,
            **analysis,
            "config": {
                "data": str(o.data),
                "fit_articles": f"{min(o.fit_articles)}-{max(o.fit_articles)}",
                "fit_documents": read_checkpoint_meta(o.adapter)["extra"].get("documents"),  # None: not recorded
                "eval_articles": f"{min(o.eval_articles)}-{max(o.eval_articles)}",
                "max_paragraphs": o.max_paragraphs,
                "paragraphs": len(paragraphs),
                "questions": len(questions),
                "seed": o.seed,
                "top_k": o.top_k,
                "max_new_tokens": o.max_new_tokens,
                "batch": o.batch,
                "adapter": str(o.adapter),
                "adapter_id": rt.adapter.checkpoint_id,
                "adapter_config": rt.adapter.config.model_dump(),
                "fold_in": rt.settings.fold_in.model_dump(),
                "fold_in_steps": fold_in_steps(rt.adapter, rt.settings.fold_in),
                "fold_in_precision": resolved_precision(rt.base.model, rt.settings.fold_in.precision),
                "plugin_format": rt.store.plugin_format,
                "lexical_weight": rt.settings.lexical_weight,
                "composition_temperature": rt.settings.composition_temperature,
                "composition_scale": rt.settings.composition_scale,
                "combine_mix": rt.settings.combine_mix,
                "combine_guidance": rt.settings.combine_guidance,
                "combine_plausibility": rt.settings.combine_plausibility,
                "capacity": {
                    "paragraphs": o.capacity_paragraphs,
                    "steps": o.capacity_steps,
                    "lr": o.capacity_lr,
                    "examples": o.capacity_examples,
                },
                "model": rt.base.identity.name,
                "latency_note": f"per request, decoded in batches of up to {o.batch}",
            },
        }
        return report, answers

    def _register(self, paragraphs: Sequence[Document]) -> float:
        """Through the registrar, as POST /documents does; returns fold-in seconds per paragraph."""
        reg = self.runtime.registrar
        seconds: list[float] = []
        for start in range(0, len(paragraphs), 32):
            chunk = [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in paragraphs[start : start + 32]]
            job = reg.wait(reg.submit(chunk, "overwrite").id)
            if job.state != "succeeded":
                raise RuntimeError(f"registration failed: {job.error}")
            seconds += [r["seconds"] for r in job.results]
        return float(np.mean(seconds))

    def _questions(self, paragraphs: Sequence[Document]) -> list[Question]:
        rng = random.Random(self.o.seed + 1)
        rt = self.runtime
        out = []
        for doc in paragraphs:
            others = [p.id for p in paragraphs if p.article != doc.article] or [
                p.id for p in paragraphs if p is not doc
            ]
            for qa in doc.questions:
                out.append(Question(doc, qa, rt.search(qa.question, self.o.top_k), rng.choice(others)))
        return out

    def _hits(self, retrieval: str, q: Question) -> list[tuple[str, float]] | None:
        retrieval = retrieval.removesuffix("-unshared").removesuffix("-wrong")
        if retrieval == "oracle":
            return [(q.doc.id, 1.0)]
        if retrieval == "wrong":
            return [(q.wrong, 1.0)]
        if retrieval == "shared":
            return []
        if retrieval.startswith("capacity"):
            return [(f"capacity:{q.doc.id}", 1.0)]
        return q.retrieved

    def _run(self, mode: Mode, retrieval: str, questions: Sequence[Question]) -> tuple[list[str], dict[str, Any]]:
        rt = self.runtime
        prepared = [
            rt.prepare(
                q.qa.question, mode, self.o.top_k, self.o.max_new_tokens, 0.0, None, hits=self._hits(retrieval, q)
            )
            for q in questions
        ]
        for p, q in zip(prepared, questions, strict=True):
            if retrieval.endswith("-unshared"):
                p.request.shared_weight = 0.0
            elif retrieval.endswith("shared"):
                p.request.z = None  # the documents' text stays in the prompt; their plugins go
            elif retrieval.endswith("-wrong"):  # the text stays; the plugin is another article's
                p.request.z = rt.prepare(q.qa.question, "plugins", 1, 1, 0.0, None, hits=[(q.wrong, 1.0)]).request.z

        async def generate_all() -> list[Any]:
            handles = [rt.submit(p) for p in prepared]
            return [await h.result() for h in handles]

        finals = asyncio.run(generate_all())
        outputs = [f.text for f in finals]
        scores = _score(outputs, questions)
        latency = [p.retrieval_ms + p.compose_ms + f.generate_ms for p, f in zip(prepared, finals, strict=True)]
        scores.update(
            context_tokens=float(np.mean([p.context_tokens for p in prepared])),
            latency_ms=float(np.mean(latency)),
            n=len(questions),
        )
        return outputs, scores

    def _capacity(
        self, paragraphs: Sequence[Document], questions: Sequence[Question]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Milestone zero: plugins trained on their own gold questions (frozen U, V) must answer them."""
        rt = self.runtime
        chosen = list(paragraphs[: self.o.capacity_paragraphs])
        config = FoldInConfig(
            examples=self.o.capacity_examples,
            steps=self.o.capacity_steps,
            lr=self.o.capacity_lr,
            l2=0.0,
            max_examples=None,
        )
        if self.o.capacity_examples == "gold-selected":  # the method's fold-in, with a perfect span selector
            gold = {"examples": "none", "selected": max(rt.settings.fold_in.selected, 1), "selected_gold": True}
            config = rt.settings.fold_in.model_copy(update=gold | {"steps": config.steps, "lr": config.lr})
        results = rt.engine.call(lambda: fold_in(rt.adapter, rt.base.model, rt.base.tokenizer, chosen, config)).result()
        for doc, res in zip(chosen, results, strict=True):
            rt.store.put(f"capacity:{doc.id}", doc.text, {}, rt.store.embedding(doc.id), res.plugin)
        ids = {d.id for d in chosen}
        subset = [q for q in questions if q.doc.id in ids]
        return self._run("plugins", "capacity", subset)[1], self._run("none", "none", subset)[1]

    def _analysis(
        self, paragraphs: Sequence[Document], questions: Sequence[Question], outputs: dict[str, list[str]]
    ) -> dict[str, Any]:
        """The seed idea's promises: plugin similarity finds same-article neighbours; |x| tracks helpfulness."""
        store = self.runtime.store
        ids = [d.id for d in paragraphs]
        articles = np.array([d.article for d in paragraphs])
        plugins = store.plugins(ids)
        x = np.stack([plugins[i].reshape(-1) for i in ids])  # (N, M*r)
        emb = np.stack([store.embedding(i) for i in ids])  # (N, d)

        def same_article_rate(vectors: np.ndarray) -> float:
            unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            cos = unit @ unit.T
            np.fill_diagonal(cos, -np.inf)
            return float((articles[cos.argmax(1)] == articles).mean())

        out: dict[str, Any] = {
            "similarity": {
                "plugin_nn_same_article": same_article_rate(x),
                "embedding_nn_same_article": same_article_rate(emb),
                "chance": float(np.mean([(articles == a).sum() - 1 for a in articles]) / max(1, len(ids) - 1)),
            },
            # beside the fit's record of its free plugins (adapter.json, extra.plugins): does fold-in write x of
            # the size U, V learned to read?
            "plugins": {"rms": float(np.sqrt(np.mean(x**2))), "mean_norm": float(np.linalg.norm(x, axis=1).mean())},
        }
        # is the own plugin above no plugin, a wrong one, U, V alone; do plugins add to classic RAG?
        pairs = [("plugins/oracle", b) for b in ("none/none", "plugins/wrong", "plugins/shared")]
        pairs += [("combine/retrieved", b) for b in ("context/retrieved", "combine/retrieved-shared")]
        pairs += [("combine/retrieved-unshared", b) for b in ("context/retrieved", "combine/retrieved")]
        pairs += [("plugins/oracle-unshared", b) for b in ("none/none", "plugins/oracle")]
        pairs += [("combine/retrieved", "combine/retrieved-wrong")]
        out["paired"] = {
            f"{a} vs {b}": paired(outputs[a], outputs[b], questions) for a, b in pairs if a in outputs and b in outputs
        }
        if "plugins/oracle" in outputs and "none/none" in outputs:
            gain: dict[str, list[float]] = defaultdict(list)
            for q, with_plugin, without in zip(questions, outputs["plugins/oracle"], outputs["none/none"], strict=True):
                gain[q.doc.id].append(f1(with_plugin, q.qa.answers) - f1(without, q.qa.answers))
            norms = np.linalg.norm(x, axis=1)
            helps = np.array([statistics.mean(gain[i]) for i in ids])
            out["uniqueness"] = {
                "pearson_norm_vs_f1_gain": _corr(norms, helps),
                "spearman_norm_vs_f1_gain": _corr(_ranks(norms), _ranks(helps)),
                "norm_mean": float(norms.mean()),
                "norm_std": float(norms.std()),
            }
        return out

    def _coverage(
        self, paragraphs: Sequence[Document], questions: Sequence[Question], outputs: dict[str, list[str]]
    ) -> dict[str, Any]:
        """Is fold-in limited by what its examples ask or by how far plugins generalise? The share of questions whose
        reference answer is contained in the target of one of its paragraph's made examples (the selected spans' and
        the builder's, as fold-in spreads them, however asked; the written and self-study sources not counted), and
        plugins/oracle's contained rate on both parts. Contained, as the metric: a clause target holding the answer
        covers it. And how often plugins answer with another of the paragraph's targets (misrouted): facts held but
        given to the wrong question."""
        fold = self.runtime.settings.fold_in
        if fold_in_steps(self.runtime.adapter, fold) == 0:
            return {}
        rt, made = self.runtime, fold.model_copy(update={"self_study": 0, "written": 0})
        examples = rt.engine.call(
            lambda: fold_in_examples(rt.adapter, rt.base.model, rt.base.tokenizer, paragraphs, made)
        )
        targets = {doc.id: answer_targets(exs) for doc, exs in zip(paragraphs, examples.result(), strict=True)}
        covered = np.array([covers(targets[q.doc.id], q.qa.answers) for q in questions])
        made_by = (f"{fold.selected} selected-span + " if fold.selected else "") + fold.examples
        out: dict[str, Any] = {"examples": made_by, "questions_covered": float(covered.mean())}
        if "plugins/oracle" in outputs:
            got = _per_question(contained, outputs["plugins/oracle"], questions)
            for name, part in (("covered", covered), ("uncovered", ~covered)):
                out[f"plugins/oracle contained, {name}"] = float(got[part].mean()) if part.any() else None
        for run in ("plugins/oracle", "plugins/wrong"):  # the wrong plugin: how often that happens by chance
            if run in outputs:
                pairs = zip(outputs[run], questions, strict=True)
                out[f"{run} answered with another target"] = float(
                    np.mean([misrouted(o, q.qa.answers, targets[q.doc.id]) for o, q in pairs])
                )
        return {"coverage": out}


def misrouted(output: str, answers: Sequence[str], targets: Sequence[str]) -> bool:
    """A wrong answer that holds one of the paragraph's fold-in targets: a fact its plugin was written with, given
    to the wrong question. Targets under 4 characters are left out: short numbers match by chance."""
    return not contained(output, answers) and any(
        len(normalize_answer(t)) >= 4 and contained(output, [t]) for t in targets
    )


def answer_sources(outputs: Sequence[str], questions: Sequence[Question], texts: dict[str, str]) -> dict[str, float]:
    """Where a reading run's answers come from: shares of questions answered right (contained), and of the rest,
    answers that are a span of the question's own paragraph, a span of another retrieved paragraph only (the
    distractors were read instead), or neither (paraphrased, partial or made up). Normalised text throughout."""
    norm = {doc_id: normalize_answer(text) for doc_id, text in texts.items()}
    counts = dict.fromkeys(("right", "own paragraph", "other retrieved paragraph", "neither"), 0)
    for out, q in zip(outputs, questions, strict=True):
        answer = normalize_answer(out)
        if contained(out, q.qa.answers):
            counts["right"] += 1
        elif answer and answer in norm[q.doc.id]:
            counts["own paragraph"] += 1
        elif answer and any(answer in norm[i] for i, _ in q.retrieved if i != q.doc.id):
            counts["other retrieved paragraph"] += 1
        else:
            counts["neither"] += 1
    return {k: v / max(1, len(questions)) for k, v in counts.items()}


def paired(a: Sequence[str], b: Sequence[str], questions: Sequence[Question], seed: int = 0) -> dict[str, Any]:
    """Is run a above run b on the same questions? Milestone one asks "clearly above", so the report says how clearly:
    questions only a (wins) or only b (losses) contains, an exact two-sided sign test on them, and a paired
    bootstrap 95% interval of the mean F1 difference."""
    got_a, got_b = _per_question(contained, a, questions), _per_question(contained, b, questions)
    wins, losses = int(((got_a == 1) & (got_b == 0)).sum()), int(((got_a == 0) & (got_b == 1)).sum())
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n if n else 1.0
    diff = _per_question(f1, a, questions) - _per_question(f1, b, questions)  # (Q,)
    boot = np.random.default_rng(seed).choice(diff, size=(2000, len(diff))).mean(1)  # (2000,)
    return {
        "wins": wins,
        "losses": losses,
        "sign_test_p": min(1.0, 2 * tail),
        "f1_diff": float(diff.mean()),
        "f1_diff_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
    }


def _answers(path: Path, run: str) -> dict[str, tuple[Question, str]]:
    """One run's answers from a FILE.answers.jsonl that `kplug eval squad --out FILE` wrote, by question id."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if run not in row["outputs"]:
                raise InvalidInputError(f"{path} has no run {run!r}; it has {sorted(row['outputs'])}")
            qa = QA(row["id"], row["question"], tuple(row["references"]))
            retrieved = [(str(doc_id), 0.0) for doc_id in row.get("retrieved", [])]  # scores are not stored
            out[row["id"]] = (Question(Document(row["paragraph"], ""), qa, retrieved, ""), row["outputs"][run])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path} is not an answers file of kplug eval squad: {exc}") from exc
    return out


def compare_answers(a: tuple[Path, str], b: tuple[Path, str]) -> dict[str, Any]:
    """Two runs, possibly of two evaluations (two adapters), paired on the same questions, and split by whether
    retrieval's top-1 (in a's file) is the question's own paragraph: a composition of retrieved plugins is mostly
    the top-1 plugin, so the split tells a wrong composition's harm from the right plugin's."""
    first, second = _answers(*a), _answers(*b)
    if first.keys() != second.keys():
        raise InvalidInputError("the two runs answered different questions: compare runs of the same sample")
    ids = sorted(first)
    questions = [first[i][0] for i in ids]
    outputs_a, outputs_b = [first[i][1] for i in ids], [second[i][1] for i in ids]
    by_top1 = {}
    for name, own in (("top1_own", True), ("top1_other", False)):
        keep = [k for k, q in enumerate(questions) if q.retrieved and (q.retrieved[0][0] == q.doc.id) == own]
        if keep:
            sub = [questions[k] for k in keep]
            by_top1[name] = {"n": len(keep), **paired([outputs_a[k] for k in keep], [outputs_b[k] for k in keep], sub)}
    return {
        "a": {"file": str(a[0]), "run": a[1], **_score(outputs_a, questions)},
        "b": {"file": str(b[0]), "run": b[1], **_score(outputs_b, questions)},
        "n": len(ids),
        **paired(outputs_a, outputs_b, questions),
        "by_top1": by_top1,
    }


def _ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v)).astype(float)


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _fmt(value: float | None) -> str:
    return "undefined (no variance)" if value is None else f"{value:.3f}"


def _fold_in_method(cfg: dict[str, Any]) -> str:
    fold, steps, encoder = cfg["fold_in"], cfg["fold_in_steps"], cfg["adapter_config"]["encoder"] is not None
    if steps == 0:
        return "encoder only"
    names = (("self_study", "self-study"), ("written", "written"), ("selected", "selected-span"))
    sources = [f"{fold[k]} {name}" for k, name in names if fold.get(k)]
    if fold.get("selected") and fold.get("selected_written"):
        sources[-1] += " (written and rule-made questions)"
    made = " + ".join([*sources, fold["examples"]])
    distill = f" + context distillation x{fold['distill']}" if fold.get("distill") else ""
    precision = f", {cfg['fold_in_precision']}" if cfg.get("fold_in_precision") == "bfloat16" else ""
    compiled = ", compiled" if fold.get("compile") else ""
    return (
        f"{'encoder + ' if encoder else ''}{steps} steps on {made} examples{distill}, lr {fold['lr']}{precision}"
        f"{compiled}"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| mode/retrieval | contained | EM | F1 | context tokens | latency ms | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in report["results"].items():
        lines.append(
            f"| {key} | {r['contained']:.3f} | {r['em']:.3f} | {r['f1']:.3f} | {r['context_tokens']:.0f} "
            f"| {r['latency_ms']:.0f} | {r['n']} |"
        )
    sim, cfg = report["similarity"], report["config"]
    warmup = report.get("fold_in_warmup_seconds")
    warm = f" (after compiling it at start-up in {warmup:.0f} s)" if warmup else ""
    lines += [
        "",
        f"Retrieval recall@{cfg['top_k']}: {report['retrieval_recall_at_k']:.3f}. "
        f"Fold-in ({_fold_in_method(cfg)}): {report['fold_in_seconds_per_doc']:.3f} s per paragraph{warm}. "
        f"Plugin: {report['bytes_per_plugin']} bytes ({cfg.get('plugin_format', 'float16')}).",
        f"Nearest neighbour from the same article: plugins {sim['plugin_nn_same_article']:.3f}, "
        f"MiniLM embeddings {sim['embedding_nn_same_article']:.3f} (chance {sim['chance']:.3f}).",
    ]
    if "uniqueness" in report:
        u = report["uniqueness"]
        lines.append(
            f"Uniqueness: correlation of |x_d| with the plugin's F1 gain on its paragraph's questions: "
            f"Pearson {_fmt(u['pearson_norm_vs_f1_gain'])}, Spearman {_fmt(u['spearman_norm_vs_f1_gain'])}."
        )
    if "coverage" in report:
        c = report["coverage"]
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in c.items() if k.startswith("plugins/"))
        lines.append(
            f"Coverage: the reference answer is contained in the target of one of its paragraph's {c['examples']} "
            f"fold-in examples for {c['questions_covered']:.3f} of the questions" + (f"; {parts}." if parts else ".")
        )
    for key, shares in report.get("answer_sources", {}).items():
        lines.append(f"Answer sources, {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()) + ".")
    for key, t in report.get("paired", {}).items():
        low, high = t["f1_diff_ci95"]
        first, second = key.split(" vs ")
        lines.append(
            f"Paired, {key}: contained on {t['wins']} questions only by {first}, {t['losses']} only by {second} "
            f"(sign test p {t['sign_test_p']:.3f}); F1 difference {t['f1_diff']:+.3f} "
            f"(95% CI {low:+.3f} to {high:+.3f})."
        )
    fitted = f"{cfg['fit_documents']} paragraphs of " if cfg.get("fit_documents") else ""
    lines.append(
        f"{cfg['paragraphs']} paragraphs, {cfg['questions']} questions of articles {cfg['eval_articles']}; "
        f"adapter fitted on {fitted}articles {cfg['fit_articles']}; {cfg['model']}, greedy, "
        f"{cfg['max_new_tokens']} new tokens."
    )
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["results"])
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 1.1), 4.5))
    for offset, metric in ((-0.2, "contained"), (0.2, "f1")):
        ax.bar(x + offset, [report["results"][k][metric] for k in keys], 0.4, label=metric)
    ax.set_xticks(x, keys, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title(f"SQuAD, {report['config']['questions']} questions, {report['config']['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_squad(options: EvalOptions, out: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kplug-eval-") as workdir:
        report, answers = SquadEval(options, Path(workdir)).run()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
        bar_chart(report, out.with_suffix(".png"))
        with out.with_suffix(".answers.jsonl").open("w") as f:
            f.writelines(json.dumps(a) + "\n" for a in answers)
    return report
