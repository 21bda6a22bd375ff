"""The envelope's wire JSON (orchestrator/envelope.py): fast, and read back exactly as the
standard library would have written it, whatever the payload holds."""

from __future__ import annotations

import enum
import json
import math
import uuid
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.envelope import Envelope, dumps_json, loads_json, strict_json

json_value = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.floats(), st.integers(-(2**80), 2**80),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-5, 5), st.booleans()),
                        inner, max_size=4),
    ),
    max_leaves=15,
)


def same(a: Any, b: Any) -> bool:
    """Equality that counts NaN equal to NaN and tells 1 from 1.0 and True."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(value=json_value)
def test_wire_json_reads_back_as_the_standard_library_would(value: Any) -> None:
    stdlib = json.loads(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    assert same(loads_json(dumps_json(value)), stdlib)


@pytest.mark.parametrize("n", [
    2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**19 - 1, 10**19, 10**20, 10**25,
    -(2**63), -(2**63) - 1, -(10**18), -(10**19 - 1), -(10**19), 1795786869381995799,
])
def test_wire_json_reads_integers_at_the_64_bit_edges_exactly(n: int) -> None:
    for text in (f"{n}", f"[{n}]", f'{{"t":{n},"s":"{n}"}}', f"{n}.5", f"{n}e2"):
        want = json.loads(text)
        assert same(loads_json(text), want), text
        assert same(loads_json(text.encode()), want), text


def test_nanosecond_timestamps_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 19-digit integer (time.time_ns()) is in orjson's exact range: reading it must not
    fall back to the standard library, which is several times slower on every hop."""
    import orchestrator.envelope as envelope

    def refuse(text: Any) -> Any:
        raise AssertionError(f"standard-library path taken for {text!r}")

    monkeypatch.setattr(envelope.json, "loads", refuse)
    assert loads_json('{"h":[["s1",1795786869381995799,9999999999999999999]]}') == {
        "h": [["s1", 1795786869381995799, 9999999999999999999]]}
    text = "Paris is the capital of France (pop. 2102650, 2023). " * 100
    assert loads_json(json.dumps({"x": text, "n": -(10**17)}).encode()) == {
        "x": text, "n": -(10**17)}


@given(digits=st.text("0123456789-.e\"a ", max_size=60))
def test_wire_json_reads_any_digit_soup_as_the_standard_library(digits: str) -> None:
    """Numbers, and digit runs inside strings, of every length around the 64-bit edge."""
    for text in (digits, json.dumps(digits), f"[{digits}]"):
        try:
            want = json.loads(text)
        except ValueError:
            with pytest.raises(ValueError):
                loads_json(text)
            continue
        assert same(loads_json(text), want), text


@pytest.mark.parametrize("value", [{"a": object()}, [1, {2, 3}], {"t": (1, b"x")}])
def test_wire_json_refuses_what_the_standard_library_refuses(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        dumps_json(value)


def test_old_writers_are_still_read() -> None:
    """What the previous (standard-library) writer produced, NaN and null payload included."""
    old = json.dumps({"id": "r:a.1>b", "run": "r", "p": "p", "s": "b", "l": "a.1", "k": "unit",
                      "c": "1/4", "from": "a", "x": {"score": float("nan")},
                      "sc": {"a": "1/2"}, "ctx": {}}, separators=(",", ":"))
    e = Envelope.from_json(old)
    assert e.credit == Fraction(1, 4) and e.scope == {"a": Fraction(1, 2)}
    assert math.isnan(e.payload["score"])
    end = Envelope(run="r", pipeline="p", stage="b", lineage=(), kind="end",
                   credit=Fraction(3, 8), id="r:end.x>b")
    assert b'"x"' not in end.to_wire()  # a None payload is left out ...
    assert Envelope.from_json(end.to_wire()) == end  # ... and reads back as None
    assert Envelope.from_json(end.to_json()) == end


def test_a_lone_surrogate_is_escaped_and_reads_back() -> None:
    """A tool may return text no UTF-8 holds (a lone surrogate): the wire (and every JSON
    answer the gateway writes with it) escapes it instead of failing the commit."""
    value = {"x": "a \ud83d b", "y": ["\udcff"]}
    out = dumps_json(value)
    assert b"\\ud83d" in out and out.isascii()
    assert loads_json(out) == value
    e = Envelope(run="r", pipeline="p", stage="s", lineage=(), kind="unit",
                 credit=Fraction(1), payload=value["x"])
    assert Envelope.from_json(e.to_wire()) == e


def _nulled(v: Any) -> Any:
    """What a strict client should read: every non-finite float as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        # keys as JSON writes them: 0 -> "0", True -> "true"
        return {k if isinstance(k, str) else json.dumps(k): _nulled(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nulled(x) for x in v]
    return v


@given(json_value)
@settings(max_examples=300, deadline=None)
def test_strict_json_is_strict_and_keeps_every_finite_value(value: Any) -> None:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in strict output")

    back = json.loads(strict_json(value), parse_constant=refuse)
    assert back == _nulled(value)  # NaN != NaN, but no NaN is left to compare


class _Colour(enum.Enum):
    RED = "red"
    DEEP = {"r": 1, "tone": None}


@pytest.mark.parametrize("other", [1, None, float("nan"), 2**70])
def test_uuids_and_enums_encode_whatever_else_the_value_holds(other: Any) -> None:
    """orjson writes a UUID and an Enum; the standard library refuses both. A `null`, a NaN
    or a big integer elsewhere in the same value sends it down the standard library's path,
    so a tool's UUID used to encode or fail by what sat beside it."""
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = {"id": u, "c": [_Colour.RED, _Colour.DEEP], "other": other}
    got = loads_json(dumps_json(value))
    assert got["id"] == str(u) and got["c"] == ["red", {"r": 1, "tone": None}]
