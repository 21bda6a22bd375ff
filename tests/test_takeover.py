"""Aggregation state survives its owner (DESIGN.md, failure model).

An aggregating instance is crashed while it provably holds part of a group (its entries
pending, unacknowledged); a new instance takes the partition's lease, claims the pending
entries, rebuilds the group and fires it exactly once. Runs on both transports. (Lease
expiry after a SIGKILL is covered by tests/test_redis_workers.py.)
"""

from __future__ import annotations

import asyncio

from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.toy import stages
from tests.waiting import eventually
from workers.client import follow_run, start_run
from workers.runner import RunnerConfig, StageRunner, partition_owners
from workers.runtime import Runtime, StageSelection
from workers.stagefn import StageFunction

SPEC = parse_pipeline(
    {
        "name": "takeover",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["gate"]},
            {"name": "gate", "kind": "tool", "function": "tests.toy.stages:gated", "to": ["group"]},
            {"name": "group", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"], "partitions": 2},
        ],
    }
)
CONFIG = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)


wait_until = eventually


def group_runner(transport: Transport, name: str) -> StageRunner:
    stage = SPEC.stage("group")
    return StageRunner(SPEC, "group", transport, StageFunction(SPEC, stage), instance=name,
                       config=CONFIG)


async def test_new_owner_rebuilds_group_from_pending(transport: Transport) -> None:
    upstream = Runtime(transport, [SPEC], config=CONFIG)
    await upstream.start([StageSelection("takeover", "split"), StageSelection("takeover", "gate")])
    text = "alpha beta gamma delta"
    run = "run_takeover_1"
    stages.GATES[run] = asyncio.Event()
    a = group_runner(transport, "group-a")
    stop_a = asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    try:
        await start_run(transport, SPEC, text, run=run)
        await wait_until(lambda: any(len(g.got) >= 1 for g in a._groups.values()))
        held = {k: len(g.got) for k, g in a._groups.items()}
        await a.abort()  # crash: in-flight work dropped, entries stay pending
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)

        b = group_runner(transport, "group-b")
        stop_b = asyncio.Event()
        task_b = asyncio.create_task(b.run(stop_b))
        stages.GATES[run].set()
        events = [ev async for _, ev in follow_run(transport, SPEC, run, deadline_s=30)]
        stop_b.set()
        await task_b
    finally:
        stages.GATES.pop(run, None)
        await upstream.stop()
    assert held and all(n >= 1 for n in held.values())
    result = events[-1]
    assert result["type"] == "result", result
    assert result["units"] == ["group[" + ",".join(text.split()) + "]"]
    assert [e["stage"] for e in events if e["type"] == "stage_done"][-1] == "group"
    assert b.processed == 1


async def test_partition_that_leaves_and_returns_is_rebuilt(transport: Transport) -> None:
    """Membership can flap under load (a heartbeat expires): an instance loses a partition
    while holding part of a group, then gets it back; it must rebuild the group from the
    pending entries, not skip them as 'already held'."""
    from orchestrator.routing import aggregation_key, partition_of, stage_group

    upstream = Runtime(transport, [SPEC], config=CONFIG)
    await upstream.start([StageSelection("takeover", "split"), StageSelection("takeover", "gate")])
    text = "alpha beta gamma"
    run = "run_takeover_flap"
    stages.GATES[run] = asyncio.Event()
    a = group_runner(transport, "group-a")
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop))
    part = partition_of(aggregation_key(run, ()), SPEC.stage("group").partitions)
    stream = a.streams[part]

    def wins(m: str) -> bool:
        return partition_owners(["group-a", m], SPEC.stage("group").partitions)[part] == m

    rival = next(f"rival-{i}" for i in range(1000) if wins(f"rival-{i}"))
    group = stage_group(SPEC.name, "group")
    try:
        await start_run(transport, SPEC, text, run=run)
        await wait_until(lambda: any(len(g.got) >= 1 for g in a._groups.values()))
        await transport.heartbeat(group, rival, {}, 60_000)  # the rival appears: a lets go
        await wait_until(lambda: stream not in a.owned)
        await transport.leave(group, rival)  # ...and vanishes before taking the lease
        await wait_until(lambda: stream in a.owned)
        stages.GATES[run].set()
        events = [ev async for _, ev in follow_run(transport, SPEC, run, deadline_s=30)]
    finally:
        stop.set()
        await task
        stages.GATES.pop(run, None)
        await upstream.stop()
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["units"] == ["group[" + ",".join(text.split()) + "]"]


