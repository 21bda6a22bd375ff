"""The envelope's wire JSON (orchestrator/envelope.py): fast, and read back exactly as the
standard library would have written it, whatever the payload holds."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.envelope import Envelope, dumps_json, loads_json

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
