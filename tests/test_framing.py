"""Framing tests.

Why these properties: a framer sees an LM's output cut at arbitrary token boundaries, so the
units must not depend on where the cuts fall (chunking invariance), must match a plain
whole-text reading of the rules (reference implementations below), and must come out as
early as the text allows (the point of streaming), never earlier, never twice.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.framing import (
    ABBREVIATIONS,
    CLOSERS,
    HELD_ENDS,
    OPENERS,
    SENTENCE_ENDS,
    TEXT_KINDS,
    WORD_LIMIT,
    FramingError,
    frame_all,
    frame_value,
    make_framer,
)
from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.inprocess import run_texts

# ---------------------------------------------------------------- strategies and helpers

FRAGMENTS = [
    "e.g. ", "i.e.", "(e.g. ", "Mr. Smith", "3.14", " pi. ", "Next", "!", "?", ". ", ".\n",
    "\n", "\n\n", " ", "\t", "\r\n", "- ", "* ", "1. ", "2) ", "\u2022 ", "\"", "'", "\\",
    "\\\"", "[", "]", "{", "}", ",", ":", "null", "true", "42", "-7.5e3", "\"a,b]\"",
    "```json\n", "```", "\u00e9", "\u6f22\u5b57", "\U0001f600", "\u2028", "\xa0", "(", ")",
    "wait...", "etc. ", "end.", "Yes?\"", "\u3000", "\x0b", "\u201cQuoted.\u201d ", "Dr.",
    "abcdefghijklmnopqrstuvwxyz", "U.S.", "p.m. ", "Jan. 5", " on", "\u2026 x", "no. 7", "A.",
    "Steps: ", "1. Boil", " 2. Add", "3. ", " 5. Then", ":", "0. ", "(1. ", "\"2. ",
]
texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=30).map(
        "".join
    ),
)


@st.composite
def chunked(draw: st.DrawFn, text: str) -> list[str]:
    """`text` cut at random points (empty chunks allowed), or one character at a time."""
    if draw(st.booleans()):
        return list(text)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 2)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def feed_all(kind: str, chunks: list[str]) -> tuple[list[Any], list[int]]:
    """Units from feeding `chunks` then closing twice; also how many units were out after
    each chunk."""
    framer = make_framer(kind)
    units: list[Any] = []
    counts: list[int] = []
    for chunk in chunks:
        units += framer.feed(chunk)
        counts.append(len(units))
    units += framer.close()
    assert framer.close() == []
    return units, counts


def outcome(framing: Any) -> list[Any] | str:
    """`framing()`'s units, or its FramingError as text: an error is an outcome too, and
    must not depend on the chunking either."""
    try:
        return framing()
    except FramingError as exc:
        return f"FramingError: {exc}"


json_strings = st.one_of(
    st.text(max_size=12),
    st.lists(
        st.sampled_from(
            ['"', "\\", "\\\"", "[", "]", "{", "}", ",", ":", "\\u00", "\u00e9", "\U0001f600",
             "\u2028", "\n", "x", " ", "/", "\x00"]
        ),
        max_size=8,
    ).map("".join),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    json_strings,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(json_strings, inner, max_size=4)
    ),
    max_leaves=12,
)
PREFIXES = ["", "   \n", "Here are the claims:\n", "Sure! ```json\n", "Claims:\n```json\n"]
SUFFIXES = ["", "\n", "\n```", "\n```\nHope this helps [1]!", ' {"x": [2]}', "]]", ",3]"]


def self_closing(value: Any) -> bool:
    """Strings and containers end with their own closing character; scalars need "," / "]"."""
    return isinstance(value, str | list | dict)


@st.composite
def array_texts(draw: st.DrawFn) -> tuple[str, list[Any], list[int]]:
    """A JSON array in prose, built element by element so that we know the offset at which
    each element becomes complete: its last character if self-closing, else the following
    separator."""
    elements = draw(st.lists(json_values, max_size=8))
    ws = st.sampled_from(["", " ", "\n", "\n  ", "\t"])
    indent = draw(st.sampled_from([None, 0, 2, "\t"]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]))
    ensure_ascii = draw(st.booleans())
    text = draw(st.sampled_from(PREFIXES)) + "[" + draw(ws)
    complete_at: list[int] = []
    for i, element in enumerate(elements):
        text += json.dumps(element, indent=indent, separators=separators, ensure_ascii=ensure_ascii)
        if self_closing(element):
            complete_at.append(len(text) - 1)
        text += draw(ws)
        if not self_closing(element):
            complete_at.append(len(text))
        text += ("," if i < len(elements) - 1 else "]") + draw(ws)
    if not elements:
        text += "]"
    return text + draw(st.sampled_from(SUFFIXES)), elements, complete_at


def reference_lines(text: str) -> list[str]:
    units = []
    for line in text.split("\n"):
        line = re.sub(r"^(?:[-*+\u2022]|[0-9]{1,3}[.)])(?:\s+|$)", "", line.strip())
        if line:
            units.append(line)
    return units


def reference_sentences(text: str, closed: bool = True) -> list[str]:
    """Whole-text reading of the sentence rule: walk (word, following whitespace) pairs,
    looking ahead for the first character of the next word where a "." or "\u2026" end
    depends on it. With closed=False, `text` is a prefix of the stream: a decision whose
    next word has not arrived, and the pending sentence, are not units yet."""
    units, pending, words = [], "", 0
    colon, last = False, None  # previous word ends with ":"; the last list marker's number
    for m in re.finditer(r"(\S*)(\s|$)", text):
        word, space = m.groups()
        pending += word + space
        core = word.rstrip(CLOSERS)
        number = re.fullmatch(r"([0-9]{1,3})\.", word.lstrip(OPENERS))
        n = int(number[1]) if number else None
        marker = n is not None and (words == 0 or (colon and n == 1) or n - 1 == last)
        ends = bool(core) and core[-1] in SENTENCE_ENDS
        if ends and core[-1] == "." and len(word) <= WORD_LIMIT:
            bare = core.lstrip(OPENERS).lower()
            ends = (bare not in ABBREVIATIONS and not re.fullmatch(r"(?:[a-z]\.){2,}", bare)
                    and not (words == 0 and bare[:-1].isdigit()) and not marker)
        if ends and core[-1] in HELD_ENDS:
            after = re.compile(r"\S").search(text, m.end())
            ends = after is not None and not (after[0].islower() or after[0].isdigit())
        if space == "\n" or (space and ends):
            if pending.strip():
                units.append(pending.strip())
            pending, words, colon, last = "", 0, False, None
        elif word:
            words += 1
            colon = word.endswith(":")
            last = n if marker else last
    return units + ([pending.strip()] if closed and pending.strip() else [])


# ---------------------------------------------------------------- properties, all kinds


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(TEXT_KINDS), data=st.data())
def test_chunking_invariance(kind: str, data: st.DataObject) -> None:
    text = data.draw(texts)
    chunks = data.draw(chunked(text))
    assert "".join(chunks) == text
    assert outcome(lambda: feed_all(kind, chunks)[0]) == outcome(lambda: frame_all(kind, text))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_lines_match_naive_split(data: st.DataObject) -> None:
    text = data.draw(texts)
    units, _ = feed_all("lines", data.draw(chunked(text)))
    assert units == reference_lines(text)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_lines_emitted_at_each_newline(data: st.DataObject) -> None:
    text = data.draw(texts)
    chunks = data.draw(chunked(text))
    _, counts = feed_all("lines", chunks)
    fed = ""
    for chunk, count in zip(chunks, counts, strict=True):
        fed += chunk
        assert count == len(reference_lines(fed.rpartition("\n")[0]))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_sentences_match_reference(data: st.DataObject) -> None:
    text = data.draw(texts)
    units, _ = feed_all("sentences", data.draw(chunked(text)))
    assert units == reference_sentences(text)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["sentences", "whole"]), data=st.data())
def test_no_text_lost_or_duplicated(kind: str, data: st.DataObject) -> None:
    """Cutting into units only drops whitespace: the units, joined, are the text without it
    (lines also drops list markers, and json_items reads JSON, so neither is a cut)."""
    text = data.draw(texts)
    units, _ = feed_all(kind, data.draw(chunked(text)))
    assert "".join("".join(units).split()) == "".join(text.split())


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_sentences_emitted_as_soon_as_decided(data: st.DataObject) -> None:
    """A sentence comes out with the character that decides its end (the whitespace after
    "!", or the first character of the word after a "."), not later, and never before."""
    text = data.draw(texts)
    chunks = data.draw(chunked(text))
    _, counts = feed_all("sentences", chunks)
    fed = ""
    for chunk, count in zip(chunks, counts, strict=True):
        fed += chunk
        assert count == len(reference_sentences(fed, closed=False))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_whole_is_stripped_text(data: st.DataObject) -> None:
    text = data.draw(texts)
    units, counts = feed_all("whole", data.draw(chunked(text)))
    assert units == ([text.strip()] if text.strip() else [])
    assert all(c == 0 for c in counts)


# ---------------------------------------------------------------- json_items properties


@settings(max_examples=150, deadline=None)
@given(
    elements=st.lists(json_values, max_size=8),
    indent=st.sampled_from([None, 0, 1, 4, "\t"]),
    separators=st.sampled_from([None, (",", ":"), (", ", ": "), (" , ", " : ")]),
    ensure_ascii=st.booleans(),
    prefix=st.sampled_from(PREFIXES),
    suffix=st.sampled_from(SUFFIXES),
    data=st.data(),
)
def test_json_items_roundtrip(
    elements: list[Any],
    indent: int | str | None,
    separators: tuple[str, str] | None,
    ensure_ascii: bool,
    prefix: str,
    suffix: str,
    data: st.DataObject,
) -> None:
    dumped = json.dumps(elements, indent=indent, separators=separators, ensure_ascii=ensure_ascii)
    text = prefix + dumped + suffix
    units, _ = feed_all("json_items", data.draw(chunked(text)))
    assert units == elements
    assert frame_all("json_items", text) == elements


@settings(max_examples=150, deadline=None)
@given(case=array_texts(), data=st.data())
def test_json_items_emitted_as_early_as_possible(
    case: tuple[str, list[Any], list[int]], data: st.DataObject
) -> None:
    text, elements, complete_at = case
    chunks = data.draw(chunked(text))
    units, counts = feed_all("json_items", chunks)
    assert units == elements
    fed = 0
    for chunk, count in zip(chunks, counts, strict=True):
        fed += len(chunk)
        # exactly the elements whose completing character has arrived: not later, not earlier
        assert count == sum(1 for at in complete_at if at < fed)


@settings(max_examples=150, deadline=None)
@given(case=array_texts(), data=st.data())
def test_json_items_truncated_stream_yields_completed_prefix(
    case: tuple[str, list[Any], list[int]], data: st.DataObject
) -> None:
    text, elements, complete_at = case
    cut = data.draw(st.integers(0, len(text)))
    truncated = text[:cut]
    done = sum(1 for at in complete_at if at < cut)
    chunks = data.draw(chunked(truncated))
    if "[" not in truncated and truncated.strip():  # cut in the prose before the list
        with pytest.raises(FramingError, match="holds no JSON list"):
            feed_all("json_items", chunks)
        return
    units, _ = feed_all("json_items", chunks)
    assert units == elements[:done]


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.dictionaries(json_strings, json_values, max_size=4),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20).filter(lambda s: not set(s) & set("[{")),
    ),
    fenced=st.booleans(),
    data=st.data(),
)
def test_json_items_whole_value_when_not_a_list(
    value: Any, fenced: bool, data: st.DataObject
) -> None:
    text = json.dumps(value, indent=data.draw(st.sampled_from([None, 2])))
    if fenced:
        text = f"```json\n{text}\n```"
    units, _ = feed_all("json_items", data.draw(chunked(text)))
    assert units == [value]


# ---------------------------------------------------------------- examples: json_items


def test_json_truncated_keeps_completed_elements_once() -> None:
    text = '[{"a": 1}, {"b": [2, 3]}, 7, {"c": "unfinish'
    framer = make_framer("json_items")
    assert framer.feed(text) == [{"a": 1}, {"b": [2, 3]}, 7]
    assert framer.close() == []
    assert framer.close() == []


def test_json_truncated_scalar_is_dropped() -> None:
    assert frame_all("json_items", "[1, 2, 3") == [1, 2]


def test_json_no_list_at_all_is_an_error() -> None:
    """Prose where a list was asked for (a small model's answer) used to give zero units,
    which FacTool read as "no claims": the text was reported fully factual."""
    prose = "I could not find any claims. " * 5
    framer = make_framer("json_items")
    assert framer.feed(prose) == []
    with pytest.raises(FramingError) as caught:
        framer.close()
    assert str(caught.value) == (
        "the output holds no JSON list (json_items framing): " + repr(prose[:80] + "..."))
    assert framer.close() == []
    assert isinstance(caught.value, ValueError)
    for text in ("Sure, here you go {as requested}.", '{"claims": ["cut off', "```\nno\n```"):
        with pytest.raises(FramingError, match=r"no JSON list \(json_items framing\): '"):
            frame_all("json_items", text)


@pytest.mark.parametrize("text", [
    "I can't [sic] do it",  # no JSON value can start with "s"
    "I can't [ sic ] do it [see below",
    "[todo] later",  # it could have been [true]: the list closed and nothing parsed
    "Claims: [oops, {bad}] and more prose",
    "[,]",
    "- [x] done\n- [x] tested",
    "See [1 source]. {not json}",
])
def test_json_brackets_in_prose_are_no_list(text: str) -> None:
    """A "[" in prose used to open "the list", which then closed with no element: zero
    units and no error, so a downstream stage read "nothing to do"."""
    with pytest.raises(FramingError, match="holds no JSON list"):
        frame_all("json_items", text)


def test_json_the_list_after_brackets_in_prose_is_found() -> None:
    assert frame_all("json_items", 'I can\'t [sic] list: ["a", "b"] ok') == ["a", "b"]
    assert frame_all("json_items", "[todo] [1, 2]") == [1, 2]
    # the whole text is one JSON string: the fallback reads it, as it reads a scalar
    assert frame_all("json_items", '"I can\'t [sic] do it"') == ["I can't [sic] do it"]


def test_json_empty_or_broken_lists_are_no_error() -> None:
    assert frame_all("json_items", "") == []
    assert frame_all("json_items", " \n\t") == []
    assert frame_all("json_items", "None found: []. Sorry.") == []
    assert frame_all("json_items", " [ \n ] ") == []
    assert frame_all("json_items", 'Claims: ["cut off') == []
    assert frame_all("json_items", "I found none, see [1].") == [1]


def test_json_object_and_scalars_are_one_unit() -> None:
    assert frame_all("json_items", '{"claims": ["x", "y"]}') == [{"claims": ["x", "y"]}]
    assert frame_all("json_items", "Result: {\"ok\": true} done") == [{"ok": True}]
    assert frame_all("json_items", "42") == [42]
    assert frame_all("json_items", '```json\n"hi"\n```') == ["hi"]
    assert frame_all("json_items", "[null, 1]") == [None, 1]


@pytest.mark.parametrize("text", ["null", " null\n", "```json\nnull\n```"])
def test_json_null_output_is_an_error(text: str) -> None:
    """A model writing `null` where a list was asked for gave one None unit, which the next
    stage got as the text "null" (a claim "null" to verify). `[]` is the empty list."""
    with pytest.raises(FramingError, match=r"holds no JSON list \(json_items framing\): "):
        frame_all("json_items", text)
    with pytest.raises(FramingError, match="holds no JSON list"):
        frame_value("json_items", text)


def test_json_prose_braces_before_the_list_are_skipped() -> None:
    assert frame_all("json_items", "As {requested}: [1, 2]") == [1, 2]


def test_json_nested_lists_and_tricky_strings() -> None:
    text = (
        'Here are the claims:\n```json\n[[1, [2]], [], {"k": [3, {"z": "]"}]}, '
        '"a \\"q\\" [x], \\\\", "\\u00e9\\n"]\n```\nHope [this] helps'
    )
    assert frame_all("json_items", text) == [
        [1, [2]], [], {"k": [3, {"z": "]"}]}, 'a "q" [x], \\', "\u00e9\n"
    ]


def test_json_emission_points() -> None:
    framer = make_framer("json_items")
    assert framer.feed('Sure: ["a') == []
    assert framer.feed('\\"') == []  # an escaped quote does not end the string
    assert framer.feed('"') == ['a"']
    assert framer.feed(", 1") == []
    assert framer.feed("2") == []  # could still become 123
    assert framer.feed(",") == [12]
    assert framer.feed(' {"b": [1') == []
    assert framer.feed("]}") == [{"b": [1]}]
    assert framer.feed(", true") == []
    assert framer.feed("]") == [True]
    assert framer.feed(', "ignored"]') == []
    assert framer.close() == []


def test_json_trailing_comma_and_garbage_elements() -> None:
    assert frame_all("json_items", "[1, oops, 2,]") == [1, 2]
    text = '[1, }, 2, "a" "b", {"c": 1} x, 3 4, 5]'
    assert frame_all("json_items", text) == [1, 2, "a", {"c": 1}, 5]


def test_json_no_fallback_after_units_were_emitted() -> None:
    # The whole text happens to be a JSON string, but the "[" inside it already started
    # streaming elements: close() must not add the whole text as a second reading.
    assert frame_all("json_items", '"[1, 2"') == [1]


def test_json_deep_nesting_does_not_raise() -> None:
    assert frame_all("json_items", "[" + "[" * 5000 + "]" * 5000 + ", 1]") == [1]


# ---------------------------------------------------------------- examples: other kinds


def test_lines_markers_and_blanks() -> None:
    text = "- a\n* b\n1. c\n2) d\n\n  e  \n\u2022 f\n-\n2024. A year\n3.14 is pi"
    assert frame_all("lines", text) == ["a", "b", "c", "d", "e", "f", "2024. A year", "3.14 is pi"]


def test_lines_complete_at_newline() -> None:
    framer = make_framer("lines")
    assert framer.feed("- ab") == []
    assert framer.feed("c") == []
    assert framer.feed("\r\nd") == ["abc"]
    assert framer.close() == ["d"]
    assert framer.close() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.14 is pi. Next", ["3.14 is pi.", "Next"]),
        ("See e.g. this. Dr. Who is here! Really? Yes", ["See e.g. this.", "Dr. Who is here!",
                                                        "Really?", "Yes"]),
        ("1. First point. Second", ["1. First point.", "Second"]),
        ('He said "stop." Then left', ['He said "stop."', "Then left"]),
        ("Line one\nLine two", ["Line one", "Line two"]),
        ("Wait... what?  \n\n ", ["Wait... what?"]),
        ("Wait... What?  \n\n ", ["Wait...", "What?"]),
        ("(i.e. not split) here.", ["(i.e. not split) here."]),
        # a "." before a lowercase word or a number, an initialism, a month: no end
        ("He arrived at 3.30 p.m. on Jan. 5! U.S. is big.",
         ["He arrived at 3.30 p.m. on Jan. 5!", "U.S. is big."]),
        ("The U.S. capital is Washington. It is small.",
         ["The U.S. capital is Washington.", "It is small."]),
        ("It came in Sept. 2020. See No. 5 and St. Louis (vs. Paris). Done",
         ["It came in Sept. 2020.", "See No. 5 and St. Louis (vs. Paris).", "Done"]),
        ("No. It is not.", ["No.", "It is not."]),
        ('He said "stop." then left. Yes! and', ['He said "stop." then left.', "Yes!", "and"]),
        ("Wait\u2026 so. Then", ["Wait\u2026 so.", "Then"]),
        ("end.\nlower", ["end.", "lower"]),
        # an inline list's markers are no ends: "1." after a ":", then the next numbers
        ("Steps: 1. Boil water 2. Add pasta.", ["Steps: 1. Boil water 2. Add pasta."]),
        ("Steps: 1. Boil water 2. Add pasta. 3. Drain. Serve it 4. Eat",
         ["Steps: 1. Boil water 2. Add pasta. 3. Drain.", "Serve it 4.", "Eat"]),
        ("1. Boil water 2. Add pasta. Then wait", ["1. Boil water 2. Add pasta.", "Then wait"]),
        # any other number ending in "." ends the sentence: no list started, or not the next
        ("It cost 5. Then we left.", ["It cost 5.", "Then we left."]),
        ("Boil water 2. Add pasta.", ["Boil water 2.", "Add pasta."]),
        ("Note: 5. Then", ["Note: 5.", "Then"]),
        ("Steps: 1. Boil 3. Add", ["Steps: 1. Boil 3.", "Add"]),
        ("Steps:\n1. Boil 2. Add", ["Steps:", "1. Boil 2. Add"]),
        ("Steps: (1. Boil 2. Add.) Done", ["Steps: (1. Boil 2. Add.)", "Done"]),
    ],
)
def test_sentences_examples(text: str, expected: list[str]) -> None:
    assert frame_all("sentences", text) == expected


def test_sentence_needs_the_whitespace_after_the_terminator() -> None:
    framer = make_framer("sentences")
    assert framer.feed("Hello world.") == []
    assert framer.feed(" ") == []  # a "." end also waits for the next word's first character
    assert framer.feed(" P") == ["Hello world."]
    assert framer.feed("i is 3.") == []
    assert framer.feed("14") == []
    assert framer.close() == ["Pi is 3.14"]


def test_a_period_end_waits_for_the_next_word() -> None:
    framer = make_framer("sentences")
    assert framer.feed("Hi! ") == ["Hi!"]  # "!" and "?" end at the whitespace
    assert framer.feed("The U.S. capital is Washington.  ") == []
    assert framer.feed("\t") == []
    assert framer.feed("it") == []  # lowercase: not an end after all
    assert framer.feed(" is. Ok. ") == ["The U.S. capital is Washington.  \tit is."]
    assert framer.feed("\n") == ["Ok."]  # a newline ends it without the next word
    assert framer.feed("Last.  ") == []
    assert framer.close() == ["Last."]


def test_whole_examples() -> None:
    assert frame_all("whole", "  hi there \n") == ["hi there"]
    assert frame_all("whole", "") == []
    assert frame_all("whole", " \n\t") == []


def test_frame_value() -> None:
    assert frame_value("items", [1, [2], "x"]) == [1, [2], "x"]
    assert frame_value("items", (1, 2)) == [1, 2]
    assert frame_value("items", {"a": 1}) == [{"a": 1}]
    assert frame_value("items", "abc") == ["abc"]
    assert frame_value("items", None) == []
    assert frame_value("lines", "a\n- b") == ["a", "b"]
    assert frame_value("json_items", '["x", 2]') == ["x", 2]
    assert frame_value("whole", {"a": 1}) == [{"a": 1}]
    assert frame_value("sentences", None) == []
    assert frame_value("json_items", None) == []
    assert frame_value("json_items", "") == []
    with pytest.raises(FramingError, match="holds no JSON list"):
        frame_value("json_items", "no results for this query")


def test_bad_kinds_and_misuse() -> None:
    with pytest.raises(ValueError, match="frame_value"):
        make_framer("items")
    with pytest.raises(ValueError, match="unknown framing"):
        make_framer("words")
    with pytest.raises(ValueError, match="unknown framing"):
        frame_value("words", "x")
    framer = make_framer("lines")
    framer.close()
    with pytest.raises(RuntimeError):
        framer.feed("x")


# ---------------------------------------------------------------- in a run


def prose(prompt: str, params: Any) -> str:
    """A sim responder that answers in prose where a JSON list was asked for."""
    return "I checked the text carefully and it contains no factual claims at all."


def null_answer(prompt: str, params: Any) -> str:
    """A sim responder that answers `null` where a JSON list was asked for."""
    return "null"


@pytest.mark.parametrize("responder", [prose, null_answer])
async def test_a_run_whose_json_items_stage_writes_prose_fails_naming_it(
    transport: Transport, responder: Any,
) -> None:
    """The runtime closes the framer at the end of the LM call: the FramingError fails the
    run as a stage error of `claims`, where it used to finish with zero claims (FacTool
    then reported the text as fully factual)."""
    spec = parse_pipeline({
        "name": "noclaims",
        "engines": {"default": {"kind": "sim", "time_scale": 0.001}},
        "stages": [
            {"name": "claims", "kind": "lm", "prompt": "{input}", "framing": "json_items",
             "responder": f"tests.test_framing:{responder.__name__}", "to": ["check"]},
            {"name": "check", "kind": "tool", "function": "tests.toy.stages:upper",
             "to": ["report"]},
            {"name": "report", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"]},
        ],
    })
    [events], _ = await run_texts(transport, spec, "Paris is in France.", deadline_s=60)
    err = events[-1]
    assert err["type"] == "error", events
    assert err["stage"] == "claims" and err["code"] == "stage_error"
    assert err["message"] == ("FramingError: the output holds no JSON list (json_items "
                              "framing): " + repr(responder("", None)))
    assert not [e for e in events if e["type"] == "partial" and e["stage"] == "claims"]
