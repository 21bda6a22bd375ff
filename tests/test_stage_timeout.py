"""A stage's `timeout_s` bounds each of its calls. A call that hangs on a live worker is
kept fresh by its worker (never taken over), and the `local` and `sim` engines and tools
have no timeout of their own, so without the bound such a call held its slot and its run
until the run's deadline. With it, the call is cancelled (an engine request aborted), the
run fails with code `stage_timeout` naming the stage, the input is dead-lettered, nothing
stays pending, and the worker goes on."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from orchestrator.spec import SpecError, parse_pipeline
from orchestrator.transport import Transport
from tests import fixtures_llama
from tests.fixtures_llama import ScriptedSSEServer, chat_chunk, start_scripted
from tests.gateway_fixtures import make_server, sdk
from tests.test_faults import pending_total
from tests.test_sim_engine import GatedSleep
from tests.toy import stages
from tests.toy.rendezvous import RENDEZVOUS
from tests.waiting import eventually
from tests.worker_procs import dead_letters
from workers.client import run_to_completion
from workers.engines.sim import SimEngine
from workers.runner import RunnerConfig, StageRunner
from workers.runtime import Runtime
from workers.stagefn import StageFunction

scripted_server = fixtures_llama.scripted_server  # a fixture of tests/fixtures_llama.py

CONFIG = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)


def _spec(stage: dict[str, Any]) -> Any:
    return parse_pipeline({
        "name": "bounded",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": [stage["name"]]},
            stage,
        ],
    })


@pytest.mark.parametrize("aggregating", [False, True], ids=["per-input", "aggregator"])
async def test_a_hung_call_fails_its_run_at_the_stage_timeout(
    transport: Transport, aggregating: bool
) -> None:
    stage: dict[str, Any] = {"name": "slow", "kind": "tool", "timeout_s": 0.2}
    if aggregating:
        stage.update(function="tests.toy.rendezvous:hold_all", aggregate_by=["request"])
    else:
        stage.update(function="tests.toy.rendezvous:hold")
    spec = _spec(stage)
    RENDEZVOUS.reset(1, 3600.0)  # `hold` waits an hour unless released
    rt = Runtime(transport, [spec], config=CONFIG)
    await rt.start()
    try:
        run, events = await run_to_completion(transport, spec, "a b", deadline_s=60)

        async def nothing_pending() -> bool:
            return await pending_total(transport, spec) == 0

        # the run fails at the first timeout; the other hung call ends at its own (held for
        # an hour otherwise): both were cancelled, nothing is left running or pending
        await eventually(lambda: RENDEZVOUS.active == 0, 10)
        await eventually(nothing_pending, 10)
        dead = await dead_letters(transport, spec.name)
        RENDEZVOUS.release.set()  # the stage works again: the same worker serves the next run
        _, after = await run_to_completion(transport, spec, "c", deadline_s=60)
    finally:
        await rt.stop()
    err = events[-1]
    assert err["type"] == "error", err
    assert err["code"] == "stage_timeout" and err["stage"] == "slow"
    assert "timeout_s=0.2" in err["message"]
    assert dead and all(d["stage"] == "slow" and d["run"] == run for d in dead)
    assert after[-1]["type"] == "result"
    assert rt.failed() is None


async def test_a_call_within_its_timeout_is_not_touched(transport: Transport) -> None:
    spec = _spec({"name": "slow", "kind": "tool", "function": "tests.toy.rendezvous:hold",
                  "timeout_s": 3600})
    RENDEZVOUS.reset(1, 3600.0)
    RENDEZVOUS.release.set()
    rt = Runtime(transport, [spec], config=CONFIG)
    await rt.start()
    try:
        _, events = await run_to_completion(transport, spec, "a b", deadline_s=60)
    finally:
        await rt.stop()
    assert events[-1]["type"] == "result"
    assert sorted(events[-1]["units"]) == ["held:a", "held:b"]


async def test_an_lm_call_past_its_timeout_aborts_the_engine_request(
    transport: Transport,
) -> None:
    """The sim engine's first step never ends (a gated clock): at `timeout_s` the request
    is aborted in the engine and the run fails, instead of holding the engine's slot."""
    spec = parse_pipeline({
        "name": "bounded_lm",
        "engines": {"default": {"kind": "sim"}},
        "stages": [{"name": "gen", "kind": "lm", "prompt": "{text}", "max_tokens": 8,
                    "timeout_s": 0.2}],
    })
    gate = GatedSleep()
    engine = SimEngine(sleep=gate)
    await engine.start()
    runner = StageRunner(spec, "gen", transport, StageFunction(spec, spec.stage("gen"), engine),
                         instance="gen-0", config=CONFIG)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        _, events = await run_to_completion(transport, spec, "hello", deadline_s=60)
        held_steps = len(gate.durations)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await gate.release(1_000)
        await engine.aclose()
    assert events[-1]["type"] == "error" and events[-1]["code"] == "stage_timeout"
    assert engine.cancelled == 1 and engine.completed == 0
    assert held_steps == 1  # it never got past the step it was held in
    assert runner.processed == 0


