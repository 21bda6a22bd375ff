"""Error paths of the worker side (issue #7): engine errors and poison inputs go to the
dead-letter stream and fail their run with an `error` event naming the stage, while the
worker goes on; a failed run leaves nothing pending; the loop rides over a Redis restart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.spec import load_pipeline, parse_pipeline
from orchestrator.transport import Transport
from tests.toy.oracle import evaluate
from tests.waiting import eventually
from tests.worker_procs import (
    ROOT,
    RedisProc,
    WorkerPool,
    dead_letters,
    follow_restarting,
    follow_through_outages,
    wait_for_members,
)
from workers.client import follow_run, run_to_completion, start_run
from workers.redis_transport import RedisTransport
from workers.runner import RunnerConfig
from workers.runtime import Runtime

SPEC = parse_pipeline(
    {
        "name": "faults",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["check"]},
            {"name": "check", "kind": "tool", "function": "tests.toy.faulty:fail_on_bad",
             "to": ["final"]},
            {"name": "final", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"], "partitions": 2},
        ],
    }
)
CONFIG = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)


async def pending_total(t: Transport, spec: Any) -> int:
    from orchestrator.routing import stage_group, stage_streams

    n = 0
    for stage in spec.by_name:
        for s in stage_streams(spec, stage):
            n += (await t.stats(s, stage_group(spec.name, stage))).pending
    return n


async def test_engine_error_dead_letters_the_input_and_the_worker_goes_on(
    transport: Transport,
) -> None:
    rt = Runtime(transport, [SPEC], config=CONFIG)
    await rt.start()
    try:
        run, events = await run_to_completion(transport, SPEC, "good bad fine", deadline_s=30)
        _, after = await run_to_completion(transport, SPEC, "good fine", deadline_s=30)
        dead = await dead_letters(transport, SPEC.name)

        async def nothing_pending() -> bool:  # the failed run's held group is let go too
            return await pending_total(transport, SPEC) == 0

        await eventually(nothing_pending, 10)
        cancelled = await transport.is_cancelled(run)
    finally:
        await rt.stop()
    err = events[-1]
    assert err["type"] == "error", err
    assert err["stage"] == "check" and err["code"] == "stage_error"
    assert "ValueError" in err["message"]
    assert after[-1]["type"] == "result" and after[-1]["units"] == ["final[good,fine]"]
    assert len(dead) == 1
    assert dead[0]["stage"] == "check" and dead[0]["run"] == run
    assert "ValueError" in dead[0]["reason"]
    assert dead[0]["envelope"]["x"] == "bad"  # the whole input, to inspect or replay
    assert cancelled  # the rest of the failed run is stopped everywhere
    assert rt.failed() is None


# ---- real worker processes over Redis -----------------------------------------------------

POISON = ROOT / "tests" / "toy" / "poison.yaml"


@pytest.mark.redis
@pytest.mark.parametrize("max_deliveries", [2, 3])
async def test_poison_input_that_kills_its_worker_is_dead_lettered(
    redis_url: str, redis_t: RedisTransport, max_deliveries: int
) -> None:
    """The word "poison" SIGKILLs whichever worker processes it. It is claimed again after
    each crash (its delivery count growing) until it exceeds ALTO_MAX_DELIVERIES; then it
    is dead-lettered without running, the run fails naming the stage, and the (restarted)
    worker goes on serving. The words next to it may share its crashes: with 3 deliveries
    allowed, the crashed worker's entries are first retried together (the poison crashes
    them all once more), then each alone; with 2, each alone at once. Either way only
    the poison is dead-lettered."""
    spec = load_pipeline(POISON)
    pool = WorkerPool(redis_url, POISON, {"ALTO_MAX_DELIVERIES": str(max_deliveries)})
    try:
        for stage in spec.by_name:
            pool.start(stage)
        await wait_for_members(redis_t, spec, 1)
        run = await start_run(redis_t, spec, "a poison b")
        events, crashes = await follow_restarting(pool, redis_t, spec, run, "crashy")
        _, after = await run_to_completion(redis_t, spec, "x y", deadline_s=60)
        dead = await dead_letters(redis_t, spec.name)
    finally:
        pool.stop()
    err = events[-1]
    assert err["type"] == "error", err
    assert err["stage"] == "crashy" and err["code"] == "max_deliveries"
    # every delivery allowed crashed; the one past the limit never ran
    assert crashes == max_deliveries
    assert len(dead) == 1 and dead[0]["stage"] == "crashy"
    assert dead[0]["envelope"]["x"] == "poison"
    assert dead[0]["entries"][0]["deliveries"] == max_deliveries + 1
    assert after[-1]["type"] == "result" and after[-1]["units"] == ["final[x,y]"]


TOY4 = ROOT / "tests" / "toy" / "pipeline4.yaml"


@pytest.mark.redis
async def test_runs_complete_across_a_redis_restart() -> None:
    """Redis (AOF, fsync always) is killed and restarted on the same port while runs are
    in flight: workers reconnect with backoff and every run completes exactly."""
    server = RedisProc()
    server.start()
    spec = load_pipeline(TOY4)
    pool = WorkerPool(server.url, TOY4)
    t = RedisTransport(server.url)
    try:
        for stage in spec.by_name:
            pool.start(stage, 2)
        await wait_for_members(t, spec, 2)
        texts = [f"alpha beta gamma delta epsilon {i}" for i in range(8)]
        runs = [await start_run(t, spec, text) for text in texts]

        async def some_progress() -> bool:  # restart mid-run, not before or after
            evs = await t.read_events(runs[0], None, 100, 0)
            return any(ev.get("type") == "partial" for _, ev in evs)

        await eventually(some_progress, 30)
        await asyncio.to_thread(server.restart)
        results = [await follow_through_outages(t, spec, run, 60) for run in runs]
        alive = {stage: len(pool.alive(stage)) for stage in spec.by_name}
    finally:
        pool.stop()
        await t.close()
        server.stop()
    assert server.restarts == 1
    for text, events in zip(texts, results, strict=True):
        assert events[-1]["type"] == "result", events[-1]
        assert events[-1]["units"] == evaluate(spec, text)
    assert alive == {stage: 2 for stage in spec.by_name}  # no worker died of the outage


GATED = parse_pipeline(
    {
        "name": "janitor",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["gate"]},
            {"name": "gate", "kind": "tool", "function": "tests.toy.stages:gated",
             "to": ["group"]},
            {"name": "group", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"], "partitions": 1},
        ],
    }
)


async def test_janitor_trims_acknowledged_entries_and_keeps_held_ones(
    transport: Transport,
) -> None:
    """Runners trim the streams they read every `trim_interval_ms`: finished work goes,
    while an aggregator's held (unacknowledged) entries survive many trims and still
    complete their group."""
    from orchestrator.routing import stage_group, stage_streams
    from tests.toy import stages

    if isinstance(transport, RedisTransport):
        transport.approximate_trim = False  # exact, so small test streams trim at all
    config = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50,
                          trim_interval_ms=20)
    rt = Runtime(transport, [GATED], config=config)
    await rt.start()
    stream = stage_streams(GATED, "group")[0]
    group = stage_group(GATED.name, "group")
    held_run = "run_janitor_held"
    stages.GATES[held_run] = asyncio.Event()
    try:
        for _ in range(5):  # runs that pass through and are acknowledged
            _, events = await run_to_completion(transport, GATED, "solo", deadline_s=30)
            assert events[-1]["type"] == "result"
        await start_run(transport, GATED, "one two three", run=held_run)

        async def held() -> bool:  # the group holds 'one' (the others wait at the gate)
            return (await transport.stats(stream, group)).pending >= 1

        await eventually(held, 10)

        async def trimmed() -> bool:  # the 5 runs' entries (2 each) went; the held ones stay
            st = await transport.stats(stream, group)
            return st.length == st.pending

        await eventually(trimmed, 10)
        stages.GATES[held_run].set()
        events = [ev async for _, ev in follow_run(transport, GATED, held_run, deadline_s=30)]

        async def all_gone() -> bool:
            for s in GATED.by_name:
                for name in stage_streams(GATED, s):
                    if (await transport.stats(name, stage_group(GATED.name, s))).length:
                        return False
            return True

        await eventually(all_gone, 10)
    finally:
        stages.GATES[held_run].set()  # never leave a gated call behind (stop drains)
        await rt.stop()
        stages.GATES.pop(held_run, None)
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["units"] == ["group[one,two,three]"]


async def test_cancelled_run_releases_the_groups_an_aggregator_holds(
    transport: Transport,
) -> None:
    """A cancelled (abandoned, expired or failed) run never completes its groups: upstream
    stops sending. The aggregator must let go of what it holds for that run, or those
    entries stay pending forever (and pin stream trimming)."""
    from orchestrator.routing import stage_group, stage_streams
    from tests.toy import stages

    rt = Runtime(transport, [GATED], config=CONFIG)
    await rt.start()
    stream = stage_streams(GATED, "group")[0]
    group = stage_group(GATED.name, "group")
    run = "run_cancel_held"
    stages.GATES[run] = asyncio.Event()
    try:
        await start_run(transport, GATED, "one two three", run=run)

        async def pending() -> int:
            return (await transport.stats(stream, group)).pending

        async def held() -> bool:
            return await pending() >= 1

        await eventually(held, 10)
        await transport.cancel(run)

        async def released() -> bool:  # while the gate is still shut: nothing else acks it
            return await pending() == 0

        await eventually(released, 10)
        events = [ev for _, ev in await transport.read_events(run, None, 1000, 0)]
    finally:
        stages.GATES[run].set()
        await rt.stop()
        stages.GATES.pop(run, None)
    assert not [e for e in events if e.get("type") == "partial" and e.get("stage") == "group"]


@pytest.mark.redis
async def test_a_script_forgotten_between_load_and_retry_is_sent_again(redis_url: str) -> None:
    """redis-py answers NOSCRIPT by loading the script and retrying once. If Redis restarts
    between that load and the retry (a script's first use right at a restart: a worker
    died of it in the restart test above), the retry fails too; the transport's scripts try
    once more, which loads it on the server that answered. Here a real server forgets its
    scripts right after the first load, as the restart does."""
    import redis.asyncio as aioredis
    from redis.exceptions import NoScriptError

    from workers.redis_transport import _Script

    class ForgetsAfterFirstLoad(aioredis.Redis):
        loads = 0

        async def script_load(self, script: str) -> str:  # type: ignore[override]
            sha = await super().script_load(script)
            self.loads += 1
            if self.loads == 1:
                await self.script_flush()
            return str(sha)

    plain = ForgetsAfterFirstLoad.from_url(redis_url, decode_responses=True)
    ours = ForgetsAfterFirstLoad.from_url(redis_url, decode_responses=True)
    try:
        await plain.script_flush()
        with pytest.raises(NoScriptError):  # what redis-py alone does
            await plain.register_script("return ARGV[1]")(keys=[], args=["a"])
        await ours.script_flush()
        assert await _Script(ours, "return ARGV[1] .. 'b'")(keys=[], args=["a"]) == "ab"
        assert ours.loads == 2
    finally:
        await plain.aclose()
        await ours.aclose()
