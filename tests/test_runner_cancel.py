"""A runner told to stop (its task cancelled) stops, even when a slot frees up in the same
loop turn. On Python 3.11, `asyncio.wait_for` returns normally in that case and the
cancellation is lost: a takeover test hung in CI that way. The runner waits with
`asyncio.timeout` instead (`workers.runner._wait_event`). And a cancelled run's LM call
ends even before the engine's first delta."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from orchestrator.engine import Engine
from orchestrator.spec import PipelineSpec, parse_pipeline
from orchestrator.transport import Transport
from tests import fixtures_llama
from tests.fixtures_llama import ScriptedSSEServer, start_scripted
from tests.test_sim_engine import GatedSleep
from tests.waiting import eventually, loop_turn
from workers.client import follow_run, start_run
from workers.engines.openai_compat import OpenAIEngine
from workers.engines.sim import SimEngine
from workers.runner import RunnerConfig, StageRunner, _wait_event
from workers.stagefn import StageFunction, running_plain_calls

scripted_server = fixtures_llama.scripted_server  # a fixture of tests/fixtures_llama.py


async def test_cancel_in_the_turn_the_event_is_set_is_not_swallowed() -> None:
    event = asyncio.Event()
    waiting = asyncio.Event()

    async def loop() -> None:  # the shape of StageRunner.run around _wait_slot
        while True:
            waiting.set()
            await _wait_event(event, 0.5)
            event.clear()

    task = asyncio.create_task(loop())
    await waiting.wait()  # it has reached its wait
    event.set()
    task.cancel()  # same turn as the event
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled()


async def test_wait_event_returns_on_set_and_on_timeout() -> None:
    event = asyncio.Event()
    event.set()
    await asyncio.wait_for(_wait_event(event, 60), 5)  # set: returns at once
    await asyncio.wait_for(_wait_event(asyncio.Event(), 0.01), 5)  # unset: times out quietly


SPEC_QUEUED = parse_pipeline({
    "name": "queued",
    "engines": {"default": {"kind": "sim"}},
    "stages": [{"name": "gen", "kind": "lm", "prompt": "{text}", "max_tokens": 8}],
})


async def _cancel_before_first_token(transport: Transport, engine: Engine,
                                     in_engine: Callable[[], Awaitable[None]]) -> StageRunner:
    """Run one input into `engine`, wait (`in_engine`) until it is there without a delta,
    cancel its run, and wait until the runner has acknowledged the input."""
    spec = SPEC_QUEUED
    runner = StageRunner(spec, "gen", transport, StageFunction(spec, spec.stage("gen"), engine),
                         instance="gen-0", config=RunnerConfig(block_ms=20, heartbeat_ms=50))
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        run = await start_run(transport, spec, "hello")
        await in_engine()
        await transport.cancel(run, 60)

        async def acknowledged() -> bool:
            return (await transport.stats(runner.streams[0], runner.group)).pending == 0

        await eventually(acknowledged, 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return runner


async def test_a_cancelled_run_frees_an_lm_call_before_its_first_token(
    transport: Transport,
) -> None:
    """A call queued in its engine (or prefilling) has produced no delta yet, so nothing
    between deltas can see a cancel. Here the sim engine's first step never ends (a gated
    clock): cancelling the run must still end the call, abort the engine request and
    acknowledge the input, instead of keeping the slot until a first token."""
    gate = GatedSleep()
    engine = SimEngine(sleep=gate)
    await engine.start()

    async def in_engine() -> None:
        await gate.wait_calls(1)  # the request is in the engine, its first step held
        assert engine.load() == 1

    try:
        runner = await _cancel_before_first_token(transport, engine, in_engine)
        held_steps = len(gate.durations)
    finally:
        await gate.release(1_000)
        await engine.aclose()
    assert engine.cancelled == 1 and engine.completed == 0  # aborted, never finished
    assert held_steps == 1  # the engine never got past the step it was held in
    assert runner.processed == 0


async def test_a_cancelled_run_drops_an_upstream_request_that_sent_no_token(
    transport: Transport, scripted_server: list[ScriptedSSEServer],
) -> None:
    """The same with the OpenAI-compatible engine: the upstream server answers 200 and then
    sends nothing (a vLLM server with a full batch, or a long prefill). The cancel closes
    the connection, which is how an OpenAI-compatible server learns to abort."""
    server = await start_scripted(scripted_server, [], ending="hang")
    engine = OpenAIEngine(base_url=server.base_url)
    await engine.start()

    async def in_engine() -> None:
        await eventually(lambda: len(server.requests) == 1, 10)

    try:
        runner = await _cancel_before_first_token(transport, engine, in_engine)
        await asyncio.wait_for(server.disconnected.wait(), 10)
    finally:
        await engine.aclose()
    assert len(server.requests) == 1 and server.requests[0]["stream"] is True
    assert runner.processed == 0


# A tool that hangs: the run's cancel must end the call (tool calls watch the flag too)
_hang: dict[str, object] = {}


async def hang_async(value: object, ctx: object) -> str:
    _hang["entered"] = True
    try:
        await asyncio.Event().wait()  # never set
    except asyncio.CancelledError:
        _hang["cancelled"] = True
        raise
    return "never"


def hang_sync(value: object, ctx: object) -> str:
    gate = _hang["gate"]
    assert isinstance(gate, threading.Event)
    _hang["entered"] = True
    gate.wait(60)  # released by the test once it has its answer
    return "late"


async def hang_between_units(value: object, ctx: object) -> AsyncIterator[str]:
    try:
        yield "first"
        _hang["entered"] = True
        await asyncio.Event().wait()
        yield "never"
    finally:
        _hang["closed"] = True


async def steady_units(value: object, ctx: object) -> AsyncIterator[str]:
    """Units without end, each at once: never caught waiting by the watcher's tick, so
    only a look between units can end it."""
    i = 0
    try:
        while True:
            await loop_turn()  # a loop turn, as a real producer's I/O would give
            yield str(i)
            i += 1
            _hang["entered"] = True
    finally:
        _hang["closed"] = True


def _tool_spec(function: str) -> PipelineSpec:
    return parse_pipeline({
        "name": "hung",
        "stages": [{"name": "tool", "kind": "tool", "function": f"tests.test_runner_cancel:{function}",
                    "concurrency": 1}],
    })


async def _cancel_while_tool_hangs(transport: Transport, spec: PipelineSpec) -> StageRunner:
    """Start a run whose tool call hangs, cancel the run once the call is in, and wait
    until the runner has acknowledged the input (no `timeout_s`: only the cancel ends it)."""
    runner = StageRunner(spec, "tool", transport, StageFunction(spec, spec.stage("tool")),
                         instance="tool-0", config=RunnerConfig(block_ms=20, heartbeat_ms=50))
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        run = await start_run(transport, spec, "hello")
        await eventually(lambda: _hang.get("entered") is True, 10)
        await transport.cancel(run, 60)

        async def acknowledged() -> bool:
            return (await transport.stats(runner.streams[0], runner.group)).pending == 0

        await eventually(acknowledged, 10)
        assert runner.processed == 0  # nothing was committed as its output
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return runner


@pytest.fixture
def hang_state() -> Iterator[dict[str, object]]:
    _hang.clear()
    _hang["gate"] = threading.Event()
    yield _hang
    gate = _hang["gate"]
    assert isinstance(gate, threading.Event)
    gate.set()


async def test_a_cancelled_run_ends_its_hung_async_tool_call(
    transport: Transport, hang_state: dict[str, object],
) -> None:
    await _cancel_while_tool_hangs(transport, _tool_spec("hang_async"))
    assert hang_state.get("cancelled") is True  # the coroutine itself was cancelled


async def test_a_cancelled_run_frees_the_slot_of_a_hung_sync_tool_call(
    transport: Transport, hang_state: dict[str, object],
) -> None:
    """A thread cannot be stopped: the call is abandoned (its thread runs on, counted),
    the input acknowledged and the stage's slot free for the next input."""
    await _cancel_while_tool_hangs(transport, _tool_spec("hang_sync"))
    assert running_plain_calls().get("tool") == 1  # still in its thread, abandoned
    gate = hang_state["gate"]
    assert isinstance(gate, threading.Event)
    gate.set()
    await eventually(lambda: "tool" not in running_plain_calls(), 10)


