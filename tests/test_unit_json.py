"""A stage's units travel as JSON. On Redis the commit encodes each unit (in its envelopes
and its event) and nothing else does: a unit JSON cannot hold fails there. The embedded
transport passes objects on, so the runner checks each unit itself. Either way the run
fails with the same OutputNotJSON message, and the call is not retried (see also
test_gateway_strict_json)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.spec import parse_pipeline
from orchestrator.template import StageContext
from orchestrator.transport import Transport
from tests.inprocess import FAST, run_texts
from workers.runner import RunnerConfig

ENCODED: list[str] = []  # one entry per encoding of a `Counted` unit
CALLS: list[str] = []  # one entry per call of a function below


class Counted(dict[str, Any]):
    """A dict that records each time the JSON encoder reads it (the standard library's
    encoder asks a dict subclass for its items; orjson hands subclasses to it)."""

    def items(self) -> Any:
        ENCODED.append("x")
        return super().items()


def counted(value: Any, ctx: StageContext) -> Any:
    return Counted(word=str(value))


def a_set_second(value: Any, ctx: StageContext) -> list[Any]:
    """Held units (a plain function's list): the second and third cannot be written."""
    CALLS.append(str(value))
    return [{"ok": 1}, {"words": {str(value)}}, b"bytes"]


def too_deep(value: Any, ctx: StageContext) -> Any:
    """Streams a unit nested deeper than the encoder can write (RecursionError)."""
    CALLS.append(str(value))
    deep: list[Any] = []
    for _ in range(50_000):
        deep = [deep]
    return _one(deep)


async def _one(unit: Any) -> Any:
    yield unit


def circular(value: Any, ctx: StageContext) -> Any:
    """Streams a list that holds itself."""
    CALLS.append(str(value))
    loop: list[Any] = [str(value)]
    loop.append(loop)
    return _one(loop)


def _message(problem: str) -> str:
    return (f"OutputNotJSON: stage 'bad' produced a unit that is not JSON ({problem}); a "
            "stage's output must be made of str, int, float, bool, None, lists and dicts "
            "with str keys")


@pytest.mark.redis
async def test_on_redis_a_unit_is_encoded_once(redis_t: Transport) -> None:
    """The commit's encoding is the check: the runner does not encode the unit first."""
    spec = parse_pipeline({"name": "once", "stages": [
        {"name": "one", "kind": "tool", "function": "tests.test_unit_json:counted"}]})
    ENCODED.clear()
    [events], _ = await run_texts(redis_t, spec, "a")
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["output"] == {"word": "a"}
    assert len(ENCODED) == 1  # in its partial event, the only place it travels


THROUGH = {"name": "bad", "kind": "tool", "to": ["up"], "retries": 2, "retry_backoff_s": 0}
FINAL = {k: v for k, v in THROUGH.items() if k != "to"}
UP = {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper"}
CASES = {
    # held units, the first bad one named; in its envelopes only (no partial events)
    "held": ([{**THROUGH, "function": "tests.test_unit_json:a_set_second",
              "framing": "items"}, UP], False,
             "Object of type set is not JSON serializable)"),
    # streamed, the output stage's unit: in its event only
    "circular": ([{**FINAL, "function": "tests.test_unit_json:circular"}], True,
                 "Circular reference detected)"),
    # (the encoder's words after these vary with the Python version)
    "too deep": ([{**THROUGH, "function": "tests.test_unit_json:too_deep"}, UP], False,
                 "maximum recursion depth exceeded while encoding a JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_unit_that_is_not_json_fails_alike_on_both_transports(
    transport: Transport, case: str
) -> None:
    stages, partial_events, problem = CASES[case]
    spec = parse_pipeline({"name": "notjson", "stages": stages})
    CALLS.clear()
    [events], _ = await run_texts(transport, spec, "a", config=RunnerConfig(
        block_ms=FAST.block_ms, heartbeat_ms=FAST.heartbeat_ms, partial_events=partial_events))
    assert events[-1]["type"] == "error" and events[-1]["stage"] == "bad", events[-1]
    assert events[-1]["message"].startswith(
        f"OutputNotJSON: stage 'bad' produced a unit that is not JSON ({problem}")
    assert events[-1]["message"].endswith(_message("").partition("()")[2])
    assert CALLS == ["a"]  # a deterministic bug: not retried


async def test_a_unit_nothing_carries_is_checked_too(transport: Transport) -> None:
    """A final stage that is not the output, without partial events: its units go nowhere
    (nothing encodes them on Redis either), and one JSON cannot hold still fails the run."""
    spec = parse_pipeline({"name": "sinks", "output": "up", "stages": [
        {"name": "split", "kind": "tool", "function": "tests.toy.stages:upper",
         "to": ["bad", "up"]},
        {"name": "bad", "kind": "tool", "function": "tests.toy.stages:not_json"},
        UP]})
    [events], _ = await run_texts(transport, spec, "a", config=RunnerConfig(
        block_ms=FAST.block_ms, heartbeat_ms=FAST.heartbeat_ms, partial_events=False))
    assert events[-1]["type"] == "error" and events[-1]["stage"] == "bad", events[-1]
    assert events[-1]["message"] == _message("Object of type set is not JSON serializable")


SEEN: list[Any] = []  # what `record` received, as the next stage reads it


KEPT: list[Any] = []  # the objects `python_objects` returned


class Attrs(dict[str, Any]):
    pass


def python_objects(value: Any, ctx: StageContext) -> Any:
    """A unit JSON holds, written with Python's own types: int keys, a tuple, a dict
    subclass; the function keeps (and later changes) the object it returned."""
    out = {1: "int key", "pair": (1, 2), "sub": Attrs(x=1)}
    KEPT.append(out)
    return out


def record(value: Any, ctx: StageContext) -> str:
    SEEN.append(value)
    KEPT[-1]["pair"] = "changed after the call"  # the upstream function's object, later
    return "ok"


async def test_the_next_stage_reads_a_unit_as_json_on_both_transports(
        transport: Transport) -> None:
    """Both transports hand the next stage what JSON reads back: on Redis the unit was
    encoded, and the embedded transport passed the Python object itself on (int keys and
    tuples arrived unchanged, and the upstream function could change it afterwards)."""
    spec = parse_pipeline({"name": "objects", "stages": [
        {"name": "make", "kind": "tool", "function": "tests.test_unit_json:python_objects",
         "to": ["read"]},
        {"name": "read", "kind": "tool", "function": "tests.test_unit_json:record"}]})
    SEEN.clear()
    [events], _ = await run_texts(transport, spec, "a")
    assert events[-1]["type"] == "result", events[-1]
    [got] = SEEN
    assert got == {"1": "int key", "pair": [1, 2], "sub": {"x": 1}}
    assert type(got["sub"]) is dict
