"""Upper bound of a vocabulary-level plugin: bias the logits toward the paragraph's tokens (no training)."""

import random
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from adapters.base_model import load_base_model
from adapters.corpus import load_squad
from adapters.metrics import contained, f1
from adapters.prompts import chat_prompt

base = load_base_model()
tok = base.tokenizer
docs = [d for d in load_squad(Path("../shared/data/squad-v1.1-dev-articles-00-35.json")) if 20 <= d.article < 24]
random.Random(0).shuffle(docs)
docs = docs[:40]
common = set()
# tokens of very frequent words get no bias
for w in ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "as", "by", "with", "that", "it", "at", "from", "his", "her", "an", "be", "this", "which", "or", "are", "were", "has", "had", "their", "its"]:
    common.update(tok(" " + w, add_special_tokens=False).input_ids + tok(w, add_special_tokens=False).input_ids)


class Bias(LogitsProcessor):
    def __init__(self, ids, beta):
        self.ids, self.beta = ids, beta

    def __call__(self, input_ids, scores):
        for b, ids in enumerate(self.ids):
            scores[b, ids] += self.beta
        return scores


for beta in [float(x) for x in sys.argv[1:]]:
    for control in (False, True):
        hits, f1s = [], []
        for i, d in enumerate(docs):
            src = docs[(i + 20) % len(docs)] if control else d
            ids = sorted(set(tok(src.text, add_special_tokens=False).input_ids) - common)
            prompts = [chat_prompt(tok, qa.question) for qa in d.questions]
            tok.padding_side = "left"
            batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = base.model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                                          logits_processor=LogitsProcessorList([Bias([ids] * len(prompts), beta)]))
            texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for t, qa in zip(texts, d.questions):
                hits.append(contained(t, qa.answers)); f1s.append(f1(t, qa.answers))
        print(f"beta {beta} {'wrong' if control else 'own'}: contained {np.mean(hits):.3f} f1 {np.mean(f1s):.3f} n {len(hits)}", flush=True)
