"""A tiny deterministic tokenizer for engines that need token counts without a model.

Why: the simulator (and any engine that must estimate usage or prefix-cache blocks) needs
a tokenizer that is fast, dependency-free, identical in every process, and *lossless*, so
that a stream of token deltas concatenates back to exactly the generated text.

Rule: a token is one run of word characters (`\\w+`) or one single other non-space
character, together with the whitespace in front of it; whitespace at the very end of
the text is a token of its own. So ``"Hello, world!\\n"`` becomes
``["Hello", ",", " world", "!", "\\n"]`` and ``"".join(tokenize(s)) == s`` for every ``s``.

How close to a real BPE (e.g. the Llama-3 tokenizer): for ordinary English prose it is
within roughly 10-30% (BPE splits rare and long words into several pieces, this rule never
does; BPE merges some punctuation runs, this rule never does). Long identifiers, numbers
and runs of CJK characters count as one token here but several in a BPE. Counts are an
estimate for scheduling and cache modelling, never for billing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")


def tokenize(text: str) -> list[str]:
    """Split `text` into tokens; joining them gives `text` back exactly."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Number of tokens `tokenize` would return, without building the list."""
    return sum(1 for _ in _TOKEN.finditer(text))


def detokenize(tokens: Iterable[str]) -> str:
    """Inverse of `tokenize` (tokens carry their own leading whitespace)."""
    return "".join(tokens)
