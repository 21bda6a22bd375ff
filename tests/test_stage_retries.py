"""A stage's `retries`: a failed call that has published nothing is tried again on the same
worker (after `retry_backoff_s`, doubling) before its run fails, so a tool whose service
hiccups once does not fail a whole pipeline run. A call that has published units is never
retried (a second try could continue them differently), and neither is a call of a
cancelled run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest

from orchestrator.spec import SpecError, parse_pipeline
from orchestrator.template import StageContext
from orchestrator.transport import Transport
from tests.test_faults import pending_total
from tests.toy import faulty
from tests.toy.rendezvous import RENDEZVOUS
from tests.waiting import eventually
from tests.worker_procs import dead_letters
from workers.client import run_to_completion, start_run
from workers.runner import RunnerConfig, StageRunner
from workers.runtime import Runtime
from workers.stagefn import StageFunction

CONFIG = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)


def _spec(stage: dict[str, Any], *, streaming: bool = True) -> Any:
    return parse_pipeline({
        "name": "retrying",
        "streaming": streaming,
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["call"]},
            {"name": "call", "kind": "tool", "retry_backoff_s": 0, **stage, "to": ["final"]},
            {"name": "final", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"]},
        ],
    })


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    faulty.FLAKY.clear()
    faulty.CALLS.clear()
    yield
    faulty.FLAKY.clear()
    faulty.CALLS.clear()


async def _run(transport: Transport, spec: Any, text: str) -> tuple[str, list[dict], list[str]]:
    """Run `text` through `spec`; (run id, its events, the observer events in order)."""
    seen: list[str] = []
    rt = Runtime(transport, [spec], config=CONFIG,
                 observer=lambda event, data: seen.append(event))
    await rt.start()
    try:
        run, events = await run_to_completion(transport, spec, text, deadline_s=30)
    finally:
        await rt.stop()
    return run, events, seen


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_call_that_fails_twice_succeeds_on_its_third_try(
    transport: Transport, streaming: bool
) -> None:
    faulty.FLAKY.update({"b": 2})
    spec = _spec({"function": "tests.toy.faulty:flaky", "retries": 2}, streaming=streaming)
    _, events, seen = await _run(transport, spec, "a b c")
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["units"] == ["final[a,b,c]"]
    assert faulty.CALLS == {"a": 1, "b": 3, "c": 1}
    assert seen.count("retry") == 2
    assert await dead_letters(transport, spec.name) == []


async def test_retries_run_out_and_the_run_fails_with_the_last_error(
    transport: Transport,
) -> None:
    faulty.FLAKY.update({"b": 3})
    spec = _spec({"function": "tests.toy.faulty:flaky", "retries": 2})
    run, events, _ = await _run(transport, spec, "a b")
    err = events[-1]
    assert err["type"] == "error" and err["code"] == "stage_error" and err["stage"] == "call"
    assert "ConnectionError" in err["message"]
    assert faulty.CALLS["b"] == 3  # the first try and two retries
    dead = await dead_letters(transport, spec.name)
    assert [d["run"] for d in dead] == [run]


async def test_without_retries_a_failure_fails_the_run_at_once(transport: Transport) -> None:
    faulty.FLAKY.update({"b": 1})
    _, events, _ = await _run(transport, _spec({"function": "tests.toy.faulty:flaky"}), "b")
    assert events[-1]["type"] == "error" and faulty.CALLS["b"] == 1


async def test_a_call_that_published_a_unit_is_not_retried(transport: Transport) -> None:
    spec = _spec({"function": "tests.toy.faulty:fail_after_one_unit", "framing": "items",
                  "retries": 3})
    _, events, seen = await _run(transport, spec, "a")
    assert any(e["type"] == "partial" and e["stage"] == "call" and e["data"] == "a#0"
               for e in events)  # the unit went downstream before the failure
    assert events[-1]["type"] == "error" and "mid-answer" in events[-1]["message"]
    assert faulty.CALLS["a"] == 1
    assert "retry" not in seen


async def _in_backoff(transport: Transport) -> tuple[Any, Runtime, str]:
    """A runtime whose call on "b" has failed once and now waits 30 s to retry:
    (spec, runtime, run id)."""
    faulty.FLAKY.update({"b": 99})
    spec = _spec({"function": "tests.toy.faulty:flaky", "retries": 3, "retry_backoff_s": 30})
    retrying = asyncio.Event()
    rt = Runtime(transport, [spec], config=CONFIG,
                 observer=lambda event, data: retrying.set() if event == "retry" else None)
    await rt.start()
    try:
        run = await start_run(transport, spec, "b")
        await asyncio.wait_for(retrying.wait(), 10)
    except BaseException:
        await rt.stop(drain=False)
        raise
    return spec, rt, run


async def test_a_run_cancelled_during_the_backoff_is_not_retried(transport: Transport) -> None:
    """The backoff (30 s here) watches the cancel flag: the cancelled run's input is let go
    at once, and the call is not made again for a run nobody wants."""
    spec, rt, run = await _in_backoff(transport)
    try:
        await transport.cancel(run, 60)

        async def let_go() -> bool:
            return await pending_total(transport, spec) == 0

        await eventually(let_go, 10)
    finally:
        await rt.stop()
    assert faulty.CALLS == {"b": 1}
    assert await dead_letters(transport, spec.name) == []  # cancelled, not failed


async def test_a_draining_worker_leaves_a_call_in_backoff_pending(transport: Transport) -> None:
    """SIGTERM during a retry's backoff (30 s here): the worker stops waiting at once and
    leaves the input pending for another worker, instead of outlasting its grace period."""
    spec, rt, _ = await _in_backoff(transport)
    stopped = False
    try:
        await asyncio.wait_for(rt.stop(), 10)  # the drain: bounded, not 30 s
        stopped = True
    finally:
        if not stopped:
            await rt.stop(drain=False)
    assert faulty.CALLS == {"b": 1}
    assert await pending_total(transport, spec) >= 1  # not acknowledged: someone takes it
    assert await dead_letters(transport, spec.name) == []


async def test_a_call_whose_earlier_delivery_published_is_not_retried(
    transport: Transport,
) -> None:
    """`already` > 0: an earlier delivery of this input published units (then its worker
    died). A failure now fails the call instead of re-running it after units are out."""
    faulty.FLAKY.update({"b": 1})
    spec = _spec({"function": "tests.toy.faulty:flaky", "retries": 3})
    stage = spec.stage("call")
    runner = StageRunner(spec, "call", transport, StageFunction(spec, stage),
                         instance="call-0", config=CONFIG)
    ctx = StageContext("run_x", spec.name, "call", (("split", 1),), {"input": "b"})
    with pytest.raises(ConnectionError):
        await runner._produce(
            cause="run_x:split.1>call", ctx=ctx, credit=Fraction(1, 2),
            base_lineage=(("split", 1),), scope={}, context={"input": "b"}, value="b",
            items=None, already=1, acks=[], credit_mid="credit:x")
    assert faulty.CALLS == {"b": 1}


async def test_a_timed_out_call_is_retried_then_fails_as_a_timeout(
    transport: Transport,
) -> None:
    RENDEZVOUS.reset(1, 3600.0)  # `hold` waits an hour unless released
    spec = _spec({"function": "tests.toy.rendezvous:hold", "timeout_s": 0.2, "retries": 1})
    _, events, _ = await _run(transport, spec, "a")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "stage_timeout"
    assert RENDEZVOUS.calls == 2 and RENDEZVOUS.active == 0


@pytest.mark.parametrize(("field", "bad"), [("retries", -1), ("retries", 11),
                                            ("retry_backoff_s", -0.5), ("retry_backoff_s", 61)])
def test_invalid_retry_settings_name_the_stage_and_field(field: str, bad: Any) -> None:
    with pytest.raises(SpecError) as info:
        _spec({"function": "tests.toy.faulty:flaky", field: bad})
    assert f"stages.call.{field}" in str(info.value)
