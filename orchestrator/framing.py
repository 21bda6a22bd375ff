"""Framing: split a stage's streamed text into complete units as early as possible.

alto's speedup comes from routing each unit (a line, a JSON item, a sentence) to the next
stage while the LM is still writing. So a framer must (1) emit a unit the moment the text
that completes it has arrived, (2) give exactly the same units however the text was cut
into deltas, because token boundaries are arbitrary, and (3) cost O(len(delta)) per feed,
because it runs once per token: each framer keeps a small scanner state and only ever looks
at the new delta, never re-scanning or re-parsing the buffer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Protocol

KINDS = ("lines", "json_items", "sentences", "whole", "items")
TEXT_KINDS = ("lines", "json_items", "sentences", "whole")

# Words ending in "." that do not end a sentence, whatever follows (compared lower-cased,
# leading "(" etc. removed): titles and the like, which come before a capitalised name ("Dr.
# Who", "St. Louis"), and months. Not "no.": "No. It is not." is a common answer, and "No. 5"
# is kept whole by the next-word rule (_Sentences).
ABBREVIATIONS = frozenset(
    {"e.g.", "i.e.", "etc.", "cf.", "vs.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.",
     "jr.", "sr.", "fig.", "approx.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.",
     "sep.", "sept.", "oct.", "nov.", "dec."}
)
# A dotted initialism ("U.S.", "p.m.", "e.g."), compared lower-cased: never a sentence end, at
# the cost of not splitting "in the U.S. Then".
INITIALISM = re.compile(r"(?:[a-z]\.){2,}")
SENTENCE_ENDS = ".!?\u2026"
# Terminators that end a sentence only if the next word does not start with a lowercase letter
# or a digit ("3.30 p.m. on Jan. 5", "Wait... what?"); "!" and "?" end it at once.
HELD_ENDS = ".\u2026"
CLOSERS = "\"')]}\u201d\u2019\u00bb"  # may follow a terminator: `He said "stop." Then`
OPENERS = "\"'([{\u201c\u2018\u00ab"  # may precede an abbreviation: "(e.g. this)"
# A list marker at the start of a line: "- ", "* ", "+ ", "• ", "1. ", "2) " (at most 3 digits,
# so "2024. A year" is not mangled).
_LIST_MARKER = re.compile(r"(?:[-*+\u2022]|[0-9]{1,3}[.)])(?:\s+|$)")
# A number that may be an inline list's marker in a sentence ("Steps: 1. Boil water 2. Add").
_NUMBERED = re.compile(r"([0-9]{1,3})\.")


class FramingError(ValueError):
    """A stage's output cannot be cut into units under its framing, though it is not empty:
    raised from close(), so that the stage fails (the runtime reports it as a stage error)
    instead of passing on zero units, which a downstream stage reads as "nothing to do"."""


class Framer(Protocol):
    def feed(self, text: str) -> list[Any]:
        """Units completed by this delta, in order."""
        ...

    def close(self) -> list[Any]:
        """Units still pending at end of stream; [] on a second call."""
        ...


class _Base:
    """Shared close-once bookkeeping, so no framer can emit a unit twice at close."""

    _closed = False

    def feed(self, text: str) -> list[Any]:
        if self._closed:
            raise RuntimeError("feed() after close()")
        return self._feed(text) if text else []

    def close(self) -> list[Any]:
        if self._closed:
            return []
        self._closed = True
        return self._close()

    def _feed(self, text: str) -> list[Any]:
        raise NotImplementedError

    def _close(self) -> list[Any]:
        raise NotImplementedError


def _line_unit(line: str) -> str:
    line = line.strip()
    m = _LIST_MARKER.match(line)
    return line[m.end() :] if m else line


class _Lines(_Base):
    def __init__(self) -> None:
        self._parts: list[str] = []  # the current line's text from earlier deltas

    def _feed(self, text: str) -> list[Any]:
        out: list[Any] = []
        start = 0
        nl = text.find("\n")
        while nl != -1:
            self._parts.append(text[start:nl])
            unit = _line_unit("".join(self._parts))
            self._parts = []
            if unit:
                out.append(unit)
            start = nl + 1
            nl = text.find("\n", start)
        if start < len(text):
            self._parts.append(text[start:])
        return out

    def _close(self) -> list[Any]:
        unit = _line_unit("".join(self._parts))
        self._parts = []
        return [unit] if unit else []


class _Whole(_Base):
    def __init__(self) -> None:
        self._parts: list[str] = []

    def _feed(self, text: str) -> list[Any]:
        self._parts.append(text)
        return []

    def _close(self) -> list[Any]:
        unit = "".join(self._parts).strip()
        self._parts = []
        return [unit] if unit else []


_WS = re.compile(r"\s")
# A word longer than this is never an abbreviation, an initialism or a list number: the
# framer keeps only the last WORD_LIMIT + 1 characters of the current word (a bounded cost
# per feed), which is enough to tell that a word is longer.
WORD_LIMIT = 16
_NO, _END, _HELD = range(3)  # what the whitespace after a word means (_Sentences._boundary)


class _Sentences(_Base):
    """A sentence ends at a newline, or at whitespace after a word ending in a terminator
    (optionally followed by closing quotes/brackets), except that:

    - a word ending in "." is no end if it is an abbreviation ("Dr.", "Jan."), a dotted
      initialism ("U.S.", "p.m.") or a number ("1.") opening the sentence, or if it is an
      inline list's marker: "1." after a word ending in ":", or the number after the
      sentence's last marker ("Steps: 1. Boil water 2. Add salt." is one sentence); any
      other number ends it ("It cost 5. Then we left.", "Boil water 2. Add salt.");
    - a word ending in "." or "\u2026" ends the sentence only if the next word does not
      start with a lowercase letter or a digit ("3.30 p.m. on Jan. 5", "Wait... what?").

    So a "." end waits for the next non-space character (or a newline, or the close) before
    it is emitted: that one character of right context is all the rule looks at, which keeps
    the result the same however the text is cut into deltas. Not a sentence tokenizer: "in
    the U.S. Then" stays one sentence, and "J. Smith" is two."""

    def __init__(self) -> None:
        self._parts: list[str] = []  # the pending sentence's text from earlier deltas
        self._word = ""  # last WORD_LIMIT + 1 chars of the current non-space run
        self._words = 0  # complete words already in the pending sentence
        self._colon = False  # the pending sentence's last complete word ends with ":"
        self._marker = -1  # the number of its last inline list marker ("2." -> 2), if any
        self._held = False  # the last word may end the sentence: waiting for the next one

    def _boundary(self, word: str) -> int:
        """_END, _NO or _HELD (decided by the next word) for whitespace after `word`."""
        core = word.rstrip(CLOSERS)
        if not core or core[-1] not in SENTENCE_ENDS:
            return _NO
        if core[-1] not in HELD_ENDS:
            return _END
        if core[-1] == "." and len(word) <= WORD_LIMIT and self._not_an_end(core):
            return _NO
        return _HELD

    def _not_an_end(self, core: str) -> bool:
        bare = core.lstrip(OPENERS).lower()
        return (bare in ABBREVIATIONS or INITIALISM.fullmatch(bare) is not None
                or (self._words == 0 and bare[:-1].isdigit())
                or self._list_number(core) is not None)

    def _list_number(self, word: str) -> int | None:
        """The number of `word` if it is an inline list's marker here: a number opening the
        sentence, "1." after a word ending in ":", or the next number after the last marker.
        A list cannot start after any word: "It cost 5. Then" ends after "5.". An opening
        bracket or quote may precede it: "Steps: (1. Boil 2. Add.)"."""
        m = _NUMBERED.fullmatch(word.lstrip(OPENERS))
        if m is None:
            return None
        n = int(m[1])
        if (self._words == 0 or (self._colon and n == 1)
                or (self._marker >= 0 and n == self._marker + 1)):
            return n
        return None

    def _count(self, word: str) -> None:
        """`word` (complete, not an end) belongs to the pending sentence."""
        n = self._list_number(word)
        if n is not None:
            self._marker = n
        self._colon = word.endswith(":")
        self._words += 1

    def _cut(self, piece: str, out: list[Any]) -> None:
        """End the pending sentence after `piece` (the rest of it in this delta)."""
        self._parts.append(piece)
        unit = "".join(self._parts).strip()
        self._parts = []
        self._words = 0
        self._colon = False
        self._marker = -1
        self._held = False
        if unit:
            out.append(unit)

    def _resolve(self, text: str, at: int, seg: int, out: list[Any]) -> int:
        """The next word after a held end starts at text[at]: end the sentence before it,
        unless it starts lowercase or with a digit. Returns the pending sentence's start."""
        self._held = False
        if text[at].islower() or text[at].isdigit():
            # the held word (ending in "." or "\u2026", so no ":" nor a marker) belongs to
            # this sentence after all
            self._words += 1
            self._colon = False
            return seg
        self._cut(text[seg:at], out)
        return at

    def _feed(self, text: str) -> list[Any]:
        out: list[Any] = []
        seg = 0  # start of the pending sentence within this delta
        word_start = 0
        for m in _WS.finditer(text):
            j = m.start()
            if self._held and j > word_start:
                seg = self._resolve(text, word_start, seg, out)
            word = (self._word + text[word_start:j])[-(WORD_LIMIT + 1) :]
            self._word = ""
            word_start = j + 1
            if text[j] == "\n":
                verdict = _END
            elif self._held:
                continue  # more whitespace: still waiting for the next word
            else:
                verdict = self._boundary(word)
            if verdict == _END:
                self._cut(text[seg:j], out)
                seg = j + 1
            elif verdict == _HELD:
                self._held = True
            elif word:
                self._count(word)
        if self._held and word_start < len(text):
            seg = self._resolve(text, word_start, seg, out)
        if seg < len(text):
            self._parts.append(text[seg:])
        self._word = (self._word + text[word_start:])[-(WORD_LIMIT + 1) :]
        return out

    def _close(self) -> list[Any]:
        unit = "".join(self._parts).strip()
        self._parts = []
        return [unit] if unit else []


