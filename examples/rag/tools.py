"""The RAG example's non-LM stages: `retrieve` (tool), `cite` (tool, one call per answer
sentence) and `report` (reduce, per request).

`cite` is where streaming pays: the answer is framed sentence by sentence, so each sentence
is matched to its source while the model is still writing the next one, and `report` only
has to put the pieces in order when the last one arrives.
"""

from __future__ import annotations

import json
import re
from typing import Any

from examples.factool.retrieval import get_index
from orchestrator.template import StageContext, as_text

TOP_K = 4
MIN_SUPPORT = 0.5  # share of a sentence's content words a passage must contain to be cited
_WORD = re.compile(r"[^\W_]+(?:[.,'’-][^\W_]+)*")
_STOP_TEXT = """a an the of in on at to for from by with and or but is are was were be
been being it its this that these those as into than then there their they he she his her
which who whom what when where how why do does did has have had not no yes about also
some any all most more many much such can could would should may might will shall"""
_STOP = frozenset(_STOP_TEXT.split())


def content_words(text: str) -> set[str]:
    """Lower-cased words that carry meaning: what a sentence and its source must share."""
    return {w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in _STOP}


def retrieve(value: Any, ctx: StageContext) -> list[dict[str, str]]:
    """BM25 top-k passages for the question (`top_k` in the stage's params), best first,
    as {"id", "title", "text"}: the score stays out of the prompt the answer reads."""
    question = as_text(value).strip()
    hits = get_index().search(question, int(ctx.params.get("top_k", TOP_K)))
    return [{"id": h["id"], "title": h["title"], "text": h["text"]} for h in hits]


def passages_of(ctx: StageContext) -> list[dict[str, Any]]:
    """The passages `retrieve` found for this run, from the call's context: the list it
    returned (on both transports), or a JSON text of one (a `retrieve` swapped for a
    function that returns the text)."""
    found = ctx.values.get("retrieve")
    if isinstance(found, str):
        try:
            found = json.loads(found)
        except json.JSONDecodeError:
            return []
    if not isinstance(found, list):
        return []
    return [p for p in found if isinstance(p, dict) and isinstance(p.get("text"), str)]


def cite(value: Any, ctx: StageContext) -> dict[str, Any]:
    """The passage that supports one answer sentence best, if it supports it enough:
    {"sentence", "source": {"id", "title"} or None, "support": 0..1}. `support` is the
    share of the sentence's content words found in the passage (title included); below
    `min_support` (params, default 0.5) the sentence is reported as unsupported."""
    sentence = as_text(value).strip()
    words = content_words(sentence)
    best: dict[str, Any] | None = None
    support = 0.0
    for p in passages_of(ctx):
        if not words:
            break
        share = len(words & content_words(f"{p.get('title', '')} {p['text']}")) / len(words)
        if share > support:
            best, support = p, share
    if best is None or support < float(ctx.params.get("min_support", MIN_SUPPORT)):
        return {"sentence": sentence, "source": None, "support": round(support, 3)}
    return {"sentence": sentence, "source": {"id": best.get("id"), "title": best.get("title")},
            "support": round(support, 3)}


def _marked(sentence: str, mark: str) -> str:
    """`mark` before the sentence's closing punctuation, as citations are written."""
    end = len(sentence.rstrip(".!?"))
    return f"{sentence[:end]} {mark}{sentence[end:]}"


def report(items: list[Any], ctx: StageContext) -> str:
    """The answer as the user reads it: the sentences in order, each with the number of its
    source ([n], numbered by first use), unsupported ones marked [?], then the sources."""
    numbers: dict[str, int] = {}
    titles: list[str] = []
    parts: list[str] = []
    for item in items:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                item = {"sentence": item, "source": None}
        if not isinstance(item, dict) or not as_text(item.get("sentence", "")).strip():
            continue
        sentence = as_text(item["sentence"]).strip()
        source = item.get("source")
        if isinstance(source, dict) and source.get("id") is not None:
            key = str(source["id"])
            if key not in numbers:
                numbers[key] = len(numbers) + 1
                titles.append(as_text(source.get("title") or key))
            parts.append(_marked(sentence, f"[{numbers[key]}]"))
        else:
            parts.append(_marked(sentence, "[?]"))
    if not parts:
        return "The passages found do not answer the question."
    text = " ".join(parts)
    if titles:
        text += "\n\nSources:\n" + "\n".join(f"[{n}] {t}" for n, t in enumerate(titles, 1))
    return text
