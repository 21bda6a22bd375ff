"""A stage's `params` reach its tool/reduce function as `ctx.params`, so one function is
configured per stage in the spec (FacTool's `search` takes its `top_k` that way). The
field used to be accepted and dropped: nothing read it. On an lm stage it is refused at
load, naming the stage and field, instead of being ignored."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.spec import SpecError, load_pipeline, parse_pipeline
from orchestrator.transport import Transport
from tests.inprocess import run_texts
from tests.toy.oracle import evaluate
from tests.worker_procs import ROOT


def _spec(times: int | None) -> Any:
    rep: dict[str, Any] = {"name": "rep", "kind": "tool", "function": "tests.toy.stages:repeat",
                           "framing": "items", "to": ["final"]}
    if times is not None:
        rep["params"] = {"times": times}
    return parse_pipeline({
        "name": "params",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["rep"]},
            rep,
            {"name": "final", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"]},
        ],
    })


@pytest.mark.parametrize("times", [None, 3])
async def test_a_tool_reads_its_stage_params(transport: Transport, times: int | None) -> None:
    spec = _spec(times)
    [events], _ = await run_texts(transport, spec, "a b")
    n = times or 1
    assert events[-1]["units"] == [f"final[{','.join(['a'] * n + ['b'] * n)}]"]
    assert events[-1]["units"] == evaluate(spec, "a b")  # the reference evaluator agrees


async def test_a_function_that_changes_its_params_changes_nothing_for_the_next_call(
    transport: Transport,
) -> None:
    spec = parse_pipeline({"name": "meddle", "stages": [
        {"name": "m", "kind": "tool", "function": "tests.toy.stages:meddle",
         "params": {"seen": []}},
    ]})
    runs, _ = await run_texts(transport, spec, "a", "b")
    outs = [events[-1]["units"] for events in runs]
    assert outs == [[["a"]], [["b"]]]  # each call saw the params as the spec wrote them
    assert spec.stage("m").params == {"seen": []}


async def test_a_function_may_set_and_return_its_params(transport: Transport) -> None:
    """They are a plain dict per call: setting a key and returning them works (they were a
    read-only mappingproxy, which failed both, against what the docs say; QA)."""
    spec = parse_pipeline({"name": "overwrite", "stages": [
        {"name": "o", "kind": "tool", "function": "tests.toy.stages:overwrite",
         "params": {"k": 1}},
    ]})
    runs, _ = await run_texts(transport, spec, "a", "b")
    outs = [events[-1] for events in runs]
    assert [o["type"] for o in outs] == ["result", "result"], outs
    assert [o["units"] for o in outs] == [[{"k": 1, "last": "a"}], [{"k": 1, "last": "b"}]]
    assert spec.stage("o").params == {"k": 1}


def test_params_on_an_lm_stage_are_refused() -> None:
    with pytest.raises(SpecError) as info:
        parse_pipeline({"name": "p", "stages": [
            {"name": "ask", "kind": "lm", "prompt": "{input}", "params": {"top_p": 0.9}}]})
    assert "stages.ask.params" in str(info.value) and "tool/reduce" in str(info.value)


def test_factool_search_takes_top_k_from_its_params() -> None:
    spec = load_pipeline(ROOT / "examples" / "factool" / "pipeline.yaml")
    assert spec.stage("search").params == {"top_k": 3}
