"""The one prompt format shared by fit, fold-in, evaluation and the service, so every mode sees the same words."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def user_message(query: str, contexts: Sequence[str] = ()) -> str:
    """The query alone, or preceded by document texts (the `context` and `combine` modes)."""
    if not contexts:
        return query
    joined = "\n\n".join(contexts)
    return f"Context:\n{joined}\n\nQuestion: {query}"


def chat_prompt(tokenizer: PreTrainedTokenizerBase, query: str, contexts: Sequence[str] = ()) -> str:
    """The chat-template prompt, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": user_message(query, contexts)}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
