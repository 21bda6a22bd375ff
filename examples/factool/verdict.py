"""Lenient reading of the `verify` stage's judgements.

A small LM asked for a JSON object often wraps it in prose or a code fence, uses Python
literals (True, single quotes), or writes "factuality": "false" as a string. A fact
checker that dropped such answers would misreport, so everything recoverable is recovered;
what is not becomes factuality None with the raw text kept for the user to see.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

_EMPTY = {"", "none", "n/a", "na", "null", "-"}  # what the prompt asks for when there is none
_TRUE = {"true", "yes", "correct", "supported", "1"}
_FALSE = {"false", "no", "incorrect", "refuted", "unsupported", "0"}
_FACT_RE = re.compile(r"""["']?factuality["']?\s*[:=]\s*["']?([A-Za-z01]+)""", re.IGNORECASE)


@dataclass(slots=True)
class Verdict:
    factuality: bool | None
    reasoning: str | None = None
    error: str | None = None
    correction: str | None = None
    claim: str | None = None  # only if the LM echoed the claim (not asked for)
    raw: str | None = None  # set when the judgement could not be read as an object

    @property
    def parsed(self) -> bool:
        return self.raw is None


def as_bool(value: Any) -> bool | None:
    """true/false however the LM spelled it; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().strip(".").lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip()
        return None if v.lower().strip(".") in _EMPTY else v
    return json.dumps(value, ensure_ascii=False)


_MAX_TRIES = 200  # bounds the work on long, brace-heavy text


def _objects(text: str) -> list[dict[str, Any]]:
    """JSON (or Python-literal) objects that start at some '{' in `text`, in order.

    Python literals are tried only on spans that mention factuality (the only objects we
    want), from the longest down, and at most _MAX_TRIES times in all.
    """
    found: list[dict[str, Any]] = []
    dec = json.JSONDecoder()
    tries = 0
    pos = text.find("{")
    while pos != -1 and tries < _MAX_TRIES:
        obj: Any = None
        try:
            obj, _ = dec.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            end = text.rfind("}")
            while end > pos and obj is None and tries < _MAX_TRIES:
                span = text[pos:end + 1]
                if "factuality" not in span.lower():
                    break
                tries += 1
                try:
                    obj = ast.literal_eval(span)
                except Exception:  # noqa: BLE001 - any failure means "not a literal here"
                    obj = None
                end = text.rfind("}", pos, end)
        if isinstance(obj, dict):
            found.append(obj)
        pos = text.find("{", pos + 1)
    return found


def from_mapping(obj: dict[str, Any]) -> Verdict:
    keys = {str(k).strip().lower(): v for k, v in obj.items()}
    return Verdict(
        factuality=as_bool(keys.get("factuality")),
        reasoning=_text(keys.get("reasoning")),
        error=_text(keys.get("error")),
        correction=_text(keys.get("correction")),
        claim=_text(keys.get("claim")),
    )


def parse_verdict(value: Any) -> Verdict:
    """Read one judgement: a dict, or text holding a JSON object somewhere inside."""
    if isinstance(value, dict):
        return from_mapping(value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    objs = _objects(text)
    best = next((o for o in objs if any(str(k).lower() == "factuality" for k in o)), None)
    if best is not None:
        return from_mapping(best)
    m = _FACT_RE.search(text)
    if m and as_bool(m.group(1)) is not None:
        # a truncated object (max_tokens hit) still says what it decided
        return Verdict(factuality=as_bool(m.group(1)), raw=text)
    return Verdict(factuality=None, raw=text)