async def test_a_cancelled_run_ends_a_generator_tool_hung_between_units(
    transport: Transport, hang_state: dict[str, object],
) -> None:
    await _cancel_while_tool_hangs(transport, _tool_spec("hang_between_units"))
    assert hang_state.get("closed") is True  # the generator was closed, not left suspended


async def test_a_cancelled_run_ends_a_generator_tool_that_keeps_yielding(
    transport: Transport, hang_state: dict[str, object],
) -> None:
    """Its units come faster than the watcher ticks, so it is checked between units too
    (a reviewer's repro: 199 more units and 20 s after the cancel)."""
    await _cancel_while_tool_hangs(transport, _tool_spec("steady_units"))
    assert hang_state.get("closed") is True


async def raise_when_cut(value: object, ctx: object) -> str:
    """A call that fails while its cancellation unwinds it (a cleanup that raises)."""
    _hang["entered"] = True
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise ValueError("cleanup failed") from None
    return "never"


async def test_a_call_failing_as_its_run_is_cancelled_is_no_dead_letter(
    transport: Transport, hang_state: dict[str, object],
) -> None:
    """The run is over: failing it would put an input nobody waits for in the dead-letter
    queue (and alert on it). Its input is acknowledged instead."""
    from workers import deadletters

    spec = _tool_spec("raise_when_cut")
    await _cancel_while_tool_hangs(transport, spec)
    assert await deadletters.count(transport, spec.name) == 0


async def raise_when_cut_items(items: list[object], ctx: object) -> str:
    return await raise_when_cut(items, ctx)


