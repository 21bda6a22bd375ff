"""Prompt templates and the context a tool/reduce function receives.

Templates use `{name}` placeholders for: `input` (the run's input), `text` (the unit
this stage is processing), `items` (for an aggregating stage: its units, one per line,
in lineage order) and any upstream stage's name (the text of that stage's unit on this
message's lineage). Anything else in braces is left as written, so prompts can contain
JSON examples without escaping. A placeholder's name in double braces, `{{input}}`, is
written as `{input}`: the way to show a placeholder itself to the model. A name between
longer runs of braces, `{{{input}}}`, is left as written: it is ambiguous (Python's format
reads it as the value in braces, Mustache as the value unescaped, and it holds the escape
`{{input}}`), so the spec refuses it around a placeholder's name (`ambiguous`). One brace
on either side is a placeholder with braces around it: `{"a": {"b": {input}}}`. A
placeholder has no blanks inside its braces: `{ input }` is text (the lint warns about it).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.envelope import Lineage

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
# a name with the whole runs of braces around it, read by `_kind`: so that `{{input}}` is one
# escape and not `{` + `{input}` + `}`, and `{{{input}}}` is seen whole
_BRACED = re.compile(rf"(\{{+)({_NAME})(\}}+)")
_PLACEHOLDER, _ESCAPE, _AMBIGUOUS = range(3)
BUILTIN_VARS = frozenset({"input", "text", "items"})


# Format characters (category Cf) that are drawn: the prepended concatenation marks (Unicode
# property Prepended_Concatenation_Mark), signs written over or before the digits that follow,
# and visible alone ("\u06dd" is the end-of-ayah ornament).
_VISIBLE_FORMAT = frozenset("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891"
                            "\u08e2\U000110bd\U000110cd")
# Invisible characters outside Cf: the Hangul fillers (letters, Default_Ignorable_Code_Point),
# the Braille blank (a symbol, drawn as nothing; a favourite "empty" message), the combining
# grapheme joiner, the Khmer inherent vowels and the variation selectors (nonspacing marks,
# Default_Ignorable_Code_Point, with nothing to select alone).
_INVISIBLE = frozenset(
    "\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5\u180b\u180c\u180d\u180f"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def is_blank(text: str) -> bool:
    """No visible character: whitespace, invisible format characters (zero-width space and
    joiners, a byte-order mark: Unicode category Cf, which `str.strip` keeps, but not the
    prepended concatenation marks, which are drawn) and invisible fillers of other
    categories (Hangul fillers, the Braille blank, variation selectors)."""
    return all(c.isspace() or c in _INVISIBLE
               or (unicodedata.category(c) == "Cf" and c not in _VISIBLE_FORMAT) for c in text)
# a name alone in braces with blanks inside: `{ input }` is not a placeholder (render
# leaves it as written), though it looks like one, and like Jinja's `{{ input }}`; the
# whole runs of braces, so that the lint can quote the text as the prompt has it
_SPACED = re.compile(rf"(\{{+)(\s*)({_NAME})(\s*)(\}}+)")


def _kind(m: re.Match[str]) -> int:
    """One brace on a side: a placeholder (the other side's extra braces are text); two on
    each: an escape; two or more on each, three or more on one: ambiguous."""
    opened, closed = len(m.group(1)), len(m.group(3))
    if min(opened, closed) == 1:
        return _PLACEHOLDER
    return _ESCAPE if opened == closed == 2 else _AMBIGUOUS


def ambiguous(template: str) -> list[tuple[str, str]]:
    """(written text, name) of each name between runs of braces that are neither a
    placeholder nor an escape, such as `{{{input}}}`, in order: `render` leaves them as
    written, and the spec refuses them around a placeholder's name."""
    return [(m.group(0), m.group(2)) for m in _BRACED.finditer(template)
            if _kind(m) == _AMBIGUOUS]


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def variables(template: str) -> list[str]:
    """The placeholders of `template`, in order (escaped ones are text, not placeholders)."""
    return [m.group(2) for m in _BRACED.finditer(template) if _kind(m) == _PLACEHOLDER]


def spaced_names(template: str) -> list[tuple[str, str]]:
    """(written text, name) of each name written as `{ name }` (blanks inside the braces),
    in order: text to `render`, which the lint points out, since such a name is rarely
    meant to reach the model as is. The text is quoted as written, braces as many as
    match on both sides (`{{ input }}` is Jinja's, and the warning said `{ input }`, which
    the prompt did not have; in `{"a": { input }}` the last brace is the JSON's), blanks
    as spaces (a warning is one line)."""
    out = []
    for m in _SPACED.finditer(template):
        if m.group(2) or m.group(4):
            n = min(len(m.group(1)), len(m.group(5)))
            inner = re.sub(r"\s", " ", m.group(2) + m.group(3) + m.group(4))
            out.append(("{" * n + inner + "}" * n, m.group(3)))
    return out


def render(template: str, values: dict[str, Any]) -> str:
    def sub(m: re.Match[str]) -> str:
        kind, name = _kind(m), m.group(2)
        if kind == _ESCAPE:
            return "{" + name + "}"
        if kind == _AMBIGUOUS or name not in values:
            return m.group(0)
        return m.group(1)[1:] + as_text(values[name]) + m.group(3)[1:]

    return _BRACED.sub(sub, template)


@dataclass(slots=True)
class StageContext:
    """What a tool or reduce function may know about the call besides its input."""

    run: str
    pipeline: str
    stage: str
    lineage: Lineage
    values: dict[str, Any] = field(default_factory=dict)  # input + upstream unit texts
    # for an aggregating stage: the upstream values of each item, in item order (a reducer
    # may need to know which claim a verdict was about)
    item_values: list[dict[str, Any]] = field(default_factory=list)
    # the stage's `params` from the spec, a copy per call: one function, configured per stage
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> str:
        return self.values.get("input", "")
