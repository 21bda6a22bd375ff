"""What the simulated engine writes for the RAG example's `answer` stage: an extractive
answer, the passage sentences that share the most content words with the question. It
stands in for a model in tests and benchmarks (the sim engine times it like one); it reads
the real case from the same tags the prompt gives a real model."""

from __future__ import annotations

import json
import re
from typing import Any

from examples.rag.tools import content_words

MAX_SENTENCES = 3
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def _last_block(prompt: str, tag: str) -> str:
    """The text inside the last <tag>...</tag> (or after the last <tag>) of the prompt."""
    open_t, close_t = f"<{tag}>", f"</{tag}>"
    i = prompt.rfind(open_t)
    if i == -1:
        raise ValueError(f"prompt has no <{tag}> block; the sim responder and the pipeline's "
                         "prompt template disagree")
    body = prompt[i + len(open_t):]
    j = body.find(close_t)
    return (body if j == -1 else body[:j]).strip()


def answer(prompt: str, params: Any = None) -> str:
    question = content_words(_last_block(prompt, "question"))
    try:
        passages = json.loads(_last_block(prompt, "passages"))
    except json.JSONDecodeError:
        passages = []
    scored: list[tuple[int, int, str]] = []
    for p in passages if isinstance(passages, list) else []:
        if not isinstance(p, dict) or not isinstance(p.get("text"), str):
            continue
        for sentence in _SPLIT.split(p["text"]):
            hits = len(question & content_words(sentence))
            if hits:
                scored.append((-hits, len(scored), sentence.strip()))
    if not scored:
        return "The passages do not say."
    best: list[tuple[int, int, str]] = []
    seen: list[set[str]] = []
    for entry in sorted(scored):  # most question words first; a restatement adds nothing
        words = content_words(entry[2])
        if words not in seen:
            best.append(entry)
            seen.append(words)
        if len(best) == MAX_SENTENCES:
            break
    return " ".join(s for _, _, s in sorted(best, key=lambda t: t[1]))