async def test_a_reduce_failing_as_its_run_is_cancelled_is_no_dead_letter(
    transport: Transport, hang_state: dict[str, object],
) -> None:
    """The same for an aggregating stage's call (a reviewer: the group was failed and
    dead-lettered)."""
    from orchestrator.routing import stage_group, stage_streams
    from workers import deadletters
    from workers.runtime import Runtime

    spec = parse_pipeline({"name": "cutgroup", "stages": [
        {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
         "framing": "items", "to": ["agg"]},
        {"name": "agg", "kind": "reduce", "aggregate_by": ["request"],
         "function": "tests.test_runner_cancel:raise_when_cut_items"}]})
    rt = Runtime(transport, [spec], config=RunnerConfig(block_ms=20, heartbeat_ms=50))
    await rt.start()
    try:
        run = await start_run(transport, spec, "a b")
        await eventually(lambda: _hang.get("entered") is True, 10)
        await transport.cancel(run, 60)

        async def acknowledged() -> bool:
            group = stage_group(spec.name, "agg")
            stats = [await transport.stats(s, group) for s in stage_streams(spec, "agg")]
            return sum(s.pending for s in stats) == 0

        await eventually(acknowledged, 10)
    finally:
        await rt.stop()
    assert await deadletters.count(transport, spec.name) == 0


LOOKS = {"n": 0}  # looks at the cancel flag by the test's stop check


async def paced_units(value: object, ctx: object) -> AsyncIterator[str]:
    """Units until the call has looked at the cancel flag once, then one more: it ends by
    itself only if that look did not end it."""
    i = 0
    while LOOKS["n"] < 1:
        await loop_turn()  # a loop turn, as a real producer's I/O would give
        yield str(i)
        i += 1
    yield str(i)


async def test_a_bus_that_cannot_say_does_not_end_a_running_call() -> None:
    """Looking at the cancel flag can fail (Redis restarting): the call goes on, as the
    watcher's own looks do (a reviewer: the look between units ended the call, which was
    then re-run from the start)."""
    from orchestrator.template import StageContext
    from workers.stagefn import CallStats

    spec = _tool_spec("paced_units")
    LOOKS["n"] = 0

    async def stop() -> bool:
        LOOKS["n"] += 1
        raise ConnectionError("the bus is restarting")

    fn = StageFunction(spec, spec.stage("tool"))
    ctx = StageContext("r", spec.name, "tool", ())
    units = [u async for u in fn.produce(ctx, "x", None, CallStats(), stop)]
    assert units == [str(i) for i in range(len(units))] and len(units) >= 2
    assert LOOKS["n"] >= 1  # it did look, and went on to the end


CALLED: list[str] = []  # runs whose `first_blocks` call started
_RELEASE: dict[str, asyncio.Event] = {}


async def first_blocks(value: object, ctx: Any) -> str:
    CALLED.append(ctx.run)
    if value == "block":
        _hang["entered"] = True
        await _RELEASE["gate"].wait()
    return str(value)


async def test_a_queued_input_of_a_cancelled_run_never_starts(
    transport: Transport, monkeypatch: pytest.MonkeyPatch, hang_state: dict[str, object],
) -> None:
    """Inputs waiting in a stage's backlog when their run is cancelled (or times out) are
    acknowledged unrun: their calls cost and have effects, and a failing one used to be
    dead-lettered (QA). Embedded, the flag is read before every call (no round trip);
    on Redis for every entry older than BACKLOG_MS, here made 0 so the test need not age one."""
    from workers import deadletters, runner
    from workers.runtime import Runtime

    monkeypatch.setattr(runner, "BACKLOG_MS", -1)
    CALLED.clear()
    _RELEASE["gate"] = asyncio.Event()
    spec = parse_pipeline({"name": "backlog", "stages": [
        {"name": "one", "kind": "tool", "function": "tests.test_runner_cancel:first_blocks",
         "concurrency": 1}]})
    rt = Runtime(transport, [spec], config=RunnerConfig(block_ms=20, heartbeat_ms=50))
    await rt.start()
    try:
        busy = await start_run(transport, spec, "block")
        await eventually(lambda: _hang.get("entered") is True, 10)
        queued = await start_run(transport, spec, "queued")
        await transport.cancel(queued, 60)
        _RELEASE["gate"].set()
        events = [ev async for _, ev in follow_run(transport, spec, busy, deadline_s=30)]

        async def drained() -> bool:
            from orchestrator.routing import stage_group, stage_streams

            group = stage_group(spec.name, "one")
            stats = await transport.stats(stage_streams(spec, "one")[0], group)
            return stats.pending == 0 and stats.lag == 0

        await eventually(drained, 10)
    finally:
        await rt.stop()
    assert events[-1]["type"] == "result"
    assert [busy] == CALLED  # the queued run's call never started
    assert await deadletters.count(transport, spec.name) == 0


def test_only_an_entry_older_than_the_backlog_bound_counts_as_waited() -> None:
    import time as _time

    from workers.runner import BACKLOG_MS, _waited

    now = int(_time.time() * 1000)
    assert _waited(f"{now - BACKLOG_MS - 5_000}-0")
    assert not _waited(f"{now}-3")
    assert not _waited("12-0")  # the embedded transport's counter: no clock in it
