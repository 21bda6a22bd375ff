"""Taking over a dead worker's backlog: at once (its heartbeat expired, no need to wait
for `claim_idle_ms`) and in parallel (its entries were delivered once: they are retried
together, not one after another); and never a live worker's long call. The isolation of
inputs that keep crashing workers is tested with real processes in tests/test_faults.py."""

from __future__ import annotations

import asyncio

from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.toy.rendezvous import RENDEZVOUS
from tests.waiting import eventually
from workers.client import follow_run, start_run
from workers.runner import RunnerConfig, StageRunner
from workers.runtime import Runtime

SPEC = parse_pipeline(
    {"name": "recovery",
     "stages": [{"name": "work", "kind": "tool", "function": "tests.toy.rendezvous:meet"}]}
)
N = 6  # within the stage's default slots (8)
# the idle sweep would take an hour: only the dead-consumer path can recover the entries
CONFIG = RunnerConfig(claim_idle_ms=3_600_000, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)
CONFIG_SHORT = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)
# for tests that a takeover would fail: the runners share this process' loop, so a stall of
# the loop (a loaded CI machine) longer than the touch interval (claim_idle / 3) or the
# member TTL (5 heartbeats) would make the other runner take over a live call, or one
# longer than the lease TTL would move a partition still firing; these bounds (1 s, touches
# every 333 ms; the lease, which no test waits out, 1.5 s) are far above the stalls seen
# (~150-300 ms), and still short enough to wait past several times
CONFIG_LIVE = RunnerConfig(claim_idle_ms=1000, block_ms=20, lease_ttl_ms=1500, heartbeat_ms=200)


async def test_dead_workers_backlog_is_taken_over_at_once_and_in_parallel(
    transport: Transport,
) -> None:
    RENDEZVOUS.reset(target=N, patience_s=10)
    (stream,) = stage_streams(SPEC, "work")
    group = stage_group(SPEC.name, "work")
    await transport.ensure_group(stream, group)
    runs = [await start_run(transport, SPEC, f"w{i}") for i in range(N)]
    # a worker that read them and died: it never heartbeats, so it is not a member
    held = await transport.consume([stream], group, "ghost", N, 0)
    assert len(held) == N
    assert await transport.pending_consumers([stream], group) == {stream: {"ghost": N}}
    rt = Runtime(transport, [SPEC], config=CONFIG)
    await rt.start()
    try:
        last = {}
        for run in runs:
            async for _, ev in follow_run(transport, SPEC, run, deadline_s=30):
                last[run] = ev
        pending = await transport.pending_consumers([stream], group)
    finally:
        await rt.stop()
    assert [last[r]["type"] for r in runs] == ["result"] * N, last
    assert sorted(last[r]["units"][0] for r in runs) == sorted(f"met:w{i}" for i in range(N))
    assert RENDEZVOUS.calls == N  # each once: nothing re-run
    assert RENDEZVOUS.peak == N  # all together, not one after another
    assert pending == {}


HOLD = parse_pipeline(
    {"name": "long",
     "stages": [{"name": "work", "kind": "tool", "function": "tests.toy.rendezvous:hold"}]}
)


async def test_a_live_workers_long_call_is_not_taken_over(transport: Transport) -> None:
    """A call that lasts many times `claim_idle_ms` on a live worker: its runner keeps the
    entry fresh, so the other instance's idle sweeps leave it alone (before, it was claimed
    and re-run beside the original, and claimed often enough, dead-lettered)."""
    RENDEZVOUS.reset(target=1, patience_s=30)
    (stream,) = stage_streams(HOLD, "work")
    group = stage_group(HOLD.name, "work")
    rts = [Runtime(transport, [HOLD], config=CONFIG_LIVE) for _ in range(2)]  # 2 workers
    for rt in rts:
        await rt.start()
    try:
        runners = [r for rt in rts for r in rt.runners]
        assert len(runners) == 2
        run = await start_run(transport, HOLD, "slow")
        await eventually(lambda: RENDEZVOUS.active == 1, 10)
        # both instances sweep for idle entries every 500 ms; wait until each has swept
        # well past the 1 s after which an untouched entry would be claimed
        base = [r.sweeps for r in runners]
        await eventually(lambda: all(r.sweeps >= b + 6 for r, b in zip(runners, base,
                                                                        strict=True)), 20)
        held = await transport.pending(stream, group, 10)
        calls_while_held = RENDEZVOUS.calls
        RENDEZVOUS.release.set()
        events = [ev async for _, ev in follow_run(transport, HOLD, run, deadline_s=30)]
    finally:
        for rt in rts:
            await rt.stop()
    assert calls_while_held == 1  # nobody re-ran it
    assert [p.deliveries for p in held] == [1]  # nor claimed it
    assert events[-1]["type"] == "result" and events[-1]["units"] == ["held:slow"]
    assert RENDEZVOUS.calls == 1


