"""Research driver for the knowledge method (not part of the package): fit, then score modes on held-out docs."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from adapters.adapter import AdapterConfig, PluginAdapter
from adapters.base_model import load_base_model
from adapters.corpus import load_squad
from adapters.encoder import EncoderConfig
from adapters.generation import greedy_generate
from adapters.metrics import contained, f1
from adapters.prompts import chat_prompt
from adapters.training import FitConfig, FoldInConfig, fit, fold_in

DATA = Path("../shared/data/squad-v1.1-dev-articles-00-35.json")


def score(base, adapter, docs, plugins, label, max_q, batch=32, contexts=False):
    rng = random.Random(1)
    rows = [(i, qa) for i, d in enumerate(docs) for qa in d.questions]
    rng.shuffle(rows)
    rows = rows[:max_q]
    n = len(docs)
    res = {}
    modes = ["none", "oracle", "wrong", "zero"] + (["context"] if contexts else [])
    for mode in modes:
        hits, f1s = [], []
        for s in range(0, len(rows), batch):
            chunk = rows[s : s + batch]
            ctx = mode == "context"
            prompts = [chat_prompt(base.tokenizer, qa.question, [docs[i].text] if ctx else []) for i, qa in chunk]
            if mode in ("none", "context"):
                z = None
                ad = None
            elif mode == "zero":
                z, ad = None, adapter
            else:
                # wrong: a plugin from another article, fixed per question
                idx = [i if mode == "oracle" else (i + n // 2) % n for i, _ in chunk]
                z, ad = torch.from_numpy(plugins[idx]), adapter
            outs = greedy_generate(base.model, base.tokenizer, ad, prompts, z, 24)
            for (_, qa), o in zip(chunk, outs, strict=True):
                hits.append(contained(o, qa.answers))
                f1s.append(f1(o, qa.answers))
        res[mode] = {"contained": float(np.mean(hits)), "f1": float(np.mean(f1s)), "n": len(hits)}
        print(label, mode, res[mode], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="22-29")
    ap.add_argument("--targets", default="o,down")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=128)
    ap.add_argument("--enc-layer", type=int, default=8)
    ap.add_argument("--enc-hidden", type=int, default=512)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--l2", type=float, default=1e-4)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--fit-max-docs", type=int, default=100000)
    ap.add_argument("--val-q", type=int, default=200)
    ap.add_argument("--eval-docs", type=int, default=60)
    ap.add_argument("--foldin-steps", type=int, default=0)
    ap.add_argument("--foldin-lr", type=float, default=0.1)
    ap.add_argument("--foldin-examples", default="cloze")
    ap.add_argument("--load", default="")
    ap.add_argument("--only-val", action="store_true")
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument("--u-std", type=float, default=0.02)
    ap.add_argument("--max-ex", type=int, default=16)
    ap.add_argument("--val-docs", type=int, default=1000)
    ap.add_argument("--out", default="runs/exp")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = load_base_model()
    lo, hi = (int(v) for v in args.layers.split("-"))
    cfg = AdapterConfig(
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets.split(","),
        layers=list(range(lo, hi + 1)),
        encoder=EncoderConfig(layer=args.enc_layer, hidden=args.enc_hidden) if args.enc_layer >= 0 else None,
        u_init_std=args.u_std,
    )
    docs = load_squad(DATA)
    train = [d for d in docs if d.article < 20][: args.fit_max_docs]
    val = [d for d in docs if 20 <= d.article < 24]
    rng = random.Random(0)
    ev = rng.sample([d for d in docs if d.article >= 24], args.eval_docs)
    if args.load:
        adapter = PluginAdapter.load(Path(args.load), base)
    elif args.no_fit:
        adapter = PluginAdapter(base, cfg)
    else:
        adapter = PluginAdapter(base, cfg)
        t = time.time()
        rep = fit(
            adapter,
            base.model,
            base.tokenizer,
            train,
            FitConfig(epochs=args.epochs, lr=args.lr, batch_size=args.bs, l2=args.l2, weight_decay=args.wd),
        )
        print("fit seconds", time.time() - t, "final loss", np.mean(rep.losses[-50:]), flush=True)
        adapter.save(out / "adapter")
    results = {"args": vars(args)}
    fcfg = FoldInConfig(steps=args.foldin_steps, lr=args.foldin_lr, examples=args.foldin_examples)
    import adapters.examples as ex
    ex.EXAMPLE_BUILDERS["questions"] = lambda d: ex.question_examples(d, args.max_ex)
    groups = [("val", val, args.val_q), ("eval", ev, 10**6)]
    if args.only_val:
        groups = [("val", val[: args.val_docs], args.val_q)]
    for name, group, max_q in groups:
        t = time.time()
        folded = fold_in(adapter, base.model, base.tokenizer, list(group), fcfg)
        print(name, "fold-in s/doc", (time.time() - t) / len(group), flush=True)
        plugins = np.stack([r.plugin for r in folded])
        norms = np.linalg.norm(plugins.reshape(len(group), -1), axis=1)
        print(name, "plugin norm mean", norms.mean(), "std", norms.std(), flush=True)
        results[name] = score(base, adapter, group, plugins, name, max_q)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
