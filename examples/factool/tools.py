"""The FacTool pipeline's non-LM stages: `search` (tool) and `report` (reduce).

Both are plain functions of (value(s), StageContext) so the runtime can host them in any
worker; they keep no per-run state (the BM25 index is per process and read-only). The
runtime calls synchronous functions in a worker thread, which the index allows.
"""

from __future__ import annotations

import json
import re
from typing import Any

from examples.factool.retrieval import get_index
from examples.factool.verdict import parse_verdict
from orchestrator.template import StageContext, as_text

TOP_K = 3
_TAG = re.compile(r"</?\w+>")
# what LMs put in front of list lines: "1.", "2)", "-", "*", "•", "Query 1:"
_MARKER = re.compile(
    r"^\s*(?:(?:query|q)\s*\d*\s*[:.)-]\s*|\d{1,2}[.)]\s+|[-*•]\s+)", re.IGNORECASE
)


def clean_query(value: Any) -> str:
    """The query text of one `queries` unit, without list markers or quotes.

    A line ending in ':' ("Queries:") or a lone tag ("</queries>") is format the LM
    wrote around the queries, not a query.
    """
    text = as_text(value).strip()
    if text.endswith(":") or _TAG.fullmatch(text):
        return ""
    text = _MARKER.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def search(value: Any, ctx: StageContext) -> Any:
    """BM25 top-k passages for one query (`top_k` in the stage's params, default 3):
    [{"id", "title", "text", "score"}], best first.

    Returned as one unit (framing `whole`) so `verify` sees each query's evidence together.
    """
    query = clean_query(value)
    if not query:
        return []
    return get_index().search(query, int(ctx.params.get("top_k", TOP_K)))


def _claim_texts(ctx: StageContext, n: int) -> list[str | None]:
    """The claim each of the `n` verdicts judged, where the runtime tells us.

    A verdict is only the LM's judgement; which claim it judged is in each item's own
    context (stage `claims` on its lineage), which a request-level reduce does not share.
    Read, in order: `ctx.item_values` (one context dict per item, if the runtime provides
    it), then `ctx.values["claims"]` as a list aligned with the items. Otherwise None, and
    report() falls back to a "claim" key the LM may have added to its JSON.
    """
    per_item = getattr(ctx, "item_values", None)
    if isinstance(per_item, list | tuple) and len(per_item) == n:
        return [
            as_text(v["claims"]) if isinstance(v, dict) and v.get("claims") is not None else None
            for v in per_item
        ]
    claims = ctx.values.get("claims")
    if isinstance(claims, str):
        try:
            claims = json.loads(claims)
        except json.JSONDecodeError:
            claims = None
    if isinstance(claims, list) and len(claims) == n:
        return [as_text(c) if c is not None else None for c in claims]
    return [None] * n


def report(items: list[Any], ctx: StageContext) -> Any:
    """Claim-level and response-level factuality for one request.

    `items` are the verify judgements in lineage (= claim) order. A judgement that cannot
    be read counts as not verified: it lowers claim_level_factuality and makes the
    response non-factual, because an unchecked claim is not a checked-true one. A text
    with no claims is vacuously factual (1.0, True).
    """
    claim_texts = _claim_texts(ctx, len(items))
    out: list[dict[str, Any]] = []
    for item, claim in zip(items, claim_texts, strict=True):
        v = parse_verdict(item)
        claim = claim if claim is not None else v.claim
        entry: dict[str, Any] = {
            "claim": claim,
            "factuality": v.factuality,
            "error": v.error,
            "correction": v.correction,
            "reasoning": v.reasoning,
        }
        if v.raw is not None:
            entry["raw"] = v.raw
        out.append(entry)
    n_true = sum(1 for e in out if e["factuality"] is True)
    return {
        "claims": out,
        "response_factuality": all(e["factuality"] is True for e in out),
        "claim_level_factuality": n_true / len(out) if out else 1.0,
        "unverified": sum(1 for e in out if e["factuality"] is None),
    }