async def test_a_draining_worker_keeps_its_calls(transport: Transport) -> None:
    """SIGTERM drain: the worker stops reading but finishes what it runs, heartbeating
    meanwhile, so the other instance does not take the call over as a dead worker's (a
    rolling update would otherwise re-run every call longer than the member TTL)."""
    RENDEZVOUS.reset(target=1, patience_s=30)
    (stream,) = stage_streams(HOLD, "work")
    group = stage_group(HOLD.name, "work")
    draining = Runtime(transport, [HOLD], config=CONFIG_LIVE)
    await draining.start()
    run = await start_run(transport, HOLD, "slow")
    await eventually(lambda: RENDEZVOUS.active == 1, 10)  # the call runs on `draining`
    other = Runtime(transport, [HOLD], config=CONFIG_LIVE)
    await other.start()
    stopping = asyncio.create_task(draining.stop(drain=True))
    try:
        (mine,) = draining.runners
        (theirs,) = other.runners
        # past the member TTL and claim_idle (1 s each), several times over
        beats, sweeps = mine.beats, theirs.sweeps
        await eventually(lambda: mine.beats >= beats + 15 and theirs.sweeps >= sweeps + 6, 20)
        members = await transport.members(group)
        held = await transport.pending(stream, group, 10)
        calls_while_draining = RENDEZVOUS.calls
        RENDEZVOUS.release.set()
        await stopping
        events = [ev async for _, ev in follow_run(transport, HOLD, run, deadline_s=30)]
    finally:
        RENDEZVOUS.release.set()
        await stopping
        await other.stop()
    assert mine.instance in members  # still a member while draining
    assert calls_while_draining == 1
    assert [(p.consumer, p.deliveries) for p in held] == [(mine.instance, 1)]
    assert events[-1]["type"] == "result" and events[-1]["units"] == ["held:slow"]
    assert RENDEZVOUS.calls == 1
    assert mine.instance not in await transport.members(group)  # left once drained


GATHER = parse_pipeline(
    {"name": "gather",
     "stages": [
         {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
          "framing": "items", "to": ["gather"]},
         {"name": "gather", "kind": "reduce", "function": "tests.toy.rendezvous:hold_all",
          "aggregate_by": ["request"], "partitions": 4},
     ]}
)


def _gather_runner(rt: Runtime) -> StageRunner:
    (runner,) = [r for r in rt.runners if r.stage.name == "gather"]
    return runner


async def test_a_draining_aggregator_hands_its_partitions_over(transport: Transport) -> None:
    """SIGTERM drain of an aggregating worker while one of its groups fires: it leaves the
    members at once, so another instance takes every other partition right away, and it
    keeps the firing group's partition until that firing ends, so the group is not fired a
    second time by the next owner; then that partition moves too."""
    RENDEZVOUS.reset(target=1, patience_s=30)
    a = Runtime(transport, [GATHER], config=CONFIG_LIVE)
    await a.start()
    b: Runtime | None = None
    stopping: asyncio.Task[None] | None = None
    try:
        run = await start_run(transport, GATHER, "x y z")
        await eventually(lambda: RENDEZVOUS.active == 1, 10)  # the group fires on a
        ga = _gather_runner(a)
        (firing,) = {g.partition for g in ga._groups.values() if g.firing}
        b = Runtime(transport, [GATHER], config=CONFIG_LIVE)
        await b.start()
        gb = _gather_runner(b)
        stopping = asyncio.create_task(a.stop(drain=True))
        others = set(gb.streams) - {firing}
        await eventually(lambda: set(gb.owned) == others, 10)  # taken while a drains
        handing_over = set(ga._handing_over)
        calls_meanwhile = RENDEZVOUS.calls
        RENDEZVOUS.release.set()
        events = [ev async for _, ev in follow_run(transport, GATHER, run, deadline_s=30)]
        await stopping
        await eventually(lambda: set(gb.owned) == set(gb.streams), 10)  # then the last one
    finally:
        RENDEZVOUS.release.set()
        if stopping is not None:
            await stopping
        else:
            await a.stop()
        if b is not None:
            await b.stop()
    assert handing_over == {firing}
    assert calls_meanwhile == 1  # the firing group was not fired again by b
    assert events[-1]["type"] == "result" and events[-1]["units"] == ["held:x,y,z"]
    assert RENDEZVOUS.calls == 1
    assert gb.processed == 0 and ga.processed >= 1