_SEEK, _OPENED, _ARRAY, _OBJECT, _DONE = range(5)
_OPEN = re.compile(r"[\[{]")
_NONBLANK = re.compile(r"\S")
# what a JSON value (or the "]" of an empty list) can start with: a "[" followed by anything
# else ("[sic]", "[see below]") is prose, not a list
_VALUE_START = frozenset('"[{-0123456789tfn')
_SIGNIFICANT = re.compile(r'[\[\]{}",\\]')


def _loads(raw: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(raw)
    except (ValueError, RecursionError):
        return False, None


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.partition("\n")[2].rstrip()
        text = text.removesuffix("```")
    return text


class _JsonItems(_Base):
    """Streams the elements of the first JSON array in the text.

    Prose before the list is skipped, and so is everything after its matching "]". A "["
    opens the list only if the first non-blank character after it can start a JSON value (or
    is the "]" of "[]"), and a list that closes with no element parsed ("[todo]", "[oops,
    {bad}]") was not one either: prose such as "I can't [sic] do it" holds no list, and the
    search for one goes on after it. If a "{" comes first, the text is taken to be one JSON
    object: it is emitted as one unit when it closes (if it does not parse, e.g. "{as
    requested}", the search goes on after it too). A string or container element is emitted
    when its closing character arrives; a scalar when the following "," or "]" does.
    Malformed or truncated elements are dropped. If nothing was emitted and no list
    closed, close() tries the whole text (optionally in a ``` fence) as one JSON value, so
    a bare scalar answer still yields a unit. If that fails too (or the text is "null": a
    model saying "nothing", which a None unit would pass on as the text "null") and no
    list is open (cut off), the output was prose where a list was asked for (a
    small model's answer): close() raises FramingError rather than yield no units, which
    would read as "the list is empty". Empty or blank output, "[]", and a list cut off
    before its first element completed yield no units, without an error.
    """

    def __init__(self) -> None:
        self._mode = _SEEK
        self._seen: list[str] | None = []  # all text, while the whole-text fallback may apply
        self._parts: list[str] = []  # current element's (or object's) text from earlier deltas
        self._depth = 0  # bracket depth; the top-level array or object is depth 1
        self._in_str = False
        self._esc = False  # the previous char was a backslash inside a string
        self._tried = False  # the element's first closed value was already offered to json
        self._emitted = False  # the current element has been emitted

    def _new_element(self) -> None:
        self._parts = []
        self._tried = False
        self._emitted = False

    def _emit(self, value: Any, out: list[Any]) -> None:
        out.append(value)
        self._emitted = True
        self._seen = None

    def _value_closed(self, text: str, start: int, end: int, out: list[Any]) -> None:
        """A string/array/object at element level just closed: if the element is just that
        value, it is complete now, without waiting for "," or "]". Only the first such value
        is tried (later ones follow it, so the element is malformed): bounded parsing."""
        if self._tried:
            return
        self._tried = True
        ok, value = _loads("".join(self._parts) + text[start:end])
        if ok:
            self._emit(value, out)

    def _element_end(self, text: str, start: int, end: int, out: list[Any]) -> None:
        if not self._emitted:
            raw = ("".join(self._parts) + text[start:end]).strip()
            if raw:
                ok, value = _loads(raw)
                if ok:
                    self._emit(value, out)
        self._new_element()

    def _object_closed(self, text: str, start: int, end: int, out: list[Any]) -> None:
        ok, value = _loads("".join(self._parts) + text[start:end])
        self._parts = []
        if ok:
            self._emit(value, out)
            self._mode = _DONE
        else:
            self._mode = _SEEK

    def _feed(self, text: str) -> list[Any]:
        if self._seen is not None:
            self._seen.append(text)
        out: list[Any] = []
        n = len(text)
        i = start = 0  # scan position; start of the current element/object in this delta
        while i < n:
            mode = self._mode
            if mode == _DONE:
                break
            if mode == _SEEK:
                m = _OPEN.search(text, i)
                if m is None:
                    break
                self._mode = _OPENED if m.group() == "[" else _OBJECT
                self._depth = 1
                self._new_element()
                start = m.end() if self._mode == _OPENED else m.start()
                i = m.end()
                continue
            if mode == _OPENED:  # is this "[" a list's? its first non-blank character says
                m = _NONBLANK.search(text, i)
                if m is None:
                    break
                if m.group() == "]":  # "[]": the list, empty
                    self._mode = _DONE
                    break
                self._mode = _ARRAY if m.group() in _VALUE_START else _SEEK
                i = m.start()
                continue
            if self._esc:
                self._esc = False
                i += 1
                continue
            m = _SIGNIFICANT.search(text, i)
            if m is None:
                break
            c = m.group()
            j = m.start()
            i = j + 1
            if self._in_str:
                if c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
                    if self._depth == 1 and mode == _ARRAY:
                        self._value_closed(text, start, i, out)
            elif c == '"':
                self._in_str = True
            elif c in "[{":
                self._depth += 1
            elif c in "]}":
                if self._depth > 1:
                    self._depth -= 1
                    if self._depth == 1 and mode == _ARRAY:
                        self._value_closed(text, start, i, out)
                elif mode == _OBJECT:
                    self._depth = 0
                    self._object_closed(text, start, i, out)
                elif c == "]":  # the top-level array ends; a stray "}" is ignored
                    self._element_end(text, start, j, out)
                    # the list if some element parsed; else prose in brackets: seek on
                    self._mode = _DONE if self._seen is None else _SEEK
            elif c == "," and self._depth == 1 and mode == _ARRAY:
                self._element_end(text, start, j, out)
                start = i
        if self._mode in (_ARRAY, _OBJECT) and not self._emitted:
            self._parts.append(text[start:])
        return out

    def _close(self) -> list[Any]:
        seen, self._seen = self._seen, None
        self._parts = []
        if self._mode == _DONE or seen is None:
            return []
        text = "".join(seen)
        ok, value = _loads(_strip_fence(text))
        if ok and value is not None:
            return [value]
        if self._mode not in (_OPENED, _ARRAY) and text.strip():
            raise FramingError(f"the output holds no JSON list (json_items framing): "
                               f"{_excerpt(text)!r}")
        return []


def _excerpt(text: str, limit: int = 80) -> str:
    """The start of `text`, for an error message: enough to see what the model wrote."""
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


_FRAMERS: dict[str, Callable[[], Framer]] = {
    "lines": _Lines,
    "json_items": _JsonItems,
    "sentences": _Sentences,
    "whole": _Whole,
}


def make_framer(kind: str) -> Framer:
    """A fresh framer for one stream. "items" frames values, not text: use frame_value()."""
    if kind == "items":
        raise ValueError("framing 'items' splits tool/reduce values, not text: use frame_value()")
    try:
        return _FRAMERS[kind]()
    except KeyError:
        raise ValueError(f"unknown framing {kind!r}; expected one of {', '.join(KINDS)}") from None


def frame_all(kind: str, text: str) -> list[Any]:
    """The units of a complete text; by construction equal to any chunked feed + close."""
    framer = make_framer(kind)
    return framer.feed(text) + framer.close()


def frame_value(kind: str, value: Any) -> list[Any]:
    """Units of a tool/reduce stage's return value. None means "no output" under every kind.
    A str is framed as text, so under json_items a str holding no JSON list (prose) raises
    FramingError, as an LM's output does."""
    if kind not in KINDS:
        raise ValueError(f"unknown framing {kind!r}; expected one of {', '.join(KINDS)}")
    if value is None:
        return []
    if kind == "items":
        return list(value) if isinstance(value, list | tuple) else [value]
    if isinstance(value, str):
        return frame_all(kind, value)
    return [value]