async def test_stale_owner_cannot_write_after_losing_its_lease(transport: Transport) -> None:
    """Fencing: an owner that stalls past its lease (here: it never renews) still believes
    it owns the partition; once another owner has taken the lease, the stale owner's
    commit for the group is refused atomically and it drops the partition. The group's
    entries stay pending, and the next owner fires it exactly once."""
    from orchestrator.routing import aggregation_key, partition_of

    upstream = Runtime(transport, [SPEC], config=CONFIG)
    await upstream.start([StageSelection("takeover", "split"), StageSelection("takeover", "gate")])
    text = "alpha beta gamma delta"
    run = "run_takeover_fenced"
    stages.GATES[run] = asyncio.Event()
    stale_config = RunnerConfig(claim_idle_ms=60_000, block_ms=20, lease_ttl_ms=200,
                                heartbeat_ms=60_000)  # acquires once, then never renews
    a = StageRunner(SPEC, "group", transport, StageFunction(SPEC, SPEC.stage("group")),
                    instance="group-stale", config=stale_config)
    part = partition_of(aggregation_key(run, ()), SPEC.stage("group").partitions)
    stream, lease = a.streams[part], f"{a.group}:p{part}"
    key = f"{aggregation_key(run, ())}@group"
    stop_a = asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    try:
        await start_run(transport, SPEC, text, run=run)
        await wait_until(lambda: any(len(g.got) >= 1 for g in a._groups.values()))
        stale_token = a._tokens[stream]

        async def thief_takes_lease() -> bool:
            return await transport.acquire_fenced(lease, "thief", 60_000) is not None

        await wait_until(thief_takes_lease)  # a's lease expired; another owner holds it now
        assert stream in a.owned  # a has not noticed
        stages.GATES[run].set()  # the group completes: a fires it with its stale token
        await wait_until(lambda: stream not in a.owned)
        events_now = [ev for _, ev in await transport.read_events(run, None, 1000, 0)]
        assert not [e for e in events_now if e["type"] == "partial" and e["stage"] == "group"]
        assert (await transport.get_progress(run, [key]))[0] is None
        assert a.processed == 0 and not a._groups
        st = await transport.stats(stream, a.group)
        assert st.pending == st.length >= len(text.split())  # nothing was acknowledged
        stop_a.set()
        await task_a
        await transport.release_lease(lease, "thief")

        b = group_runner(transport, "group-b")
        stop_b = asyncio.Event()
        task_b = asyncio.create_task(b.run(stop_b))
        events = [ev async for _, ev in follow_run(transport, SPEC, run, deadline_s=30)]
        b_token = b._tokens[stream]  # (its drain hands the partition back)
        stop_b.set()
        await task_b
    finally:
        stop_a.set()
        await asyncio.gather(task_a, return_exceptions=True)
        stages.GATES.pop(run, None)
        await upstream.stop()
    assert b_token > stale_token
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["units"] == ["group[" + ",".join(text.split()) + "]"]
    assert len([e for e in events if e["type"] == "partial" and e["stage"] == "group"]) == 1
    assert b.processed == 1 and a.processed == 0


def test_partition_owners_are_balanced_and_deterministic() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.sets(st.text("abcdef", min_size=1, max_size=4), min_size=1, max_size=8),
           st.integers(1, 24))
    def check(members: set[str], partitions: int) -> None:
        owners = partition_owners(list(members), partitions)
        assert len(owners) == partitions and set(owners) <= members
        loads = [owners.count(m) for m in members]
        assert max(loads) - min(loads) <= 1  # even: floor(P/M) or ceil(P/M) each
        assert partition_owners(sorted(members, reverse=True), partitions) == owners

    check()