async def test_an_upstream_that_stops_mid_answer_is_cut_off_at_the_timeout(
    transport: Transport, scripted_server: list[ScriptedSSEServer],
) -> None:
    """The same with the OpenAI-compatible engine against a real socket: the upstream sends
    one token and then nothing (a stuck vLLM server). At `timeout_s` the connection is
    closed, which is how such a server learns to abort, and the run fails."""
    server = await start_scripted(scripted_server, [chat_chunk("Hel")], ending="hang")
    spec = parse_pipeline({
        "name": "bounded_openai",
        "engines": {"default": {"kind": "openai", "base_url": server.base_url}},
        "stages": [{"name": "gen", "kind": "lm", "prompt": "{text}", "max_tokens": 8,
                    "timeout_s": 0.3}],
    })
    rt = Runtime(transport, [spec], config=CONFIG)
    await rt.start()
    try:
        _, events = await run_to_completion(transport, spec, "hello", deadline_s=60)
        await asyncio.wait_for(server.disconnected.wait(), 10)
    finally:
        await rt.stop()
    assert events[-1]["type"] == "error" and events[-1]["code"] == "stage_timeout"
    assert len(server.requests) == 1


@pytest.mark.parametrize("bad", [0, -1, 86_401, "soon"])
def test_an_invalid_timeout_names_the_stage_and_field(bad: Any) -> None:
    with pytest.raises(SpecError) as info:
        _spec({"name": "slow", "kind": "tool", "function": "tests.toy.rendezvous:hold",
               "timeout_s": bad})
    assert "stages.slow.timeout_s" in str(info.value)


def test_the_gateway_answers_a_stage_timeout_with_504() -> None:
    """Over HTTP (a real server, the `openai` SDK): a non-streaming chat completion whose
    pipeline timed out is a 504 `timeout_error` with code `stage_timeout`, like a missed
    run deadline; streamed, the error is the stream's last event."""
    server = make_server(("hang",))
    try:
        c = sdk(server)
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="hang", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 504
        assert info.value.code == "stage_timeout" and info.value.type == "timeout_error"
        assert "timeout_s=0.2" in info.value.message and "wait" in info.value.message
        with pytest.raises(openai.APIError, match="timeout_s=0.2"):
            list(c.chat.completions.create(
                model="hang", messages=[{"role": "user", "content": "x"}], stream=True))
    finally:
        server.stop()


async def test_hung_plain_functions_keep_only_their_own_stages_threads(
    transport: Transport,
) -> None:
    """A plain function past `timeout_s` keeps its thread (it cannot be stopped). Those
    threads are the stage's own, twice its runner's slots: the loop's default pool, which
    every other plain function and the DNS lookups of engine connections use, stays free.
    The default pool here is as small as on a small machine (2 threads): on it, 10 hung
    calls left nothing for anyone else."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
    spec = _spec({"name": "slow", "kind": "tool", "function": "tests.toy.stages:block",
                  "timeout_s": 0.1, "concurrency": 2})
    stages.BLOCKED.clear()
    rt = Runtime(transport, [spec], config=CONFIG, concurrency=3)  # 3 slots win over 2
    await rt.start()
    try:
        done = await asyncio.gather(*(  # 10 runs of one input each: 10 calls that hang
            run_to_completion(transport, spec, f"w{i}", deadline_s=60) for i in range(10)))
        free = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10)
        pool = next(r for r in rt.runners if r.stage.name == "slow").function._pool
        hung = len(pool._threads) if pool is not None else 0
    finally:
        stages.BLOCKED.set()  # the hung threads return, so the process can exit
        await rt.stop()
    assert all(ev[-1]["type"] == "error" and ev[-1]["code"] == "stage_timeout"
               for _, ev in done)
    assert free == "free"
    assert hung == 6  # twice the runner's 3 slots; the calls after those waited and timed out
