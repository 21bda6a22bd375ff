"""`max_units` and `unique`: a stage's output is bounded however its model or function
behaves. A small model caught in a loop wrote the same claim 31 times (QA: the FacTool
example then ran past its deadline, each copy costing a search and a verification)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.engine import GenParams
from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.inprocess import FAST, run_texts
from tests.test_sim_engine import GatedSleep
from tests.toy.stages import repetitive
from workers.client import run_to_completion
from workers.engines.sim import SimEngine
from workers.engines.tokens import tokenize
from workers.runner import StageRunner
from workers.runtime import Runtime
from workers.stagefn import StageFunction


def _spec(first: dict[str, Any]) -> Any:
    return parse_pipeline({
        "name": "limits",
        "engines": {"default": {"kind": "sim", "time_scale": 0.001}},
        "stages": [{**first, "name": "list", "to": ["up"]},
                   {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper",
                    "to": ["all"]},
                   {"name": "all", "kind": "reduce", "function": "tests.toy.stages:collect",
                    "aggregate_by": ["request"]}],
    })


LM = {"kind": "lm", "prompt": "{input}", "framing": "json_items", "max_tokens": 2000,
      "responder": "tests.toy.stages:repetitive"}
TOOL = {"kind": "tool", "function": "tests.toy.stages:many", "framing": "items"}


async def _run(transport: Transport, first: dict[str, Any]) -> tuple[list[Any], Runtime]:
    [events], rt = await run_texts(transport, _spec(first), "x", deadline_s=60)
    assert events[-1]["type"] == "result", events[-1]
    return [e["data"] for e in events if e["type"] == "partial" and e["stage"] == "list"], rt


@pytest.mark.parametrize(("limits", "expect"), [
    ({}, ["a is 1.", *["b is 2."] * 30, "c is 3.", "d is 4."]),
    ({"unique": True}, ["a is 1.", "b is 2.", "c is 3.", "d is 4."]),
    ({"max_units": 3}, ["a is 1.", "b is 2.", "b is 2."]),
    ({"unique": True, "max_units": 3}, ["a is 1.", "b is 2.", "c is 3."]),
])
async def test_an_lm_stage_is_bounded(transport: Transport, limits: dict[str, Any],
                                      expect: list[str]) -> None:
    units, rt = await _run(transport, {**LM, **limits})
    assert units == expect
    engine = next(iter(rt.engines.values()))
    # one request, over either way: stopped at max_units (aborted, when the engine had not
    # written the rest yet: under load it may have) or run to its end
    assert engine.cancelled + engine.completed == 1
    if "max_units" not in limits:
        assert engine.cancelled == 0


async def test_max_units_aborts_the_engine_request(transport: Transport) -> None:
    """The simulator's clock holds the step that would write the reply's last token, so
    the request cannot finish: the call ends (and its run completes) only because
    `max_units` closes the stream, and the engine must have seen that as an abort."""
    spec = parse_pipeline({"name": "aborting", "engines": {"default": {"kind": "sim"}},
                           "stages": [{**LM, "name": "list", "max_units": 3}]})
    reply = tokenize(repetitive("x", GenParams()))
    gate = GatedSleep()  # one token a step: every step but the reply's last one runs
    await gate.release(len(reply) - 1)
    engine = SimEngine(sleep=gate)
    await engine.start()
    runner = StageRunner(spec, "list", transport,
                         StageFunction(spec, spec.stage("list"), engine),
                         instance="list-0", config=FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        _, events = await run_to_completion(transport, spec, "x", deadline_s=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await gate.release(len(reply))
        await engine.aclose()
    assert events[-1]["type"] == "result", events[-1]
    assert [e["data"] for e in events if e["type"] == "partial"] == \
        ["a is 1.", "b is 2.", "b is 2."]
    assert engine.requests == 1 and engine.completed == 0 and engine.cancelled == 1
    assert engine.completion_tokens < len(reply)


@pytest.mark.parametrize(("limits", "expect"), [
    ({"unique": True}, [f"item {i}" for i in range(20)]),
    ({"max_units": 5}, ["item 0", "item 0", "item 1", "item 1", "item 2"]),
    ({"unique": True, "max_units": 5}, [f"item {i}" for i in range(5)]),
])
async def test_a_tool_stage_is_bounded(transport: Transport, limits: dict[str, Any],
                                       expect: list[str]) -> None:
    units, _ = await _run(transport, {**TOOL, **limits})
    assert units == expect


async def test_unique_compares_dicts_whatever_their_key_order(transport: Transport) -> None:
    units, _ = await _run(transport, {"kind": "tool", "function": "tests.toy.stages:reordered",
                                      "framing": "items", "unique": True})
    assert units == [{"a": 1, "b": 2}, "x", "y"]


def mixed_keys(value: Any, ctx: Any) -> list[Any]:
    """Dicts whose keys JSON writes alike: each reads back as its last "1" key's value,
    so the first two arrive equal and the third does not; equal dicts in another key
    order, at the top and nested."""
    return [{1: "a", "1": "b"}, {"1": "b"}, {"1": "b", 1: "a"},
            [{2: "x", "k": {"z": 1, "y": None}}], ({"k": {"y": None, "z": 1}, 2: "x"},)]


async def test_unique_compares_units_as_the_next_stage_reads_them(
    transport: Transport,
) -> None:
    """A unit was compared as the function wrote it: {1: "a", "1": "b"} and {"1": "b"}
    both passed, and the next stage read the same {"1": "b"} twice."""
    units, _ = await _run(transport, {"kind": "tool", "function": "tests.test_stage_limits:"
                                      "mixed_keys", "framing": "items", "unique": True})
    assert units == [{"1": "b"}, {"1": "a"}, [{"2": "x", "k": {"z": 1, "y": None}}]], units


def test_max_units_must_be_positive() -> None:
    from orchestrator.spec import SpecError

    with pytest.raises(SpecError, match=r"stages\.list\.max_units"):
        _spec({**TOOL, "max_units": 0})
